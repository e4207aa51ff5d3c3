"""SLURM through submitit: one job array per invocation, job tracking for ``--status``.

A cluster profile (``--profile NAME`` or ``slurm: {profile: NAME}`` in the experiment; see
``bench.pipeline.profiles``) gives the resources. Each run's throughput and its dense baseline are timed
inside the same job, so they always share a node and a GPU.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import submitit

from bench.pipeline.files import REPO, atomic_write_json
from bench.pipeline.profiles import Profile, eval_resources, load_profile, profile_path
from bench.pipeline.records import failure_path, last_error_line, now

# An array task that neither squeue nor sacct lists while they list its array: cancelled before it started.
NO_RECORD = "NO_ACCOUNTING_RECORD"
SETUP_LINE = "TOKENBENCH_SETUP_LINE"  # the job script's variable: the setup line running, as its SetupError starts
# the job script's variables: its EXIT trap from before the setup lines, and the setup guard's own
SETUP_TRAPS = ("TOKENBENCH_PRIOR_EXIT_TRAP", "TOKENBENCH_SETUP_EXIT_TRAP")
MAX_POLL_S = 60.0  # the longest pause between two looks of --wait at SLURM (at first 2 s: poll_delay)
ACTIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING")
# squeue's reasons for a pending job that SLURM holds until someone changes it (scontrol update, scancel): the job
# asks for more than its partition allows or names what the cluster does not know
HELD_REASONS = {
    "PartitionTimeLimit": "its time limit (timeout_min) is above the partition's",
    "PartitionConfig": "it asks for more CPUs, memory or GPUs than the partition's nodes have",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows",
    "InvalidAccount": "its account is not valid here", "InvalidQOS": "its qos is not valid here",
    "BadConstraints": "no node has its constraint",
}
# profile key -> submitit parameter (max_requeue and setup are handled apart)
SUBMITIT_NAMES = {"partition": "slurm_partition", "account": "slurm_account", "qos": "slurm_qos",
                  "constraint": "slurm_constraint", "array_parallelism": "slurm_array_parallelism",
                  "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb",
                  "timeout_min": "timeout_min"}


def executor_parameters(profile: Profile, finetune: bool, profile_file: Path | None = None) -> dict[str, Any]:
    """submitit's ``update_parameters`` arguments for a profile (``max_requeue`` is a constructor argument
    of the executor instead: see ``make_executor``). ``profile_file`` is named by a failing setup line."""
    values = {key: getattr(profile, key) for key in SUBMITIT_NAMES}
    if not finetune:
        values.update(eval_resources(profile))  # one GPU and its share of the node's CPUs and memory
    params = {name: values[key] for key, name in SUBMITIT_NAMES.items() if values[key] is not None}
    if not params.get("gpus_per_node"):
        params.pop("gpus_per_node", None)  # --gpus-per-node=0 is refused by clusters without GPU gres
    params["tasks_per_node"] = profile.tasks_per_node if finetune else 1
    params["nodes"] = 1
    if params["tasks_per_node"] > 1:  # one task failing ends the others: a DDP rank left waiting for a rank
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]  # that died held the job until its time limit
    # The job imports this repository's packages wherever the user submitted from. sbatch hands the job the
    # submitting shell's environment: a MASTER_PORT exported there would be every multi-task job's rendezvous port
    # (two jobs sharing a node then collide); unset, each job draws its own (``distributed.master_port``), unless
    # a setup line of the profile exports one.
    params["slurm_setup"] = [f"export PYTHONPATH={REPO}:${{PYTHONPATH:-}}; unset MASTER_PORT",
                             *guarded_setup(profile.setup, profile_file)]
    return params


def guarded_setup(lines: list[str], profile_file: Path | None) -> list[str]:
    """The profile's ``setup`` lines as the job script runs them: a line that fails, or calls ``exit`` with a
    non-zero status (itself or a script it sources), stops the job with that status, its log ending in one line
    that names the profile's file, the line and its exit status (``--wait`` and ``--status`` show it). A job script
    goes on after a failing line: a failed ``module load`` surfaced later as some other error of the run, or not at
    all; an ``exit`` ended it with nothing said. Each line runs in a brace group, so what it sets (``source``,
    ``export``) stays; the line is said by an ``EXIT`` trap, set for the setup lines only. After them the script's
    own ``EXIT`` trap from before them is back, unless a setup line set one of its own, which then stays (and the
    lines after it are no longer said)."""
    where = f"{profile_file}: " if profile_file else ""
    guarded = []
    for number, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):  # does nothing; an empty brace group: a syntax error
            guarded.append(line)
            continue
        said = shlex.quote(f"SetupError: {where}setup[{number}]: {line!r} failed (exit ")
        guarded.append(f"{SETUP_LINE}={said}; {{ {line}\n}} || exit")
    if guarded == lines:
        return guarded  # blank and comment lines only
    trap = (f'code=$?; [ "$code" -eq 0 ] || printf \'%s%d%s\\n\' "${SETUP_LINE}" "$code" '
            '\'); the job stopped before its run\' >&2')  # exit 0, or a signal to bash itself (scancel): not a line's
    prior, ours = SETUP_TRAPS
    return [f"{prior}=$(trap -p EXIT); trap {shlex.quote(trap)} EXIT; {ours}=$(trap -p EXIT)", *guarded,
            f'if [ "$(trap -p EXIT)" = "${ours}" ]; then trap - EXIT; eval "${prior}"; fi; '
            f"unset {SETUP_LINE} {prior} {ours}"]


def thread_notes(runs: list, profile: Profile) -> list[str]:
    """A line per job shape whose runs set more ``threads`` than a job of that shape gets CPUs (``cpus_per_task``):
    their threads would share fewer cores, and timed forwards read slow (user test 16)."""
    notes = []
    for shape, finetune in (("evaluation", False), ("fine-tuning", True)):
        cpus = executor_parameters(profile, finetune).get("cpus_per_task")
        over = sorted({run.threads for run in runs if ("finetune" in run.stages) == finetune
                       and run.threads and cpus and run.threads > cpus})
        if over:
            notes.append(f"note: runs set threads: {', '.join(map(str, over))}, but each {shape} job (task) gets "
                         f"cpus_per_task={cpus}: their threads share {cpus} CPU(s) and throughput reads low; give "
                         "the profile at least that many cpus_per_task, or the runs fewer threads")
    return notes


def make_executor(log_folder: Path, profile: Profile, finetune: bool, name: str,
                  profile_file: Path | None = None) -> submitit.AutoExecutor:
    """A SLURM executor for one job array. ``max_requeue`` is submitit's ``max_num_timeout`` (default 3): how
    often a job may be requeued after its time limit. submitit counts a preemption signal (USR2) as such a
    timeout once the job has run min(80 %, limit - 10 min) of its limit: with ``timeout_min`` <= 10, every
    preemption counts."""
    executor = submitit.AutoExecutor(folder=str(Path(log_folder) / "%j"), cluster="slurm",
                                     slurm_max_num_timeout=profile.max_requeue)
    executor.update_parameters(name=name, **executor_parameters(profile, finetune, profile_file))
    return executor


def ensure_slurm_conf() -> None:
    """Point SLURM's clients at the local cluster of ``slurm/local_cluster.sh`` when nothing else is set."""
    if "SLURM_CONF" in os.environ:
        return
    conf = local_cluster_dir() / "slurm.conf"
    if conf.exists():
        os.environ["SLURM_CONF"] = str(conf.resolve())


def local_cluster_dir() -> Path:
    """The state folder of ``slurm/local_cluster.sh``: ``$TOKENBENCH_SLURM_DIR``, else ``<repo>/.slurm``
    (a folder, or a link the script made to one that the daemons' users can reach)."""
    return Path(os.environ.get("TOKENBENCH_SLURM_DIR") or REPO / ".slurm")


class RunJob(submitit.helpers.Checkpointable):
    """The SLURM job: ``run_job`` of one run. On preemption or time limit submitit calls
    ``checkpoint()`` (inherited: requeue with the same arguments); fine-tuning then resumes from its last
    checkpoint, which the training loop wrote at the step where the signal arrived."""

    def __call__(self, spec: dict[str, Any], results_dir: str, redo: bool = False) -> str:
        from bench.pipeline.runner import submitted_job

        return submitted_job(spec, results_dir, redo)


def jobs_file(results_dir: Path) -> Path:
    return Path(results_dir) / "jobs.json"


class SubmitError(RuntimeError):
    """sbatch refused the submission (controller down, bad partition, ...): one line, exit 2."""


# sbatch's refusals that one cluster-profile key decides (its words on SLURM 22-24), and that key
REFUSAL_KEYS = (
    ("invalid partition", "partition"),
    ("invalid account", "account"),
    ("invalid qos", "qos"),
    ("invalid feature", "constraint"),
    ("invalid generic resource", "gpus_per_node"),
    ("requested node configuration is not available", "cpus_per_task, mem_gb, gpus_per_node or tasks_per_node"),
    ("time limit", "timeout_min"),
)


def profile_name(experiment, profile: str | None = None) -> str:
    """The cluster profile a submission uses: ``--profile``, else the experiment's ``slurm.profile``, else ``local``."""
    return profile or experiment.slurm.profile or "local"


def refusal(reason: str, profile_file: Path | None) -> str:
    """The one line of an sbatch refusal: the profile file and the key it points at where sbatch's words name one
    (with the cluster's partitions for a bad partition), else SLURM's reason alone (e.g. the controller down)."""
    line = f"SLURM refused the submission ({reason}); nothing was submitted"
    key = next((key for words, key in REFUSAL_KEYS if words in reason.lower()), None)
    if key is None or profile_file is None:
        return line
    if key == "partition":
        try:
            names = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30,
                                   check=True).stdout.split()
            line += f"; allowed here: {', '.join(name.rstrip('*') for name in names)}" if names else ""
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{profile_file}: {key}: {line}"


def _read_jobs(results_dir: Path, set_aside: bool = False) -> dict[str, dict[str, Any]]:
    """``jobs.json`` ({key: {job_id, log, submitted_at, previous_job_ids}}); an unreadable one is reported,
    and set aside as ``jobs.json.torn.<n>`` when ``set_aside`` (the submitter, under the folder's lock)."""
    from bench.pipeline.textio import TextError, read_json
    from bench.pipeline.textio import set_aside as set_aside_file

    path = jobs_file(results_dir)
    try:
        jobs = read_json(path)
        if not isinstance(jobs, dict) or not all(isinstance(job, dict) and "job_id" in job for job in jobs.values()):
            raise TextError(path, "not a mapping of run keys to jobs")
        return jobs
    except TextError as error:
        if error.missing:
            return {}
        moved = f"; moved to {set_aside_file(path).name}" if set_aside else ""
        print(f"warning: {error}; the job ids it held are not known{moved}", file=sys.stderr)
        return {}


def _write_jobs(results_dir: Path, jobs: dict[str, dict[str, Any]]) -> None:
    atomic_write_json(jobs_file(results_dir), jobs)


def check_submission(experiment, runs, profile: str | None = None) -> Profile:
    """The cluster profile of a submission of ``runs`` (``--profile``, the experiment's, else ``local``), checked
    before anything is written or submitted: ``ProfileError`` for a bad profile, ``SubmitError`` where every job
    would fail on its node."""
    name = profile_name(experiment, profile)
    settings = load_profile(name)
    if not settings.gpus_per_node and any(run.device == "cuda" for run in runs):  # every job would fail on its node
        given = "gpus_per_node: 0" if settings.gpus_per_node == 0 else "no gpus_per_node"
        raise SubmitError(f"{experiment.file}: defaults.device: cuda, but cluster profile {profile_path(name)} gives "
                          f"its jobs no GPU ({given}); allowed: a profile with gpus_per_node >= 1 (e.g. "
                          "slurm/example_gpu.yaml), or device auto or cpu")
    tasks = settings.tasks_per_node
    for run in runs:  # each fine-tuning job's global batch is split over its tasks (DDP): refused here, not on the node
        if not run.finetune or tasks == 1:
            continue
        batch, pairs = run.finetune["batch_size"], run.finetune["mixup"] > 0 or run.finetune["cutmix"] > 0
        step = tasks * (2 if pairs else 1)  # mixup and cutmix pair the images of each process's share
        if batch % step:
            raise SubmitError(f"{experiment.file}: finetune.batch_size: {batch} is not split into "
                              f"{'even ' if batch % tasks == 0 else ''}shares by the {tasks} processes of cluster "
                              f"profile {profile_path(name)} (tasks_per_node: {tasks}); allowed: a multiple of {step}"
                              + (" (mixup and cutmix pair the images of each process's share)" if pairs else ""))
    return settings


def submit(experiment, runs, results_dir: Path, settings: Profile, wait: bool = False, redo: bool = False,
           profile_file: Path | None = None, before_wait: Callable[[], None] | None = None) -> int:
    """Submit ``runs`` as SLURM job arrays (one per resource shape: evaluation, fine-tuning); print the
    job ids and the log folder; with ``wait``, wait and summarise. Exit code as ``run_bench``'s.
    Runs whose job from an earlier submission is still pending or running are not submitted again
    (``jobs.json`` keeps their ids; a resubmitted run keeps its earlier ids in ``previous_job_ids``).
    ``redo`` (``--force``): a job recomputes its run even if a record appeared since submission.
    ``SubmitError`` when sbatch refuses (e.g. the controller is down). ``settings``: the cluster profile, as
    ``check_submission`` returned it; ``profile_file``: its file, named in a refusal that points at one of its keys.
    ``before_wait``: called once the jobs are in ``jobs.json``, before waiting (run_bench: gives up the results
    folder's lock, so another invocation can submit or compute other runs of the folder meanwhile)."""
    for note in thread_notes(runs, settings):
        print(note, file=sys.stderr)
    ensure_slurm_conf()
    results_dir = Path(results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    if not runs:
        print("nothing to submit: every run has a record")
        return 0
    _read_jobs(results_dir, set_aside=True)  # an unreadable jobs.json: reported and set aside once, here
    flying = in_flight(results_dir, [run.key for run in runs])
    for key, job in flying.items():
        print(f"not resubmitted: {key} (job {job['job_id']} {job['state']}, submitted {job.get('submitted_at')})")
    runs = [run for run in runs if run.key not in flying]
    if not runs and not wait:
        print(f"nothing to submit: {len(flying)} run(s) still queued or running from an earlier submission")
        return 0
    log_folder = results_dir / "logs" / "slurm"
    submitted_at = time.time()
    jobs_by_key: dict[str, Any] = {}
    for finetune in (False, True):
        group = [run for run in runs if ("finetune" in run.stages) == finetune]
        if not group:
            continue
        executor = make_executor(log_folder, settings, finetune, name=f"tokenbench-{experiment.name}",
                                 profile_file=profile_file)
        submitted = _submit_group(executor, group, results_dir, redo, log_folder, profile_file)
        for run, job in zip(group, submitted, strict=True):
            jobs_by_key[run.key] = job
    known = _read_jobs(results_dir, set_aside=True)
    submitted_now = now()
    for key, job in jobs_by_key.items():
        earlier = known.get(key) or {}
        previous = [*earlier.get("previous_job_ids", []), *([earlier["job_id"]] if "job_id" in earlier else [])]
        known[key] = {"job_id": job.job_id, "log": str(job.paths.stderr), "submitted_at": submitted_now,
                      **({"previous_job_ids": previous} if previous else {})}
        failure_path(results_dir, key).unlink(missing_ok=True)
    _write_jobs(results_dir, known)
    ids = sorted({job.job_id.split("_")[0] for job in jobs_by_key.values()})
    if jobs_by_key:
        arrays = any("_" in job.job_id for job in jobs_by_key.values())  # submitit sends a single run as a plain job
        print(f"submitted {len(jobs_by_key)} run(s) as {'job array(s)' if arrays else 'job(s)'} {', '.join(ids)}; "
              f"logs in {log_folder}")
    follow = f"python run_bench.py --config {shlex.quote(str(experiment.file))} --results {shlex.quote(str(results_dir))} --status"
    if not wait:
        print(f"follow with: {follow}")
        return 0
    if before_wait is not None:
        before_wait()
    try:
        return _wait_all(jobs_by_key, results_dir, flying, submitted_at)
    except KeyboardInterrupt as interrupt:  # only the waiting stops: the jobs are SLURM's (not "the run in progress")
        from bench.pipeline.interrupts import cause, exit_code

        print(f"stopped waiting ({cause(interrupt)}): the {len(jobs_by_key) + len(flying)} job(s) go on in SLURM; "
              f"follow them with {follow} (scancel stops them)", file=sys.stderr)
        return exit_code(interrupt)


def _wait_all(jobs_by_key: dict, results_dir: Path, flying: dict[str, dict[str, Any]], submitted_at: float) -> int:
    """``--wait``: every submitted job's outcome, and those of runs whose earlier jobs were still on them."""
    from bench.pipeline.executors import Outcome, job_error, summary

    outcomes = []
    for key, job in jobs_by_key.items():
        try:
            _await(job)
            ended = None if job.paths.result_pickle.exists() else _final_state(job)
            if ended not in (None, "COMPLETED", "UNKNOWN"):  # it ended outside Python (a setup line, scancel, the
                # node): no result will come, where results() waited 15 s for one, job after job
                raise JobEnded(state_message(job.job_id, ended) or last_error_line(job.stderr() or "",
                                                                                    f"job {job.job_id} {ended}"))
            # results(), not result(): a multi-task (DDP) job has one result per task (rank 0 records).
            job.results()
            outcomes.append(Outcome(key, True, log=str(job.paths.stderr)))
        except Exception as error:  # noqa: BLE001 - a failed job is reported, the others go on
            message = str(error) if isinstance(error, JobEnded) else \
                state_message(job.job_id, _final_state(job)) or job_error(last_error_line(str(error), "unknown error"))
            log = str(job.paths.stderr) if job.paths.stderr.exists() else None  # a task cancelled before it started
            outcomes.append(Outcome(key, False, error=message, log=log))
    outcomes += _wait_in_flight(results_dir, flying)
    since = "submission" if jobs_by_key else "the wait began (this invocation submitted none)"
    print(f"all {len(jobs_by_key) + len(flying)} job(s) ended {time.time() - submitted_at:.1f} s after {since}")
    return summary(outcomes)


def _submit_group(executor: submitit.AutoExecutor, group: list, results_dir: Path, redo: bool,
                  log_folder: Path, profile_file: Path | None = None) -> list:
    """One job array; sbatch's refusal becomes ``SubmitError`` with its last line (submitit would print
    sbatch's stderr and raise with a traceback), and the files submitit wrote for it in ``log_folder`` (the
    pickled runs, ``.submission_file_*.sh``) are removed: they belong to no job."""
    import contextlib
    import io

    captured = io.StringIO()
    before = set(log_folder.iterdir()) if log_folder.is_dir() else set()
    try:
        with contextlib.redirect_stderr(captured), executor.batch():
            return [executor.submit(RunJob(), run.to_dict(), str(results_dir), redo) for run in group]
    except (submitit.core.utils.FailedJobError, OSError, subprocess.SubprocessError) as error:
        for path in set(log_folder.iterdir()) - before if log_folder.is_dir() else ():
            if path.is_file():
                path.unlink(missing_ok=True)
        for folder in (log_folder, log_folder.parent):  # made for this array alone: empty, removed
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = last_error_line(f"{captured.getvalue()}\n{error}", "no reason given")
        raise SubmitError(refusal(reason, profile_file)) from None


def _final_state(job: submitit.Job, tries: int = 5, interval: float = 1.0) -> str:
    """The job's state from sacct (``CANCELLED by 0`` -> ``CANCELLED``); ``UNKNOWN`` if SLURM cannot say.
    sacct has no line of its own for an array task cancelled while pending: its state is then read from
    the array's lines (a range line ``12_[2-3%2]`` covers it), and ``NO_RECORD`` when nothing covers it.
    The accounting lags the controller by a moment, so a task not found yet is asked again."""
    array = job.job_id.split("_")[0]
    for attempt in range(tries):
        try:
            states = _parse_states(_sacct(job.job_id))
            if job.job_id not in states and array != job.job_id:
                states = {**_parse_states(_sacct(array)), **states}
        except (OSError, subprocess.SubprocessError):
            return "UNKNOWN"
        if job.job_id in states or attempt == tries - 1:
            return _task_state(states, job.job_id)
        time.sleep(interval)
    return "UNKNOWN"


class JobEnded(RuntimeError):
    """A job that ended without a result of its own, its message the line to show: SLURM dropped the array task
    without a trace (cancelled while pending: it will never end for submitit), or it ended outside Python (a setup
    line, scancel, the node)."""


def poll_delay(started: float, interval: float = 2.0) -> float:
    """Seconds to the next look at SLURM while waiting since ``started`` (``time.monotonic()``): ``interval``
    at first, then half the time waited so far, at most ``MAX_POLL_S`` (a wait of hours asks the controller
    every minute, not every 2 s). submitit's own ``done()`` refreshes on a like schedule (at most every 10
    minutes), so waiting longer between looks does not make ``--wait`` notice the end later."""
    return min(MAX_POLL_S, max(interval, (time.monotonic() - started) / 2))


def _await(job: submitit.Job, interval: float = 2.0, checks: int = 3) -> None:
    """Until submitit sees ``job`` end; ``JobEnded`` when the task is in neither squeue nor sacct (while
    sacct lists its array) at ``checks`` polls in a row: submitit would wait for it forever. A job SLURM holds
    (``HELD_REASONS``) is said once: it waits until someone releases or cancels it. Polls ``poll_delay`` apart."""
    missing, said, started = 0, False, time.monotonic()
    while not job.done():
        time.sleep(poll_delay(started, interval))
        states, answered = _live_states(job.job_id.split("_")[0])
        if not said and _task_state(states, job.job_id) == "PENDING":
            said = _warn_held(job.job_id, pending_reasons(job.job_id.split("_")[0]).get(job.job_id))
        gone = answered and _task_state(states, job.job_id) == NO_RECORD  # SLURM cannot say now: keep waiting
        missing = missing + 1 if gone else 0
        if missing >= checks:
            raise JobEnded(f"job {job.job_id}: no accounting record (cancelled before it started?)")


def pending_reasons(ids: str) -> dict[str, str]:
    """squeue's reason of each pending task of the job arrays ``ids`` (comma-separated); empty when SLURM
    cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-r", "-h", "-t", "PENDING", "-j", ids, "-o", "%i|%r"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return _parse_states(out)


def pending_note(reason: str | None) -> str:
    """`` (Priority)``, or for a job SLURM holds `` (PartitionTimeLimit: ...; scancel it ...)``; empty without a
    reason."""
    if not reason or reason in ("None", "(null)", "UNKNOWN"):
        return ""
    if reason not in HELD_REASONS:
        return f" ({reason})"
    return (f" ({reason}: {HELD_REASONS[reason]}; SLURM does not start it until it is changed: scancel it and "
            "resubmit with a profile that fits the partition)")


def _warn_held(job_id: str, reason: str | None) -> bool:
    """Warn (stderr) that SLURM holds pending job ``job_id`` for good (``HELD_REASONS``); whether it does."""
    if reason not in HELD_REASONS:
        return False
    print(f"warning: job {job_id} PENDING{pending_note(reason)}", file=sys.stderr, flush=True)
    return True


def _sacct(job_ids: str) -> str:
    return subprocess.run(["sacct", "-j", job_ids, "-X", "-n", "-P", "-o", "JobID,State"], capture_output=True,
                          text=True, timeout=30, check=True).stdout


def _task_state(states: dict[str, str], job_id: str) -> str:
    """``job_id``'s state in ``states`` (from ``_parse_states``); an array task SLURM has no line for while
    it lists its array (a task cancelled before it started) is ``NO_RECORD``, anything else ``UNKNOWN``."""
    if job_id in states:
        return states[job_id]
    array, sep, _ = job_id.partition("_")
    known = sep and any(other == array or other.startswith(f"{array}_") for other in states)
    return NO_RECORD if known else "UNKNOWN"


def state_message(job_id: str, state: str) -> str | None:
    """The failure line of a job that left no error of its own (cancelled, never started); else None."""
    if state.startswith("CANCELLED"):
        return f"job {job_id} {state}"
    if state == NO_RECORD:
        return f"job {job_id}: no accounting record (cancelled before it started?)"
    return None


def in_flight(results_dir: Path, keys: list[str]) -> dict[str, dict[str, Any]]:
    """The jobs (with ``state``) of ``keys`` that an earlier submission left pending or running."""
    wanted = set(keys)
    return {key: job for key, job in job_states(results_dir).items()
            if key in wanted and job["state"] in ACTIVE_STATES}


def leave_to_jobs(runs: list, results_dir: Path) -> tuple[list, list[str]]:
    """For an invocation that computes runs itself (``inprocess``, ``local``): the runs to compute, and one line
    per run left to the job an earlier SLURM submission has pending or running on it. Computing such a run here
    too would do it twice, and the job would fail on the run's claim if it started meanwhile. No ``jobs.json``:
    SLURM is not asked (``job_states``)."""
    flying = in_flight(results_dir, [run.key for run in runs])
    lines = [f"left to SLURM: {key} (job {job['job_id']} {job['state']}, submitted {job.get('submitted_at')}); "
             f"its job computes it (scancel {job['job_id']} to run it here)" for key, job in flying.items()]
    return [run for run in runs if run.key not in flying], lines


def _wait_in_flight(results_dir: Path, flying: dict[str, dict[str, Any]], interval: float = 2.0) -> list:
    """``--wait`` for runs not resubmitted because an earlier job is still on them: poll until those jobs
    end; each one's outcome from its record (or failure note / final state)."""
    from bench.pipeline.executors import Outcome
    from bench.pipeline.records import RecordError, read_failure, read_record, record_path

    pending, said, started = dict(flying), set(), time.monotonic()
    while pending:
        time.sleep(poll_delay(started, interval))
        states = job_states(results_dir)
        for key, job in states.items():  # held by SLURM for good: said once, as for the jobs submitted now
            if key in pending and key not in said and _warn_held(job["job_id"], job.get("reason")):
                said.add(key)
        pending = {key: job for key, job in pending.items() if states.get(key, {}).get("state") in ACTIVE_STATES}
    outcomes = []
    for key, job in flying.items():
        try:
            read_record(record_path(results_dir, key))
            outcomes.append(Outcome(key, True, log=job.get("log")))
        except RecordError:
            state = job_states(results_dir).get(key, {}).get("state", "UNKNOWN")
            error = ((read_failure(results_dir, key) or {}).get("error") or state_message(job["job_id"], state)
                     or f"job {job['job_id']} {state}")
            outcomes.append(Outcome(key, False, error=error, log=job.get("log")))
    return outcomes


def job_states(results_dir: Path) -> dict[str, dict[str, Any]]:
    """State of every submitted run's job (from ``sacct``; ``UNKNOWN`` when SLURM cannot be asked)."""
    jobs = _read_jobs(results_dir)
    if not jobs:
        return {}
    ensure_slurm_conf()
    ids = ",".join(sorted({job["job_id"].split("_")[0] for job in jobs.values()}))
    states, answered = _live_states(ids, warn=lambda line: print(line, file=sys.stderr))
    found = {key: {**job, "state": _task_state(states, job["job_id"]) if answered else
                   states.get(job["job_id"], "UNKNOWN")} for key, job in jobs.items()}
    if any(job["state"] == "PENDING" for job in found.values()):  # why: SLURM's reason (held for good, or queued)
        reasons = pending_reasons(ids)
        for job in found.values():
            if job["state"] == "PENDING" and job["job_id"] in reasons:
                job["reason"] = reasons[job["job_id"]]
    return found


def _live_states(ids: str, warn: Callable[[str], None] | None = None) -> tuple[dict[str, str], bool]:
    """``({task: state}, answered)`` of the job arrays ``ids`` (comma-separated): sacct's states, with the
    controller's live list (squeue) winning for the tasks it still holds, since the accounting lags behind
    it (a task just submitted is not listed yet; a stale range line may still cover a task that runs).
    ``answered``: both replied, so a task neither lists is truly gone (``_task_state``'s ``NO_RECORD``)."""
    states: dict[str, str] = {}
    answered = True
    try:
        states.update(_parse_states(_sacct(ids)))
    except (OSError, subprocess.SubprocessError) as error:
        answered = False
        if warn:
            warn(f"warning: sacct unavailable ({error}); job states unknown")
    try:
        out = subprocess.run(["squeue", "-r", "-h", "-j", ids, "-o", "%i|%T"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        states.update(_parse_states(out))
    except (OSError, subprocess.SubprocessError):
        answered = False  # without the controller's list, a task missing from sacct may just be queued
    return states, answered


def _parse_states(out: str) -> dict[str, str]:
    """``JobID|State`` lines of sacct/squeue -> {job id: state}. A pending array's tasks share one line,
    ``12_[0-3,5%2]``: it is expanded to 12_0 ... 12_5. A task's own line (``12_2|COMPLETED``) wins over a
    range line covering it (``12_[2-3%2]|CANCELLED by 0`` after ``scancel 12_3``), whatever their order."""
    own: dict[str, str] = {}
    ranges: dict[str, str] = {}
    for line in out.splitlines():
        job_id, _, state = line.strip().partition("|")
        state = state.split()[0] if state.strip() else "UNKNOWN"
        job_id = job_id.strip()
        base, sep, tasks = job_id.partition("_[")
        if not sep:
            own[job_id] = state
            continue
        for part in tasks.rstrip("]").split("%")[0].split(","):
            first, _, last = part.partition("-")
            if first.isdigit() and (not last or last.isdigit()):
                for task in range(int(first), int(last or first) + 1):
                    ranges[f"{base}_{task}"] = state
    return {**ranges, **own}
