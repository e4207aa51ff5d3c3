"""Ctrl-C that Python cannot lose.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Where that is a finalizer
(a ``weakref`` callback, a ``__del__``: tensors and data loaders run them all the time), Python prints
``Exception ignored ... KeyboardInterrupt`` through ``sys.unraisablehook`` and goes on: run_bench then finished
every run and exited 0 (about 2 in 10 interrupts in user test 11). Inside ``remembered()`` that hook also
records such a dropped interrupt, and ``check()`` raises it again at the next safe point (every run, batch,
training step and calibrated value, and run_bench's end), so it stops the work there: the run in progress is
marked interrupted, exit 130. An interrupt that was raised and handled (``--wait``'s "stopped waiting") is not
recorded: only the dropped ones are.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

_pending = False


@contextmanager
def remembered() -> Iterator[None]:
    """Record every ``KeyboardInterrupt`` Python drops while the body runs (then report it as before)."""
    global _pending
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        global _pending
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _pending = True
        previous(unraisable)

    _pending = False
    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        _pending = False


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Python dropped one since the last check."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt
