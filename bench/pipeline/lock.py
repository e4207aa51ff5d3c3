"""Nothing computed twice: one invocation per results folder, one process per run.

- ``results_lock``: checks that the results folder is usable (a folder, writable, not full) and holds
  ``fcntl.flock`` on ``<results>/.lock`` for the whole invocation, or until it calls the ``release`` it was
  given (``--executor slurm --wait``, once its jobs are submitted). A second invocation on the same folder
  refuses with one line naming the holder (pid, host, command; from ``.lock.holder``), or waits for it
  (``--wait-lock``). The kernel drops the lock when its process dies, even by ``kill -9``.
- ``claim_run``: before computing a run, its job creates ``<results>/claims/<key>.json`` with
  ``O_CREAT | O_EXCL`` (pid, host, process start time, SLURM job id) and removes it when done. A claim
  held by a live process makes another job refuse that run (``RunClaimed``); a claim whose process is
  gone (same host, pid dead or reused), whose SLURM job is ours (a requeued job) or no longer queued is
  stale and taken over. Stale checks and creation happen under a short flock of ``claims/.lock``.
- ``exit_with_parent``: a job of the ``local`` executor runs in a grandchild of run_bench (submitit's
  controller in between); it watches run_bench's pid and stops (KeyboardInterrupt, then exit) when
  run_bench dies, so a ``kill -9``'d invocation leaves nothing computing.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.pipeline.files import atomic_write_json, write_probe
from bench.pipeline.textio import TextError, read_json

PROBE_BYTES = 256 * 1024  # the results folder must take this much (a record is ~10 KB)
PARENT_ENV = "TOKENBENCH_PARENT"  # "<pid>:<start time>" of the run_bench process a local job belongs to


class FolderError(RuntimeError):
    """The results folder cannot be used (one line naming it)."""


class LockBusy(FolderError):
    """Another invocation holds the results folder's lock."""


class RunClaimed(RuntimeError):
    """Another live process is computing this run."""


# ---------------------------------------------------------------------------------------- processes
def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (``[0]``: state, ``[19]``: start time); ``None``
    when unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22); ``None`` when
    unknown. Together with the pid it names one process: a reused pid has another start time."""
    stat = _stat(pid)
    return None if stat is None else stat[19]


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` (started at ``start``, where given) still runs: a zombie, exited but not yet reaped by its
    parent (a killed local job until submitit's controller or init collects it), does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    stat = _stat(pid)
    if stat is None:
        return True  # alive as far as anyone here can tell
    return stat[0] not in ("Z", "X") and (start is None or stat[19] == start)


def slurm_job() -> str | None:
    """The job id as jobs.json, ``--status`` and the log folders name it: ``<array>_<task>`` for an array
    task (SLURM_JOB_ID is the task's own internal id), else SLURM_JOB_ID; None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "start": process_start(os.getpid()), "host": socket.gethostname(),
            "command": " ".join(sys.argv)[:300], "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # SLURM's own id (squeue -j), also of an array task
            "slurm_job": slurm_job()}  # as --status names it


def describe(holder: Any) -> str:
    if not isinstance(holder, dict):
        return "another process (holder unknown)"
    name = holder.get("slurm_job") or holder.get("slurm_job_id")
    job = f", SLURM job {name}" if name else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job} since {holder.get('since')}{command}"


# ------------------------------------------------------------------------------------- results lock
def check_usable(results_dir: Path) -> None:
    """``FolderError`` unless ``results_dir`` is (or can be made) a folder that takes a small file."""
    if results_dir.exists() and not results_dir.is_dir():
        raise FolderError(f"results folder {results_dir} is a file, not a folder")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FolderError(f"cannot create results folder {results_dir} ({error.strerror})") from None
    try:
        write_probe(results_dir, PROBE_BYTES)
    except OSError as error:
        raise FolderError(f"results folder {results_dir} is not writable ({error.strerror or error})") from None


