"""GPU and cluster readiness (issue 9), checked on CPU: where tensors live, which device a rank takes
first, what SLURM is asked for, which images are measured, what records say about the GPU, which attention
kernel runs, where remote weights are fetched, that the README's commands parse, and the GPU smoke script."""

from __future__ import annotations

import functools
import http.server
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import yaml

import bench
import run_bench
from bench.pipeline import train
from bench.pipeline.files import REPO
from bench.pipeline.profiles import Profile, ProfileError, eval_resources, load_profile
from bench.pipeline.records import read_all
from bench.pipeline.slurm import executor_parameters
from tests.test_pipeline import MODEL, _image_folder, bench_main, config, write
from tests.test_train import Toy, tiny_model


# ------------------------------------------------------------------ 1. the epoch's all-reduce tensor
class _Stop(Exception):
    pass


def test_epoch_totals_are_reduced_on_the_training_device(monkeypatch):
    """NCCL reduces CUDA tensors only: the tensor handed to all_reduce lives on the training device
    (``meta`` stands in for a GPU here)."""
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise _Stop

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(_Stop):
        train.reduce_totals([1.0, 2.0, 3.0], torch.device("meta"), world_size=2)
    assert seen == [torch.device("meta")]
    assert train.reduce_totals([4.0, 1.0, 8.0], torch.device("cpu"), world_size=1) == [4.0, 1.0, 8.0]


def test_ddp_finetune_reduces_on_the_model_device_and_seeds_loaders_per_rank(tmp_path, monkeypatch):
    """The training loop itself, as rank 0 of 2 (a one-process gloo group; all_reduce adds a second rank's
    totals, other than this rank's): the reduced tensor is on the model's device, the history is the ratio of
    the summed totals, and the DataLoader's generator is seeded by (seed, epoch, rank, step)."""
    reduced_on, loader_seeds, local = [], [], []
    model = tiny_model()
    other = [1000.0, 7.0, 10.0]  # the other rank's loss sum, correct and seen

    def all_reduce(tensor, *args, **kwargs):
        reduced_on.append((tensor.device, next(model.parameters()).device))
        local.append(tensor.tolist())
        tensor.add_(torch.tensor(other, dtype=tensor.dtype, device=tensor.device))

    real_loader = train.DataLoader

    def loader(*args, generator=None, **kwargs):
        loader_seeds.append(generator.initial_seed())
        return real_loader(*args, generator=generator, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(train, "DataLoader", loader)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        options = train.FinetuneOptions(epochs=2, batch_size=8, lr=1e-3, seed=3)
        result = train.finetune(model, Toy(32), options, tmp_path / "ckpt", torch.device("cpu"), rank=0,
                                world_size=2, progress=False, log=lambda message: None)
    finally:
        dist.destroy_process_group()
    assert reduced_on == [(torch.device("cpu"), torch.device("cpu"))] * 2
    assert [seen for _, _, seen in local] == [16.0, 16.0]  # this rank's half of the 32 images, each epoch
    for history, (loss_sum, correct, seen) in zip(result["history"], local, strict=True):
        assert history["train_loss"] == pytest.approx((loss_sum + 1000.0) / (seen + 10.0), rel=1e-12)
        assert history["train_top1"] == pytest.approx(100.0 * (correct + 7.0) / (seen + 10.0), rel=1e-12)
    assert loader_seeds == [train.loader_seed(3, 0, 0, 0), train.loader_seed(3, 1, 0, 0)]


def test_loader_seeds_differ_per_rank_epoch_and_first_step():
    seeds = {train.loader_seed(s, e, r, f) for s in (0, 1) for e in (0, 1) for r in (0, 1) for f in (0, 5)}
    assert len(seeds) == 16 and train.loader_seed(0, 1, 1, 5) == train.loader_seed(0, 1, 1, 5)
    assert all(0 <= seed < 2**63 for seed in seeds)


# ------------------------------------------------------------------ 6. the CUDA generator in checkpoints
def test_checkpoint_rng_keeps_and_restores_the_training_devices_cuda_generator(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: calls.append(("get", device)) or "state")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(("set", state, device)))
    gpu = torch.device("cuda", 1)
    state = train.rng_state(gpu)
    assert state["cuda"] == "state" and calls == [("get", gpu)]
    train.set_rng_state(state, gpu)
    assert calls[-1] == ("set", "state", gpu)
    assert "cuda" not in train.rng_state(torch.device("cpu"))  # and CUDA is not touched for a CPU run
    assert len(calls) == 2


