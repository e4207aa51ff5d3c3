"""Experiment-file checks: each bad value is one line naming the file, the key and what is allowed (exit 2, no
traceback), ``--dry-run`` refuses what the runs would, and what the file says is what runs (config audit 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import run_bench
from bench.pipeline.calibrate import cache_path
from bench.pipeline.config import ConfigError, load_experiment
from bench.pipeline.data import run_dataset
from bench.pipeline.files import REPO
from bench.pipeline.profiles import ProfileError, load_profile
from tests.test_pipeline import write

MODEL = {
    "name": "vit_tiny_patch16_224",
    "label": "tiny-fmnist",
    "kwargs": {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 2,
               "num_heads": 2},
}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENBENCH_CACHE_DIR", str(tmp_path / "cache"))


def config(**changes) -> dict:
    cfg = {
        "name": "checks",
        "defaults": {"model": dict(MODEL), "weights": None, "data": {"name": "fashion_mnist", "subset": 16},
                     "batch_size": 8, "device": "cpu", "threads": 1},
        "stages": ["eval"],
        "grid": {"methods": ["baseline", {"method": "tome", "r": 2}]},
    }
    cfg.update(changes)
    return cfg


def refused(tmp_path: Path, capsys, cfg: dict, *extra: str) -> str:
    """The one error line of run_bench on ``cfg`` (exit 2, nothing run)."""
    path = write(tmp_path, cfg)
    results = tmp_path / "results"
    assert run_bench.main(["--config", str(path), "--results", str(results), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {path}: "), err
    assert not (results / "runs").exists() and not (results / "failed").exists()
    return err[len(f"error: {path}: "):]


def with_data(**data) -> dict:
    cfg = config()
    cfg["defaults"]["data"].update(data)
    return cfg


# ------------------------------------------------------------------------------ 1. fashion_mnist's data keys
@pytest.mark.parametrize(("data", "message"), [
    ({"split": "bogus"}, "defaults.data.split: 'bogus' not allowed for fashion_mnist; allowed: null (test), test, train"),
    ({"split": "val"}, "defaults.data.split: 'val' not allowed for fashion_mnist; allowed: null (test), test, train"),
    ({"train_split": "t10k"}, "defaults.data.train_split: 't10k' not allowed for fashion_mnist; allowed: test, train"),
    ({"class_map": "classes.txt"}, "defaults.data.class_map: fashion_mnist has its own ten labels; allowed: null"),
    ({"download": True}, "defaults.data.download: fashion_mnist is read from data.root, else Debian's package, else "
                         "torchvision's one-time download into the cache ($TOKENBENCH_DATA); allowed: false"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_fashion_mnist_refuses_the_data_keys_it_would_ignore(tmp_path, capsys, data, message, dry):
    assert refused(tmp_path, capsys, with_data(**data), *["--dry-run"] * dry).startswith(message)


def test_fashion_mnist_evaluates_on_the_split_the_record_names(tmp_path):
    """split: train evaluated on t10k while the record said train (audit item 1)."""
    default = load_experiment(write(tmp_path, with_data(subset=None)), check_files=False).runs[0]
    train = load_experiment(write(tmp_path, with_data(subset=None, split="train")), check_files=False).runs[0]
    test = load_experiment(write(tmp_path, with_data(subset=None, split="test")), check_files=False).runs[0]
    assert train.data["split"] == "train" and len(run_dataset(train.data, "val")) == 60000
    assert len(run_dataset(default.data, "val")) == 10000
    assert test.key == default.key and "split" not in test.data  # test is the default: its records stay
    tuned = load_experiment(write(tmp_path, with_data(subset=None, train_split="test")), check_files=False).runs[0]
    assert len(run_dataset(tuned.data, "train")) == 10000 and len(run_dataset(default.data, "train")) == 60000


# ------------------------------------------------------------------------- 2. a model entry naming another model
def test_an_entry_naming_another_model_takes_neither_the_defaults_label_nor_kwargs(tmp_path):
    cfg = config(grid={"models": ["deit_tiny_patch16_224", {}, {"label": "small-10"},
                                  {"name": "deit_tiny_patch16_224", "label": "t", "kwargs": {"num_classes": 5}}],
                       "methods": ["baseline"]})
    cfg["defaults"]["model"] = {"name": "deit_small_patch16_224", "label": "deit-s", "kwargs": {"num_classes": 10}}
    runs = load_experiment(write(tmp_path, cfg), check_files=False).runs
    assert [(run.model, run.model_label, run.model_kwargs) for run in runs] == [
        ("deit_tiny_patch16_224", "deit_tiny_patch16_224", {}),  # was reported as deit-s, with its kwargs
        ("deit_small_patch16_224", "deit-s", {"num_classes": 10}),
        ("deit_small_patch16_224", "small-10", {"num_classes": 10}),
        ("deit_tiny_patch16_224", "t", {"num_classes": 5}),
    ]


def test_an_entry_of_the_same_model_overrides_the_defaults_transform_key_by_key(tmp_path):
    """As its kwargs: {transform: {mean: [0.5]}} kept the defaults' crop_pct (the whole transform was replaced)."""
    cfg = config(grid={"models": [{}, {"label": "grey-mean", "transform": {"mean": [0.5]}}], "methods": ["baseline"]})
    cfg["defaults"]["model"] = {**MODEL, "transform": {"crop_pct": 0.9, "mean": [0.4]}}
    plain, tuned = load_experiment(write(tmp_path, cfg), check_files=False).runs
    assert plain.data["transform"]["crop_pct"] == tuned.data["transform"]["crop_pct"] == 0.9
    assert plain.data["transform"]["mean"] == [0.4] and tuned.data["transform"]["mean"] == [0.5]


