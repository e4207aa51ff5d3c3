"""run_bench with ``--executor slurm`` against the real local cluster (slurm/local_cluster.sh): job arrays,
failures inside jobs, preemption with requeue and resume, multi-task (DDP) fine-tuning. No mocks.

Run:  bash slurm/local_cluster.sh start
      TOKENBENCH_REQUIRE_SLURM=1 .venv/bin/python -m pytest tests/test_slurm_pipeline.py
Skipped when the cluster is not up, failed instead when TOKENBENCH_REQUIRE_SLURM=1. Lines starting with
``[measured]`` are printed even under output capture: submit -> records of a job array, preemption ->
resumed -> done, DDP vs single-process differences. About 70 s on 2 CPU cores.

Every test has its own results folder, hence its own submitit log folder (``<results>/logs/slurm/%j``):
job ids restart at 1 after a cluster wipe, and a reused folder would hand back stale results.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import submitit
import torch
import yaml

import run_bench
from bench.pipeline.records import read_all
from tests.helpers import wait_for
from tests.test_pipeline import METHODS, MODEL

pytestmark = pytest.mark.slurm

EVAL_METHODS = METHODS
# Fine-tuning: 1000 images, global batch 20 -> 50 steps per epoch (about 1 s on one CPU thread).
FINETUNE = {"epochs": 5, "batch_size": 20, "lr": 1e-3, "warmup_epochs": 0.5}


def weights_file(folder: Path) -> str:
    """A random-init checkpoint: with ``weights: null`` the dense reference model of the agreement metric
    would be a second random draw that depends on the process's RNG state, not the run's weights."""
    from bench.pipeline.models import create_model

    path = folder / "tiny.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save(create_model(MODEL["name"], MODEL["kwargs"]).state_dict(), path)
    return path.name


def experiment(folder: Path, name: str, subset: int = 200, batch_size: int = 100, **changes) -> Path:
    cfg = {
        "name": name,
        "defaults": {"model": MODEL, "weights": weights_file(folder), "data": {"name": "fashion_mnist", "subset": subset},
                     "batch_size": batch_size, "device": "cpu", "threads": 1},
        "stages": ["eval", "macs"],
        "macs": {"images": 2},
        "grid": {"methods": EVAL_METHODS},
    }
    cfg.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def finetune_experiment(folder: Path) -> Path:
    return experiment(folder, "ft", subset=1000, batch_size=250, stages=["finetune", "eval"], finetune=FINETUNE,
                      grid={"methods": [{"method": "tome", "r": 2}]})


def bench(config: Path, results: Path, *extra: str) -> int:
    return run_bench.main(["--config", str(config), "--results", str(results), "--quiet", "--no-report", *extra])


def on_slurm(config: Path, results: Path, *extra: str, profile: str = "local") -> int:
    return bench(config, results, "--executor", "slurm", "--profile", profile, *extra)


def records_by_key(results: Path) -> dict[str, dict]:
    records, problems = read_all(results)
    assert problems == []
    return {record["key"]: record for record in records}


def jobs(results: Path) -> dict[str, dict]:
    return json.loads((results / "jobs.json").read_text())


def sacct_rows(env: dict[str, str], job_id: str, *flags: str) -> list[dict[str, str]]:
    fields = ["JobID", "State", "ExitCode", "Start", "End"]
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(fields), *flags], env=env,
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line.strip()]


def queue_states(env: dict[str, str], job_id: str) -> list[str]:
    """squeue's states of ``job_id``'s tasks (one per task still queued or running; none once it has left)."""
    return subprocess.run(["squeue", "-r", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True,
                          timeout=30, check=True).stdout.split()


def sacct_final(env: dict[str, str], job_id: str, *flags: str, timeout: float = 60) -> list[dict[str, str]]:
    """sacct rows once the job has ended (a job is still ending for a moment after its result file)."""

    def ended() -> list[dict[str, str]] | None:
        rows = sacct_rows(env, job_id, *flags)
        return rows if rows and rows[-1]["State"].split()[0] not in ("PENDING", "RUNNING", "COMPLETING") else None

    return [{**row, "State": row["State"].split()[0]} for row in wait_for(ended, timeout, f"job {job_id} to end", 0.5)]


def in_background(function, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run ``function`` (e.g. a ``run_bench --wait``) in a thread; its return value lands in the list."""
    returned: list = []
    thread = threading.Thread(target=lambda: returned.append(function(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, returned


def watch_status(config: Path, results: Path, waiter: threading.Thread, timeout: float = 300,
                 details: dict[str, str] | None = None) -> set[str]:
    """Poll ``--status`` (its rows, via ``collect_status``) once a second until ``waiter`` ends; the states
    seen after the submission was recorded (and into ``details``, each run's last ``job <id> <STATE>``)."""
    from bench.pipeline.config import load_experiment
    from bench.pipeline.status import collect_status

    runs = load_experiment(config).runs
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while waiter.is_alive() and time.monotonic() < deadline:
        if (results / "jobs.json").exists():
            rows = collect_status([run.key for run in runs], results)
            seen.update(row.state for row in rows)
            if details is not None:
                details.update({row.key: row.detail for row in rows if row.detail.startswith("job ")})
        waiter.join(timeout=1.0)
    waiter.join(timeout=max(deadline - time.monotonic(), 0))
    assert not waiter.is_alive(), f"run_bench --wait still waiting after {timeout:.0f} s"
    return seen


def report(capsys, message: str) -> None:
    """A measured number, shown even though the test captures its output (and with ``-s``)."""
    with capsys.disabled():
        print(f"\n[measured] {message}")


def flat(stats: dict) -> dict[str, float]:
    return {f"{layer}.{name}": value for layer, values in stats.items() for name, value in values.items()}


def close(a: float, b: float, rel: float = 1e-9) -> bool:
    return a == pytest.approx(b, rel=rel, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# a. One job array = the same records as in-process
# --------------------------------------------------------------------------------------------------
def test_job_array_gives_the_same_records_as_inprocess(slurm_env, tmp_path, capsys):
    config = experiment(tmp_path, "array")
    results = tmp_path / "slurm"
    started = time.monotonic()
    waiter, codes = in_background(on_slurm, config, results, "--wait")
    status_during: dict[str, str] = {}
    seen = watch_status(config, results, waiter, details=status_during)  # while the array runs: pending / running
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert codes == [0], out
    assert "submitted 4 run(s) as job array(s) " in out and "4 run(s) succeeded, 0 failed" in out
    assert seen and seen <= {"pending", "running", "done"} and seen & {"pending", "running"}, seen
    submitted = jobs(results)
    arrays = {job["job_id"].split("_")[0] for job in submitted.values()}
    assert len(arrays) == 1, f"expected one job array, got {submitted}"
    assert sorted(job["job_id"].split("_")[1] for job in submitted.values()) == ["0", "1", "2", "3"]
    report(capsys, f"4-run array: submit -> all records {elapsed:.1f} s (run_bench: "
           f"{next(line for line in out.splitlines() if 'after submission' in line)}); --status saw {sorted(seen)}")

    assert bench(config, tmp_path / "inprocess") == 0
    capsys.readouterr()
    on_cluster, local = records_by_key(results), records_by_key(tmp_path / "inprocess")
    assert sorted(on_cluster) == sorted(local) and len(local) == 4
    for key, record in on_cluster.items():
        reference = local[key]
        assert record["run"] == reference["run"]
        for name in ("top1", "top5", "agreement", "images"):
            assert record["metrics"]["eval"][name] == reference["metrics"]["eval"][name], (key, name)
        assert close(record["metrics"]["eval"]["loss"], reference["metrics"]["eval"]["loss"]), key
        assert record["metrics"]["macs"] == pytest.approx(reference["metrics"]["macs"], rel=1e-9), key
        assert record["tokens_per_layer"] == reference["tokens_per_layer"], key
        assert flat(record["method_stats"]) == pytest.approx(flat(reference["method_stats"]), rel=1e-9), key
        assert record["env"]["slurm_job_id"] and record["env"]["slurm_array_task_id"] is not None
        assert record["env"]["slurm_job"] == submitted[key]["job_id"]  # "<array>_<task>", as --status shows it
        assert f"job {record['env']['slurm_job']} " in status_during[key]
        assert reference["env"]["slurm_job_id"] is None and reference["env"]["slurm_job"] is None
    identical = all(on_cluster[key][part] == local[key][part] for key in local
                    for part in ("metrics", "tokens_per_layer", "method_stats"))
    report(capsys, f"4-run array vs in-process: metrics, tokens_per_layer, method_stats "
           f"{'bit-identical' if identical else 'equal within rel. 1e-9'}")

    assert run_bench.main(["--config", str(config), "--results", str(results), "--status"]) == 0
    status = capsys.readouterr().out
    assert status.count("done     tiny-fmnist-") == 4 and status.strip().endswith("4 done")

    # A second submission finds every record and submits nothing.
    assert on_slurm(config, results, "--wait") == 0
    again = capsys.readouterr().out
    assert "4 already done, 0 to run" in again and "nothing to submit" in again
    assert jobs(results) == submitted


# --------------------------------------------------------------------------------------------------
# b. A run that crashes inside its job
# --------------------------------------------------------------------------------------------------
def test_a_crash_inside_a_job_is_reported_failed_with_log_and_error(slurm_env, tmp_path, capsys, monkeypatch):
    # The hook is read by run_job inside the job: sbatch exports the submitting environment (--export=ALL).
    monkeypatch.setenv("TOKENBENCH_FAIL_KEYS", "*-tome-*")
    config = experiment(tmp_path, "crash", stages=["macs"], grid={"methods": EVAL_METHODS[:2] + EVAL_METHODS[3:]})
    results = tmp_path / "slurm"
    assert on_slurm(config, results, "--wait") == 1
    out = capsys.readouterr().out
    assert "2 run(s) succeeded, 1 failed" in out
    failed_line = next(line for line in out.splitlines() if line.startswith("FAILED "))
    assert "tiny-fmnist-tome-r4-" in failed_line and "injected failure" in failed_line
    assert len(records_by_key(results)) == 2

    assert run_bench.main(["--config", str(config), "--results", str(results), "--status"]) == 1
    status = capsys.readouterr().out
    assert status.strip().endswith("2 done, 1 failed")
    row = next(line for line in status.splitlines() if line.startswith("failed "))
    assert "tiny-fmnist-tome-r4-" in row and "FAILED" in row
    assert "RuntimeError: injected failure: run tiny-fmnist-tome-r4-" in row  # the last error line
    log = Path(row.split("log: ")[1].strip())
    assert log.exists() and "injected failure" in log.read_text()
    note = json.loads(next((results / "failed").glob("*tome*.json")).read_text())
    assert note["log"] == str(log) and note["slurm_job_id"]


def test_a_job_whose_python_was_killed_shows_srun_saying_so(slurm_env, tmp_path, capsys):
    """``kill -9`` of a job's Python (the kernel's OOM killer, a user): no Python error in its log, whose last line is
    ``srun: Force Terminated StepId=<id>.0``, which --status showed (``job 1 FAILED: srun: Force Terminated ...``);
    it now shows srun's line before it, which says what happened: ``srun: error: <node>: task 0: Killed``."""
    config = experiment(tmp_path, "killed", stages=["throughput"], grid={"methods": EVAL_METHODS[:1]},
                        throughput={"batch_sizes": [64], "warmup": 1, "runs": 1000000})
    results = tmp_path / "slurm"
    assert on_slurm(config, results) == 0
    (key, job), = jobs(results).items()
    claim = results / "claims" / f"{key}.json"
    pid = wait_for(lambda: claim.exists() and claim.read_text() and json.loads(claim.read_text())["pid"], 120,
                   "the job to claim its run")
    subprocess.run(["kill", "-9", str(pid)], check=True, timeout=30)
    assert sacct_final(slurm_env, job["job_id"])[0]["State"] == "FAILED"
    log = Path(job["log"])
    assert "Force Terminated" in log.read_text().strip().splitlines()[-1]  # the line that showed before
    capsys.readouterr()
    assert run_bench.main(["--config", str(config), "--results", str(results), "--status"]) == 1
    (row,) = [line for line in capsys.readouterr().out.splitlines() if key in line]
    assert row.split(key)[1].strip() == f"job {job['job_id']} FAILED: srun: error: {socket.gethostname().split('.')[0]}: task 0: " \
        f"Killed  log: {log}", row


# --------------------------------------------------------------------------------------------------
# c, d. Fine-tuning: preemption (USR2 -> checkpoint -> requeue -> resume) and two DDP tasks
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned_inprocess(tmp_path_factory):
    """The uninterrupted single-process reference: (config, record, final weights)."""
    folder = tmp_path_factory.mktemp("finetune")
    config = finetune_experiment(folder)
    results = folder / "inprocess"
    assert bench(config, results) == 0
    (record,) = records_by_key(results).values()
    final = torch.load(results / "checkpoints" / record["key"] / "final.pth", weights_only=True)["model"]
    return config, record, final


def history(record: dict, *fields: str) -> list[tuple]:
    return [tuple(entry[f] for f in fields) for entry in record["metrics"]["finetune"]["history"]]


def test_preempted_finetune_resumes_mid_epoch_with_identical_results(slurm_env, finetuned_inprocess, tmp_path,
                                                                   capsys):
    from bench.pipeline.config import load_experiment
    from bench.pipeline.status import collect_status

    config, reference, reference_weights = finetuned_inprocess
    key = reference["key"]
    results = tmp_path / "slurm"
    submitted = time.monotonic()
    waiter, codes = in_background(on_slurm, config, results, "--wait")
    job_id = wait_for(lambda: (results / "jobs.json").exists() and jobs(results)[key]["job_id"], 60, "jobs.json")
    # After the first epoch's checkpoint, training is in epoch 2 (of 5, ~1 s each): signal it there.
    wait_for((results / "checkpoints" / key / "last.pth").exists, 300, "the first epoch's checkpoint", 0.05)
    preempted = time.monotonic()
    subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_env, check=True, timeout=30)
    folder = results / "logs" / "slurm" / job_id
    logs = lambda: "".join(p.read_text(errors="replace") for p in sorted(folder.glob("*_log.*")))  # noqa: E731
    runs, seen = load_experiment(config).runs, []

    def resumed_yet() -> bool:
        seen.append(collect_status([run.key for run in runs], results)[0])  # while requeued: pending, never failed
        return "resuming from" in logs()

    wait_for(resumed_yet, 180, "the requeued job to resume", 0.5)
    resumed = time.monotonic()
    waiter.join(timeout=300)
    done = time.monotonic()
    assert not waiter.is_alive() and codes == [0], capsys.readouterr().out
    assert {row.state for row in seen} <= {"pending", "running"}, seen
    assert any(row.state == "pending" for row in seen), seen

    text = logs()
    assert "Caught signal SIGUSR2" in text and "Requeued job" in text
    resume_line = next(line for line in text.splitlines() if "resuming from" in line)
    assert ", step " in resume_line, f"not a mid-epoch checkpoint: {resume_line}"  # "at epoch E, step S"
    rows = sacct_final(slurm_env, job_id, "-D")  # -D: every instance of a requeued job
    assert [row["State"] for row in rows] == ["REQUEUED", "COMPLETED"], rows
    assert not (results / "failed").exists() or not list((results / "failed").iterdir())
    report(capsys, f"preemption: submit -> USR2 {preempted - submitted:.1f} s, USR2 -> resumed "
           f"{resumed - preempted:.1f} s, resumed -> done {done - resumed:.1f} s "
           f"(USR2 -> done {done - preempted:.1f} s); {resume_line.strip().split(' at ')[-1]}; sacct -D: "
           + ", ".join(f"{row['JobID']} {row['State']}" for row in rows))

    (record,) = records_by_key(results).values()
    # Exact equality: the same CPU, one thread, the same batches and RNG streams, state restored bit for bit.
    fields = ("epoch", "train_loss", "train_top1", "lr")
    assert history(record, *fields) == history(reference, *fields)
    assert {k: v for k, v in record["metrics"]["eval"].items()} == reference["metrics"]["eval"]
    weights = torch.load(results / "checkpoints" / key / "final.pth", weights_only=True)["model"]
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[name], reference_weights[name]) for name in weights)


def test_a_two_task_job_meets_below_the_ephemeral_ports_and_a_failing_task_ends_it(slurm_env, tmp_path, monkeypatch):
    """The fine-tuning executor, 2 tasks. Both tasks' ``distributed_context`` export the job id's own port below
    Linux's ephemeral ports and the gloo rendezvous completes (submitit's choice, 20000-60000, had rank 0 fail
    with EADDRINUSE in a CI run while rank 1 waited), also with a ``MASTER_PORT`` exported in the submitting shell
    (sbatch hands it to the job: it was every job's port); one a profile's setup line exports is the job's. A task
    that fails ends the other (``--kill-on-bad-exit``): before, rank 1 waited for the dead rank 0 until the job's
    time limit."""
    from bench.pipeline.distributed import MASTER_PORTS, master_port
    from bench.pipeline.profiles import Profile
    from bench.pipeline.slurm import make_executor

    monkeypatch.setenv("MASTER_PORT", "40404")  # left behind in the submitting shell (outside MASTER_PORTS)
    profile = Profile(partition="debug", tasks_per_node=2, cpus_per_task=1, mem_gb=2, timeout_min=10)
    executor = make_executor(tmp_path / "logs", profile, finetune=True, name="tokenbench-tasks")

    def rendezvous():  # shipped by value; imports this repository in the job (the executor's PYTHONPATH)
        import os

        import torch
        import torch.distributed as dist

        from bench.pipeline.distributed import distributed_context

        with distributed_context(torch.device("cpu")) as ctx:
            total = torch.tensor([ctx.rank + 1.0])
            dist.all_reduce(total)
            return ctx.rank, ctx.world_size, int(os.environ["MASTER_PORT"]), total.item()

    job = executor.submit(rendezvous)
    port = master_port(job.job_id)
    assert sorted(job.results()) == [(0, 2, port, 3.0), (1, 2, port, 3.0)]
    assert MASTER_PORTS[0] <= port <= MASTER_PORTS[1] < 32768

    chosen = Profile(partition="debug", tasks_per_node=2, cpus_per_task=1, mem_gb=2, timeout_min=10,
                     setup=["export MASTER_PORT=23456"])
    job = make_executor(tmp_path / "logs", chosen, finetune=True, name="tokenbench-tasks").submit(rendezvous)
    assert sorted(job.results()) == [(0, 2, 23456, 3.0), (1, 2, 23456, 3.0)]

    def rank_zero_gives_up():
        import time

        import submitit

        if submitit.JobEnvironment().global_rank == 0:
            raise RuntimeError("tokenbench: rank 0 gives up")
        time.sleep(600)

    started = time.monotonic()
    job = executor.submit(rank_zero_gives_up)
    try:
        (row,) = sacct_final(slurm_env, job.job_id, timeout=120)
    finally:
        job.cancel(check=False)  # never leave rank 1 asleep on the node for the tests after this one
    assert row["State"] == "FAILED" and time.monotonic() - started < 120


def test_two_task_ddp_finetune_matches_one_process(slurm_env, finetuned_inprocess, tmp_path, capsys):
    config, reference, reference_weights = finetuned_inprocess
    profile = tmp_path / "ddp2.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "tasks_per_node": 2, "cpus_per_task": 1, "mem_gb": 2,
                                       "timeout_min": 30, "max_requeue": 5}))
    results = tmp_path / "slurm"
    started = time.monotonic()
    assert on_slurm(config, results, "--wait", profile=str(profile)) == 0, capsys.readouterr().out
    elapsed = time.monotonic() - started
    (record,) = records_by_key(results).values()
    job_id = jobs(results)[record["key"]]["job_id"]
    folder = results / "logs" / "slurm" / job_id
    # Both tasks ran to the end: each wrote its submitit result; rank 0 alone wrote the record.
    assert (folder / f"{job_id}_0_result.pkl").exists() and (folder / f"{job_id}_1_result.pkl").exists()
    assert (folder / f"{job_id}_1_log.err").exists()
    assert record["metrics"]["finetune"]["world_size"] == 2
    (row,) = sacct_final(slurm_env, job_id)
    assert (row["State"], row["ExitCode"]) == ("COMPLETED", "0:0")  # rank 1 ended cleanly too
    assert reference["metrics"]["finetune"]["world_size"] == 1

    # Gloo averages the two half-batch gradients: the same updates up to float rounding, which AdamW
    # amplifies only where the true gradient is ~0: the attention key biases (softmax ignores a constant
    # added to every key), whose Adam steps are normalised rounding noise of up to ~lr each.
    weights = torch.load(results / "checkpoints" / record["key"] / "final.pth", weights_only=True)["model"]
    dim = MODEL["kwargs"]["embed_dim"]

    def relative(name: str, keep=slice(None)) -> float:
        a, b = weights[name][..., keep], reference_weights[name][..., keep]
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    per_tensor = {name: relative(name) for name in weights if not name.endswith("attn.qkv.bias")}
    per_tensor.update({name: relative(name, torch.cat([torch.arange(dim), torch.arange(2 * dim, 3 * dim)]))
                       for name in weights if name.endswith("attn.qkv.bias")})  # q and v biases
    key_bias = max((weights[n][dim : 2 * dim] - reference_weights[n][dim : 2 * dim]).abs().max().item()
                   for n in weights if n.endswith("attn.qkv.bias"))
    overall = (sum(((weights[n] - reference_weights[n]) ** 2).sum() for n in weights)
               / sum((w**2).sum() for w in reference_weights.values())).sqrt().item()
    loss_rel = max(abs(a - b) / abs(b) for (a,), (b,) in zip(history(record, "train_loss"),
                                                           history(reference, "train_loss"), strict=True))
    worst = max(per_tensor, key=per_tensor.get)
    report(capsys, f"DDP 2 tasks: submit -> record {elapsed:.1f} s; vs 1 process after "
           f"{FINETUNE['epochs'] * 50} AdamW steps: train loss max rel. diff {loss_rel:.1e}; weights rel. L2 diff "
           f"{overall:.1e} overall, per tensor max {per_tensor[worst]:.1e} ({worst}) without key biases, key "
           f"biases max abs diff {key_bias:.1e} (lr {FINETUNE['lr']}); eval top-1 "
           f"{record['metrics']['eval']['top1']:.2f} vs {reference['metrics']['eval']['top1']:.2f}")
    assert history(record, "epoch", "lr") == history(reference, "epoch", "lr")
    assert loss_rel < 1e-5
    assert overall < 1e-3
    # 7.6e-05 in every CI run so far; a DDP that summed the two ranks' gradients instead of averaging them gives
    # 1.1e-03 (the same training in one process with its gradients doubled), which 1e-3 let by
    assert per_tensor[worst] < 4e-4
    assert key_bias < 5 * FINETUNE["lr"]
    assert abs(record["metrics"]["eval"]["top1"] - reference["metrics"]["eval"]["top1"]) <= 0.2  # <= 2 of 1000


