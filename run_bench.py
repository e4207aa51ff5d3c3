#!/usr/bin/env python3
"""Run a tokenbench experiment: expand the YAML grid into runs, execute those without a finished record,
write one JSON record per run, then the leaderboard.

    python run_bench.py --config configs/quickstart.yaml                 # in this process
    python run_bench.py --config X.yaml --executor local                  # one subprocess per run
    python run_bench.py --config X.yaml --executor slurm --profile local  # a SLURM job array (submitit)
    python run_bench.py --config X.yaml --status                          # done / pending / running / failed
    python run_bench.py --config X.yaml --dry-run                         # validate and list, run nothing

``tokenbench-run`` (installed with the project) is the same command.

A run that an earlier SLURM submission's job is still on (pending or running) is left to that job by the
``inprocess`` and ``local`` executors (one line each), not computed twice.

Exit codes: 0 every run succeeded (runs left to their SLURM jobs aside); 1 some runs failed (their errors
are listed, the others' records kept); 2 bad input (the message names the file, the key and what is
allowed), an unusable or busy results folder, or SLURM refusing the submission; 130 interrupted (Ctrl-C);
143 stopped by SIGTERM (``kill``, ``timeout``, the end of an allocation), handled as a Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.pipeline.executors import EXECUTORS
from bench.pipeline.files import REPO


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """run_bench's command line (tests parse the README's commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--executor", choices=EXECUTORS, default="inprocess")
    parser.add_argument("--results", help="results folder (default: results/<experiment name>)")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and list the runs")
    parser.add_argument("--force", action="store_true", help="redo runs that already have a record")
    parser.add_argument("--only", metavar="GLOB", action="append",
                        help="only runs whose key or method matches GLOB (repeated: any of them)")
    parser.add_argument("--profile", help="SLURM cluster profile (slurm/<name>.yaml or a path; default: the "
                        "experiment's slurm.profile, else local)")
    parser.add_argument("--wait", action="store_true",
                        help="with --executor slurm: wait for the jobs (the results folder is left free meanwhile)")
    parser.add_argument("--status", action="store_true", help="list every run's state and exit")
    parser.add_argument("--no-report", action="store_true", help="do not write the leaderboard afterwards")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="validate without calibrating MAC budgets (budget runs are left out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--wait-lock", action="store_true",
                        help="wait while another invocation uses the results folder (default: refuse, exit 2)")
    return parser