# --------------------------------------------------------------------------------------- 3. weights: ''
@pytest.mark.parametrize(("where", "key"), [("defaults", "defaults.weights"), ("model", "defaults.model.weights"),
                                            ("entry", "grid.models[0].weights")])
def test_empty_weights_are_refused_not_random(tmp_path, capsys, where, key):
    cfg = config()
    if where == "defaults":
        cfg["defaults"]["weights"] = ""
    elif where == "model":
        cfg["defaults"]["model"]["weights"] = ""
    else:
        cfg["grid"]["models"] = [{"weights": " "}]
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(
        f"{key}: must be null, a path, a URL or timm:<tag>, got ")


# --------------------------------------------------------------- 4. keys named where the values came from
@pytest.mark.parametrize(("model", "message"), [
    ({**MODEL, "name": "vit_nonexistent"}, "defaults.model.name: unknown timm model 'vit_nonexistent'"),
    ({**MODEL, "kwargs": {"no_such_kwarg": 1}}, "defaults.model.kwargs: timm.create_model('vit_tiny_patch16_224') "
                                                "failed"),
    ({**MODEL, "kwargs": [1]}, "defaults.model.kwargs: must be a mapping of timm.create_model keyword arguments"),
    (None, "defaults.model: missing: a timm model name (e.g. deit_small_patch16_224); give defaults.model: {name: "
           "...} or grid.models"),
])
def test_values_of_defaults_model_are_named_there_without_grid_models(tmp_path, capsys, model, message):
    cfg = config()
    cfg["defaults"]["model"] = model
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(message)
    cfg["grid"]["models"] = [{"label": "x"}]  # inherited by an entry: still the defaults' key
    if model is None:
        message = "grid.models[0].name: missing"
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(message)


def test_a_bad_name_in_an_entry_is_named_in_the_entry(tmp_path, capsys):
    cfg = config(grid={"models": [{"name": "vit_nonexistent"}], "methods": ["baseline"]})
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(
        "grid.models[0].name: unknown timm model 'vit_nonexistent'")