# --------------------------------------------------------------------------------------------------
# e. A task cancelled while still pending
# --------------------------------------------------------------------------------------------------
# sacct -X -n -P -o JobID,State on the local cluster: a range line after the task's own line (a user's test,
# after `scancel 4_3` with 4_3 pending), and array 201 cancelled with tasks 2-3 pending.
OWN_THEN_RANGE = "4_2|COMPLETED\n4_[2-3%2]|CANCELLED by 0\n"
CANCELLED_RANGE = "201_0|CANCELLED by 0\n201_1|CANCELLED by 0\n201_[2-3%2]|CANCELLED by 0\n"
# array 186 (0-2%1) after `scancel 186_2` while 186_2 was pending: sacct has no line for it at all.
VANISHED = "186_0|COMPLETED\n186_1|COMPLETED\n"


def test_a_tasks_own_line_wins_over_a_range_line_in_any_order():
    from bench.pipeline.slurm import _parse_states

    expected = {"4_2": "COMPLETED", "4_3": "CANCELLED"}
    assert _parse_states(OWN_THEN_RANGE) == expected
    assert _parse_states("".join(reversed(OWN_THEN_RANGE.splitlines(keepends=True)))) == expected
    assert _parse_states(CANCELLED_RANGE) == {f"201_{task}": "CANCELLED" for task in range(4)}


def test_a_task_missing_from_its_arrays_accounting_has_no_record():
    from bench.pipeline.slurm import NO_RECORD, _parse_states, _task_state, state_message

    states = _parse_states(VANISHED)
    assert _task_state(states, "186_1") == "COMPLETED"
    assert _task_state(states, "186_2") == NO_RECORD  # its array is listed, the task is not
    assert _task_state(states, "190_0") == "UNKNOWN"  # nothing known of that array
    assert state_message("186_2", NO_RECORD) == "job 186_2: no accounting record (cancelled before it started?)"
    assert state_message("4_3", "CANCELLED") == "job 4_3 CANCELLED" and state_message("4_3", "FAILED") is None


def test_a_task_cancelled_while_pending_is_failed_with_its_job(slurm_env, tmp_path, capsys):
    # --wait too: submitit's result() alone never returns for a task SLURM dropped without a record.
    profile = tmp_path / "one_at_a_time.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10,
                                       "array_parallelism": 1}))
    config = experiment(tmp_path, "cancel", stages=["macs"], grid={"methods": EVAL_METHODS[:2]})
    results = tmp_path / "slurm"
    waiter, codes = in_background(on_slurm, config, results, "--wait", profile=str(profile))
    wait_for(lambda: (results / "jobs.json").exists() and len(jobs(results)) == 2, 60, "the submission")
    first, second = sorted(job["job_id"] for job in jobs(results).values())
    queued = queue_states(slurm_env, second)
    assert second.endswith("_1") and queued == ["PENDING"], queued  # array_parallelism 1: waits for task 0
    subprocess.run(["scancel", second], env=slurm_env, check=True, timeout=30)
    waiter.join(120)
    out = capsys.readouterr().out
    assert not waiter.is_alive() and codes == [1], out
    assert (f"job {second} CANCELLED" in out or f"job {second}: no accounting record (cancelled before it "
            "started?)" in out) and "1 run(s) succeeded, 1 failed" in out, out
    sacct_final(slurm_env, first)
    time.sleep(2)  # the accounting of the cancelled task, where SLURM keeps one
    capsys.readouterr()
    assert run_bench.main(["--config", str(config), "--results", str(results), "--status"]) == 1
    status = capsys.readouterr().out
    (row,) = [line for line in status.splitlines() if line.startswith("failed ")]
    # SLURM keeps a CANCELLED line for the task or, as seen on the local cluster, none at all.
    assert (f"job {second} CANCELLED" in row
            or f"job {second}: no accounting record (cancelled before it started?)" in row), status
    assert status.strip().endswith("1 done, 1 failed"), status


def test_a_run_submitted_again_shows_its_queued_job_not_its_earlier_record(slurm_env, tmp_path):
    """--force on SLURM: while a run's new job waits in the queue, --status says pending (the earlier record stays
    until the job replaces it), where it used to say done. Ctrl-C on --wait then stops only the waiting, says so,
    and the jobs finish on their own."""
    import signal
    import sys

    from bench.pipeline.status import collect_status

    profile = tmp_path / "one_at_a_time.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10,
                                       "array_parallelism": 1}))
    config = experiment(tmp_path, "again", stages=["macs"], grid={"methods": EVAL_METHODS[:2]})
    results = tmp_path / "slurm"
    assert bench(config, results) == 0
    earlier = records_by_key(results)
    time.sleep(1.1)  # the records' finished_at and the submission's submitted_at are whole seconds
    waiting = subprocess.Popen([sys.executable, "run_bench.py", "--config", str(config), "--results", str(results),
                                "--executor", "slurm", "--profile", str(profile), "--force", "--wait", "--no-report"],
                               cwd=Path(run_bench.__file__).parent, env=slurm_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (results / "jobs.json").exists() and len(jobs(results)) == 2, 60, "the submission")
    second_key, second = max(((key, job["job_id"]) for key, job in jobs(results).items()), key=lambda item: item[1])
    queued = queue_states(slurm_env, second)
    (row,) = collect_status([second_key], results)
    assert second.endswith("_1") and queued == ["PENDING"], queued  # array_parallelism 1: waits for task 0
    assert (row.state, row.detail) == ("pending", f"job {second} PENDING (submitted again: the record of "
                                                  f"{earlier[second_key]['finished_at']} stays until it finishes)")
    waiting.send_signal(signal.SIGINT)
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == (f"stopped waiting (Ctrl-C): the 2 job(s) go on in SLURM; follow them with "
                                            f"python run_bench.py --config {config} --results {results.resolve()} --status "
                                            "(scancel stops them)")
    wait_for(lambda: all(key in (now := records_by_key(results)) and now[key]["finished_at"] > earlier[key]["finished_at"]
                         for key in earlier), 120, "the jobs to finish on their own")
    assert [row.state for row in collect_status(list(earlier), results)] == ["done", "done"]


