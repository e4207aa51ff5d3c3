"""Fine-tuning: the schedule, exact resumption after an epoch and after a preemption signal mid-epoch."""

from __future__ import annotations

import os
import signal

import pytest
import timm
import torch
from torch.utils.data import Dataset

import bench
import bench.pipeline.train as train_module
from bench.pipeline.train import EpochBatches, FinetuneOptions, finetune, lr_at


class Toy(Dataset):
    """Random 1x28x28 images with random labels."""

    def __init__(self, n: int = 96) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 1, 28, 28, generator=generator)
        self.labels = torch.randint(0, 10, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def tiny_model():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
                            num_classes=10, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1)
    return bench.apply(vit, "tome", r=4)


OPTIONS = FinetuneOptions(epochs=3, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_epochs=0.5, mixup=0.2, seed=3)


def train(tmp_path, name, dataset=None, **kwargs):
    model = tiny_model()
    result = finetune(model, dataset or Toy(), OPTIONS, tmp_path / name, torch.device("cpu"), progress=False,
                      log=lambda message: None, **kwargs)
    return model, result


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_lr_schedule_warms_up_then_decays_to_min():
    opts = FinetuneOptions(lr=1.0, min_lr=0.1)
    assert lr_at(0, 100, 10, opts) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, opts) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, opts) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, opts) == pytest.approx(0.55)
    assert lr_at(100, 100, 10, opts) == pytest.approx(0.1)


def test_epoch_batches_split_one_global_batch_across_ranks():
    opts = FinetuneOptions(batch_size=8, seed=1)
    single = EpochBatches(30, opts, epoch=2, rank=0, world_size=1).batches
    shares = [EpochBatches(30, opts, epoch=2, rank=r, world_size=2).batches for r in (0, 1)]
    assert len(single) == 3  # the last partial batch is dropped
    assert [sorted(a + b) for a, b in zip(*shares, strict=True)] == [sorted(batch) for batch in single]
    assert EpochBatches(30, opts, epoch=3, rank=0, world_size=1).batches != single
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        EpochBatches(30, opts, epoch=0, rank=0, world_size=3)


