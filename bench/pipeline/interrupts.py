"""Ctrl-C that Python cannot lose.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Where that is a finalizer
(a ``weakref`` callback, a ``__del__``: tensors and data loaders run them all the time), Python prints
``Exception ignored ... KeyboardInterrupt`` and goes on: run_bench then finished every run and exited 0
(about 2 in 10 interrupts in user test 11). Inside ``remembered()`` the handler also records the interrupt,
and ``check()`` raises it again at the next safe point (every run, batch, training step and calibrated
cell), so a lost one stops the work there: the run in progress is marked interrupted, exit 130.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_pending = False


def _handler(signum, frame) -> None:
    global _pending
    _pending = True
    raise KeyboardInterrupt


@contextmanager
def remembered() -> Iterator[None]:
    """Record every Ctrl-C of the body (main thread, Python's default handler in place; else nothing)."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pending = False
    previous = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending = False


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a Ctrl-C arrived since the last check (even one Python dropped)."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt
