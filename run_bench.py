#!/usr/bin/env python3
"""Run a tokenbench experiment: expand the YAML grid into runs, execute those without a finished record,
write one JSON record per run, then the leaderboard.

    python run_bench.py --config configs/quickstart.yaml                 # in this process
    python run_bench.py --config X.yaml --executor local                  # one subprocess per run
    python run_bench.py --config X.yaml --executor slurm --profile local  # a SLURM job array (submitit)
    python run_bench.py --config X.yaml --status                          # done / pending / running / failed
    python run_bench.py --config X.yaml --dry-run                         # validate and list, run nothing

``tokenbench-run`` (installed with the project) is the same command.

Exit codes: 0 every run succeeded; 1 some runs failed (their errors are listed, the others' records
kept); 2 bad input (the message names the file, the key and what is allowed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.pipeline.executors import EXECUTORS
from bench.pipeline.files import REPO


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML file")
    parser.add_argument("--executor", choices=EXECUTORS, default="inprocess")
    parser.add_argument("--results", help="results folder (default: results/<experiment name>)")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and list the runs")
    parser.add_argument("--force", action="store_true", help="redo runs that already have a record")
    parser.add_argument("--only", metavar="GLOB", help="only runs whose key or method matches GLOB")
    parser.add_argument("--profile", help="SLURM cluster profile (slurm/<name>.yaml or a path)")
    parser.add_argument("--wait", action="store_true", help="with --executor slurm: wait for the jobs")
    parser.add_argument("--status", action="store_true", help="list every run's state and exit")
    parser.add_argument("--no-report", action="store_true", help="do not write the leaderboard afterwards")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.pipeline.config import ConfigError, load_experiment, select
    from bench.pipeline.status import collect_status, print_status, todo_runs

    try:
        experiment = load_experiment(args.config, check_files=not args.status, data_required=not args.dry_run)
    except ConfigError as error:
        return fail(str(error))
    for warning in experiment.warnings:
        print(warning, file=sys.stderr)
    results_dir = Path(args.results) if args.results else REPO / "results" / experiment.name
    runs = select(experiment.runs, args.only)
    if not runs:
        return fail(f"{args.config}: --only {args.only!r} matches no run (keys: {experiment.runs[0].key}, ...)")

    if args.status:
        rows = collect_status(runs, results_dir)
        print_status(rows)
        return 0 if all(row.state == "done" for row in rows) else 1

    todo, notes = todo_runs(runs, results_dir, force=args.force)
    for note in notes:
        print(note, file=sys.stderr)
    print(f"{experiment.name}: {len(runs)} run(s), {len(runs) - len(todo)} already done, {len(todo)} to run "
          f"-> {results_dir}")
    if args.dry_run:
        for run in runs:
            print(f"  {'todo' if run in todo else 'done'}  {run.key}")
        return 0
    if args.executor == "slurm":
        from bench.pipeline.profiles import ProfileError
        from bench.pipeline.slurm import submit

        try:
            code = submit(experiment, todo, results_dir, profile=args.profile, wait=args.wait)
        except ProfileError as error:
            return fail(str(error))
        if args.wait and not args.no_report:
            write_report(results_dir)
        return code

    from bench.pipeline.executors import run_inprocess, run_local, summary

    started = time.time()
    if args.executor == "local":
        outcomes = run_local(todo, results_dir)
    else:
        outcomes = run_inprocess(todo, results_dir, progress=not args.quiet and sys.stderr.isatty())
    code = summary(outcomes)
    print(f"wall time {time.time() - started:.1f} s")
    if not args.no_report:
        write_report(results_dir)
    return code


def write_report(results_dir: Path) -> None:
    import report

    if (results_dir / "runs").is_dir():
        report.main([str(results_dir)])


if __name__ == "__main__":
    sys.exit(main())
