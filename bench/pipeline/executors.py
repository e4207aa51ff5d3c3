"""Where runs execute: ``inprocess`` (this Python process, one after another), ``local`` (each run in
its own subprocess through submitit's LocalExecutor, one at a time so timings do not compete) and
``slurm`` (one submitit job array per invocation on a SLURM cluster, see ``bench.pipeline.slurm``).
All three call the same job function, ``bench.pipeline.runner.run_job``, with a small dict and a folder."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.pipeline import interrupts
from bench.pipeline.records import last_error_line

if TYPE_CHECKING:
    import submitit

    from bench.pipeline.config import RunSpec

EXECUTORS = ("inprocess", "local", "slurm")  # run_bench --executor


@dataclass
class Outcome:
    key: str
    ok: bool
    error: str | None = None
    log: str | None = None
    seconds: float | None = None


def run_inprocess(runs: list[RunSpec], results_dir: Path, progress: bool = True,
                  announce: Callable[[str], None] = print, redo: bool = False) -> list[Outcome]:
    import time

    from bench.pipeline.lock import RunClaimed
    from bench.pipeline.runner import run_job

    outcomes = []
    for index, run in enumerate(runs, start=1):
        interrupts.check()
        announce(f"[{index}/{len(runs)}] {run.key}")
        started = time.time()
        try:
            run_job(run.to_dict(), str(results_dir), progress=progress, redo=redo)
            outcomes.append(Outcome(run.key, True, seconds=time.time() - started))
        except KeyboardInterrupt:
            raise
        except RunClaimed as error:  # another process computes it: not a failure of the run
            announce(f"    skipped: {error}")
            outcomes.append(Outcome(run.key, False, error=f"skipped: {error}"))
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the others
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            announce(f"    failed: {message}")
            outcomes.append(Outcome(run.key, False, error=message, seconds=time.time() - started))
    return outcomes


@contextmanager
def output_to(path: Path) -> Iterator[None]:
    """This process's file descriptors 1 and 2 appended to ``path`` while the body runs (restored after), so
    that the processes it starts write there; ``sys.stdout`` / ``sys.stderr`` are flushed around it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(log, 1)
        os.dup2(log, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log):
            os.close(fd)


def run_local(runs: list[RunSpec], results_dir: Path, announce: Callable[[str], None] = print,
              redo: bool = False) -> list[Outcome]:
    """Each job watches this process (``$TOKENBENCH_PARENT``) and stops when it dies (``kill -9``). submitit's
    controller processes write to ``logs/local/controller.log``, not the terminal: on Ctrl-C they get SIGINT
    (from the terminal and from ``job.cancel``) and print tracebacks of their own; the jobs' logs are apart."""
    import submitit

    executor = submitit.LocalExecutor(folder=str(results_dir / "logs" / "local" / "%j"))
    executor.update_parameters(timeout_min=24 * 60)
    try:
        return _submit_local(executor, runs, results_dir, announce, redo)
    finally:
        with suppress(OSError):  # submitit's controller also makes its folder template: an empty folder named %j
            (results_dir / "logs" / "local" / "%j").rmdir()


def _submit_local(executor: submitit.LocalExecutor, runs: list[RunSpec], results_dir: Path,
                  announce: Callable[[str], None], redo: bool) -> list[Outcome]:
    """``run_local``'s jobs, one after the other. A Ctrl-C that Python dropped in this process
    (``bench.pipeline.interrupts``) stops them as one it raised: the job in progress is stopped, none starts."""
    import time

    from bench.pipeline.lock import PARENT_ENV, claim_path, parent_marker, release_dead_claim
    from bench.pipeline.runner import submitted_job, write_failure

    outcomes = []
    for index, run in enumerate(runs, start=1):
        interrupts.check()  # a Ctrl-C this process dropped while the last job ran: no next job
        previous, os.environ[PARENT_ENV] = os.environ.get(PARENT_ENV), parent_marker()
        try:  # submitit's controller and the job inherit this environment, the controller also fds 1 and 2
            with output_to(results_dir / "logs" / "local" / "controller.log"):
                job = executor.submit(submitted_job, run.to_dict(), str(results_dir), redo)
        finally:
            os.environ.pop(PARENT_ENV) if previous is None else os.environ.update({PARENT_ENV: previous})
        announce(f"[{index}/{len(runs)}] {run.key} (local job {job.job_id}, log {job.paths.stderr})")
        try:
            interrupts.check()  # dropped since (in a finalizer): the job is stopped as for a Ctrl-C raised here
            job.result()
            outcomes.append(Outcome(run.key, True, log=str(job.paths.stderr)))
        except KeyboardInterrupt:
            job.cancel(check=False)  # SIGINT to the job: it marks its run interrupted
            deadline = time.monotonic() + 30  # the controller stops its job within ~1 s (then SIGKILL)
            while not job.done() and time.monotonic() < deadline:  # marked when this process returns
                time.sleep(0.05)
            # Killed before it could mark its run (SIGKILL 1 s after the SIGINT, the job inside one long
            # operation): its claim is left behind a dead process. The note the job would have written, here. The
            # job's process can outlive the controller's answer by a moment (on a loaded machine: the claim's
            # holder still alive when job.done() says so): its claim is awaited up to 10 s.
            released, settle = False, time.monotonic() + 10
            while job.done() and not (released := release_dead_claim(results_dir, run.key)) and \
                    claim_path(results_dir, run.key).exists() and time.monotonic() < settle:
                time.sleep(0.05)
            if released:
                write_failure(results_dir, run, KeyboardInterrupt(), log=str(job.paths.stderr))
            raise
        except Exception as error:  # noqa: BLE001
            message = job_error(last_error_line(str(error), "unknown error"))
            announce(f"    {message}" if message.startswith("skipped: ") else f"    failed: {message}")
            outcomes.append(Outcome(run.key, False, error=message, log=str(job.paths.stderr)))
    return outcomes


def job_error(line: str) -> str:
    """A job's error line (``last_error_line`` of its traceback) as its outcome says it: ``skipped: <why>`` where
    the job refused a run that another process computes (``RunClaimed``), as ``run_inprocess`` says it (a local job
    said ``failed: bench.pipeline.lock.RunClaimed: ...``); any other line as it is."""
    from bench.pipeline.lock import RunClaimed

    name = f"{RunClaimed.__module__}.{RunClaimed.__qualname__}: "
    return f"skipped: {line[len(name):]}" if line.startswith(name) else line


def summary(outcomes: list[Outcome], stream=None) -> int:
    """Print one line per failure and a count; the exit code: 0 when every run succeeded, else 1."""
    stream = stream or sys.stdout
    failed = [o for o in outcomes if not o.ok]
    done = len(outcomes) - len(failed)
    for outcome in failed:
        where = f" (log: {outcome.log})" if outcome.log else ""
        print(f"FAILED {outcome.key}: {outcome.error}{where}", file=stream)
    print(f"{done} run(s) succeeded, {len(failed)} failed", file=stream)
    return 1 if failed else 0