@pytest.mark.parametrize(("batch_size", "world_size"), [(8, 2), (24, 4), (12, 3), (16, 8)])
def test_each_process_mixes_the_pairs_one_process_mixes(batch_size, world_size):
    """timm's Mixup mixes image j of a process's batch with image n-1-j (``x.flip(0)``): under DDP every process
    must mix the pairs of the whole global batch that one process mixes, so N tasks train as one does."""
    opts = FinetuneOptions(batch_size=batch_size, seed=3)

    def pairs(batch):
        return {frozenset((batch[j], batch[-1 - j])) for j in range(len(batch) // 2)}

    single = EpochBatches(100, opts, epoch=1, rank=0, world_size=1).batches
    shares = [EpochBatches(100, opts, epoch=1, rank=r, world_size=world_size).batches for r in range(world_size)]
    for step, batch in enumerate(single):
        local = [share[step] for share in shares]
        assert sorted(sum(local, [])) == sorted(batch) and {len(part) for part in local} == {batch_size // world_size}
        assert set().union(*(pairs(part) for part in local)) == pairs(batch)


def test_fashion_mnist_crops_and_flips_follow_the_finetune_seed(tmp_path):
    """Fashion-MNIST's augmentation is seeded per (seed, epoch, image): the images a fine-tuning epoch trains on (the
    model's inputs, as a set: the batch order follows the seed anyway) differ between seeds, not between two runs of
    one seed, and seed 0 keeps the crops of before the seed counted (the embedded checkpoint's)."""
    from torch.utils.data import Subset

    from bench.pipeline.data import FMNIST_MEAN, FMNIST_STD, FashionMNIST

    data = FashionMNIST(None, "test", augment=True)
    epoch0 = data[5][0]
    padded = torch.nn.functional.pad(data.images[5], (2, 2, 2, 2), value=-FMNIST_MEAN / FMNIST_STD)
    top, left, flip = torch.randint(0, 5, (3,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = padded[:, top : top + 28, left : left + 28]
    assert torch.equal(epoch0, expected.flip(-1) if flip % 2 else expected)  # epoch 0, seed 0: seeded by the index

    def inputs(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1,
                                num_classes=10, embed_dim=32, depth=1, num_heads=2)
        seen = []
        vit.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().flatten(1).clone()))
        opts = FinetuneOptions(epochs=2, batch_size=16, lr=1e-3, warmup_epochs=0, mixup=0.0, seed=seed)
        finetune(vit, Subset(data, range(32)), opts, tmp_path / f"seed{seed}-{len(list(tmp_path.iterdir()))}",
                 torch.device("cpu"), progress=False, log=lambda message: None)
        images = torch.cat(seen)
        return images[torch.argsort(images.sum(1))]  # as a set: in the order of the images' sums

    first = inputs(0)
    assert first.shape == (64, 28 * 28)
    assert torch.equal(first, inputs(0))
    assert not torch.equal(first, inputs(1))


def test_resume_after_an_epoch_is_exact(tmp_path):
    straight, result = train(tmp_path, "straight")
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    train(tmp_path, "split", stop_after_epoch=0)
    assert torch.load(tmp_path / "split" / "last.pth", weights_only=False)["epoch"] == 1
    resumed, resumed_result = train(tmp_path, "split")
    assert same_weights(straight, resumed)
    assert [h["train_loss"] for h in resumed_result["history"]] == [h["train_loss"] for h in result["history"]]
    assert "resumes" not in result and resumed_result["resumes"] == [{"epoch": 1, "step": 0}]
    assert not any("resumed_at_step" in h for h in resumed_result["history"])  # whole epochs: none cut
    # Interrupted after the last epoch (in a later stage): the rerun trains nothing and resumes nothing
    _, again = train(tmp_path, "split")
    assert again["history"] == resumed_result["history"] and again["resumes"] == [{"epoch": 1, "step": 0}]
    _, finished = train(tmp_path, "straight")
    assert finished["history"] == result["history"] and "resumes" not in finished


def test_a_ctrl_c_mid_epoch_says_where_the_next_invocation_resumes(tmp_path, monkeypatch):
    """User test 14: a Ctrl-C inside an epoch loses that epoch's steps (checkpoints are per epoch; mid-epoch only
    at a preemption), and nothing said so. The third step of epoch 2 is interrupted: the line names epoch 2 and
    its start, and the checkpoint, where the next invocation resumes, still holds epoch 1."""
    train(tmp_path, "run", stop_after_epoch=0)
    calls = []

    def ctrl_c_at_third_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module.interrupts, "check", ctrl_c_at_third_step)
    said = []
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_model(), Toy(), OPTIONS, tmp_path / "run", torch.device("cpu"), progress=False, log=said.append)
    assert said[-1] == ("fine-tuning interrupted in epoch 2/3 after 2 of 6 steps: the next invocation resumes at the "
                        "start of epoch 2 (the checkpoint is written after every epoch; mid-epoch only at a SLURM "
                        "preemption)")
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=False)["epoch"] == 1


def test_a_checkpoint_of_a_disabled_scaler_resumes_where_the_scaler_is_enabled(tmp_path, monkeypatch):
    """device auto, dtype fp16: a run interrupted on a CPU host (GradScaler disabled: its state is {}) and resumed on a
    CUDA host (enabled: same run key) failed with "The source state dict is empty". It resumes with a fresh scale."""
    train(tmp_path, "run", stop_after_epoch=0)
    assert torch.load(tmp_path / "run" / "last.pth", weights_only=False)["scaler"] == {}
    scaler = torch.amp.GradScaler  # enabled, as on CUDA in fp16 (the same load_state_dict), here on the CPU
    monkeypatch.setattr(train_module.torch.amp, "GradScaler", lambda device, enabled: scaler(device, enabled=True))
    _, result = train(tmp_path, "run")
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3] and result["resumes"] == [{"epoch": 1, "step": 0}]