def test_a_forced_attempt_cancelled_on_slurm_shows_as_failed_beside_its_earlier_record(slurm_env, tmp_path, capsys):
    """--force on SLURM, and the new job cancelled (scancel writes no failure note of the run's own): --status said
    'done' from the earlier record; it now shows the cancelled attempt, and the record stays."""
    profile = tmp_path / "slow_setup.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10,
                                       "setup": ["sleep 60"]}))
    config = experiment(tmp_path, "cancelled", stages=["macs"], grid={"methods": EVAL_METHODS[:1]})
    results = tmp_path / "slurm"
    assert bench(config, results) == 0
    (key, record), = records_by_key(results).items()
    time.sleep(1.1)  # the record's finished_at and the submission's submitted_at are whole seconds
    assert on_slurm(config, results, "--force", profile=str(profile)) == 0
    job = jobs(results)[key]["job_id"]
    wait_for(lambda: queue_states(slurm_env, job) == ["RUNNING"], 60, "the job to start its setup")
    subprocess.run(["scancel", job], env=slurm_env, check=True, timeout=30)
    sacct_final(slurm_env, job)
    capsys.readouterr()
    assert run_bench.main(["--config", str(config), "--results", str(results), "--status"]) == 1
    (row,) = [line for line in capsys.readouterr().out.splitlines() if key in line]
    assert row.startswith("failed ") and f"job {job} CANCELLED (a later attempt; the record of " \
        f"{record['finished_at']} stays)" in row, row
    assert records_by_key(results)[key]["finished_at"] == record["finished_at"]


def test_an_inprocess_run_leaves_a_run_to_its_queued_slurm_job(slurm_env, tmp_path, capsys):
    """A run that an earlier submission's job is still queued on is not computed in this process too (it was: the
    job then failed on the run's claim, or computed it a second time). One line names the job; the other runs are
    computed here, and the job stays queued; the count line says so (it counted that run "to run")."""
    from bench.pipeline.config import load_experiment
    from bench.pipeline.records import failure_path

    cpus = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%c"], env=slurm_env, capture_output=True, text=True,
                          timeout=30, check=True).stdout.split()[0]
    blocker = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-c", cpus.rstrip("+"), "-o", "/dev/null",
                              "--wrap", "sleep 300"], env=slurm_env, capture_output=True, text=True, timeout=30,
                             check=True).stdout.strip().split(";")[0]
    job = None
    try:
        wait_for(lambda: queue_states(slurm_env, blocker) == ["RUNNING"], 60, "the job that fills the node")
        config = experiment(tmp_path, "left", stages=["macs"], grid={"methods": EVAL_METHODS[:2]})
        keys = [run.key for run in load_experiment(config).runs]
        results = tmp_path / "results"
        assert on_slurm(config, results, "--only", "baseline") == 0
        ((key, entry),) = jobs(results).items()
        job = entry["job_id"]
        assert queue_states(slurm_env, job) == ["PENDING"]  # the node is full
        capsys.readouterr()
        assert bench(config, results) == 0
        out, err = capsys.readouterr()
        # counted apart: the count said "0 already done, 2 to run", then one ran
        assert f"left: 2 run(s), 0 already done, 1 left to SLURM jobs, 1 to run -> {results}" in out.splitlines(), out
        assert (f"left to SLURM: {key} (job {job} PENDING, submitted {entry['submitted_at']}); its job computes it "
                f"(scancel {job} to run it here)") in err.splitlines(), err
        assert set(records_by_key(results)) == set(keys) - {key} and len(keys) == 2, out
        assert not failure_path(results, key).exists() and queue_states(slurm_env, job) == ["PENDING"]
    finally:
        subprocess.run(["scancel", blocker, *([job] if job else [])], env=slurm_env, timeout=30)