def calibration_line(calibration: dict) -> str:
    from dataclasses import fields

    from bench.pipeline.calibrate import Calibration

    # an entry of experiment.calibrations: Calibration's fields, then its model, setting and group (weights, data)
    return Calibration(**{field.name: calibration[field.name] for field in fields(Calibration)}).describe()


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from bench.pipeline import interrupts

    try:
        with interrupts.remembered():
            code = _main(argv)
            interrupts.check()  # a Ctrl-C Python dropped in a finalizer still ends here, exit 130
            return code
    except KeyboardInterrupt as interrupt:  # the run in progress has marked itself interrupted; finished records
        # stay. SIGTERM (kill, timeout, an allocation's end) arrives as ``interrupts.Terminated``: the same, exit 143
        print(f"interrupted ({interrupts.cause(interrupt)}): finished runs keep their records (a run in progress is "
              "marked interrupted, finished calibrations stay cached); run the same command again to continue",
              file=sys.stderr)
        return interrupts.exit_code(interrupt)
    except BrokenPipeError:  # the reader of stdout went away (`--dry-run | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    args.began = time.monotonic()  # the wall-time line also says what came before the runs (calibrating)
    mode = " ".join(["--executor", args.executor, *(["--dry-run"] if args.dry_run else []),
                     *(["--status"] if args.status else [])])
    unused = [flag for flag, value, used in (  # not silently ignored
        ("--wait", args.wait, args.executor == "slurm" and not (args.dry_run or args.status)),
        ("--profile", args.profile, (args.executor == "slurm" or args.dry_run) and not args.status)) if value and not used]
    if unused:
        return fail(f"{' and '.join(unused)}: does nothing here (--wait: with --executor slurm, when it submits; "
                    f"--profile: with --executor slurm or --dry-run); this invocation: {mode}")
    try:
        import methods  # every method file registers itself here
    except ImportError as error:  # a file of methods/ that does not import: one line naming it
        return fail(str(error))
    from bench.pipeline.config import ConfigError, load_experiment, select
    from bench.pipeline.data import forget_datasets
    from bench.pipeline.status import collect_status, print_status

    forget_datasets()  # an earlier invocation in this process (a notebook, the tests) may have read other files

    try:
        experiment = load_experiment(args.config, check_files=not args.status, data_required=not args.dry_run,
                                     calibrate=not args.no_calibrate, only=args.only)
    except ConfigError as error:
        return fail(str(error))
    for warning in experiment.warnings:
        print(warning, file=sys.stderr)
    results_dir = Path(args.results) if args.results else REPO / "results" / experiment.name
    if args.only and not all(pattern.strip() for pattern in args.only):
        return fail("--only: an empty GLOB; give a method name or a key glob (e.g. --only tome --only 'deit-s-*')")
    runs = select(experiment.runs, args.only)
    # each glob, not only all together: a typo beside a good one is not silently ignored; and a method the file does not
    # name, also where no run is left at all (--only baseline on a grid of budget entries: its other methods' budgets
    # left uncalibrated, said "no MAC budget of theirs is reachable" before)
    unmatched = [pattern for pattern in args.only or () if not select(experiment.runs, [pattern]) and (
        experiment.runs or (pattern in methods.names() and pattern not in experiment.methods))]
    if unmatched:
        keys = f"; keys: {experiment.runs[0].key}, ..." if experiment.runs else ""
        return fail(f"{args.config}: --only {unmatched[0]!r} matches no run (methods: {', '.join(experiment.methods)}"
                    f"{keys})")
    if not experiment.runs:  # e.g. every run a MAC budget no setting reaches (the warnings above say which)
        why = ("without its MAC-budget runs (--no-calibrate)" if args.no_calibrate else
               "of the methods --only selects (no MAC budget of theirs is reachable)" if not experiment.complete else
               "(no MAC budget is reachable)")
        return fail(f"{args.config}: grid: makes no run {why}")

    if (args.status or args.dry_run) and results_dir.exists() and not results_dir.is_dir():  # as the runs refuse it
        return fail(f"results folder {results_dir} is a file, not a folder")
    if args.status:
        rows = collect_status([run.key for run in runs], results_dir, {run.key: run.data for run in runs})
        print_status(rows)
        return 0 if all(row.state == "done" for row in rows) else 1
    if args.dry_run:  # reads only
        return run(args, experiment, runs, results_dir)
    from bench.pipeline.lock import FolderError, results_lock

    waiting: list[float] = []  # when --wait-lock began waiting for another invocation: the wall-time line says
    # that wait apart (its "before the runs" included it: 44.7 s, of which 41 s the wait)

    def announce(line: str) -> None:
        print(line, file=sys.stderr)
        waiting.append(time.monotonic())

    try:  # the folder is checked usable and held for the whole invocation (nothing computed twice), but the
        # wait of --executor slurm --wait (its jobs are submitted and in jobs.json: SLURM's now)
        with results_lock(results_dir, wait=args.wait_lock, announce=announce) as release:
            args.waited = time.monotonic() - waiting[0] if waiting else 0.0
            return run(args, experiment, runs, results_dir, release)
    except FolderError as error:
        return fail(str(error))


def here_problem(experiment, todo: list) -> str | None:
    """Why the runs ``todo`` cannot run on this machine (``--executor inprocess`` / ``local``), in one line: a
    CUDA device, or a CUDA-only attention kernel on ``device: auto``, where CUDA is not available."""
    import torch

    from bench.sdpa import CPU_BACKENDS

    if not todo or torch.cuda.is_available():
        return None
    if any(run.device == "cuda" for run in todo):
        return (f"{experiment.file}: defaults.device: cuda, but CUDA is not available on this machine "
                f"({len(todo)} run(s) to do); allowed here: cpu or auto, or --executor slurm for GPU nodes")
    kernels = [run.sdpa_backend for run in todo if run.sdpa_backend not in CPU_BACKENDS]
    if kernels:  # device: cpu with such a kernel is refused when the file is read
        return (f"{experiment.file}: defaults.sdpa_backend: {kernels[0]!r} needs CUDA, and device: auto is the CPU "
                f"on this machine (no CUDA); allowed here: {', '.join(CPU_BACKENDS)}, or --executor slurm for "
                "GPU nodes")
    return None