class Preempted(Exception):
    pass


def test_preemption_signal_checkpoints_at_the_next_step_and_resumes_exactly(tmp_path, monkeypatch):
    straight, result = train(tmp_path, "straight")

    def submitit_handler(signum, frame):  # stands in for submitit's checkpoint-and-requeue handler
        raise Preempted

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        # epoch 2 (index 1) reads image 40 somewhere in its batches: the signal arrives mid-epoch
        with pytest.raises(Preempted):
            train(tmp_path, "preempted", dataset=_SignalAtEpoch(Toy(), epoch=1, index=40))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    state = torch.load(tmp_path / "preempted" / "last.pth", weights_only=False)
    assert state["epoch"] == 1 and 0 < state["step"] < 6  # mid-epoch, at a step boundary
    assert 0 < state["partial_seconds"] < 60  # the time epoch 2 had run before the signal
    state["partial_seconds"] = 1000.0  # marked: the resumed epoch's time must include it
    torch.save(state, tmp_path / "preempted" / "last.pth")
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    resumed, resumed_result = train(tmp_path, "preempted")
    assert same_weights(straight, resumed)
    assert [h["train_loss"] for h in resumed_result["history"]] == pytest.approx(
        [h["train_loss"] for h in result["history"]], rel=1e-12)
    assert resumed_result["resumes"] == [{"epoch": 1, "step": state["step"]}]
    second = resumed_result["history"][1]
    assert second["resumed_at_step"] == state["step"] and 1000 < second["seconds"] < 1060
    assert [h.get("resumed_at_step") for h in resumed_result["history"]] == [None, state["step"], None]


class _SignalAtEpoch(Dataset):
    """Wraps a dataset; sends SIGUSR2 the first time ``index`` is read during ``epoch``."""

    def __init__(self, data: Toy, epoch: int, index: int) -> None:
        self.data, self.target_epoch, self.index, self.epoch, self.sent = data, epoch, index, 0, False

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if self.epoch == self.target_epoch and index == self.index and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR2)
        return self.data[index]


def test_a_redo_trains_afresh_over_the_finished_checkpoint_and_resumes_its_own(tmp_path):
    straight, result = train(tmp_path, "run")
    finished, messages = result["history"], []

    def redo(**kwargs):
        model = tiny_model()
        return model, finetune(model, Toy(), OPTIONS, tmp_path / "run", torch.device("cpu"), progress=False,
                               log=messages.append, redone_history=finished, **kwargs)

    redo(stop_after_epoch=0)  # the redo is interrupted after its first epoch
    assert "training from epoch 0" in messages[0] and not any("resuming" in m for m in messages)
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=False)
    assert state["epoch"] == 1 and state["history"][0]["seconds"] != finished[0]["seconds"]  # trained again
    messages.clear()
    resumed, resumed_result = redo()  # requeued: resumes the redo's own checkpoint
    assert messages[0].endswith("at the end of epoch 1"), messages
    assert same_weights(straight, resumed)
    assert [h["train_loss"] for h in resumed_result["history"]] == [h["train_loss"] for h in finished]


def _pipeline(tmp_path, **finetune_options):
    from tests.test_pipeline import config, write

    cfg = config(tmp_path, stages=["finetune"], grid={"methods": [{"method": "tome", "r": 2}]},
                 finetune={"epochs": 1, "batch_size": 50, "lr": 1e-3, **finetune_options})
    return write(tmp_path, cfg)