@contextlib.contextmanager
def results_lock(results_dir: Path, wait: bool = False, announce=print) -> Iterator[Callable[[], None]]:
    """Check the folder, then hold its lock until the block ends or until the ``release`` it yields is called
    (see the module docstring)."""
    results_dir = Path(results_dir)
    check_usable(results_dir)
    lock_path, holder_path = results_dir / ".lock", results_dir / ".lock.holder"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise FolderError(f"cannot open {lock_path} ({error.strerror})") from None
    acquired = False

    def release() -> None:
        nonlocal fd
        if fd < 0:
            return
        if acquired:  # the holder note goes first: a holder it names still holds the lock
            with contextlib.suppress(OSError):
                holder_path.unlink()
        os.close(fd)  # releases the flock
        fd = -1

    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(holder_path)
            if not wait:
                raise LockBusy(f"results folder {results_dir} is in use by {describe(holder)}; wait for it to "
                               "finish (or pass --wait-lock)") from None
            announce(f"waiting for results folder {results_dir}, in use by {describe(holder)}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        acquired = True
        atomic_write_json(holder_path, holder_info())
        yield release
    finally:
        release()


def _read_holder(path: Path) -> Any:
    try:
        return read_json(path)
    except TextError:
        return None


# ------------------------------------------------------------------------------------------- claims
def claim_path(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / "claims" / f"{key}.json"


@contextlib.contextmanager
def _claims_guard(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stale(holder: Any) -> bool:
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return True  # unreadable claim (a crash between create and write): nobody can prove it live
    own_job = os.environ.get("SLURM_JOB_ID")
    if own_job and holder.get("slurm_job_id") == own_job:
        return True  # this job's earlier incarnation (preempted, requeued)
    if holder.get("host") == socket.gethostname():
        return not process_alive(holder["pid"], holder.get("start"))
    if holder.get("slurm_job_id"):
        return not _slurm_job_active(holder["slurm_job_id"])
    return False


def _unprovable(holder: Any, path: Path) -> str:
    """What to do about a claim whose holder no one here can prove dead: a process on another host outside SLURM
    (an in-process run on a login node, seen from a compute node; user test 16: every resubmission failed)."""
    if isinstance(holder, dict) and holder.get("host") != socket.gethostname() and not holder.get("slurm_job_id"):
        return f" (its host is not this one: if that process is gone, delete {path})"
    return ""


def live_claim(results_dir: Path, key: str) -> dict[str, Any] | None:
    """The holder of run ``key``'s claim when it is a live process on this host (an in-process or local run being
    computed now), else None. SLURM jobs are left to ``jobs.json`` (no ``squeue`` per key here)."""
    holder = _read_holder(claim_path(results_dir, key))
    if isinstance(holder, dict) and holder.get("host") == socket.gethostname() and not _stale(holder):
        return holder
    return None


def release_dead_claim(results_dir: Path, key: str) -> bool:
    """Remove run ``key``'s claim where its holder is a process on this host that is gone (a job killed before it
    could release it); True when it did."""
    path = claim_path(results_dir, key)
    with _claims_guard(path.parent):
        holder = _read_holder(path)
        if not isinstance(holder, dict) or holder.get("host") != socket.gethostname() or not _stale(holder):
            return False
        path.unlink(missing_ok=True)
        return True


def _slurm_job_active(job_id: str) -> bool:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return True  # cannot tell: assume it still runs
    return bool(out.strip())


@contextlib.contextmanager
def claim_run(results_dir: Path, key: str) -> Iterator[Path]:
    """Hold the claim on run ``key`` for the block; ``RunClaimed`` (naming the holder) when a live process
    holds it."""
    path = claim_path(results_dir, key)
    info = holder_info()
    with _claims_guard(path.parent):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read_holder(path)
            if not _stale(holder):
                raise RunClaimed(f"run {key} is being computed by {describe(holder)}; not run twice"
                                 f"{_unprovable(holder, path)}") from None
            path.unlink()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
            handle.flush()
            os.fsync(handle.fileno())
    try:
        yield path
    finally:
        with contextlib.suppress(OSError), _claims_guard(path.parent):
            if _read_holder(path) == info:
                path.unlink()


# --------------------------------------------------------------------------------- parent watchdog
def parent_marker() -> str:
    """The value of ``$TOKENBENCH_PARENT`` naming this process for the jobs it starts."""
    return f"{os.getpid()}:{process_start(os.getpid()) or ''}"


def exit_with_parent(interval: float = 0.5, grace: float = 10.0) -> None:
    """In a job started by the ``local`` executor: stop when the run_bench process named by
    ``$TOKENBENCH_PARENT`` is gone: KeyboardInterrupt in the main thread (the run is marked interrupted,
    its claim released), and a hard exit ``grace`` seconds later if the computation does not yield, after a
    traceback of every thread on stderr (the job's log): where it was stuck."""
    marker = os.environ.get(PARENT_ENV)
    if not marker:
        return
    pid_text, _, start = marker.partition(":")
    pid = int(pid_text)
    if pid == os.getpid():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        # inherited ignored (run_bench started as a background job of a script): SIGINT is how the parent
        # cancels this job and how the watchdog below interrupts it, so it must raise KeyboardInterrupt here
        signal.signal(signal.SIGINT, signal.default_int_handler)

    main = threading.main_thread().ident

    def watch() -> None:
        while process_alive(pid, start or None):
            time.sleep(interval)
        print(f"run_bench (pid {pid}) is gone: stopping this job", file=sys.stderr, flush=True)
        if callable(signal.getsignal(signal.SIGINT)):
            # a real SIGINT to the main thread, not ``_thread.interrupt_main()``: that only sets a flag the
            # thread sees when it next runs Python code, never while it is blocked in a system call
            signal.pthread_kill(main, signal.SIGINT)
        time.sleep(grace)
        print(f"the job did not stop within {grace:g} s; where its threads were:", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):  # a stderr without a file descriptor: no dump, still the exit
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(130)

    threading.Thread(target=watch, name="tokenbench-parent-watchdog", daemon=True).start()


# ---------------------------------------------------------------------------------------- job guard
@contextlib.contextmanager
def _no_foreign_claim(results_dir: Path, key: str) -> Iterator[None]:
    """For the ranks > 0 of a multi-task job (rank 0 holds the claim): refuse as rank 0 would."""
    holder = _read_holder(claim_path(results_dir, key))
    if isinstance(holder, dict) and holder.get("slurm_job_id") != os.environ.get("SLURM_JOB_ID") and not _stale(holder):
        raise RunClaimed(f"run {key} is being computed by {describe(holder)}; not run twice")
    yield


@contextlib.contextmanager
def run_guard(results_dir: Path, key: str, redo: bool = False) -> Iterator[bool]:
    """What every executor's job does around one run (inside ``exit_with_parent``'s watch, which the job starts
    first): hold the run's claim (rank 0; other ranks check it), and yield ``True`` when a finished record
    appeared since the run was planned (another process computed it: nothing to do) unless ``redo``
    (``--force``)."""
    from bench.pipeline.distributed import job_world
    from bench.pipeline.records import RecordError, read_record, record_path

    results_dir = Path(results_dir)
    guard = claim_run(results_dir, key) if job_world()[0] == 0 else _no_foreign_claim(results_dir, key)
    with guard:
        done = False
        if not redo and record_path(results_dir, key).exists():
            with contextlib.suppress(RecordError):
                read_record(record_path(results_dir, key))
                done = True
        yield done