# ------------------------------------------------------------------ 2. SLURM resources per job shape
def test_eval_jobs_request_one_gpu_and_its_share_of_the_node():
    profile = load_profile("example_gpu")  # 4 GPUs, 4 tasks x 10 CPUs, 240 GB
    evaluation = executor_parameters(profile, finetune=False)
    finetune = executor_parameters(profile, finetune=True)
    assert (evaluation["tasks_per_node"], evaluation["gpus_per_node"]) == (1, 1)
    assert (evaluation["cpus_per_task"], evaluation["mem_gb"]) == (10, 60)
    assert (finetune["tasks_per_node"], finetune["gpus_per_node"], finetune["cpus_per_task"], finetune["mem_gb"]) \
        == (4, 4, 10, 240)
    # 8 GPUs driven by 2 tasks of 16 CPUs: the node's 32 CPUs / 8 GPUs
    assert eval_resources(Profile(gpus_per_node=8, tasks_per_node=2, cpus_per_task=16, mem_gb=500)) == {
        "gpus_per_node": 1, "cpus_per_task": 4, "mem_gb": 62}
    cpu_only = executor_parameters(Profile(tasks_per_node=2, cpus_per_task=4, mem_gb=9), finetune=False)
    assert "gpus_per_node" not in cpu_only and (cpu_only["cpus_per_task"], cpu_only["mem_gb"]) == (4, 4)


