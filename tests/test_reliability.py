"""Reliability probes of issue 8, kept as tests: nothing computed twice, nothing silently stale, every
refusal one line (exit 2), nothing already computed lost. The SLURM probes (marked ``slurm``) run on the
real local cluster (slurm/local_cluster.sh); the folder probes mount small tmpfs in a private mount
namespace (``unshare -m``), as root does here.

Run: .venv/bin/python -m pytest -q tests/test_reliability.py   (+ TOKENBENCH_REQUIRE_SLURM=1 for CI)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import report
import run_bench
from bench.pipeline.files import REPO
from bench.pipeline.records import read_all, read_record, record_path
from tests.helpers import wait_for

MODEL = {
    "name": "vit_tiny_patch16_224",
    "label": "tiny",
    "kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 2,
               "num_heads": 2},
}
TWO = ["baseline", {"method": "tome", "r": 4}]


@pytest.fixture(autouse=True)
def _own_hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_CACHE_DIR", str(tmp_path / "hash-cache"))


def config(folder: Path, name: str = "rel", weights: str | None = None, **changes) -> Path:
    cfg = {
        "name": name,
        "defaults": {"model": MODEL, "weights": weights, "data": {"name": "fashion_mnist", "subset": 100},
                     "batch_size": 100, "device": "cpu", "threads": 1},
        "stages": ["macs"],
        "macs": {"images": 1},
        "grid": {"methods": TWO},
    }
    cfg.update(changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def save_weights(path: Path, seed: int) -> None:
    from bench.pipeline.models import create_model

    torch.manual_seed(seed)
    model = create_model(MODEL["name"], MODEL["kwargs"])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)  # predictions that vary between images
    torch.save(model.state_dict(), path)


def bench(path: Path, results: Path, *extra: str) -> int:
    return run_bench.main(["--config", str(path), "--results", str(results), "--quiet", "--no-report", *extra])


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def keys(results: Path) -> set[str]:
    return {record["key"] for record in read_all(results)[0]}


def spawn(*args: str, **kwargs) -> subprocess.Popen:
    """``python *args`` with SIGINT at its default, as a terminal gives it. (A shell's background job, ``cmd &``
    without job control, inherits SIGINT ignored, and Python then never raises KeyboardInterrupt: without
    this the Ctrl-C tests would test the shell that started pytest.)"""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().rsplit(")", 1)[1].split()[0] == "Z")


# ----------------------------------------------------------------------------- 1. weights by content
def test_changed_checkpoint_at_same_path_means_new_runs_and_new_dense_cache(tmp_path, capsys):
    save_weights(tmp_path / "w.pth", seed=0)
    path = config(tmp_path, weights="w.pth", stages=["eval"])
    results = tmp_path / "results"
    assert bench(path, results) == 0
    first = keys(results)
    assert bench(path, results) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().out  # unchanged file: same keys
    os.utime(tmp_path / "w.pth")  # touched, same bytes: still the same keys (content, not mtime)
    assert bench(path, results) == 0
    assert "2 already done, 0 to run" in capsys.readouterr().out

    save_weights(tmp_path / "w.pth", seed=1)  # retrained in place: same path, other weights
    assert bench(path, results) == 0
    assert "0 already done, 2 to run" in capsys.readouterr().out
    second = keys(results) - first
    assert len(second) == 2 and len(keys(results)) == 4  # the earlier records are kept, not overwritten
    assert len(list((results / "cache").glob("dense-*.pt"))) == 2
    # the new records' agreement is against the new dense model: equal to a fresh folder's
    assert bench(path, tmp_path / "fresh") == 0
    fresh = {r["run"]["method"]: r for r in read_all(tmp_path / "fresh")[0]}
    new = {r["run"]["method"]: r for r in read_all(results)[0] if r["key"] in second}
    assert new["tome"]["metrics"]["eval"]["agreement"] == fresh["tome"]["metrics"]["eval"]["agreement"]
    assert new["baseline"]["metrics"]["eval"]["agreement"] == 100.0
    assert new["tome"]["run"]["weights_sha256"] != read_record(record_path(results, min(first)))["run"]["weights_sha256"]
    # the leaderboard keeps the two checkpoints apart
    frame = report.build_frame(read_all(results)[0])
    assert frame["weights"].nunique() == 2 and all("(sha256 " in label for label in frame["weights"])


def test_records_of_a_redefined_method_are_not_reused(tmp_path, capsys, monkeypatch):
    """Method.revision enters the run key: raising it (a method whose code now computes something else) means
    new runs, not the records computed before; revision 0 leaves keys as they were before the field existed."""
    from bench.pipeline.config import load_experiment
    from bench.pipeline.files import REPO
    from methods.random_prune import RandomPrune

    path = config(tmp_path, grid={"methods": ["baseline", {"method": "random", "layers": [0]}]})
    results = tmp_path / "results"
    assert bench(path, results) == 0
    first = keys(results)
    capsys.readouterr()
    monkeypatch.setattr(RandomPrune, "revision", RandomPrune.revision + 1)
    assert bench(path, results) == 0
    assert "1 already done, 1 to run" in capsys.readouterr().out  # random anew, baseline reused
    (new,) = keys(results) - first
    (old,) = {key for key in first if "random" in key}
    assert read_record(record_path(results, new))["method_revision"] == RandomPrune.revision
    assert read_record(record_path(results, old))["method_revision"] == RandomPrune.revision - 1
    # both records stay on disk; the leaderboard shows the new definition's and names the other as superseded
    assert report.main([str(results)]) == 0
    assert f"skipped {old}: random revision {RandomPrune.revision - 1}, superseded by the record of revision " \
           f"{RandomPrune.revision} of the same run" in capsys.readouterr().err
    frame = report.build_frame(read_all(results)[0])
    assert sorted(frame["method"]) == ["baseline", "random", "random"]  # the reader itself drops nothing
    shown, _, skipped, _, _ = report.load_all(results)
    assert sorted(shown["method"]) == ["baseline", "random"] and shown.loc[shown["method"] == "random", "key"].item() == new
    assert len(skipped) == 1 and old in (results / "leaderboard.md").read_text()
    # revision 0: the key random's quickstart run had before revisions existed (computed at f6717d2, when the
    # quickstart left the attention kernel to PyTorch)
    from bench.pipeline.config import RunSpec, run_key

    monkeypatch.setattr(RandomPrune, "revision", 0)
    (run, *_) = [run for run in load_experiment(REPO / "configs" / "quickstart.yaml").runs if run.method == "random"]
    assert run.sdpa_backend == "explicit"
    assert run_key(RunSpec.from_dict({**run.to_dict(), "sdpa_backend": "auto"})) == \
        "fmnist-vit-96x8-random-keep-rate0.729-layers1-3-5-1ba8bea7"


def test_weights_hash_is_computed_once_per_file_version(tmp_path):
    from bench.pipeline.fingerprint import cache_file, weights_sha256

    save_weights(tmp_path / "w.pth", seed=0)
    real = weights_sha256(str(tmp_path / "w.pth"))
    import hashlib

    assert real == hashlib.sha256((tmp_path / "w.pth").read_bytes()).hexdigest()
    cache = json.loads(cache_file().read_text())
    entry = cache[str((tmp_path / "w.pth").resolve())]
    assert entry["size"] == (tmp_path / "w.pth").stat().st_size
    entry["sha256"] = "f" * 64  # same size and mtime: the cached value is used, the file is not read again
    cache_file().write_text(json.dumps(cache))
    assert weights_sha256(str(tmp_path / "w.pth")) == "f" * 64
    os.utime(tmp_path / "w.pth", ns=(1, 1))  # another mtime: hashed again
    assert weights_sha256(str(tmp_path / "w.pth")) == real
    # rewritten in place with the same size and its mtime put back (cp -p, touch -r): was the cached hash (a
    # retrained checkpoint at the same path reused the old runs); the ctime tells it
    times = (tmp_path / "w.pth").stat()
    save_weights(tmp_path / "x.pth", seed=1)  # a name as long: torch.save names its archive after it
    with open(tmp_path / "w.pth", "r+b") as handle:
        handle.write((tmp_path / "x.pth").read_bytes())
    os.utime(tmp_path / "w.pth", ns=(times.st_atime_ns, times.st_mtime_ns))
    after = (tmp_path / "w.pth").stat()
    assert (after.st_size, after.st_mtime_ns) == (times.st_size, times.st_mtime_ns)  # as before
    other = hashlib.sha256((tmp_path / "x.pth").read_bytes()).hexdigest()
    assert other != real and weights_sha256(str(tmp_path / "w.pth")) == other
    # URLs and timm tags are identified by their string, and runs without weights keep their keys
    assert weights_sha256("timm:augreg_in21k") is None and weights_sha256("https://x/y.pth") is None
    cache_file().write_bytes(b"\xff\xfe garbage")  # an unreadable cache is recomputed, not fatal
    assert weights_sha256(str(tmp_path / "w.pth")) == other


def test_a_job_refuses_weights_changed_after_planning(tmp_path):
    from bench.pipeline.config import load_experiment
    from bench.pipeline.runner import run_job

    save_weights(tmp_path / "w.pth", seed=0)
    (run, _) = load_experiment(config(tmp_path, weights="w.pth")).runs
    save_weights(tmp_path / "w.pth", seed=1)  # e.g. between a SLURM submission and the job's start
    with pytest.raises(ValueError, match="weights file changed since the run was planned"):
        run_job(run.to_dict(), str(tmp_path / "results"), progress=False)
    assert not record_path(tmp_path / "results", run.key).exists()


# ------------------------------------------------------------------------------ 3. lock and claims
HOLD_LOCK = """
import sys, time
from pathlib import Path
from bench.pipeline.lock import results_lock
with results_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_invocation_refuses_naming_the_holder_or_waits(tmp_path, capsys):
    path, results = config(tmp_path), tmp_path / "results"
    holder = spawn("-c", HOLD_LOCK, str(results))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert bench(path, results) == 2
        line = one_line(capsys.readouterr().err)
        assert f"is in use by pid {holder.pid} on {socket.gethostname()}" in line and "--wait-lock" in line
        assert not (results / "runs").exists()  # refused before any run
        assert json.loads((results / ".lock.holder").read_text())["pid"] == holder.pid  # the refused left it

        import threading

        codes: list[int] = []

        def wait_lock() -> None:
            began = time.monotonic()
            codes.append(bench(path, results, "--wait-lock"))
            codes.append(time.monotonic() - began)

        waiter = threading.Thread(target=wait_lock)
        waiter.start()
        time.sleep(2.0)
        assert waiter.is_alive() and not (results / "runs").exists()  # waiting, not running
    finally:
        holder.kill()
        holder.wait()
    waiter.join(timeout=120)
    (code, elapsed) = codes
    assert code == 0 and len(keys(results)) == 2
    out, err = capsys.readouterr()
    assert "waiting for results folder" in err
    # the wait is said apart, not counted in "before the runs" (it was: 44.7 s before the runs, 41 s of them waiting)
    import re

    (before, waited), = re.findall(r"([\d.]+) s before them \(the experiment read, its MAC budgets calibrated, "
                                   r"weights checked; ([\d.]+) s waiting for the results folder \(--wait-lock\)\)", out)
    assert float(waited) >= 0.5 and float(before) + float(waited) <= elapsed + 0.1, (out, elapsed)