def test_a_failing_setup_line_fails_the_job_with_its_line(slurm_env, tmp_path, capsys, monkeypatch):
    """A cluster profile whose setup line fails (a module the cluster lacks): the job stops there, and --wait and
    --status give the line that failed, with the profile's file. Before, the job went on without it and succeeded
    or failed later on something else; the line was only in the job's log."""
    profile = tmp_path / "bad_setup.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10,
                                       "setup": ["export TOKENBENCH_SETUP_STEP=1", "module load cuda/99"]}))
    config = experiment(tmp_path, "setup", stages=["macs"], grid={"methods": EVAL_METHODS[:1]})
    results = tmp_path / "slurm"
    line = f"SetupError: {profile}: setup[1]: 'module load cuda/99' failed (exit 127); the job stopped before its run"
    asked = []  # a job that left no result is not asked for one (submitit waited 15 s per such job for it)
    results_of = submitit.core.core.Job.results
    monkeypatch.setattr(submitit.core.core.Job, "results", lambda job: asked.append(job.job_id) or results_of(job))
    assert on_slurm(config, results, "--wait", profile=str(profile)) == 1
    assert asked == []
    out = capsys.readouterr().out
    assert f": {line} (log: " in out and "0 run(s) succeeded, 1 failed" in out, out
    assert not (results / "runs").exists() or not list((results / "runs").iterdir())
    assert run_bench.main(["--config", str(config), "--results", str(results), "--status"]) == 1
    (row,) = [row for row in capsys.readouterr().out.splitlines() if row.startswith("failed ")]
    assert f"FAILED: {line}  log: " in row, row