def auto_device(args: argparse.Namespace, experiment) -> tuple[str, str] | None:
    """What ``device: auto`` runs on for this invocation, and why: with ``--executor slurm`` the nodes of the cluster
    profile (cuda where it gives GPUs), else this machine. None: a profile that does not load (refused below)."""
    if args.executor == "slurm":
        from bench.pipeline.profiles import ProfileError, load_profile
        from bench.pipeline.slurm import profile_name

        name = profile_name(experiment, args.profile)
        try:
            gpus = load_profile(name).gpus_per_node
        except ProfileError:
            return None
        return ("cuda", f"cluster profile {name} gives gpus_per_node: {gpus}") if gpus else (
            "cpu", f"cluster profile {name} gives its jobs no GPU")
    import torch

    return ("cuda", "CUDA is available on this machine") if torch.cuda.is_available() else (
        "cpu", "no CUDA on this machine")


def run(args: argparse.Namespace, experiment, runs: list, results_dir: Path, release=None) -> int:
    from bench.pipeline.status import todo_runs

    # a record of a device: auto run timed on another device kind than auto gives now is set aside and redone
    todo, notes = todo_runs(runs, results_dir, force=args.force, set_aside=not args.dry_run,
                            auto=auto_device(args, experiment))
    for note in notes:
        print(note, file=sys.stderr)
    done, left = len(runs) - len(todo), []
    if args.executor != "slurm" and not args.dry_run:  # a run an earlier submission's job is on is left to that
        # job, and counted apart: not "to run" here (the count said so, then fewer ran)
        from bench.pipeline.slurm import leave_to_jobs

        todo, left = leave_to_jobs(todo, results_dir)
        for line in left:
            print(line, file=sys.stderr)
    queued = f"{len(left)} left to SLURM jobs, " if left else ""
    print(f"{experiment.name}: {len(runs)} run(s), {done} already done, {queued}{len(todo)} to run -> {results_dir}")
    if args.dry_run:
        for run in runs:
            print(f"  {'todo' if run in todo else 'done'}  {run.key}")
        for calibration in experiment.calibrations:  # every MAC budget: the knob found, or why none; a method's
            # settings (a sweep of its other parameters) told apart as the progress lines and the leaderboard's rows
            method = experiment.budget_label(calibration["method"], calibration.get("setting"))
            print(f"  budget  {calibration['model']}: {calibration_line({**calibration, 'method': method})}")
        from report import transform_label

        for line in dict.fromkeys(f"  transform  {run.model_label} on {run.data['name']}: "
                                  f"{transform_label(run.data['transform'])}" for run in runs):
            print(line)  # the eval transform timm resolved for each model (run.data.transform)
        from bench.pipeline.profiles import ProfileError
        from bench.pipeline.resources import describe
        from bench.pipeline.slurm import SubmitError, check_submission, profile_name

        try:  # the SLURM resources per job shape (profile: --profile, the config's, else local)
            print("\n".join(describe(todo, profile_name(experiment, args.profile))))
            check_submission(experiment, todo, args.profile)
        except ProfileError as error:
            return fail(str(error))
        except SubmitError as error:  # what --executor slurm would refuse (user test 17: the dry run said nothing)
            print(f"  note: --executor slurm refuses this: {error}")
        problem = here_problem(experiment, todo) if args.executor != "slurm" else None
        if problem:  # what a run here would refuse (a config for GPU nodes may be dry-run on a login node)
            print(f"  note: --executor {args.executor} refuses this: {problem}")
        return 0
    problem = here_problem(experiment, todo) if args.executor != "slurm" else None
    if problem:  # said once, before anything runs (each run failed on its own before)
        return fail(problem)
    if args.executor == "slurm":  # a bad profile, or jobs that would all fail: refused before anything is written
        from bench.pipeline.profiles import ProfileError
        from bench.pipeline.slurm import SubmitError, check_submission

        try:
            cluster = check_submission(experiment, todo, args.profile)
        except (ProfileError, SubmitError) as error:
            return fail(str(error))
    from bench.pipeline.records import (
        ExperimentFileError,
        experiment_bytes,
        experiment_path,
        read_all,
        read_experiment,
        restore_experiment,
        write_experiment,
    )

    earlier = experiment_bytes(results_dir)  # put back if nothing starts (weights not fetched, sbatch refused)
    try:
        previous = read_experiment(results_dir)
    except ExperimentFileError as error:
        previous = None
        print(f"note: {error}; rewritten", file=sys.stderr)
    if previous and previous["name"] and previous["name"] != experiment.name:
        print(f"note: {results_dir} holds the results of experiment {previous['name']!r} ({previous['config']}); "
              f"those runs are now listed under 'Records of earlier configs' (report.py --all shows them)",
              file=sys.stderr)
    # not every MAC-budget run keyed (--no-calibrate: none; --only METHOD...: those of its methods,
    # ``experiment.budget_methods``): the other methods' calibrations of the last invocation stay (and their budget
    # records that the config makes at those calibrations count as current); the keyed methods' calibrations and
    # budget runs are this config's alone
    keyed = experiment.budget_methods
    calibrations = experiment.calibrations
    keys = [run.key for run in experiment.runs]
    if not experiment.complete and previous:
        kept = [c for c in previous["calibrations"] if c.get("method") not in keyed]
        calibrations = kept + calibrations
        # their budget runs' keys: those of the records the config makes at a kept calibration (every budget record
        # of those methods counted as current, an earlier config's too: another budget, model, data or setting)
        keys += [record["key"] for record in read_all(results_dir)[0] if experiment.left_out_run(record, kept)]
    try:  # the report shows the runs this config makes (and unreachable budgets as "-")
        write_experiment(results_dir, experiment.name, experiment.file, keys, calibrations)
    except OSError as error:
        return fail(f"cannot write {experiment_path(results_dir)} ({error.strerror or error})")
    from bench.pipeline.fetch import prefetch_weights
    from bench.pipeline.models import WeightsError

    try:  # URL and timm weights: fetched once here, the jobs get local files
        todo = prefetch_weights(todo, results_dir, warn=lambda message: print(message, file=sys.stderr),
                                jobs_here=args.executor != "slurm")
    except WeightsError as error:
        restore_experiment(results_dir, earlier)
        return fail(str(error))
    if args.executor == "slurm":
        from bench.pipeline.profiles import profile_path
        from bench.pipeline.slurm import SubmitError, profile_name, submit

        try:  # with the profile checked above
            code = submit(experiment, todo, results_dir, cluster, wait=args.wait, redo=args.force,
                          profile_file=profile_path(profile_name(experiment, args.profile)), before_wait=release)
        except SubmitError as error:  # sbatch took none of it (one experiment: one job array)
            restore_experiment(results_dir, earlier)
            return fail(str(error))
        if args.wait and not args.no_report:
            write_report(results_dir)
        return code

    from bench.pipeline.executors import run_inprocess, run_local, summary

    started, before = time.time(), time.monotonic() - args.began - args.waited
    if args.executor == "local":
        outcomes = run_local(todo, results_dir, redo=args.force)
    else:
        outcomes = run_inprocess(todo, results_dir, progress=not args.quiet and sys.stderr.isatty(), redo=args.force)
    code = summary(outcomes)
    waited = f"; {args.waited:.1f} s waiting for the results folder (--wait-lock)" if args.waited else ""
    # the runs' own time, and apart from it the time before them (it read as if the first held the second)
    print(f"wall time {time.time() - started:.1f} s for the runs, {before:.1f} s before them (the experiment read, its "
          f"MAC budgets calibrated, weights checked{waited})")
    if not args.no_report:
        write_report(results_dir)
    return code


def write_report(results_dir: Path) -> None:
    import report

    if (results_dir / "runs").is_dir():
        report.main([str(results_dir)])


if __name__ == "__main__":
    sys.exit(main())