def test_invocations_starting_together_do_not_remove_each_others_write_probe(tmp_path, monkeypatch):
    """Every invocation wrote and removed the same <results>/.write-probe: one starting together with another could
    have its probe removed by the other between its write and its unlink, and refused a writable folder ("not
    writable (No such file or directory)", also with --wait-lock). The other's check runs exactly there here:
    both pass, and no probe is left behind."""
    from bench.pipeline import files, lock

    results, write, between = tmp_path / "results", files.atomic_write, []

    def write_then_the_other_checks(path, content):
        write(path, content)
        if not between:  # the other invocation's whole check, between this one's write and its unlink
            between.append(path)
            lock.check_usable(results)

    monkeypatch.setattr(files, "atomic_write", write_then_the_other_checks)
    lock.check_usable(results)
    assert between and list(results.iterdir()) == []


SLEEPER = "import time; time.sleep(120)"


def test_a_run_claimed_by_a_live_process_is_not_computed_twice(tmp_path, capsys):
    from bench.pipeline.config import load_experiment
    from bench.pipeline.lock import claim_path, process_start

    path, results = config(tmp_path), tmp_path / "results"
    base, tome = load_experiment(path).runs
    other = spawn("-c", SLEEPER)  # e.g. a SLURM job of an earlier submission computing tome
    try:
        claim = claim_path(results, tome.key)
        claim.parent.mkdir(parents=True)
        claim.write_text(json.dumps({"pid": other.pid, "start": process_start(other.pid),
                                     "host": socket.gethostname(), "since": "now", "command": "job"}))
        assert bench(path, results) == 1
        out = capsys.readouterr().out
        assert f"skipped: run {tome.key} is being computed by pid {other.pid}" in out
        assert keys(results) == {base.key}
        assert not (results / "failed").exists() or not list((results / "failed").iterdir())  # not "failed"

        # a local job refusing it is announced alike (it said "failed: bench.pipeline.lock.RunClaimed: run ...")
        local = tmp_path / "local"
        claim_path(local, tome.key).parent.mkdir(parents=True)
        claim_path(local, tome.key).write_text(claim.read_text())
        assert bench(path, local, "--executor", "local") == 1
        out = capsys.readouterr().out
        refusal = f"run {tome.key} is being computed by pid {other.pid} on {socket.gethostname()} since now (job); " \
            "not run twice"
        assert f"\n    skipped: {refusal}\n" in out and "failed:" not in out
        assert f"FAILED {tome.key}: skipped: {refusal} (log: " in out
        assert keys(local) == {base.key} and not (local / "failed").exists()
    finally:
        other.kill()
        other.wait()
    assert bench(path, results) == 0  # its process is gone: the stale claim is taken over
    assert keys(results) == {base.key, tome.key} and not claim.exists()


SLOW = {"stages": ["throughput"], "throughput": {"batch_sizes": [64], "warmup": 1, "runs": 1000000}}


def test_kill_9_of_a_local_parent_leaves_no_child_computing(tmp_path):
    from bench.pipeline.config import load_experiment

    path = config(tmp_path, grid={"methods": ["baseline"]}, **SLOW)
    results = tmp_path / "results"
    (run,) = load_experiment(path).runs
    parent = spawn("run_bench.py", "--config", str(path), "--results", str(results), "--executor", "local",
                   "--quiet", "--no-report")
    claim = results / "claims" / f"{run.key}.json"
    try:
        child = wait_for(lambda: claim.exists() and claim.read_text() and json.loads(claim.read_text())["pid"],
                         120, "the local job to claim its run")
        assert child != parent.pid and alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        try:
            wait_for(lambda: not alive(child), 30, f"the orphaned local job {child} to stop")
        finally:
            if alive(child):  # the bug this test catches: do not leave it computing
                os.kill(child, signal.SIGKILL)
    finally:
        parent.kill()
        parent.wait()
    note = json.loads(next((results / "failed").glob("*.json")).read_text())
    assert note["state"] == "interrupted"


# The watchdog of a local job (bench.pipeline.lock.exit_with_parent), on its own: a stand-in parent (a sleep)
# is killed while the job's main thread is blocked in a system call (a lock held by itself), or swallows the
# interrupt. Run with SIGINT ignored, as a script's background job inherits it.
WATCHED = """
import sys, threading
from bench.pipeline.lock import exit_with_parent
exit_with_parent(interval=0.05, grace=float(sys.argv[1]))
lock = threading.Lock()
lock.acquire()
print("watching", flush=True)
while True:
    try:
        lock.acquire()  # blocks until a signal interrupts it
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        if sys.argv[2] == "stop":
            sys.exit(3)
"""


@pytest.mark.parametrize("swallow", [False, True], ids=["blocked-in-a-system-call", "interrupt-swallowed"])
def test_watchdog_interrupts_a_blocked_job_and_dumps_a_stuck_one(tmp_path, swallow):
    from bench.pipeline.lock import PARENT_ENV, process_start

    stand_in = subprocess.Popen(["sleep", "300"])
    try:
        marker = f"{stand_in.pid}:{process_start(stand_in.pid)}"
        job = subprocess.Popen([sys.executable, "-c", WATCHED, "4", "swallow" if swallow else "stop"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), PARENT_ENV: marker},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        assert job.stdout.readline() == "watching\n"
        started = time.monotonic()  # before the kill: the hard exit comes at least the grace after it
        stand_in.kill()
        stand_in.wait()
        out, err = job.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        stand_in.kill()
        stand_in.wait()
    assert f"run_bench (pid {stand_in.pid}) is gone: stopping this job" in err
    if not swallow:  # the system call is interrupted: KeyboardInterrupt at once, not the hard exit
        assert (job.returncode, out, took < 4) == (3, "interrupted\n", True), err
        assert "did not stop" not in err
    else:  # hard exit after the grace, saying where the main thread was
        assert job.returncode == 130 and out.startswith("interrupted\n") and took >= 4, err
        assert "the job did not stop within 4 s; where its threads were:" in err
        assert 'File "<string>", line 10 in <module>' in err  # the main thread's frame: lock.acquire()


# ---------------------------------------------------------------------------------- 4. decoding
def test_undecodable_records_are_set_aside_numbered_and_redone(tmp_path, capsys):
    path, results = config(tmp_path), tmp_path / "results"
    assert bench(path, results) == 0
    victim = sorted((results / "runs").glob("*.json"))[0]
    for n, damage in enumerate((b"\xff", b'{"schema": 1, "key": "caf\xe9"}'), start=1):
        victim.write_bytes(damage)
        assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 1
        rows = capsys.readouterr().out
        assert f"todo     {victim.stem}  torn record: {victim}: record not UTF-8 text" in rows
        assert report.main([str(results)]) == 0  # the leaderboard skips it, naming it
        assert f"skipped {victim}: record not UTF-8 text" in capsys.readouterr().err
        assert bench(path, results) == 0
        err = capsys.readouterr().err
        assert f"{victim}: record not UTF-8 text" in err and f"moved to {victim.name}.torn.{n}" in err
        assert read_record(victim)["key"] == victim.stem  # redone
    assert (results / "runs" / f"{victim.name}.torn.1").read_bytes() == b"\xff"  # not overwritten by the 2nd


