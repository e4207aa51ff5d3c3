"""Which runs of an experiment are done, failed, queued or still to do; torn records are set aside."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.pipeline.records import (
    RecordError,
    last_error_line,
    read_failure,
    read_record,
    record_path,
    write_record,
)
from bench.pipeline.textio import set_aside as set_aside_file

if TYPE_CHECKING:  # the report reads states too, without the model stack that the config module imports
    from bench.pipeline.config import RunSpec


@dataclass
class RunStatus:
    key: str
    state: str  # done | failed | interrupted | pending | running | todo | unknown (SLURM gives no job state)
    detail: str = ""
    log: str | None = None


def read_current(path: Path, data: dict[str, Any] | None = None, auto: tuple[str, str] | None = None
                 ) -> tuple[dict[str, Any] | None, str | None]:
    """``(record, why)``: the record at ``path`` and, where it does not count as the run's result, why not (the
    one rule of ``todo_runs``, which sets such a record aside and redoes its run, and of ``collect_status``,
    which shows that run as todo): a record that does not read (``record`` None; ``why`` the file's error
    line), one computed on other eval images than the run's ``data`` section (None: the one the record
    names) gives here now (its ``data_digest``; not checked where the record has none or the data cannot be
    read here), or, given ``auto`` (``(kind, because)``: the device ``device: auto`` runs on for this invocation,
    "cpu" or "cuda", and why), one of a ``device: auto`` run whose throughput was timed on the other kind (keys do
    not hold the machine: a record made where auto meant the CPU would show CPU speeds for a GPU submission)."""
    try:
        record = read_record(path)
    except RecordError as error:
        return None, str(error)
    timed_on = str((record.get("env") or {}).get("device") or "")
    run = record["run"]
    if (auto and run.get("device") == "auto" and "throughput" in (run.get("stages") or ())
            and timed_on and timed_on.split(":")[0] != auto[0]):
        return record, f"its throughput was timed on {timed_on}, and device: auto is {auto[0]} here ({auto[1]})"
    recorded = record.get("data_digest")
    data = data if data is not None else run.get("data")
    if recorded and isinstance(data, dict) and isinstance(data.get("name"), str):
        from bench.pipeline.data import data_digest

        if (now := data_digest(data)) and now != recorded:  # the images the folder holds now
            return record, (f"its record was computed on other eval images than {data.get('root') or data['name']} "
                            "holds now (changed in place, or another folder of the same name)")
    return record, None


def todo_runs(runs: list[RunSpec], results_dir: Path, force: bool = False, set_aside: bool = True,
              auto: tuple[str, str] | None = None) -> tuple[list[RunSpec], list[str]]:
    """Runs without a finished record (all with ``force``). A record that does not read (cut off
    mid-write, not UTF-8, incomplete) is renamed ``*.json.torn.<n>`` (``set_aside``; never over an earlier
    one) and its run redone; likewise, as ``*.json.stale.<n>``, one that ``read_current`` does not count (other
    eval images; with ``auto``, throughput timed on another device kind than ``device: auto`` gives here). Of a
    readable record only ``run.reference`` can change (``set_aside``): the published numbers are not part of the
    run key, so a ``reference`` entry added to or changed in the experiment after its runs finished reaches their
    records (and the report) without recomputing them.
    Likewise a changed ``finetune.export`` path gets the run's saved fine-tuned weights.
    A record reused although its method's code (``calibrate.method_code``: its module and the ``methods`` modules
    it imports) changed since, at the same ``revision``, counts as before: one line per set of changed files says
    so, with the methods and how to redo them (a comment edited must not redo every run; a change of what the
    method computes raises its ``revision``, which the run key holds)."""
    from bench.pipeline.calibrate import method_code
    from bench.pipeline.stages.finetune import restore_export

    todo, notes, updated = [], [], 0
    codes: dict[str, dict[str, str]] = {}
    changed: dict[tuple[str, ...], dict[str, int]] = {}  # the files that changed: {method: records reused}
    for run in runs:
        path = record_path(results_dir, run.key)
        if not path.exists() or force:
            todo.append(run)
            continue
        record, why = read_current(path, run.data, auto)
        if why:  # torn (no record), computed on other eval images or timed on another device
            if set_aside:
                moved = f"moved to {set_aside_file(path, 'torn' if record is None else 'stale').name}"
            else:
                moved = "it would be set aside"
            notes.append(f"warning: {why if record is None else f'run {run.key}: {why}'}; {moved}, the run is redone")
            todo.append(run)
            continue
        if isinstance(recorded := record.get("method_code"), dict):  # absent: a record from before the field
            if run.method not in codes:  # read once per method and invocation, not once per record
                codes[run.method] = method_code(run.method)
            now = codes[run.method]
            if files := tuple(sorted(f for f in {*recorded, *now} if recorded.get(f) != now.get(f))):
                methods = changed.setdefault(files, {})
                methods[run.method] = methods.get(run.method, 0) + 1
        if set_aside and record["run"].get("reference") != run.reference:
            write_record(path, {**record, "run": {**record["run"], "reference": run.reference}})
            updated += 1
        if set_aside and (note := restore_export(run, results_dir)):  # a finetune.export changed since
            notes.append(note)
    if updated:
        notes.append(f"note: the published reference of {updated} finished run(s) updated from the experiment file")
    for files, methods in changed.items():
        notes.append(f"warning: {', '.join(files)} changed since {sum(methods.values())} finished run(s) of "
                     f"{', '.join(methods)} were computed, at the same revision: their records are reused as they are; "
                     "where the change makes a method compute something else, raise its `revision` (methods/base.py: "
                     "Method.revision), or redo them with --force")
    return todo, notes


def collect_status(keys: list[str], results_dir: Path, data: Mapping[str, dict[str, Any]] | None = None
                   ) -> list[RunStatus]:
    """The state of each run key: its record, its failure note and its SLURM job (``jobs.json``). A run submitted
    again after its record was written (``--force``) shows its queued or running job, not that record. A record
    ``read_current`` does not count (torn, or computed on other eval images than the run's data section,
    ``data[key]``, else the one its record names, gives now) is todo: the next invocation sets it aside and
    redoes the run."""
    from bench.pipeline.lock import describe, live_claim
    from bench.pipeline.slurm import ACTIVE_STATES, NO_RECORD, job_states, pending_note, state_message

    queued = job_states(results_dir)
    rows = []
    for key in keys:
        path = record_path(results_dir, key)
        job = queued.get(key)
        # in-process or local, computing now: also where an earlier SLURM job of the run has ended (cancelled,
        # failed), whose state showed instead (the run's own job, queued or running, shows as that job)
        if not (job and job["state"] in ACTIVE_STATES) and (holder := live_claim(results_dir, key)):
            rows.append(RunStatus(key, "running", f"computing now: {describe(holder)}"))
            continue
        if path.exists():
            record, why = read_current(path, data.get(key) if data is not None else None)
            if why:
                rows.append(RunStatus(key, "todo", f"torn record: {why}" if record is None else
                                      f"{why}: the next invocation sets it aside and redoes the run"))
                continue
            if job and job["state"] in ACTIVE_STATES and str(record.get("finished_at")) < str(job.get("submitted_at")):
                rows.append(RunStatus(key, _active(job), f"job {job['job_id']} {job['state']} (submitted again: the record "
                                                  f"of {record.get('finished_at')} stays until it finishes)", job.get("log")))
            elif (failure := read_failure(results_dir, key)) and str(failure.get("time")) > str(record.get("finished_at")):
                # redone (--force) since the record, and that attempt failed or was cut: the record stays
                rows.append(RunStatus(key, failure.get("state") or "failed", f"{failure.get('error') or ''} (a later "
                                      f"attempt; the record of {record.get('finished_at')} stays)", failure.get("log")))
            elif job and job["state"] not in (*ACTIVE_STATES, "COMPLETED", "UNKNOWN") and \
                    str(record.get("finished_at")) < str(job.get("submitted_at")):
                # redone (--force) since the record, and that job ended without a note of its own (scancel, a
                # setup line, the node): the record stays
                detail = state_message(job["job_id"], job["state"]) or \
                    f"job {job['job_id']} {job['state']}: {_log_error(job.get('log')) or 'no record written'}"
                rows.append(RunStatus(key, "failed", f"{detail} (a later attempt; the record of "
                                      f"{record.get('finished_at')} stays)", job.get("log")))
            else:
                rows.append(RunStatus(key, "done", log=(job or {}).get("log")))
            continue
        failure = read_failure(results_dir, key)
        if failure and job and job["state"] not in ACTIVE_STATES and _after_job(failure, job):
            job = None  # computed again since its job ended (in process, local): that attempt's note says how
        if failure and failure.get("state") == "interrupted" and not (job and job["state"] in ACTIVE_STATES):
            rows.append(RunStatus(key, "interrupted", failure.get("error") or "", failure.get("log")))
        elif job and job["state"] in ("CANCELLED", NO_RECORD):  # scancel: no error of the run's own to show
            log = job.get("log") if job.get("log") and Path(job["log"]).exists() else None  # none if it never started
            rows.append(RunStatus(key, "failed", state_message(job["job_id"], job["state"]), log))
        elif job and job["state"] in ACTIVE_STATES and not (  # a requeued (preempted) job is pending again
                failure and failure.get("state") == "failed" and str(failure.get("time")) >= str(job.get("submitted_at"))):
            # (a run that failed in this submission has failed, while SLURM still lists its job as ending)
            rows.append(RunStatus(key, _active(job), f"job {job['job_id']} {job['state']}{pending_note(job.get('reason'))}",
                                  job.get("log")))
        elif job and job["state"] == "UNKNOWN" and not failure:  # it may still be queued or running: not "todo"
            rows.append(RunStatus(key, "unknown", f"job {job['job_id']}: SLURM gives no state for it (sacct or squeue "
                                  f"unreachable, or the job is gone from its accounting)", job.get("log")))
        elif failure or (job and job["state"] not in ("COMPLETED", "UNKNOWN")):
            error = (failure or {}).get("error") or (job and _log_error(job.get("log"))) or "no record written"
            log = (job or {}).get("log") or (failure or {}).get("log")
            detail = f"job {job['job_id']} {job['state']}: {error}" if job else error
            rows.append(RunStatus(key, "failed", detail, log))
        else:
            rows.append(RunStatus(key, "todo"))
    return rows


def _after_job(failure: dict, job: dict) -> bool:
    """Whether ``failure`` is the note of an attempt outside ``job`` (the run computed again in process or by the
    local executor after the job ended), not the job's own: its error and log, not the job's end (``job 4_0
    CANCELLED``, a killed job's last log line), say how the run's latest attempt went. A note names the job that
    wrote it (``slurm_job``, as ``jobs.json`` names it; a note from before that field: by SLURM's own id)."""
    if "slurm_job" in failure:
        return failure["slurm_job"] != job["job_id"]
    return not failure.get("slurm_job_id")


def _active(job: dict) -> str:
    """The state of a run whose job SLURM still holds: running, or pending (queued, requeued)."""
    return "running" if job["state"] in ("RUNNING", "COMPLETING") else "pending"


def _log_error(log: str | None) -> str | None:
    if not log:
        return None
    try:
        return last_error_line(Path(log).read_text(errors="replace"))
    except OSError:
        return None


def print_status(rows: list[RunStatus]) -> None:
    width = max(len(row.key) for row in rows)
    states = max(8, *(len(row.state) for row in rows))  # "interrupted" too keeps the keys in one column
    for row in rows:
        line = f"{row.state:{states}s} {row.key:{width}s}"
        if row.detail:
            line += f"  {row.detail}"
        if row.log and row.state != "done":
            line += f"  log: {row.log}"
        print(line.rstrip())
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