# ------------------------------------------------------------------- 5. device auto with a CUDA-only kernel
def test_auto_device_without_cuda_refuses_cuda_only_attention_kernels_here(tmp_path, capsys, monkeypatch):
    """``device: auto`` is the CPU where CUDA is not: a run made here with a CUDA-only kernel is refused before
    anything runs; the dry run says so in a note (a GPU nodes' config may be dry-run on a login node), and the
    file itself loads (``--executor slurm`` submits it from there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = config()
    cfg["defaults"].update(device="auto", sdpa_backend="efficient")
    message = ("defaults.sdpa_backend: 'efficient' needs CUDA, and device: auto is the CPU on this machine (no "
               "CUDA); allowed here: auto, math, flash, explicit, or --executor slurm for GPU nodes")
    assert refused(tmp_path, capsys, cfg) == message
    path = write(tmp_path, cfg)
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert f"  note: --executor inprocess refuses this: {path}: {message}" in capsys.readouterr().out
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "dry"), "--dry-run", "--executor",
                           "slurm"]) == 0  # submitted from here, it runs on the GPU nodes
    assert "refuses this" not in capsys.readouterr().out
    assert [run.sdpa_backend for run in load_experiment(path).runs] == ["efficient", "efficient"]
    cfg["defaults"]["sdpa_backend"] = "flash"  # a kernel PyTorch has on CPU
    assert [run.sdpa_backend for run in load_experiment(write(tmp_path, cfg)).runs] == ["flash", "flash"]
    cfg["defaults"].update(device="cpu", sdpa_backend="cudnn")  # refused when the file is read
    assert refused(tmp_path, capsys, cfg, "--dry-run") == (
        "defaults.sdpa_backend: 'cudnn' needs CUDA (device: cpu); allowed on CPU: auto, math, flash, explicit")


# --------------------------------------------------------------------------- 6. tensor transforms at load time
def test_flash_attention_with_float32_on_cuda_is_refused_and_warned_on_auto(tmp_path, capsys):
    """CUDA's flash kernel has no float32 variant: every forward of such a run failed on the GPU ("No available
    kernel"). device: cuda is refused; device: auto (the CPU where there is no CUDA, which has one) is warned."""
    cfg = config()
    cfg["defaults"].update(device="cuda", sdpa_backend="flash")
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(
        "defaults.sdpa_backend: 'flash' has no float32 kernel on CUDA (every forward fails there)")
    cfg["defaults"].update(device="auto")
    experiment = load_experiment(write(tmp_path, cfg), data_required=False)
    assert any("defaults.sdpa_backend: 'flash' has no float32 kernel on CUDA" in w for w in experiment.warnings)
    cfg["defaults"].update(device="cuda", dtype="bf16")
    assert not [w for w in load_experiment(write(tmp_path, cfg), data_required=False).warnings if "flash" in w]


def test_fashion_mnist_transforms_tensors_cannot_do_are_refused_at_load_time(tmp_path, capsys):
    cfg = with_data(transform={"interpolation": "lanczos", "crop_pct": 0.875})
    message = "'lanczos' is not available for tensors; allowed: bicubic, bilinear, nearest"
    assert refused(tmp_path, capsys, cfg, "--dry-run") == f"defaults.data.transform.interpolation: {message}"
    cfg = with_data(transform={"crop_pct": 0.875})
    cfg["grid"]["models"] = [{"transform": {"interpolation": "box"}}]
    assert refused(tmp_path, capsys, cfg, "--dry-run") == (
        "grid.models[0].transform.interpolation: 'box' is not available for tensors; allowed: bicubic, bilinear, "
        "nearest")
    cfg = with_data(transform={"crop_pct": 0.875, "crop_mode": "border"})
    assert refused(tmp_path, capsys, cfg, "--dry-run") == (
        "defaults.data.transform.crop_mode: 'border' not supported for tensors; allowed: center, squash")
    cfg = with_data(transform={"interpolation": "lanczos"})  # the native 28x28 input is never resized: it runs
    assert len(load_experiment(write(tmp_path, cfg)).runs) == 2


# -------------------------------------------------------------------- 7. a missing root with download: true
def test_a_missing_fashion_mnist_root_is_refused_before_the_runs_even_with_download(tmp_path, capsys):
    cfg = with_data(root=str(tmp_path / "nope"), download=True)
    assert refused(tmp_path, capsys, cfg).startswith("defaults.data.download: ")  # every run failed on the root
    cfg = with_data(root=str(tmp_path / "nope"))
    assert refused(tmp_path, capsys, cfg) == f"defaults.data.root: {tmp_path / 'nope'} does not exist"


def test_an_image_folder_without_images_is_refused_before_the_runs(tmp_path, capsys):
    """A folder or ImageNet split that exists but holds no image torchvision reads (no class sub-folder; class
    sub-folders with other files only) was accepted, and every run failed on it, one by one."""
    from PIL import Image

    flat = tmp_path / "flat"  # images, but not in class sub-folders
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.jpg")
    empty = tmp_path / "empty" / "val"  # class sub-folders without an image
    (empty / "n01").mkdir(parents=True)
    (empty / "n02").mkdir()
    (empty / "n02" / "notes.txt").write_text("x")
    cases = [({"name": "folder", "root": str(flat)}, f"{flat}: no class sub-folder (ImageFolder layout: "
                                                    "<class>/<image> files)"),
             ({"name": "imagenet", "root": str(empty.parent)}, f"{empty}: no image file (.jpg, .jpeg, .png, .ppm, "
                                                               "...) in its 2 class sub-folders (ImageFolder layout: <class>/<image> files)")]
    for data, message in cases:
        assert refused(tmp_path, capsys, with_data(**data, subset=None)) == f"defaults.data.root: {message}"
    Image.new("RGB", (8, 8)).save(empty / "n02" / "deep.JPEG")  # an image, in upper case, is enough
    assert len(load_experiment(write(tmp_path, with_data(name="imagenet", root=str(empty.parent), subset=None))).runs) == 2


def test_a_fashion_mnist_root_without_the_splits_files_or_not_a_folder_is_refused_before_the_runs(tmp_path, capsys):
    """A folder without the IDX files was accepted and every run failed on it (exit 1, one failure per run); a file
    was said not to exist."""
    (tmp_path / "empty").mkdir()
    assert refused(tmp_path, capsys, with_data(root=str(tmp_path / "empty"))) == (
        f"defaults.data.root: {tmp_path / 'empty'}: no t10k-images-idx3-ubyte[.gz] (Fashion-MNIST IDX files expected; "
        "apt-get install dataset-fashion-mnist); allowed: a folder holding the test split's IDX files, or null "
        "(Debian's package, else torchvision's download)")
    (tmp_path / "afile").write_text("x")
    assert refused(tmp_path, capsys, with_data(root=str(tmp_path / "afile"))) == (
        f"defaults.data.root: {tmp_path / 'afile'} is not a folder")
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not debian.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    test_only = tmp_path / "test-only"
    test_only.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (test_only / name).symlink_to(debian / name)
    assert len(load_experiment(write(tmp_path, with_data(root=str(test_only)))).runs) == 2  # eval: t10k is enough
    cfg = with_data(root=str(test_only))
    cfg.update(stages=["finetune", "eval"], finetune={"epochs": 1, "batch_size": 8})
    assert refused(tmp_path, capsys, cfg).startswith(f"defaults.data.root: {test_only}: no train-images-idx3-ubyte")


# ------------------------------------------------------------------------------------- 8. integer bounds
@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("defaults", "batch_size", 10**23, "defaults.batch_size: must be an integer >= 1 and at most 2**63-1 "
                                       "(9223372036854775807), got 100000000000000000000000"),
    ("defaults", "seed", 2**64, "defaults.seed: must be an integer >= 0 and at most 2**63-1"),
    ("defaults", "threads", 10**14, "defaults.threads: must be an integer in [1, 4096], got 100000000000000"),
    ("defaults", "threads", 4097, "defaults.threads: must be an integer in [1, 4096], got 4097"),
    ("defaults", "workers", 2**63, "defaults.workers: must be an integer >= 0 and at most 2**63-1"),
    ("throughput", "batch_sizes", [10**20], "throughput.batch_sizes[0]: must be an integer >= 1 and at most 2**63-1"),
    ("finetune", "seed", 10**30, "finetune.seed: must be an integer in [0, 281474976710656], got 10"),
])
def test_integers_beyond_what_the_runs_take_are_refused_naming_the_key(tmp_path, capsys, section, key, value, message):
    cfg = config()
    cfg.setdefault(section, {})[key] = value
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(message)


def test_the_largest_allowed_values_load(tmp_path):
    cfg = config()
    cfg["defaults"].update(seed=2**63 - 1, threads=4096, batch_size=2**63 - 1)
    assert load_experiment(write(tmp_path, cfg), check_files=False).runs[0].seed == 2**63 - 1


# ------------------------------------------------------------------------- 9. a wrongly shaped calibration cache
@pytest.mark.parametrize("content", ["[1]", '"text"', "null", "{}", "no value", "method 3"])
def test_a_wrongly_shaped_calibration_cache_is_rebuilt(tmp_path, content):
    cfg = config(budgets={"macs": [0.8]}, grid={"methods": [{"method": "tome"}]})
    path = write(tmp_path, cfg)
    expected = load_experiment(path).runs[0].params
    cache = json.loads(cache_path().read_text())
    if content == "no value":  # readable, but its entries lack a field
        content = json.dumps({key: {k: v for k, v in entry.items() if k != "value"} for key, entry in cache.items()})
    elif content == "method 3":  # ... or have one of another type
        content = json.dumps({key: {**entry, "method": 3} for key, entry in cache.items()})
    cache_path().write_text(content)
    assert load_experiment(path).runs[0].params == expected  # was a TypeError traceback
    rebuilt = json.loads(cache_path().read_text())
    assert rebuilt.keys() == cache.keys() and rebuilt == cache


# ----------------------------------------------------------------------------------------- 10. wording
def test_a_list_of_any_items_is_described_as_a_list(tmp_path, capsys):
    assert refused(tmp_path, capsys, config(grid={"methods": "baseline"}), "--dry-run") == (
        "grid.methods: must be a list, got 'baseline'")
    assert refused(tmp_path, capsys, config(grid={"models": "deit_tiny_patch16_224", "methods": ["baseline"]}),
                   "--dry-run") == "grid.models: must be a list, got 'deit_tiny_patch16_224'"


def test_duplicate_runs_name_the_sweep_values_and_model_entries_that_make_them(tmp_path, capsys):
    cfg = config(grid={"methods": [{"method": "tome", "sweep": {"r": [2, 3, 2]}}]})
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(
        "grid: grid.methods[0] sweep.r[0] and grid.methods[0] sweep.r[2] make the same run tiny-fmnist-tome-r2-")
    cfg = config(grid={"methods": [{"method": "tome", "sweep": {"r": [2, 3], "inflection": [0, 0]}}]})
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(
        "grid: grid.methods[0] sweep.inflection[0], sweep.r[0] and grid.methods[0] sweep.inflection[1], sweep.r[0] "
        "make the same run")  # (safe_dump sorts the keys)
    cfg = config(grid={"models": [{"label": "x"}, {"label": "x"}], "methods": ["baseline"]})
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(
        "grid: grid.models[0] with grid.methods[0] and grid.models[1] with grid.methods[0] make the same run x-baseline-")
    cfg = config(grid={"methods": ["baseline", "baseline"]})  # distinct entries: named as before
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith(
        "grid: grid.methods[0] and grid.methods[1] make the same run")


def test_a_profile_path_is_not_given_a_second_suffix(tmp_path, capsys):
    missing = tmp_path / "nothere.yaml"
    with pytest.raises(ProfileError) as raised:
        load_profile(str(missing))
    assert str(raised.value).startswith(f"{missing}: no such cluster profile; available: ")
    assert load_profile("local.yaml") == load_profile("local")  # a shipped profile by its file name
    path = write(tmp_path, config())
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), "--dry-run", "--profile",
                           str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: no such cluster profile; available: example_gpu, local"


def test_config_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_experiment(write(tmp_path, with_data(split="bogus")), check_files=False)
    assert raised.value.key == "defaults.data.split"


