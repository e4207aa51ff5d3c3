"""Ctrl-C that Python cannot lose, and SIGTERM that stops run_bench as a Ctrl-C does.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Where that is a finalizer
(a ``weakref`` callback, a ``__del__``: tensors and data loaders run them all the time), Python prints
``Exception ignored ... KeyboardInterrupt`` through ``sys.unraisablehook`` and goes on: run_bench then finished
every run and exited 0 (about 2 in 10 interrupts in user test 11). Inside ``remembered()`` that hook also
records such a dropped interrupt, and ``check()`` raises it again at the next safe point (every run, batch,
training step and calibrated value, and run_bench's end), so it stops the work there: the run in progress is
marked interrupted, exit 130. An interrupt that was raised and handled (``--wait``'s "stopped waiting") is not
recorded: only the dropped ones are.

SIGTERM (``kill``, ``timeout``, the end of a SLURM allocation that runs run_bench itself) killed run_bench at
once: no note, its run ``todo`` under ``--status`` and its claim left to a later invocation. Inside
``remembered()`` it raises ``Terminated``, a ``KeyboardInterrupt``: every path of a Ctrl-C (the run marked
interrupted, its claim released, a local job stopped, one line) with exit 143. Only in run_bench's own main
thread, and only where SIGTERM is at its default: a submitit job (local or SLURM) never calls run_bench's
``main``, and submitit's own handler there (SIGTERM logged and bypassed, so that a preempted job is requeued
through USR2) is never replaced. Forked children (DataLoader workers) keep SIGTERM's default meaning.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

_pending: KeyboardInterrupt | None = None  # the interrupt Python dropped since the last check
_terminated = False  # a SIGTERM was raised: the process is stopping, later ones are not raised again


class Terminated(KeyboardInterrupt):
    """SIGTERM to run_bench's process: handled as a Ctrl-C, exit 143 (128 + 15) instead of 130."""

    def __str__(self) -> str:
        return "SIGTERM"


def cause(interrupt: KeyboardInterrupt) -> str:
    """How the interrupt arrived, as run_bench's one line names it: ``Ctrl-C`` or ``SIGTERM``."""
    return "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C"


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """run_bench's exit code for an interrupt: 130 for Ctrl-C (SIGINT), 143 for SIGTERM (128 + the signal)."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


@contextmanager
def remembered() -> Iterator[None]:
    """Record every ``KeyboardInterrupt`` Python drops while the body runs (then report it as before), and raise
    ``Terminated`` at SIGTERM (see the module docstring)."""
    global _pending, _terminated
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        global _pending
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _pending = unraisable.exc_value
        previous(unraisable)

    _pending, _terminated = None, False
    sys.unraisablehook = hook
    restore = _raise_at_sigterm()
    try:
        yield
    finally:
        restore()
        sys.unraisablehook = previous
        _pending, _terminated = None, False


@contextmanager
def once() -> Iterator[Callable[[bool], AbstractContextManager[None]]]:
    """While one run computes (``runner.run_job``): SIGINT raises ``KeyboardInterrupt`` once; later ones, while that
    interrupt unwinds (the run's note written, its claim released), are dropped. Yields ``note(interrupted)``: a
    context in which SIGINT is held, then raised at its end unless ``interrupted`` (the note answers an interrupt,
    which goes on). Only in the main thread where SIGINT has Python's own handler; elsewhere both change nothing.

    A local job stopped from the terminal gets two SIGINTs milliseconds apart: the terminal's, to the whole process
    group, and the one submitit's controller passes on to its job when the same Ctrl-C stops it. Where the job took
    the first between two operations, the second arrived while the first one unwound: no note, and the claim
    released on the way out, so run_bench's fallback (the note of a job killed before writing its own) did not
    apply either (seen in CI)."""
    state = {"raised": False, "held": None}

    def handler(signum, frame) -> None:
        if state["held"] is not None:
            state["held"].append(signum)
        elif not state["raised"]:
            state["raised"] = True
            raise KeyboardInterrupt

    @contextmanager
    def note(interrupted: bool) -> Iterator[None]:
        state["held"] = []
        try:
            yield
        finally:
            arrived, state["held"] = state["held"], None
        if arrived and not (interrupted or state["raised"]):
            state["raised"] = True
            raise KeyboardInterrupt

    restore = _install(signal.SIGINT, signal.default_int_handler, handler)
    if restore is None:
        yield lambda interrupted: nullcontext()
        return
    try:
        yield note
    finally:
        restore()


def _install(signum: int, default, handler) -> Callable[[], None] | None:
    """Install ``handler`` for ``signum`` where it may be: in the main thread, and only where the signal is at
    ``default`` (a handler of someone else's, or an ignored signal, is left as it is). The undo, or None."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signum) is not default:
        return None
    signal.signal(signum, handler)
    return lambda: signal.signal(signum, default)


def _raise_at_sigterm():
    """Install the SIGTERM handler where it may be (main thread, SIGTERM at its default); the undo."""
    owner = os.getpid()

    def handler(signum, frame) -> None:
        global _terminated
        if os.getpid() != owner:  # a forked child (a DataLoader worker): SIGTERM ends it, as before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if _terminated:  # already stopping: `timeout` signals its command, then the command's process group
            return  # (a second raise would cut the first one's note short)
        _terminated = True
        raise Terminated

    return _install(signal.SIGTERM, signal.SIG_DFL, handler) or (lambda: None)


def check() -> None:
    """Raise the ``KeyboardInterrupt`` (or ``Terminated``) Python dropped since the last check, if any."""
    global _pending
    if _pending is not None:
        interrupt, _pending = _pending, None
        raise type(interrupt)