def test_wait_asks_slurm_less_often_and_leaves_the_folder_to_others(slurm_env, tmp_path, capsys, monkeypatch):
    """--wait on a job of about 23 s (its profile's setup sleeps 20 s): squeue, counted by a shim on PATH ahead of
    the real one, is asked at 2, 4, 6, 9, 13.5 and 20 s (``poll_delay``: half the time waited, at most a minute
    apart). Every 2 s, as before, it was asked 11 times for this job, and 1,800 times an hour for a long one.
    While it waits, the results folder's lock is free: another invocation can submit or compute other runs of the
    folder (before, it was refused as "in use" until the wait ended, for hours behind a long job)."""
    import shutil

    from bench.pipeline.lock import LockBusy, results_lock

    real = shutil.which("squeue", path=slurm_env["PATH"])
    shim, log = tmp_path / "bin", tmp_path / "squeue.log"
    shim.mkdir()
    (shim / "squeue").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    (shim / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}:{slurm_env['PATH']}")
    profile = tmp_path / "slow_setup.yaml"
    profile.write_text(yaml.safe_dump({"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 10,
                                       "setup": ["sleep 20"]}))
    config = experiment(tmp_path, "poll", stages=["macs"], grid={"methods": EVAL_METHODS[:1]})
    results = tmp_path / "slurm"
    started = time.monotonic()
    waiter, returned = in_background(on_slurm, config, results, "--wait", profile=str(profile))

    def lock_taken() -> str | None:
        if not (results / "jobs.json").exists():
            return None
        try:
            with results_lock(results):
                return "during the wait" if waiter.is_alive() else "only after the wait"
        except LockBusy:
            return None

    assert wait_for(lock_taken, 60, "the results folder's lock") == "during the wait"
    waiter.join(timeout=120)
    waited = time.monotonic() - started
    calls = log.read_text().splitlines()
    assert returned == [0] and waited > 20 and 4 <= len(calls) <= 8, (returned, waited, calls)  # 6 here