# --------------------------------------------------------------------------- --only naming the file's methods
def test_only_matching_no_run_lists_every_method_of_the_file(tmp_path, capsys):
    """``--only`` with a method's name calibrates that method's budgets alone: a name the file lacks is refused
    with the methods the file names, those whose budget runs were left uncalibrated included."""
    cfg = config(budgets={"macs": [0.7]}, grid={"methods": ["baseline", "tome", {"method": "evit", "layers": [1]}]})
    assert refused(tmp_path, capsys, cfg, "--dry-run", "--only", "pitome").startswith(
        "--only 'pitome' matches no run (methods: baseline, tome, evit; keys: tiny-fmnist-baseline-")


def test_only_a_method_the_file_lacks_is_named_where_the_grid_has_budget_runs_only(tmp_path, capsys):
    """With only budget entries, ``--only baseline`` left every run out uncalibrated and was refused as "no MAC budget
    of theirs is reachable", of a method the file does not name."""
    cfg = config(budgets={"macs": [0.7]}, grid={"methods": ["tome"]})
    for flags in (["--dry-run"], []):
        assert refused(tmp_path, capsys, cfg, *flags, "--only", "baseline") == (
            "--only 'baseline' matches no run (methods: tome)")
    assert not cache_path().exists()  # nothing calibrated for it


# ------------------------------------------------------------------------- empty grid lists
@pytest.mark.parametrize(("grid", "message"), [
    ([], "grid: must be {models, methods} or a non-empty list of such blocks, got []"),
    ({"models": [], "methods": ["baseline"]}, "grid.models: must be a non-empty list of model entries, got []; "
                                              "allowed: leave the key out to run defaults.model alone"),
    ([{"methods": ["baseline"]}, {"models": [], "methods": ["tome"]}], "grid[1].models: must be a non-empty list"),
])
@pytest.mark.parametrize("dry", [True, False])
def test_empty_grid_lists_are_refused_naming_the_key(tmp_path, capsys, grid, message, dry):
    """``grid: []`` was refused as "makes no run (no MAC budget is reachable)"; ``models: []`` ran defaults.model."""
    assert refused(tmp_path, capsys, config(grid=grid), *["--dry-run"] * dry).startswith(message)


def test_a_finetune_seed_its_epoch_streams_would_overflow_is_refused(tmp_path, capsys):
    """Each epoch is seeded with ``seed * 10_007 + epoch``: a seed that overflows it is one line, not a crash."""
    cfg = config(stages=["finetune", "eval"], finetune={"epochs": 1, "batch_size": 8, "seed": 2**60})
    assert refused(tmp_path, capsys, cfg, "--dry-run").startswith("finetune.seed: must be")
    cfg["finetune"]["seed"] = 2**48
    path = write(tmp_path, cfg)
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "dry"), "--dry-run"]) == 0