def test_record_whose_metrics_is_not_a_mapping_is_torn_and_redone(tmp_path, capsys):
    path, results = config(tmp_path), tmp_path / "results"
    assert bench(path, results) == 0
    victim = sorted((results / "runs").glob("*.json"))[0]
    record = json.loads(victim.read_text())
    victim.write_text(json.dumps({**record, "metrics": [1, 2]}))
    assert bench(path, results) == 0
    captured = capsys.readouterr()
    assert "record field 'metrics' is not a mapping" in captured.err and "1 already done, 1 to run" in captured.out
    assert isinstance(read_record(victim)["metrics"], dict)


def test_undecodable_config_profile_failure_note_and_jobs_file(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert bench(latin, tmp_path / "r") == 2
    assert one_line(capsys.readouterr().err) == f"error: {latin}: not UTF-8 text (byte 0xe9 at offset 9)"

    from bench.pipeline.profiles import ProfileError, load_profile

    profile = tmp_path / "cluster.yaml"
    profile.write_bytes(b"partition: \xff\n")
    with pytest.raises(ProfileError, match=r"cluster.yaml: not UTF-8 text \(byte 0xff at offset 11\)"):
        load_profile(str(profile))

    path, results = config(tmp_path), tmp_path / "results"
    assert bench(path, results, "--only", "baseline") == 0
    from bench.pipeline.config import load_experiment

    tome = load_experiment(path).runs[1]
    (results / "failed").mkdir()
    (results / "failed" / f"{tome.key}.json").write_bytes(b"\x80\x81")
    (results / "jobs.json").write_bytes(b"\xff{}")
    capsys.readouterr()
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 1
    captured = capsys.readouterr()
    assert "failed   " in captured.out and "unreadable failure note" in captured.out
    assert "jobs.json: not UTF-8 text" in captured.err and "Traceback" not in captured.err


# ------------------------------------------------------------------------- 5. unusable results folder
def test_results_folder_that_is_a_file_is_refused_before_any_run(tmp_path, capsys):
    path = config(tmp_path)
    (tmp_path / "taken").write_text("not a folder")
    assert bench(path, tmp_path / "taken") == 2
    assert one_line(capsys.readouterr().err) == f"error: results folder {tmp_path / 'taken'} is a file, not a folder"


FOLDER_PROBES = """
set -e
mount -t tmpfs -o size=2m tmpfs {tmp}/full
mkdir {tmp}/full/results
cp -r {tmp}/done/runs {tmp}/full/results/runs
echo old > {tmp}/full/results/leaderboard.md
dd if=/dev/zero of={tmp}/full/filler bs=4k 2>/dev/null || true
mount -t tmpfs -o ro tmpfs {tmp}/ro
set +e
{python} -c '
import sys, report, run_bench
for args in (["--config", "{config}", "--results", "{tmp}/full/results", "--quiet"],
             ["--config", "{config}", "--results", "{tmp}/ro/results", "--quiet"]):
    print("exit", run_bench.main(args), flush=True)
print("exit", report.main(["{tmp}/full/results"]), flush=True)
'
cat {tmp}/full/results/leaderboard.md
ls -a {tmp}/full/results
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root for tmpfs mounts")
def test_full_disk_and_read_only_folder_are_one_line_exit_2_and_leave_no_temp(tmp_path):
    path = config(tmp_path)
    assert bench(path, tmp_path / "done") == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "ro").mkdir()
    script = FOLDER_PROBES.format(tmp=tmp_path, python=sys.executable, config=path)
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    out, err = probe.stdout, probe.stderr
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.strip()]
    assert errors[0] == f"error: results folder {tmp_path}/full/results is not writable (No space left on device)"
    assert errors[1] == f"error: cannot create results folder {tmp_path}/ro/results (Read-only file system)"
    assert errors[2] == f"report.py: error: cannot write {tmp_path}/full/results/leaderboard.md (No space left on device)"
    assert out.count("exit 2") == 3, out
    listing = out.split("exit 2")[-1].split()
    assert "old" in listing  # the previous leaderboard kept whole
    assert not [name for name in listing if name.endswith(".tmp") or "probe" in name], listing


# --------------------------------------------------------------------------------- 6, 7. bad input
@pytest.mark.parametrize("name", [".", "..", "a/b", ".hidden"])
def test_experiment_names_are_plain_file_names(tmp_path, capsys, name):
    path = config(tmp_path, name="x")
    path.write_text(path.read_text().replace("name: x", f"name: '{name}'"))
    assert bench(path, tmp_path / "results") == 2
    line = one_line(capsys.readouterr().err)
    assert f"{path}: name: must be a plain file name" in line and repr(name) in line
    assert not (tmp_path / "results").exists()


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path, capsys):
    path = config(tmp_path)
    path.write_text(path.read_text() + "name: other\n")
    lines = path.read_text().splitlines()
    first, second = [i + 1 for i, line in enumerate(lines) if line.startswith("name:")]
    assert bench(path, tmp_path / "r") == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: {path}: name: duplicate key (line {first} and line {second}); each key may appear once")
    nested = tmp_path / "nested.yaml"
    nested.write_text("name: n\ngrid:\n  methods:\n    - {method: tome, r: 4, r: 8}\n")
    assert bench(nested, tmp_path / "r") == 2
    assert "nested.yaml: grid.methods[0].r: duplicate key (line 4 and line 4)" in capsys.readouterr().err
    nested.write_text("name: n\ndefaults:\n  batch_size: 8\n  seed: 1\n  batch_size: 16\ngrid: {methods: [baseline]}\n")
    assert bench(nested, tmp_path / "r") == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: {nested}: defaults.batch_size: duplicate key (line 3 and line 5); each key may appear once")

    from bench.pipeline.profiles import ProfileError, load_profile

    profile = tmp_path / "p.yaml"
    profile.write_text("partition: a\nmem_gb: 4\npartition: b\n")
    with pytest.raises(ProfileError, match=r"p.yaml: partition: duplicate key \(line 1 and line 3\)"):
        load_profile(str(profile))


BOMB = "\n".join(  # "billion laughs": 9 levels of 9 aliases, 9**10 strings once expanded
    [f"      a0: &a0 [{', '.join(['lol'] * 9)}]"]
    + [f"      a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)])


def test_yaml_alias_bomb_in_kwargs_is_refused_quickly(tmp_path, capsys):
    path = config(tmp_path)
    text = path.read_text().replace("    kwargs:\n", "    kwargs:\n" + BOMB + "\n", 1)
    assert text != path.read_text()
    path.write_text(text)
    started = time.monotonic()
    assert bench(path, tmp_path / "r") == 2
    assert time.monotonic() - started < 5
    line = one_line(capsys.readouterr().err)
    assert "aliases expand to more than 100000 values" in line and "refused" in line


# ------------------------------------------------------------------------------------------ 9. misc
def _signalled_run(tmp_path: Path, *signals: int):
    """A slow in-process run_bench sent ``signals`` once its run is computing: (path, results, run, exit code, err)."""
    from bench.pipeline.config import load_experiment

    path = config(tmp_path, grid={"methods": ["baseline"]}, **SLOW)
    results = tmp_path / "results"
    (run,) = load_experiment(path).runs
    process = spawn("run_bench.py", "--config", str(path), "--results", str(results), "--quiet", "--no-report")
    try:
        wait_for(lambda: (results / "claims" / f"{run.key}.json").exists(), 120, "the run to start")
        time.sleep(0.5)
        for signum in signals:
            process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()  # never leave a run of a million timed forwards computing
        process.wait()
    return path, results, run, process.returncode, err


def test_ctrl_c_is_interrupted_not_failed_exit_130_without_traceback(tmp_path, capsys):
    path, results, run, code, err = _signalled_run(tmp_path, signal.SIGINT)
    assert code == 130, err
    assert one_line(err).startswith("interrupted (Ctrl-C)")
    note = json.loads((results / "failed" / f"{run.key}.json").read_text())
    assert note["state"] == "interrupted" and note["error"] == "KeyboardInterrupt"  # no dangling ": "
    assert not (results / "claims" / f"{run.key}.json").exists()
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 1
    status = capsys.readouterr().out
    assert status.startswith("interrupted ") and "1 interrupted" in status


def test_sigterm_is_interrupted_as_a_ctrl_c_exit_143_and_leaves_submitits_handler_alone(tmp_path, capsys):
    """SIGTERM (``kill``, ``timeout``, the end of an allocation running run_bench) killed an in-process run_bench
    at once: no note, the run ``todo`` under ``--status``, its claim left behind. Now as a Ctrl-C: one line, the
    run marked interrupted, its claim released, exit 143. Sent twice in a row, as ``timeout`` does (to its
    command, then to the command's process group): the second does not cut the first one's note short."""
    from bench.pipeline import interrupts

    path, results, run, code, err = _signalled_run(tmp_path, signal.SIGTERM, signal.SIGTERM)
    assert code == 143, err  # killed by the signal before: -15
    assert one_line(err).startswith("interrupted (SIGTERM): finished runs keep their records")
    note = json.loads((results / "failed" / f"{run.key}.json").read_text())
    assert (note["state"], note["error"]) == ("interrupted", "Terminated: SIGTERM")
    assert not (results / "claims" / f"{run.key}.json").exists()
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 1
    assert capsys.readouterr().out.splitlines() == [f"interrupted {run.key}  Terminated: SIGTERM", "1 interrupted"]

    # a SIGTERM while the first one's interrupt unwinds (writing the run's note, releasing its claim) is not raised
    # again; two sent back to back (above) may reach Python as one
    with interrupts.remembered(), pytest.raises(interrupts.Terminated):
        try:
            signal.raise_signal(signal.SIGTERM)
        finally:
            signal.raise_signal(signal.SIGTERM)  # raised here, it would replace the first one
            unwound = True
    assert unwound and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    # inside a submitit job SIGTERM is submitit's (logged and bypassed: a preempted job is requeued through USR2):
    # a handler already there is never replaced; nor from a thread other than the main one (signal.signal refuses)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # run_bench.main put it back
    bypass = lambda signum, frame: None  # noqa: E731 - submitit's SignalHandler.bypass, in effect
    signal.signal(signal.SIGTERM, bypass)
    try:
        with interrupts.remembered():
            assert signal.getsignal(signal.SIGTERM) is bypass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import threading

    def in_a_thread() -> None:
        with interrupts.remembered():  # signal.signal would raise ValueError here
            seen.append(signal.getsignal(signal.SIGTERM))

    seen: list = []
    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert seen == [signal.SIG_DFL]


class _DropsCtrlC:
    """Collected at once: its finalizer receives a Ctrl-C, whose KeyboardInterrupt Python prints and drops
    (``Exception ignored in ... __del__``), as it did in a ``weakref`` callback in user test 11."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)  # the handler runs inside raise_signal, inside the finalizer


def test_a_ctrl_c_python_drops_in_a_finalizer_still_stops_the_runs(tmp_path, monkeypatch, capsys):
    from bench.pipeline import executors, interrupts, runner

    started = []

    def first_run_gets_a_dropped_ctrl_c(spec, results_dir, **_):
        started.append(spec["key"])
        _DropsCtrlC()  # the KeyboardInterrupt is gone; the run itself finishes

    monkeypatch.setattr(runner, "run_job", first_run_gets_a_dropped_ctrl_c)
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    path = config(tmp_path, grid={"methods": ["baseline", {"method": "tome", "r": 2}]})
    from bench.pipeline.config import load_experiment

    runs = load_experiment(path).runs
    with interrupts.remembered(), pytest.raises(KeyboardInterrupt):
        executors.run_inprocess(runs, tmp_path / "results", progress=False, announce=lambda line: None)
    assert started == [runs[0].key]  # the second run never started
    assert dropped == [KeyboardInterrupt]  # Python dropped it ("Exception ignored in ... __del__")
    assert sys.unraisablehook is not None and interrupts._pending is None  # nothing pending once raised
    interrupts.check()

    # a Ctrl-C raised and handled inside (``--wait``'s "stopped waiting") is not raised again at the end
    def handled(argv):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            return 130
        return 0

    monkeypatch.setattr(run_bench, "_main", handled)
    assert run_bench.main([]) == 130 and "interrupted (Ctrl-C)" not in capsys.readouterr().err

    # run_bench: dropped after the last run, it still exits 130 with its line (it exited 0)
    monkeypatch.setattr(run_bench, "_main", lambda argv: (_DropsCtrlC(), 0)[1])
    assert run_bench.main([]) == 130
    assert dropped == [KeyboardInterrupt, KeyboardInterrupt]
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err


def test_records_and_failure_notes_have_normal_permissions(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_FAIL_KEYS", "*-tome-*")
    old = os.umask(0o022)
    try:
        path, results = config(tmp_path), tmp_path / "results"
        assert bench(path, results) == 1
    finally:
        os.umask(old)
    (record,) = (results / "runs").glob("*.json")
    (note,) = (results / "failed").glob("*.json")
    assert oct(record.stat().st_mode & 0o777) == oct(0o644) and oct(note.stat().st_mode & 0o777) == oct(0o644)


def test_refused_pickle_keeps_its_security_reason(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    assert bench(config(tmp_path, weights="evil.pth"), tmp_path / "r") == 2
    line = one_line(capsys.readouterr().err)
    assert "evil.pth: refused" in line and "can run arbitrary code" in line and "weights_only=True" in line
    assert "Unsupported global" in line


# ------------------------------------------------------------------------------------ SLURM probes
def sacct_state(env: dict, job_id: str) -> str:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State"], env=env,
                         capture_output=True, text=True, timeout=30).stdout
    from bench.pipeline.slurm import _parse_states  # a never-started task is listed as 12_[1]

    return _parse_states(out).get(job_id, "")


def slurm(path: Path, results: Path, *extra: str, profile: str = "local") -> int:
    return bench(path, results, "--executor", "slurm", "--profile", profile, *extra)


def held_profile(folder: Path) -> str:
    """The local profile on partition ``short`` (MaxTime 30) with a 60-minute limit: its jobs stay PENDING
    (reason PartitionTimeLimit) until ``scontrol update JobId=... TimeLimit=10`` lets them run."""
    settings = yaml.safe_load((REPO / "slurm" / "local.yaml").read_text())
    path = folder / "held.yaml"
    path.write_text(yaml.safe_dump({**settings, "partition": "short", "timeout_min": 60}))
    return str(path)


@pytest.fixture
def scancel_afterwards(slurm_env, tmp_path):
    """Whatever happens, no held job of this test is left pending (it would wait forever)."""
    yield
    jobs_file = tmp_path / "results" / "jobs.json"
    if jobs_file.exists():
        ids = {job["job_id"].split("_")[0] for job in json.loads(jobs_file.read_text()).values()}
        subprocess.run(["scancel", *sorted(ids)], env=slurm_env, capture_output=True, timeout=30)


@pytest.mark.slurm
def test_resubmission_skips_jobs_in_flight_and_keeps_their_ids(slurm_env, scancel_afterwards, tmp_path, capsys):
    path, results = config(tmp_path, name="resubmit"), tmp_path / "results"
    held = held_profile(tmp_path)
    assert slurm(path, results, profile=held) == 0  # the tasks stay pending until released
    first = json.loads((results / "jobs.json").read_text())
    assert len(first) == 2
    assert f"follow with: python run_bench.py --config {path} --results {results.resolve()} --status" in \
        capsys.readouterr().out  # the folder given, not the config's default (user test 16)
    # --status says why SLURM holds them (user test 16: a plain "pending" looked like a queue to wait out)
    run_bench.main(["--config", str(path), "--results", str(results), "--status"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pending ")]
    held_for = ("PartitionTimeLimit: its time limit (timeout_min) is above the partition's",  # SLURM names either
                "PartitionConfig: it asks for more CPUs, memory or GPUs than the partition's nodes have")
    assert len(rows) == 2 and all(any(f"PENDING ({reason}; SLURM does not start it until it is changed: scancel it "
                                      "and resubmit with a profile that fits the partition)" in row for reason in held_for)
                                  for row in rows), rows

    assert slurm(path, results, profile=held) == 0  # again while they are pending: nothing sent twice
    out = capsys.readouterr().out
    for key, job in first.items():
        assert f"not resubmitted: {key} (job {job['job_id']} PENDING" in out, out
    assert "nothing to submit: 2 run(s) still queued" in out and "as job array(s)" not in out
    assert json.loads((results / "jobs.json").read_text()) == first

    base_key = next(key for key in first if "-baseline-" in key)
    tome_key = next(key for key in first if "-tome-" in key)
    subprocess.run(["scontrol", "update", f"JobId={first[base_key]['job_id']}", "TimeLimit=10"], env=slurm_env,
                   check=True, timeout=30)  # released: it runs (its task leaves the pending array record)
    subprocess.run(["scancel", first[tome_key]["job_id"]], env=slurm_env, check=True, timeout=30)
    cancelled = first[tome_key]["job_id"]

    def ended() -> bool:  # SLURM keeps a CANCELLED line for a task cancelled while pending, or at times none
        queued = subprocess.run(["squeue", "-h", "-r", "-j", cancelled.split("_")[0], "-o", "%i"], env=slurm_env,
                                capture_output=True, text=True, timeout=30).stdout.split()
        return sacct_state(slurm_env, cancelled) == "CANCELLED" or cancelled not in queued

    wait_for(ended, 60, "the cancel", 0.5)
    time.sleep(1)  # its accounting line, where SLURM writes one
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 1
    status = capsys.readouterr().out
    row = next(line for line in status.splitlines() if tome_key in line)
    assert row.startswith("failed ") and (f"job {cancelled} CANCELLED" in row or
                                          f"job {cancelled}: no accounting record" in row), status
    assert "log:" not in row  # cancelled before it started: it has no log (user test 16: a path that never existed)
    assert "Error stream" not in status

    assert slurm(path, results, "--wait") == 0  # the cancelled run is resubmitted, the released one not
    out = capsys.readouterr().out
    assert out.strip().endswith("run(s) succeeded, 0 failed")  # the released one may be done already
    final = json.loads((results / "jobs.json").read_text())
    assert final[tome_key]["previous_job_ids"] == [first[tome_key]["job_id"]]
    assert final[base_key] == first[base_key]  # computed by its original job, id kept
    assert len(read_all(results)[0]) == 2


@pytest.mark.slurm
def test_cancelled_task_under_wait_says_cancelled(slurm_env, scancel_afterwards, tmp_path, capsys):
    import threading

    path, results = config(tmp_path, name="cancel", grid={"methods": ["baseline"]}), tmp_path / "results"
    held = held_profile(tmp_path)
    codes: list[int] = []
    waiter = threading.Thread(target=lambda: codes.append(slurm(path, results, "--wait", profile=held)), daemon=True)
    waiter.start()
    jobs = wait_for(lambda: (results / "jobs.json").exists() and json.loads((results / "jobs.json").read_text()),
                    60, "the submission")
    (job,) = jobs.values()
    subprocess.run(["scancel", job["job_id"]], env=slurm_env, check=True, timeout=30)
    waiter.join(timeout=120)
    assert codes == [1]
    out = capsys.readouterr().out
    failed = next(line for line in out.splitlines() if line.startswith("FAILED "))
    assert f"job {job['job_id']} CANCELLED" in failed and "Error stream" not in out
    assert f"submitted 1 run(s) as job(s) {job['job_id']}; logs in " in out  # one run: a plain job, not an array


@pytest.mark.slurm
def test_an_sbatch_refusal_names_the_profile_file_and_key(slurm_env, tmp_path, capsys):
    """sbatch refuses a partition the cluster lacks, or GPUs its nodes lack: the one line names the cluster
    profile's file and the key (with the cluster's partitions for a bad partition), and nothing is submitted."""
    settings = yaml.safe_load((REPO / "slurm" / "local.yaml").read_text())
    cases = {"partition": ({"partition": "nosuch"}, "Invalid partition name specified"),
             "gpus_per_node": ({"gpus_per_node": 1}, "Invalid generic resource (gres) specification")}
    for key, (change, words) in cases.items():
        profile = tmp_path / f"bad-{key}.yaml"
        profile.write_text(yaml.safe_dump({**settings, **change}))
        path, results = config(tmp_path, name=f"refused-{key}"), tmp_path / f"results-{key}"
        assert slurm(path, results, profile=str(profile)) == 2
        line = one_line(capsys.readouterr().err)
        assert line.startswith(f"error: {profile}: {key}: SLURM refused the submission ("), line
        assert words in line and "nothing was submitted" in line
        assert line.endswith("; allowed here: debug, short") == (key == "partition"), line
        assert not (results / "jobs.json").exists()
        assert not (results / "experiment.json").exists() and not (results / "logs").exists()


@pytest.mark.slurm
def test_submitting_with_the_controller_down_is_one_line_exit_2(slurm_env, tmp_path, capsys, monkeypatch):
    conf = Path(slurm_env["SLURM_CONF"]).read_text()
    down = tmp_path / "slurm.conf"
    down.write_text("\n".join("SlurmctldPort=6899" if line.startswith("SlurmctldPort=") else line
                              for line in conf.splitlines()) + "\n")  # nothing listens there
    monkeypatch.setenv("SLURM_CONF", str(down))
    path, results = config(tmp_path, name="down"), tmp_path / "results"
    assert slurm(path, results) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: SLURM refused the submission (") and "Unable to contact slurm controller" in line
    assert not (results / "jobs.json").exists()
    # submitit wrote its pickles and the sbatch script there: files of no job, gone with their folders, and the
    # experiment.json this invocation wrote before submitting (the folder had none): nothing was submitted
    assert sorted(path.name for path in results.iterdir()) == [".lock"], sorted(results.rglob("*"))
    # a folder with runs: its experiment.json (the last invocation's) is put back as it was
    assert bench(path, results) == 0
    earlier = (results / "experiment.json").read_bytes()
    time.sleep(0.01)  # written_at of a rewrite would differ
    assert slurm(path, results, "--force") == 2
    assert (results / "experiment.json").read_bytes() == earlier and not (results / "logs").exists()


def test_a_wait_that_submitted_nothing_does_not_time_from_a_submission(tmp_path, capsys, monkeypatch):
    """--wait whose runs were all still on earlier jobs: it submitted nothing, so its closing line counts from the
    start of the wait (it said "after submission")."""
    from bench.pipeline import slurm as slurm_module
    from bench.pipeline.executors import Outcome

    monkeypatch.setattr(slurm_module, "_wait_in_flight", lambda results_dir, flying: [Outcome(key, True) for key in flying])
    assert slurm_module._wait_all({}, tmp_path, {"k": {"job_id": "7_0", "state": "RUNNING"}}, time.time()) == 0
    assert "all 1 job(s) ended 0.0 s after the wait began (this invocation submitted none)\n" in capsys.readouterr().out


def test_weights_that_cannot_be_fetched_leave_the_experiment_file_as_it_was(tmp_path, capsys):
    """A URL that cannot be fetched stops the invocation before any run: the experiment.json it had rewritten (with
    the new config's runs) is the earlier one again, or none where there was none."""
    results = tmp_path / "results"
    assert bench(config(tmp_path), results) == 0
    earlier = (results / "experiment.json").read_bytes()
    unreachable = config(tmp_path, name="other", weights="http://127.0.0.1:9/weights.pth")  # the discard port
    time.sleep(0.01)
    assert bench(unreachable, results) == 2
    assert "http://127.0.0.1:9/weights.pth: download failed" in capsys.readouterr().err
    assert (results / "experiment.json").read_bytes() == earlier
    assert bench(unreachable, tmp_path / "fresh") == 2
    assert not (tmp_path / "fresh" / "experiment.json").exists()


def _local_job_gets_a_dropped_ctrl_c(tmp_path: Path, monkeypatch) -> tuple[Path, Any, Any, list[str], list]:
    """``run_local`` of two slow runs (784 tokens, ~30 s a run), with a Ctrl-C Python drops in a finalizer once the
    first run's job has claimed it; KeyboardInterrupt raised. Returns (results, first run, second run, the
    announced lines, the exception types Python dropped)."""
    from bench.pipeline import executors, interrupts
    from bench.pipeline.config import load_experiment

    slow = {**MODEL, "label": "slow", "kwargs": {**MODEL["kwargs"], "patch_size": 1, "depth": 4}}  # 784 tokens
    path = config(tmp_path, grid={"models": [slow], "methods": ["baseline", {"method": "tome", "r": 2}]},
                  stages=["throughput"], throughput={"batch_sizes": [64], "warmup": 1, "runs": 20})
    results = tmp_path / "results"
    first, second = load_experiment(path).runs
    announced, dropped = [], []

    def announce(line: str) -> None:  # called once a job is submitted: the first one computing, a Ctrl-C dropped
        announced.append(line)
        if len(announced) == 1:
            wait_for(lambda: (results / "claims" / f"{first.key}.json").exists(), 180, "the first run to start")
            _DropsCtrlC()

    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    with interrupts.remembered(), pytest.raises(KeyboardInterrupt):
        executors.run_local([first, second], results, announce=announce)
    return results, first, second, announced, dropped


def test_a_ctrl_c_python_drops_while_a_local_job_runs_stops_that_job_and_starts_no_other(tmp_path, monkeypatch):
    """``--executor local``: a Ctrl-C that run_bench's Python drops in a finalizer while a job computes stops that
    job (its run marked interrupted) and submits no other. Before, the loop went on: every run was computed, and
    only run_bench's exit status (130, at its end) said so."""
    results, first, second, announced, dropped = _local_job_gets_a_dropped_ctrl_c(tmp_path, monkeypatch)
    assert dropped == [KeyboardInterrupt]  # Python dropped it ("Exception ignored in ... __del__")
    logs = "\n".join(f"{path}:\n{path.read_text(errors='replace')[-2000:]}" for path in (results / "logs").rglob("*.*")
                     if path.is_file())
    assert len(announced) == 1 and first.key in announced[0], (announced, logs)  # the second was never submitted
    note = results / "failed" / f"{first.key}.json"
    assert note.exists() and json.loads(note.read_text())["state"] == "interrupted", logs
    assert keys(results) == set() and not (results / "failed" / f"{second.key}.json").exists()
    assert not (results / "claims" / f"{first.key}.json").exists()


def test_a_local_job_killed_before_it_marks_its_run_gets_its_note_from_run_bench(tmp_path, monkeypatch):
    """``--executor local``: submitit's controller answers a Ctrl-C with SIGINT to its job and SIGKILL a second
    later; a job inside one long operation (here: one that ignores SIGINT) dies without its note and leaves its
    claim. run_bench then writes the ``interrupted`` note (with the job's log) and removes the dead claim (its
    holder may still be a zombie, which counts as gone). Before, the run had no note and a stale claim (a CI run
    of the test above failed so)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # a handler that does nothing (SIG_IGN the job itself undoes)
        "import os, signal\n"
        "if os.environ.get('SUBMITIT_LOCAL_JOB_ID'):  # submitit's local task, not its controller\n"
        "    signal.signal(signal.SIGINT, lambda signum, frame: None)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    results, first, second, announced, _ = _local_job_gets_a_dropped_ctrl_c(tmp_path, monkeypatch)
    note = json.loads((results / "failed" / f"{first.key}.json").read_text())
    assert note["state"] == "interrupted" and note["error"] == "KeyboardInterrupt"
    assert note["log"].endswith("_0_log.err") and first.key not in keys(results)
    assert not (results / "claims" / f"{first.key}.json").exists()
    assert len(announced) == 1 and not (results / "failed" / f"{second.key}.json").exists()


@pytest.mark.parametrize("first", ["interrupted", "signalled twice", "failed"])
def test_a_second_ctrl_c_while_the_note_is_written_does_not_cut_it_short(tmp_path, monkeypatch, first):
    """A local job stopped from the terminal gets two SIGINTs milliseconds apart: the terminal's (the whole process
    group) and the one submitit's controller passes on when the same Ctrl-C stops it. Taken between two of the
    job's operations, the second arrived while the first one unwound: no note, and the claim released, so
    run_bench's own fallback note (for a job killed before writing one) did not apply either (seen in CI:
    ``test_ctrl_c_of_local_executor_is_one_line_without_submitit_tracebacks[group]``). Here SIGINTs are raised in
    this (main) thread while the run unwinds and inside the note's writing: the note is written whole; an
    interrupted run goes on as interrupted, and a failure's note is followed by the Ctrl-C, not lost."""
    from bench.pipeline import runner
    from bench.pipeline.config import load_experiment

    (run,) = load_experiment(config(tmp_path, grid={"methods": ["baseline"]})).runs
    results = tmp_path / "results"

    def execute(*args, **kwargs):
        if first == "signalled twice":  # the terminal's SIGINT raises; the controller's, as it unwinds, is dropped
            try:
                signal.raise_signal(signal.SIGINT)
            finally:
                signal.raise_signal(signal.SIGINT)
        raise KeyboardInterrupt if first == "interrupted" else RuntimeError("the run's own failure")

    def error_line(error):
        signal.raise_signal(signal.SIGINT)  # Python's handler runs here: inside the note's writing
        return original(error)

    original = runner.error_line
    monkeypatch.setattr(runner, "execute", execute)
    monkeypatch.setattr(runner, "error_line", error_line)
    with pytest.raises(KeyboardInterrupt) as raised:
        runner.run_job(run.to_dict(), str(results), progress=False)
    note = json.loads((results / "failed" / f"{run.key}.json").read_text())
    if first != "failed":
        assert (note["state"], note["error"]) == ("interrupted", "KeyboardInterrupt")
        assert raised.value.__context__ is None  # the run's own interrupt, not a second one raised over it
    else:
        assert (note["state"], note["error"]) == ("failed", "RuntimeError: the run's own failure")
        assert isinstance(raised.value.__context__, RuntimeError)
    assert "Traceback" in note["traceback"]
    assert not (results / "claims" / f"{run.key}.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# A local job's run, as submitit's task runs it, with SIGINT ignored as a script's background job inherits it (the
# job restores Python's handler itself): two SIGINTs as the run unwinds, a third inside its note's writing.
TWICE_IGNORED = """
import json, signal, sys
from bench.pipeline import runner
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
original = runner.error_line
def execute(*args, **kwargs):
    try:
        signal.raise_signal(signal.SIGINT)
    finally:
        signal.raise_signal(signal.SIGINT)
def error_line(error):
    signal.raise_signal(signal.SIGINT)
    return original(error)
runner.execute, runner.error_line = execute, error_line
try:
    runner.run_job(json.loads(sys.argv[1]), sys.argv[2], progress=False)
except KeyboardInterrupt as raised:
    print("raised once" if raised.__context__ is None else "raised over another", flush=True)
"""


def test_a_local_job_that_inherited_an_ignored_sigint_drops_the_second_one_too(tmp_path):
    """The job restores Python's SIGINT handler (``lock.exit_with_parent``), which it did inside ``run_guard``,
    after ``interrupts.once()`` had seen SIGINT ignored and stayed out: there the second SIGINT of one Ctrl-C raised
    over the first and a third cut the note short (no note, the claim released). Now the handler is restored first."""
    from bench.pipeline.config import load_experiment
    from bench.pipeline.lock import PARENT_ENV, process_start

    (run,) = load_experiment(config(tmp_path, grid={"methods": ["baseline"]})).runs
    results = tmp_path / "results"
    parent = f"{os.getpid()}:{process_start(os.getpid())}"  # this test's process: alive throughout, never killed
    done = subprocess.run([sys.executable, "-c", TWICE_IGNORED, json.dumps(run.to_dict()), str(results)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), PARENT_ENV: parent},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert (done.returncode, done.stdout) == (0, "raised once\n"), done.stderr
    note = json.loads((results / "failed" / f"{run.key}.json").read_text())
    assert (note["state"], note["error"]) == ("interrupted", "KeyboardInterrupt")
    assert not (results / "claims" / f"{run.key}.json").exists()


@pytest.mark.parametrize("target", ["parent", "group"])
def test_ctrl_c_of_local_executor_is_one_line_without_submitit_tracebacks(tmp_path, capsys, target):
    """``--executor local``: submitit's controller gets SIGINT too (from ``job.cancel``, and from the terminal
    for a whole process group) and prints tracebacks; they go to ``logs/local/controller.log``, not the terminal."""
    from bench.pipeline.config import load_experiment

    fast = {**MODEL, "label": "fast", "kwargs": {**MODEL["kwargs"], "patch_size": 14, "depth": 1}}  # 4 tokens
    slow = {**MODEL, "label": "slow", "kwargs": {**MODEL["kwargs"], "patch_size": 1, "depth": 4}}  # 784 tokens
    path = config(tmp_path, grid={"models": [fast, slow], "methods": ["baseline"]}, stages=["throughput"],
                  throughput={"batch_sizes": [64], "warmup": 1, "runs": 1000})
    results = tmp_path / "results"
    done, interrupted = load_experiment(path).runs
    process = spawn("run_bench.py", "--config", str(path), "--results", str(results), "--executor", "local",
                    "--quiet", "--no-report", start_new_session=True)
    try:
        wait_for(lambda: (results / "claims" / f"{interrupted.key}.json").exists(), 180, "the second run to start")
        time.sleep(0.5)
        if target == "group":  # a terminal's Ctrl-C: every process of the foreground group
            os.killpg(process.pid, signal.SIGINT)
        else:  # kill -INT <pid>
            process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, (out, err)
    assert one_line(err).startswith("interrupted (Ctrl-C): finished runs keep their records")
    assert "KeyboardInterrupt" not in err + out and "Traceback" not in out, (out, err)
    assert keys(results) == {done.key}
    note = json.loads((results / "failed" / f"{interrupted.key}.json").read_text())
    assert note["state"] == "interrupted"
    assert not (results / "claims" / f"{interrupted.key}.json").exists()
    assert (results / "logs" / "local" / "controller.log").is_file()
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 1
    status = capsys.readouterr().out.splitlines()
    assert status[0].split() == ["done", done.key] and status[1].startswith(f"interrupted {interrupted.key}")
    assert status[-1] == "1 done, 1 interrupted"


@pytest.mark.parametrize("executor", ["inprocess", "local"])
def test_timm_weights_unavailable_here_are_one_line_exit_2_when_the_jobs_run_here(tmp_path, monkeypatch, executor):
    """Offline (``HF_HUB_OFFLINE=1``, an empty cache) the jobs of ``inprocess`` / ``local`` would try the same
    download on the same host: refused before any run, one line, instead of a failure (and retries) per run."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    path, results = config(tmp_path, weights="timm:augreg_in21k"), tmp_path / "results"
    process = spawn("run_bench.py", "--config", str(path), "--results", str(results), "--executor", executor,
                    "--quiet", "--no-report")
    try:
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 2, (out, err)
    line = one_line(err)
    assert line.startswith("error: timm:augreg_in21k: timm pretrained weights for vit_tiny_patch16_224 unavailable (")
    assert line.endswith("; the runs execute on this host, so they cannot fetch them either") and len(line) < 320
    assert out.splitlines() == [f"rel: 2 run(s), 0 already done, 2 to run -> {results}"]
    assert not (results / "runs").exists() and not (results / "failed").exists() and not (results / "logs").exists()


def test_timm_weights_unavailable_here_are_left_to_slurm_jobs_with_one_warning(tmp_path, monkeypatch, caplog):
    import logging

    import huggingface_hub.constants as hub

    from bench.pipeline.config import load_experiment
    from bench.pipeline.fetch import prefetch_weights, quiet_hub
    from bench.pipeline.models import WeightsError

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read at import: HF_HUB_OFFLINE=1 for this process
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf"))
    runs = load_experiment(config(tmp_path, weights="timm:augreg_in21k")).runs
    hub_logger = logging.getLogger("huggingface_hub")
    level, hub_levels = hub_logger.level, []

    class HubLevel(logging.Handler):  # the hub logger's level when timm starts its download
        def emit(self, record):
            hub_levels.append(hub_logger.level)

    timm_logger, handler = logging.getLogger("timm.models._builder"), HubLevel()
    timm_logger.addHandler(handler)
    caplog.set_level(logging.INFO, logger="timm.models._builder")
    warnings: list[str] = []
    try:
        kept = prefetch_weights(runs, tmp_path / "results", warn=warnings.append, jobs_here=False)
        with pytest.raises(WeightsError) as refused:
            prefetch_weights(runs, tmp_path / "results", warn=warnings.append, jobs_here=True)
    finally:
        timm_logger.removeHandler(handler)
    assert [run.weights_path for run in kept] == ["timm:augreg_in21k"] * 2 and kept[0].key == runs[0].key
    (warning,) = warnings  # one per (model, tag), none for the refusal
    assert warning.startswith("warning: timm:augreg_in21k for vit_tiny_patch16_224 not fetched here (timm:augreg")
    assert warning.endswith("); each job will fetch it itself") and "\n" not in warning
    message = str(refused.value)
    assert message.startswith("timm:augreg_in21k: timm pretrained weights for vit_tiny_patch16_224 unavailable (")
    assert "\n" not in message and len(message) < 300
    assert hub_levels == [logging.ERROR, logging.ERROR] and hub_logger.level == level  # restored
    with quiet_hub():  # what the hub's retries log (a warning each) stays off the terminal, errors do not
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 8s [Retry 5/5].")
        logging.getLogger("huggingface_hub.utils._http").error("gave up")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")] == ["gave up"]


def test_a_run_that_failed_in_this_submission_is_failed_while_slurm_still_lists_its_job(tmp_path, monkeypatch):
    """sacct lags behind the job: a job whose run has just failed is still RUNNING for a moment, and the leaderboard
    that run_bench --wait writes right after listed the run as running (user test 8). Its failure note, written
    after the job was submitted, wins; an interrupted (preempted, requeued) run's job still shows pending."""
    from types import SimpleNamespace

    from bench.pipeline import runner, slurm
    from bench.pipeline.status import collect_status

    run = SimpleNamespace(key="k-tome")
    submitted = "2026-01-01T00:00:00+00:00"
    monkeypatch.setattr(slurm, "job_states", lambda results: {"k-tome": {
        "job_id": "5_0", "state": "RUNNING", "submitted_at": submitted, "log": None}})
    (tmp_path / "failed").mkdir()
    for error, state in ((RuntimeError("boom"), "failed"), (KeyboardInterrupt(), "running")):
        try:
            raise error
        except BaseException as raised:  # noqa: BLE001 - as the runner records it
            runner.write_failure(tmp_path, run, raised)
        (row,) = collect_status(["k-tome"], tmp_path)
        assert row.state == state, row
    assert collect_status(["k-tome"], tmp_path)[0].detail == "job 5_0 RUNNING"
    runner.write_failure(tmp_path, run, RuntimeError("boom"))
    monkeypatch.setattr(slurm, "job_states", lambda results: {"k-tome": {  # submitted again after that failure
        "job_id": "6_0", "state": "PENDING", "submitted_at": "2999-01-01T00:00:00+00:00", "log": None}})
    assert collect_status(["k-tome"], tmp_path)[0].state == "pending"


def test_status_of_a_submitted_run_is_unknown_while_slurm_cannot_be_asked(tmp_path, monkeypatch, capsys):
    """With sacct and squeue unreachable, a submitted run without a record showed as 'todo' (as if never
    submitted; it may still be queued or running): it is 'unknown', naming its job. A run whose failure note the
    job wrote stays 'failed'."""
    from types import SimpleNamespace

    from bench.pipeline import runner, slurm
    from bench.pipeline.status import collect_status, print_status

    (tmp_path / "nobin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))  # neither sacct nor squeue can be started
    slurm._write_jobs(tmp_path, {key: {"job_id": f"7_{i}", "log": None, "submitted_at": "2026-01-01T00:00:00+00:00",
                                       "previous_job_ids": []} for i, key in enumerate(("k-tome", "k-evit"))})
    try:
        raise RuntimeError("boom")
    except RuntimeError as raised:
        runner.write_failure(tmp_path, SimpleNamespace(key="k-evit"), raised)
    rows = collect_status(["k-tome", "k-evit"], tmp_path)
    assert [row.state for row in rows] == ["unknown", "failed"]
    assert rows[0].detail.startswith("job 7_0: SLURM gives no state for it")
    assert "boom" in rows[1].detail
    assert "sacct unavailable" in capsys.readouterr().err
    print_status(rows)
    assert capsys.readouterr().out.splitlines()[-1] == "1 failed, 1 unknown"


def test_status_shows_a_run_computed_now_as_running(tmp_path):
    """User test 14: a run being computed in process (or by the local executor) showed as 'todo': its live claim
    (this process here) makes it 'running'; a claim of a dead process does not."""
    from bench.pipeline.lock import claim_path, claim_run
    from bench.pipeline.status import collect_status

    with claim_run(tmp_path, "k-tome"):
        (row,) = collect_status(["k-tome"], tmp_path)
        assert row.state == "running" and row.detail.startswith(f"computing now: pid {os.getpid()} on ")
    assert collect_status(["k-tome"], tmp_path)[0].state == "todo"  # the claim is gone with the block
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim_path(tmp_path, "k-tome").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert collect_status(["k-tome"], tmp_path)[0].state == "todo"


def test_status_says_todo_for_a_record_of_eval_images_edited_since_as_the_rerun_redoes_it(tmp_path, capsys):
    """The eval folder edited in place after the runs: --status said 'done' from their records while the next
    invocation set them aside and redid them. One rule (status.read_current) now decides both: --status and the
    report's collect_status say todo and why, the rerun redoes the runs, and --status then says done."""
    import shutil

    from bench.pipeline.status import collect_status
    from tests.test_pipeline import _image_folder

    _image_folder(tmp_path / "imgs")
    defaults = {"model": MODEL, "weights": None, "data": {"name": "folder", "root": "imgs", "split": "val"},
                "batch_size": 8, "device": "cpu", "threads": 1}
    path, results = config(tmp_path, defaults=defaults, stages=["eval"]), tmp_path / "results"
    assert bench(path, results) == 0
    val = tmp_path / "imgs" / "val" / "n00000001"
    shutil.copy(val / "img_0.JPEG", val / "img_9.JPEG")  # grown in place
    capsys.readouterr()
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 1
    rows = capsys.readouterr().out.splitlines()
    why = (f"its record was computed on other eval images than {tmp_path / 'imgs'} holds now (changed in place, or "
           "another folder of the same name): the next invocation sets it aside and redoes the run")
    assert [row.split()[0] for row in rows[:-1]] == ["todo", "todo"] and all(row.endswith(why) for row in rows[:-1]), rows
    assert rows[-1] == "2 todo"
    assert [(row.state, row.detail) for row in collect_status(sorted(keys(results)), results)] == [("todo", why)] * 2
    assert bench(path, results) == 0
    assert capsys.readouterr().err.count(", the run is redone") == 2
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 done"


def test_a_device_auto_record_timed_on_another_device_kind_is_set_aside_and_redone(tmp_path, capsys):
    """Run keys do not hold the machine: a ``device: auto`` record timed on the CPU (in process on a login node)
    was reused when the experiment was submitted to GPU nodes, and the leaderboard showed CPU speeds for it (and a
    GPU record for an in-process rerun on a CPU machine). Such a record now counts as stale where auto gives the
    other device kind: a dry run says so and counts the run to do, the run sets it aside and redoes it; records
    without a throughput stage, and those of device: cpu, are reused."""
    from bench.pipeline.config import load_experiment

    defaults = {"model": MODEL, "weights": None, "data": {"name": "fashion_mnist", "subset": 16},
                "batch_size": 8, "device": "auto", "threads": 1}
    grid = {"methods": ["baseline"]}
    path = config(tmp_path, defaults=defaults, stages=["macs", "throughput"], grid=grid,
                  throughput={"batch_sizes": [8], "warmup": 1, "runs": 2})
    results = tmp_path / "results"
    assert bench(path, results) == 0
    (record_file,) = (results / "runs").glob("*.json")
    assert read_record(record_file)["env"]["device"] == "cpu"  # this machine has no CUDA
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(yaml.safe_dump({"partition": "debug", "gpus_per_node": 1, "timeout_min": 60}))
    capsys.readouterr()
    # a submission to GPU nodes: the CPU record is stale (a dry run sets nothing aside)
    assert bench(path, results, "--dry-run", "--executor", "slurm", "--profile", str(gpu)) == 0
    captured = capsys.readouterr()
    assert "1 run(s), 0 already done, 1 to run" in captured.out
    why = (f"its throughput was timed on cpu, and device: auto is cuda here (cluster profile {gpu} gives "
           "gpus_per_node: 1); it would be set aside, the run is redone")
    assert why in captured.err, captured.err
    assert bench(path, results, "--dry-run", "--executor", "slurm", "--profile", "local") == 0  # CPU nodes: reused
    assert "1 already done, 0 to run" in capsys.readouterr().out
    # a record timed on a GPU (as a SLURM job writes it), rerun in process on this CPU machine: set aside, redone
    record = read_record(record_file)
    record["env"]["device"] = "cuda:0"
    record_file.write_text(json.dumps(record))
    assert bench(path, results) == 0
    err = capsys.readouterr().err
    assert ("its throughput was timed on cuda:0, and device: auto is cpu here (no CUDA on this machine); moved to "
            f"{record_file.name}.stale.1, the run is redone") in err, err
    assert read_record(record_file)["env"]["device"] == "cpu"
    assert read_record(results / "runs" / f"{record_file.name}.stale.1")["env"]["device"] == "cuda:0"
    # without the throughput stage the device does not matter, and device: cpu means the CPU wherever it runs
    for changes in ({"stages": ["macs"]}, {"defaults": {**defaults, "device": "cpu"}}):
        other = config(tmp_path, **{"defaults": defaults, "stages": ["macs", "throughput"], "grid": grid,
                                    "throughput": {"batch_sizes": [8], "warmup": 1, "runs": 2}, **changes})
        assert bench(other, results) == 0
        (key,) = [run.key for run in load_experiment(other).runs]
        stored = read_record(record_path(results, key))
        stored["env"]["device"] = "cuda:0"
        record_path(results, key).write_text(json.dumps(stored))
        capsys.readouterr()
        assert bench(other, results) == 0
        assert "is redone" not in capsys.readouterr().err
        assert read_record(record_path(results, key))["env"]["device"] == "cuda:0"  # reused


def test_a_forced_rerun_that_fails_shows_as_failed_beside_its_earlier_record(tmp_path, capsys, monkeypatch):
    """--force recomputes a finished run; when that attempt fails (or is cut), --status said 'done' from the earlier
    record (user test 9): it now shows the attempt, and the record stays."""
    import time

    from bench.pipeline.stages import macs
    from tests.test_pipeline import bench_main, config, write

    path = write(tmp_path, config(tmp_path, stages=["macs"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]}))
    results = tmp_path / "results"
    assert bench_main(path, results, "--no-report") == 0
    time.sleep(1.1)  # the notes' and records' times are whole seconds
    original = macs.run
    monkeypatch.setattr(macs, "run", lambda ctx: (_ for _ in ()).throw(RuntimeError("injected")) if ctx.run.method == "tome"
                        else original(ctx))
    assert bench_main(path, results, "--no-report", "--force") == 1
    capsys.readouterr()
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status"]) == 1
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if "-tome-" in line)
    assert row.startswith("failed   tiny-fmnist-tome-r4-") and "RuntimeError: injected (a later attempt; the record of " in row
    assert out[-1] == "1 done, 1 failed"
    assert len(list((results / "runs").glob("*.json"))) == 2  # the earlier records stay


def test_a_claim_from_another_host_outside_slurm_names_its_file_and_is_the_jobs_error_line(tmp_path):
    """User test 16: a dead in-process run on a login node leaves a claim that no compute node can prove dead;
    the refusal names the claim file to delete, and a job's log gives that refusal as its one-line error (the
    last line naming an Error was srun's, or none: RunClaimed names neither)."""
    import traceback

    from bench.pipeline.lock import RunClaimed, claim_path, claim_run, holder_info
    from bench.pipeline.records import last_error_line

    claim = claim_path(tmp_path, "k-tome")
    claim.parent.mkdir(parents=True)
    claim.write_text(json.dumps({**holder_info(), "host": "login01", "slurm_job_id": None, "slurm_job": None}))
    with pytest.raises(RunClaimed) as raised, claim_run(tmp_path, "k-tome"):
        pass
    message = str(raised.value)
    assert "is being computed by pid" in message and "on login01" in message
    assert message.endswith(f"(its host is not this one: if that process is gone, delete {claim})")
    log = "".join(traceback.format_exception(raised.value)) + "srun: error: vm: task 0: Exited with exit code 1\n"
    assert last_error_line(log) == f"bench.pipeline.lock.RunClaimed: {message}"[:300]
    claim.write_text(json.dumps({**holder_info(), "slurm_job_id": "478", "slurm_job": "475_2"}))  # this host, live
    with pytest.raises(RunClaimed, match=r"SLURM job 475_2 since .*not run twice$"), claim_run(tmp_path, "k-tome"):
        pass


def test_status_rows_keep_their_keys_in_one_column(capsys):
    """An "interrupted" row is wider than the 8 characters of the state column (user test 16): every key still
    starts in the same column."""
    from bench.pipeline.status import RunStatus, print_status

    print_status([RunStatus("m-tome-1", "interrupted", "KeyboardInterrupt"), RunStatus("m-base-2", "done")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.index("m-") for line in lines[:2]] == [12, 12] and lines[2] == "1 done, 1 interrupted"


def test_status_shows_the_attempt_made_here_after_a_slurm_job_ended(tmp_path, monkeypatch):
    """A run whose SLURM job was cancelled (or failed, or killed), then computed again in process or by the local
    executor: --status said 'failed  job 5_0 CANCELLED' while that run was being computed here (its live claim
    was looked at only for a run without a job), and again after the attempt here failed, hiding that attempt's
    error and log. A live claim is 'running'; the later attempt's note gives the row; the job's own note still
    shows with its job."""
    from types import SimpleNamespace

    from bench.pipeline import runner, slurm
    from bench.pipeline.lock import claim_run
    from bench.pipeline.status import collect_status

    run = SimpleNamespace(key="k-tome")
    job = {"job_id": "5_0", "state": "CANCELLED", "submitted_at": "2026-01-01T00:00:00+00:00", "log": "/logs/5_0.err"}
    monkeypatch.setattr(slurm, "job_states", lambda results: {"k-tome": dict(job)})
    assert [(row.state, row.detail) for row in collect_status(["k-tome"], tmp_path)] == [("failed", "job 5_0 CANCELLED")]
    with claim_run(tmp_path, "k-tome"):  # computed here now
        (row,) = collect_status(["k-tome"], tmp_path)
        assert row.state == "running" and row.detail.startswith(f"computing now: pid {os.getpid()} on "), row
    monkeypatch.setenv("TOKENBENCH_LOG", "/logs/local/9/9_0_log.err")
    try:
        raise RuntimeError("boom here")
    except RuntimeError as raised:  # the attempt here fails
        runner.write_failure(tmp_path, run, raised)
    (row,) = collect_status(["k-tome"], tmp_path)
    assert (row.state, row.detail, row.log) == ("failed", "RuntimeError: boom here", "/logs/local/9/9_0_log.err")
    job["state"] = "FAILED"  # the job's own note (written inside job 5_0): shown with its job, as before
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "6")
    monkeypatch.setenv("TOKENBENCH_LOG", job["log"])
    try:
        raise RuntimeError("boom in the job")
    except RuntimeError as raised:
        runner.write_failure(tmp_path, run, raised)
    (row,) = collect_status(["k-tome"], tmp_path)
    assert (row.state, row.detail, row.log) == ("failed", "job 5_0 FAILED: RuntimeError: boom in the job", job["log"])


def test_a_run_failing_in_a_local_job_leaves_a_note_with_the_jobs_log(tmp_path, monkeypatch, capsys):
    """A failure note of the local executor named no log (only SLURM jobs set ``$TOKENBENCH_LOG``): --status
    gave a failed local run without its log. The note and --status now name the job's log, as run_bench's
    summary does."""
    from bench.pipeline.records import read_failure

    path = config(tmp_path)
    results = tmp_path / "results"
    monkeypatch.setenv("TOKENBENCH_FAIL_KEYS", "*-tome-*")  # the local job inherits it
    assert bench(path, results, "--executor", "local", "--only", "tome") == 1
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("FAILED "))
    log = summary.rsplit("(log: ", 1)[1].rstrip(")")
    assert log.startswith(str(results / "logs" / "local")) and Path(log).is_file()
    (key,) = [name.stem for name in (results / "failed").glob("*.json")]
    assert read_failure(results, key)["log"] == log
    assert run_bench.main(["--config", str(path), "--results", str(results), "--status", "--only", "tome"]) == 1
    row = capsys.readouterr().out.splitlines()[0]
    assert row.startswith(f"failed   {key}  RuntimeError: injected failure") and row.endswith(f"  log: {log}"), row