def test_force_retrains_a_finished_finetune_run_from_epoch_0(tmp_path, capsys):
    from bench.pipeline.records import read_all, record_path
    from tests.test_pipeline import bench_main

    path, results = _pipeline(tmp_path), tmp_path / "results"
    assert bench_main(path, results, "--no-report") == 0
    (first,), _ = read_all(results)
    last = results / "checkpoints" / first["key"] / "last.pth"
    before = last.stat().st_mtime_ns
    capsys.readouterr()
    assert bench_main(path, results, "--no-report") == 0
    assert "1 already done, 0 to run" in capsys.readouterr().out
    assert last.stat().st_mtime_ns == before
    assert bench_main(path, results, "--no-report", "--force") == 0
    out = capsys.readouterr().out
    assert "0 already done, 1 to run" in out
    assert "training from epoch 0" in out and "resuming" not in out
    again = read_all(results)[0][0]
    history, earlier = again["metrics"]["finetune"]["history"], first["metrics"]["finetune"]["history"]
    assert [h["epoch"] for h in history] == [1]
    assert history[0]["seconds"] != earlier[0]["seconds"]  # a fresh epoch, not the checkpoint's
    assert history[0]["train_loss"] == earlier[0]["train_loss"]  # from the same start, deterministically
    assert last.stat().st_mtime_ns > before
    assert torch.load(last, weights_only=False)["history"] == history
    assert record_path(results, first["key"]).exists()


def test_a_changed_export_of_a_finished_run_is_written_from_its_final_weights(tmp_path, capsys):
    from bench.pipeline.records import read_all
    from tests.test_pipeline import bench_main

    results = tmp_path / "results"
    assert bench_main(_pipeline(tmp_path, export="a.pth"), results, "--no-report") == 0
    (record,), _ = read_all(results)
    capsys.readouterr()
    assert bench_main(_pipeline(tmp_path, export="out/b.pth"), results, "--no-report") == 0
    captured = capsys.readouterr()
    assert "1 already done, 0 to run" in captured.out
    notes = [line for line in captured.err.splitlines() if record["key"] in line]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "b.pth" in notes[0], captured.err
    old = torch.load(tmp_path / "a.pth", weights_only=True)
    new = torch.load(tmp_path / "out" / "b.pth", weights_only=True)
    assert set(new) == {"model"} and list(new["model"]) == list(old["model"])
    assert all(torch.equal(new["model"][k], old["model"][k]) for k in old["model"])
    assert not list((tmp_path / "out").glob(".*.tmp"))  # written atomically, nothing left beside it
    # the final weights gone: one warning, nothing written
    (results / "checkpoints" / record["key"] / "final.pth").unlink()
    assert bench_main(_pipeline(tmp_path, export="c.pth"), results, "--no-report") == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if record["key"] in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "--force" in warnings[0], captured.err
    assert not (tmp_path / "c.pth").exists()


def test_an_export_that_cannot_be_written_is_one_warning(tmp_path, capsys, monkeypatch):
    """The disk full (or the folder gone read-only) when a finished run's export is written again: one warning
    line naming the file and where the weights stay; the invocation goes on (before: a traceback, exit 1)."""
    import errno

    from bench.pipeline.records import read_all
    from bench.pipeline.stages import finetune
    from tests.test_pipeline import bench_main

    results = tmp_path / "results"
    assert bench_main(_pipeline(tmp_path, export="a.pth"), results, "--no-report") == 0
    (record,), _ = read_all(results)
    capsys.readouterr()

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finetune, "atomic_torch_save", full)
    assert bench_main(_pipeline(tmp_path, export="b.pth"), results, "--no-report") == 0
    captured = capsys.readouterr()
    assert "1 already done, 0 to run" in captured.out
    final = results / "checkpoints" / record["key"] / "final.pth"
    assert captured.err.splitlines() == [f"warning: run {record['key']}: its fine-tuned weights could not be exported to "
                                         f"{tmp_path / 'b.pth'} (OSError: No space left on device); they stay in {final}"]