def test_budgets_no_entry_uses_are_a_warning_and_a_results_file_is_refused_by_dry_run_and_status(tmp_path, capsys):
    cfg = config(budgets={"macs": [0.7]}, grid={"methods": [{"method": "tome", "r": 2}, "baseline"]})
    path = write(tmp_path, cfg)
    assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {path}: budgets: is set but no grid entry leaves its method's budget knob unset (or every method "
        "lacks one): no run is calibrated to it (drop the knob from an entry to run it at each budget)"]
    unset = config(budgets={"macs": [0.7]}, grid={"methods": ["baseline", "tome"]})  # tome's r is calibrated
    assert [w for w in load_experiment(write(tmp_path, unset), calibrate=False).warnings if "budgets:" in w] == []
    (tmp_path / "afile").write_text("x")
    for flag in ("--dry-run", "--status"):
        assert run_bench.main(["--config", str(path), "--results", str(tmp_path / "afile"), flag]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"error: results folder {tmp_path / 'afile'} is a file, not a folder"


def test_a_reference_an_earlier_entry_shadows_is_named_as_such_not_as_matching_nothing(tmp_path):
    refs = [{"method": "tome", "top1": 70.0}, {"method": "tome", "params": {"r": 2}, "top1": 71.0},
            {"method": "evit", "top1": 60.0}]
    experiment = load_experiment(write(tmp_path, config(reference=refs)))
    path = tmp_path / "exp.yaml"
    assert [run.reference for run in experiment.runs if run.method == "tome"] == [{"top1": 70.0}]
    assert experiment.warnings == [
        f"warning: {path}: reference[1]: every run it matches takes reference[0] (the first matching entry wins; list "
        "the more specific entry first)",
        f"warning: {path}: reference[2]: matches no run (model any, method evit, params {{}}); a reference is matched "
        "by model label, method and a subset of the parameters"]


# ------------------------------------------------------------------------------------------ fine-tuning checks
def test_finetune_min_lr_above_lr_and_exports_that_would_replace_something_else_are_refused(tmp_path, capsys):
    """The cosine goes from lr down to min_lr (above lr it rose, 10x the peak asked for); an export is written
    atomically over its path (a link or a device there was replaced by a file); '' meant no export, silently."""
    def finetune(**changes):  # one run: an export path is one run's
        return config(stages=["finetune", "eval"], finetune={"epochs": 1, "batch_size": 8, **changes},
                      grid={"methods": ["baseline"]})

    assert refused(tmp_path, capsys, finetune(lr=1.0e-7), "--dry-run") == (
        "finetune.min_lr: 1e-06 is above finetune.lr (1e-07): the schedule goes from lr down to min_lr; allowed: at "
        "most finetune.lr")
    assert refused(tmp_path, capsys, finetune(export=""), "--dry-run") == "finetune.export: must be null or a file path, got ''"
    (tmp_path / "target.pth").write_bytes(b"weights")
    (tmp_path / "link.pth").symlink_to(tmp_path / "target.pth")
    assert refused(tmp_path, capsys, finetune(export=str(tmp_path / "link.pth"))).startswith(
        f"finetune.export: {tmp_path / 'link.pth'} is a symbolic link, which the export would replace by a file")
    assert refused(tmp_path, capsys, finetune(export="/dev/null")).startswith(
        "finetune.export: /dev/null is not a regular file, which the export would replace by a file")
    # a folder that takes no file though os.access says writable (to root, /proc does): refused before training
    assert refused(tmp_path, capsys, finetune(export="/proc/tokenbench/w.pth")).startswith(
        "finetune.export: /proc/tokenbench/w.pth cannot be written: /proc ")
    assert len(load_experiment(write(tmp_path, finetune(lr=1.0e-7, min_lr=0.0, export=str(tmp_path / "target.pth"))),
                               data_required=False).runs) == 1


def test_a_submission_whose_processes_cannot_share_the_finetune_batch_is_refused(tmp_path):
    """Each fine-tuning job splits its global batch over the profile's tasks (DDP); mixup and cutmix need even
    shares. Every rank failed on its node; now the submission is refused naming the key and the profile."""
    from bench.pipeline.slurm import SubmitError, check_submission

    profile = tmp_path / "four.yaml"
    profile.write_text((REPO / "slurm" / "local.yaml").read_text().replace("tasks_per_node: 1", "tasks_per_node: 4"))
    for batch, mixup, allowed in ((18, 0.0, "a multiple of 4"), (20, 0.8, "a multiple of 8")):
        cfg = config(stages=["finetune", "eval"], finetune={"epochs": 1, "batch_size": batch, "mixup": mixup})
        cfg["defaults"]["data"]["subset"] = 32
        experiment = load_experiment(write(tmp_path, cfg), data_required=False)
        with pytest.raises(SubmitError, match=rf"finetune.batch_size: {batch} is not split into (even )?shares by the "
                                              rf"4 processes of cluster profile {profile} \(tasks_per_node: 4\); "
                                              rf"allowed: {allowed}") as raised:
            check_submission(experiment, experiment.runs, str(profile))
        # the pairs are named only where mixup makes them (they were named without mixup too)
        assert str(raised.value).endswith(f"allowed: {allowed}" + (" (mixup and cutmix pair the images of each "
                                                                   "process's share)" if mixup else ""))
    cfg["finetune"]["batch_size"] = 24
    experiment = load_experiment(write(tmp_path, cfg), data_required=False)
    assert check_submission(experiment, experiment.runs, str(profile)).tasks_per_node == 4
