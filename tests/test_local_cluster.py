"""Integration tests against the real local SLURM cluster (slurm/local_cluster.sh).

Run:  bash slurm/local_cluster.sh start && .venv/bin/python -m pytest -m slurm tests/test_local_cluster.py
Skipped when the cluster is not up, failed instead when TOKENBENCH_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import submitit

pytestmark = pytest.mark.slurm

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}


def _run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}: {proc.stderr.strip()}"
    return proc.stdout


def _sbatch_wait(env: dict[str, str], tmp_path: Path, *args: str) -> str:
    """Submit with --wait (returns once the job ended, exit code = the job's) and return the job id."""
    out = _run(["sbatch", "--parsable", "--wait", "-o", str(tmp_path / "slurm-%j.out"), *args], env)
    job_id = out.strip().splitlines()[-1].split(";")[0]
    assert job_id.isdigit(), f"unexpected sbatch output {out!r}"
    return job_id


def _sacct_job(env: dict[str, str], job_id: str, timeout: float = 30) -> dict[str, str]:
    """The allocation's accounting record, once complete.

    slurmdbd receives the records asynchronously: right after `sbatch --wait` returns, the row may still
    lack fields (the partition shows up empty for a moment), so poll until state and partition are set.
    """
    fields = ["JobID", "State", "Partition", "ExitCode", "Timelimit"]
    deadline = time.monotonic() + timeout
    row: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(fields)], env, timeout=30)
        lines = [line for line in out.splitlines() if line.strip()]
        if lines:
            row = dict(zip(fields, lines[0].split("|"), strict=True))
            if row["State"].split()[0] in FINAL_STATES and row["Partition"]:
                return row
        time.sleep(0.5)
    raise AssertionError(f"sacct has no complete record of job {job_id} after {timeout}s (last: {row})")


@pytest.fixture(scope="module")
def file_job(slurm_env, tmp_path_factory):
    """A batch job that computes a value and writes it to a file; returns (job_id, file)."""
    tmp = tmp_path_factory.mktemp("file_job")
    result = tmp / "result.txt"
    job_id = _sbatch_wait(
        slurm_env, tmp, "--job-name=tb-file", "--wrap", f"echo tokenbench-$((6 * 7)) > {result}"
    )
    return job_id, result


def test_sbatch_wait_writes_file(file_job):
    _, result = file_job
    assert result.read_text() == "tokenbench-42\n"


def test_sacct_reports_completed(slurm_env, file_job):
    job_id, _ = file_job
    row = _sacct_job(slurm_env, job_id)
    assert row["JobID"] == job_id
    assert row["State"] == "COMPLETED"
    assert row["ExitCode"] == "0:0"
    assert row["Partition"] == "debug"  # the default partition


def test_failed_job_reported_by_sacct(slurm_env, tmp_path):
    # sbatch --wait exits with the job's code; check=False by hand here.
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", "-o", str(tmp_path / "slurm-%j.out"), "--wrap", "exit 3"],
        env=slurm_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3
    row = _sacct_job(slurm_env, proc.stdout.strip().split(";")[0])
    assert row["State"] == "FAILED"
    assert row["ExitCode"] == "3:0"


def test_short_partition(slurm_env, tmp_path):
    result = tmp_path / "partition.txt"
    job_id = _sbatch_wait(
        slurm_env, tmp_path, "-p", "short", "--wrap", f"echo $SLURM_JOB_PARTITION > {result}"
    )
    assert result.read_text() == "short\n"
    row = _sacct_job(slurm_env, job_id)
    assert row["State"] == "COMPLETED"
    assert row["Partition"] == "short"
    assert row["Timelimit"] == "00:30:00"  # short's MaxTime=30 is the default limit there


def _executor(folder: Path, **params):
    executor = submitit.AutoExecutor(folder=folder / "%j")
    assert executor.cluster == "slurm", "submitit did not pick slurm: is srun on PATH?"
    executor.update_parameters(slurm_partition="debug", timeout_min=5, cpus_per_task=1, **params)
    return executor


def test_submitit_returns_computed_value(slurm_env, submitit_folder):
    executor = _executor(submitit_folder)
    job = executor.submit(sum, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert job.result() == 55
    assert _sacct_job(slurm_env, job.job_id)["State"] == "COMPLETED"


def test_submitit_batch_array(slurm_env, submitit_folder):
    executor = _executor(submitit_folder)
    with executor.batch():
        jobs = [executor.submit(pow, 2, k) for k in (3, 5, 7)]
    assert [job.result() for job in jobs] == [8, 32, 128]
    # One array job: ids <array id>_0, _1, _2.
    assert len({job.job_id.split("_")[0] for job in jobs}) == 1
    assert sorted(job.job_id.split("_")[1] for job in jobs) == ["0", "1", "2"]


def test_submitit_two_tasks(slurm_env, submitit_folder):
    # Nested function: cloudpickle ships it by value, so the job does not need to import this test module.
    def rank_and_size():
        import submitit

        env = submitit.JobEnvironment()
        return env.global_rank, env.num_tasks

    executor = _executor(submitit_folder, tasks_per_node=2)
    job = executor.submit(rank_and_size)
    assert sorted(job.results()) == [(0, 2), (1, 2)]


def test_submitit_exception_propagates(slurm_env, submitit_folder):
    def boom():
        raise ValueError("tokenbench-boom")

    job = _executor(submitit_folder).submit(boom)
    with pytest.raises(submitit.core.utils.FailedJobError, match="tokenbench-boom"):
        job.result()