def test_more_tasks_than_gpus_is_a_one_line_profile_error(tmp_path, capsys):
    profile = tmp_path / "wide.yaml"
    profile.write_text(yaml.safe_dump({"partition": "gpu", "gpus_per_node": 2, "tasks_per_node": 4}))
    with pytest.raises(ProfileError, match=r"wide.yaml: tasks_per_node: 4 exceeds gpus_per_node 2; allowed: 1 to 2"):
        load_profile(str(profile))
    path = write(tmp_path, config(tmp_path, grid={"methods": ["baseline"]}))
    assert run_bench.main(["--config", str(path), "--dry-run", "--profile", str(profile)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tasks_per_node: 4 exceeds gpus_per_node 2" in err


def test_dry_run_prints_the_resources_of_each_job_array(tmp_path, capsys):
    assert run_bench.main(["--config", str(REPO / "configs" / "deit_imagenet.yaml"), "--dry-run", "--no-calibrate",
                           "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "profile example_gpu" in out
    # 48 runs at the papers' settings (the MAC-budget runs are left out without calibration)
    assert re.search(r"eval +48 job\(s\) partition=gpu .*nodes=1 tasks=1 gpus=1 cpus_per_task=10 mem=60G "
                     r"time=720min .*at most 16 at once", out)
    assert re.search(r"finetune +0 job\(s\) partition=gpu .*tasks=4 gpus=4 cpus_per_task=10 mem=240G", out)
    # --profile overrides the config's; a config without one gets 'local'
    path = write(tmp_path, config(tmp_path, grid={"methods": ["baseline", {"method": "tome", "r": 4}]}))
    assert run_bench.main(["--config", str(path), "--dry-run", "--results", str(tmp_path / "r2")]) == 0
    out = capsys.readouterr().out
    assert "profile local" in out and re.search(r"eval +2 job\(s\) partition=debug nodes=1 tasks=1 gpus=0", out)


# ------------------------------------------------------------------ 3. the rank's device comes first
def test_rank_device_is_current_before_the_model_moves(tmp_path, monkeypatch):
    """Task 1 of a 2-task GPU job: torch.cuda.set_device(cuda:1) happens before the model is moved, and
    the model goes to cuda:1, not to the bare 'cuda' (GPU 0)."""
    from bench.pipeline import distributed, runner
    from bench.pipeline.config import load_experiment
    from bench.pipeline.stages import stage

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", torch.device(device))))
    monkeypatch.setattr(distributed, "job_world", lambda: (1, 2, 1))

    def to(self, *args, **kwargs):
        calls.append(("to", torch.device(args[0]) if args else kwargs.get("device")))
        return self

    monkeypatch.setattr(torch.nn.Module, "to", to)

    def fake_stage(ctx):  # what the finetune stage leaves for a non-zero rank
        calls.append(("stage", ctx.device))
        ctx.rank = 1
        return {}

    monkeypatch.setattr(stage("eval"), "run", fake_stage)
    cfg = config(tmp_path, stages=["eval"], grid={"methods": ["baseline"]})
    cfg["defaults"]["device"] = "cuda"
    (run,) = load_experiment(write(tmp_path, cfg)).runs
    assert runner.execute(run, tmp_path / "results", progress=False) is None
    gpu1 = torch.device("cuda", 1)
    assert calls[0] == ("set_device", gpu1)
    moves = [call for call in calls if call[0] == "to"]
    assert moves and all(device == gpu1 for _, device in moves)
    assert calls[-1] == ("stage", gpu1)


# ------------------------------------------------------------------ 4. representative samples
def test_measured_images_are_a_seeded_draw_across_classes(tmp_path):
    from bench.pipeline.data import build_dataset
    from bench.pipeline.samples import sample_indices
    from bench.pipeline.stages.throughput import real_batch

    _image_folder(tmp_path / "in1k", classes=4, per_class=3)
    val = build_dataset("imagenet", "val", root=str(tmp_path / "in1k"))
    first = sample_indices(val, 4)
    assert {val.targets[i] for i in first} == {0, 1, 2, 3}  # the first 4 images hold 2 classes only
    assert sample_indices(val, 4) == first and sample_indices(val, 8, seed=0)[:4] == first
    assert sample_indices(val, 4, seed=1) != first
    cycled = sample_indices(val, 14)
    assert sorted(cycled[:12]) == list(range(12)) and cycled[12:] == cycled[:2]
    subset = build_dataset("imagenet", "val", root=str(tmp_path / "in1k"), subset=8)
    assert len({subset.dataset.targets[subset.indices[i]] for i in sample_indices(subset, 4)}) == 4
    # the throughput stage times exactly these images
    ctx = SimpleNamespace(val_set=lambda: val, run=SimpleNamespace(seed=0), device=torch.device("cpu"))
    assert torch.equal(real_batch(ctx, 4), torch.stack([val[i][0] for i in first]))


def test_data_averaged_macs_use_the_drawn_images(monkeypatch):
    from bench.pipeline.samples import sample_indices
    from bench.pipeline.stages import macs

    val = Toy(40)
    val.targets = [i % 5 for i in range(40)]
    traced = []
    monkeypatch.setattr(macs, "count_macs", lambda model: 100)
    monkeypatch.setattr(macs, "analytic_macs", lambda model, *counts: 100)
    monkeypatch.setattr(macs, "data_macs", lambda model, images: traced.extend(images) or 90.0)
    model = SimpleNamespace(last_forward=SimpleNamespace(tokens_attn=[1], tokens_mlp=[1], tokens_in=[1], tokens_out=[1]),
                            method=SimpleNamespace(data_dependent=True))
    run = SimpleNamespace(seed=0, macs={"images": 5}, model="toy", model_kwargs={}, weights_sha256=None,
                          weights_path=None, data={}, stages=("macs",))  # random weights: traced in the stage
    ctx = SimpleNamespace(model=model, val_set=lambda: val, run=run, note_tokens=lambda info: None)
    assert macs.run(ctx)["data_mean"] == 90.0
    expected = [val[i][0] for i in sample_indices(val, 5)]
    assert len(traced) == 5 and all(torch.equal(a, b) for a, b in zip(traced, expected, strict=True))
    assert not torch.equal(traced[1], val[1][0])


# ------------------------------------------------------------------ 5. the README's commands parse
def readme_commands() -> list[str]:
    """Every ``python run_bench.py ...`` / ``tokenbench-run ...`` command of README.md (a code-block line or
    inline code; backslash continuations joined), without leading ``VAR=value`` assignments."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    command = re.compile(r"^\s*(?:\w+=\S*\s+)*((?:(?:[\w.-]*/)?python3?\s+(?:\S*/)?run_bench\.py|tokenbench-run)(?:\s.*)?)$")
    commands = []
    for line in text.splitlines():
        for fragment in [line, *re.findall(r"`([^`]*)`", line)]:
            match = command.match(fragment)
            if match:
                commands.append(match.group(1).strip())
    return list(dict.fromkeys(commands))


def check_command(command: str) -> None:
    """A concrete command must parse with run_bench's parser; a synopsis (``[--flag A|B]``) must name
    only options it knows, with allowed choices."""
    words = shlex.split(command.split(" #")[0])
    start = next(i for i, word in enumerate(words) if word.endswith(("run_bench.py", "tokenbench-run")))
    parser_args = words[start + 1:]
    if "[" in command:
        known = {option for action in run_bench.build_parser()._actions for option in action.option_strings}
        for flag, value in re.findall(r"(--[\w-]+)(?:[ =]([\w|<>./-]+))?", command):
            assert flag in known, f"README: {command!r}: {flag} is not an option of run_bench.py"
            action = next(a for a in run_bench.build_parser()._actions if flag in a.option_strings)
            if action.choices and value:
                assert set(value.split("|")) <= set(action.choices), f"README: {command!r}: {value}"
        return
    try:
        run_bench.parse_args(parser_args)
    except SystemExit:
        pytest.fail(f"README command does not parse with run_bench.py's arguments: {command}")


def test_readme_commands_parse_with_run_bench_arguments(capsys):
    commands = readme_commands()
    assert len(commands) >= 4 and any("deit_imagenet" in c for c in commands)
    for command in commands:
        check_command(command)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):  # what an outdated line looks like
        check_command("IMAGENET_ROOT=/data python run_bench.py --config configs/deit_imagenet.yaml --device cuda")


# ------------------------------------------------------------------ 7. environment fields, SDPA pin
def test_records_carry_gpu_fields_null_on_cpu_and_a_pinned_backend_runs(tmp_path, monkeypatch):
    from bench.pipeline.stages import stage
    from bench.sdpa import enabled_backends, written_out

    original = stage("eval").run
    enabled = []
    monkeypatch.setattr(stage("eval"), "run",
                        lambda ctx: enabled.append((enabled_backends(), written_out())) or original(ctx))
    grid = {"methods": ["baseline", {"method": "tome", "r": 4}]}
    auto = write(tmp_path, config(tmp_path, stages=["eval"], grid=grid), "auto.yaml")
    assert bench_main(auto, tmp_path / "auto", "--no-report") == 0
    for backend in ("math", "explicit"):
        cfg = config(tmp_path, stages=["eval", "throughput"], grid=grid,
                     throughput={"batch_sizes": [2], "warmup": 1, "runs": 1})
        cfg["defaults"]["sdpa_backend"] = backend
        assert bench_main(write(tmp_path, cfg, f"{backend}.yaml"), tmp_path / backend, "--no-report") == 0
    assert [written for _, written in enabled] == [False] * 4 + [True] * 2  # explicit: every block written out
    assert [kernels for kernels, _ in enabled[:2]] != [["math"], ["math"]]
    assert [kernels for kernels, _ in enabled[2:4]] == [["math"], ["math"]]
    for folder, backend in (("auto", None), ("math", "math"), ("explicit", "explicit")):
        records = read_all(tmp_path / folder)[0]
        assert len(records) == 2
        for record in records:
            env = record["env"]
            assert {k: env[k] for k in ("cuda_version", "cudnn_version", "driver_version", "tf32")} == dict.fromkeys(
                ("cuda_version", "cudnn_version", "driver_version", "tf32"))
            assert env["sdpa_backend"] == backend and record["run"]["sdpa_backend"] == (backend or "auto")
    keys = {folder: {r["key"] for r in read_all(tmp_path / folder)[0]} for folder in ("auto", "math", "explicit")}
    assert not keys["auto"] & keys["math"] and not keys["auto"] & keys["explicit"]  # another kernel, another run
    # the leaderboard names the kernel next to the throughput conditions
    import report

    for folder, words in (("math", "1 thread, SDPA kernel pinned to math. Speed-up"),
                          ("explicit", "1 thread, attention written out. Speed-up")):
        assert report.main([str(tmp_path / folder)]) == 0
        assert words in (tmp_path / folder / "leaderboard.md").read_text()


def test_pinned_math_backend_dispatches_to_the_math_kernel():
    from bench.sdpa import kernels_used, sdpa_backend
    from tests.helpers import images, small_vit

    model, batch = bench.apply(small_vit(depth=2), "tome", r=4), images(2)
    with sdpa_backend("math"):
        assert kernels_used(model, batch) == ["math"]
    assert kernels_used(model, batch) != ["math"]


def test_auto_backend_keeps_run_keys_and_bad_backends_are_one_line_errors(tmp_path, capsys):
    from bench.pipeline.config import load_experiment, run_key

    (run,) = load_experiment(write(tmp_path, config(tmp_path, grid={"methods": ["baseline"]}))).runs
    assert run.sdpa_backend == "auto"
    identity_without = {k: v for k, v in run.to_dict().items() if k != "sdpa_backend"}
    from bench.pipeline.config import RunSpec

    assert run_key(RunSpec.from_dict(identity_without)) == run.key  # keys from before the option stay
    for value, message in (("fastest", "defaults.sdpa_backend: 'fastest' not allowed; allowed: auto, math, "
                                       "efficient, flash, cudnn, explicit"),
                           ("efficient", "defaults.sdpa_backend: 'efficient' needs CUDA (device: cpu); allowed on "
                                         "CPU: auto, math, flash, explicit")):
        cfg = config(tmp_path, grid={"methods": ["baseline"]})
        cfg["defaults"]["sdpa_backend"] = value
        assert bench_main(write(tmp_path, cfg, f"{value}.yaml"), tmp_path / "r", "--dry-run") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_gpu_environment_fields_on_cuda(monkeypatch, tmp_path):
    """On a CUDA device: the CUDA / cuDNN versions of this torch, the driver from nvidia-smi, TF32 flags,
    and the enabled SDPA backends for auto."""
    from bench.pipeline import accelerator

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 580.65.06\necho 580.65.06\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    env = accelerator.cuda_environment(torch.device("cuda", 0))
    assert env["cuda_version"] == torch.version.cuda and env["cudnn_version"] == 91002
    assert env["driver_version"] == "580.65.06"
    assert env["tf32"] == {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    assert env["sdpa_backend"].startswith("auto:") and "math" in env["sdpa_backend"]
    assert accelerator.cuda_environment(torch.device("cuda", 0), "flash")["sdpa_backend"] == "flash"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert accelerator.driver_version() is None


# ------------------------------------------------------------------ 8. remote weights fetched at submit time
@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A local HTTP server (127.0.0.1, a thread) serving tmp_path/served; counts the GET requests."""
    served = tmp_path / "served"
    served.mkdir()
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    yield served, f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()
    server.server_close()


def test_url_weights_are_fetched_once_before_the_runs(tmp_path, weights_server, monkeypatch):
    from bench.pipeline import models
    from bench.pipeline.models import create_model

    served, base, hits = weights_server
    torch.manual_seed(5)
    vit = create_model(MODEL["name"], MODEL["kwargs"])
    torch.save({"model": vit.state_dict()}, served / "tiny.pth")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("a job downloaded the weights itself"))
    loaded = []
    real_read = models.read_weights
    monkeypatch.setattr(models, "read_weights", lambda source: loaded.append(source) or real_read(source))
    cfg = config(tmp_path, stages=["eval"], grid={"methods": ["baseline", {"method": "tome", "r": 4}]})
    cfg["defaults"]["weights"] = f"{base}/tiny.pth"
    path = write(tmp_path, cfg)
    results = tmp_path / "results"
    assert bench_main(path, results, "--no-report") == 0
    assert hits == ["/tiny.pth"]  # once for both runs
    (cached,) = (results / "cache" / "weights").iterdir()
    assert re.fullmatch(r"[0-9a-f]{16}-tiny\.pth", cached.name)
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".tmp")]
    records = read_all(results)[0]
    assert {r["run"]["weights_path"] for r in records} == {str(cached)}
    assert {r["run"]["weights"] for r in records} == {f"{base}/tiny.pth"}
    assert loaded and set(loaded) <= {str(cached)}
    assert bench_main(path, results, "--no-report", "--force") == 0
    assert hits == ["/tiny.pth"]  # cached
    cfg["defaults"]["weights"] = f"{base}/missing.pth"
    assert bench_main(write(tmp_path, cfg, "missing.yaml"), tmp_path / "r2", "--no-report") == 2


class _RunsCode:
    """A pickled object whose unpickling makes a folder: what a checkpoint's foreign objects could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.makedirs, (str(self.marker),)


def test_url_weights_read_before_the_fetch_run_no_pickled_code(tmp_path, weights_server, monkeypatch):
    """The calibration of a data-dependent method's budget reads URL weights before they are fetched (torch.hub):
    as a local file, with torch.load(weights_only=True), a checkpoint holding other objects is refused, not run."""
    from bench.pipeline.models import WeightsError, create_model, read_weights

    served, base, _ = weights_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    marker = tmp_path / "pickle-ran"
    torch.save({"model": create_model(MODEL["name"], MODEL["kwargs"]).state_dict(), "extra": _RunsCode(marker)},
               served / "tiny.pth")
    with pytest.raises(WeightsError, match=r"/tiny\.pth: refused: the checkpoint holds pickled Python objects"):
        read_weights(f"{base}/tiny.pth")
    assert not marker.exists()


def test_timm_weights_resolved_to_a_local_file_or_left_to_the_job(tmp_path, monkeypatch, capsys):
    import timm

    from bench.pipeline.fetch import prefetch_weights
    from bench.pipeline.models import load_model

    real_create = timm.create_model
    downloads = []

    def create(name, pretrained=False, **kwargs):  # timm's hub download, offline: fixed "pretrained" values
        model = real_create(name.split(".")[0], pretrained=False, **kwargs)
        if pretrained:
            downloads.append(name)
            with torch.no_grad():
                for index, parameter in enumerate(model.parameters()):
                    parameter.fill_(0.01 * index)
        return model

    monkeypatch.setattr(timm, "create_model", create)
    run = _runspec(tmp_path, "timm:augreg_in21k")  # a tag timm knows: the config refuses others
    (resolved,) = prefetch_weights([run], tmp_path / "results")
    assert downloads == [f"{MODEL['name']}.augreg_in21k"]
    assert resolved.key == run.key and Path(resolved.weights_path).is_file()
    from_file = load_model(run.model, run.model_kwargs, resolved.weights_path)
    direct = load_model(run.model, run.model_kwargs, "timm:augreg_in21k")
    assert all(torch.equal(a, b) for a, b in zip(from_file.state_dict().values(), direct.state_dict().values(),
                                                 strict=True))
    assert prefetch_weights([run], tmp_path / "results")[0].weights_path == resolved.weights_path
    assert len(downloads) == 2  # the second prefetch found the file; `direct` was the other download

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise RuntimeError("no network")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    warnings = []
    (kept,) = prefetch_weights([run], tmp_path / "other", warn=warnings.append)
    assert kept.weights_path == "timm:augreg_in21k" and "each job will fetch it itself" in warnings[0]


def _runspec(tmp_path: Path, weights: str):
    from bench.pipeline.config import load_experiment

    cfg = config(tmp_path, stages=["eval"], grid={"methods": ["baseline"]})
    cfg["defaults"]["weights"] = weights
    (run,) = load_experiment(write(tmp_path, cfg, "timm.yaml")).runs
    return run


# ------------------------------------------------------------------ 9. the GPU smoke script on CPU
def test_gpu_check_runs_on_cpu_with_a_small_model():
    started = time.time()
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--small",
                          "--threads", "1", "--batch-size", "2", "--methods", "baseline,tome,ppt,evit"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.time() - started < 60  # ~15 s on an idle 2-core machine
    for name in ("baseline", "tome", "ppt", "evit"):
        assert re.search(rf"^{name} +0\.00e\+00 +same +\d+\.\d\dx +\d+\.\d\dx .* flash / flash$", out.stdout, re.M)
        assert re.search(rf"^  {name} +ok: train loss \d\.\d{{4}}", out.stdout, re.M)
    assert "4 passed, 0 failed" in out.stdout



@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "-3"], "argument --batch-size: -3 is below 1"),
    (["--runs", "0"], "argument --runs: 0 is below 1"),
    (["--warmup", "-1"], "argument --warmup: -1 is below 0"),
    (["--ddp-procs", "0"], "argument --ddp-procs: 0 is below 1"),
    (["--threads", "two"], "argument --threads: 'two' is not an integer"),
    (["--batch-size", "99999999999999999999"], "argument --batch-size: 99999999999999999999 is above 2147483647"),
])
def test_gpu_check_refuses_bad_numbers_in_one_line(argv, message):
    """Were accepted (``--warmup -1``, ``--runs 0`` as the default) or a traceback after the model was built."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "cpu", "--small", *argv],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(message), out.stderr[-500:]
    assert "Traceback" not in out.stderr


def test_gpu_check_refuses_another_device_in_one_line():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--device", "tpu"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 2 and out.stderr.strip() == "error: --device 'tpu' not allowed; allowed: cuda, cpu"
