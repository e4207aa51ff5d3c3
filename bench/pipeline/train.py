"""Fine-tuning with the method active, DeiT-style: AdamW, cosine schedule with linear warm-up (per step),
label smoothing, optional mixup / cutmix (timm), AMP on GPU. A checkpoint after every epoch; a run
resumes from it. Multi-process (DDP) runs see the same global batches as a single process: each global
batch is split across ranks. Datasets with ``set_epoch`` (Fashion-MNIST) seed their augmentation per
(seed, epoch, image), not per process, and resume exactly; for the others (timm's ImageNet transforms in loader
workers) the workers are seeded per (seed, epoch, rank, first step): ranks differ, and a resumed epoch
draws fresh augmentations rather than replaying the interrupted ones. The checkpoint keeps the CPU
generators and, on GPU, the training device's CUDA generator.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from bench.pipeline import interrupts
from bench.pipeline.files import atomic_torch_save, digest
from bench.pipeline.schema import option
from bench.throughput import autocast

SEED_MAX = 2**48  # finetune.seed's ceiling: every epoch's streams are seeded with seed * 10_007 + epoch (int64)


@dataclass(frozen=True)
class FinetuneOptions:
    """The ``finetune:`` section of an experiment file (keys, types and defaults)."""

    epochs: int = option(30, minimum=1)
    batch_size: int = option(256, minimum=1)  # global, over all processes
    lr: float = option(1e-5, minimum=0)
    min_lr: float = option(1e-6, minimum=0)
    weight_decay: float = option(0.05, minimum=0)
    warmup_epochs: float = option(0.0, minimum=0)
    label_smoothing: float = option(0.1, minimum=0, maximum=1)
    mixup: float = option(0.0, minimum=0)
    cutmix: float = option(0.0, minimum=0)
    clip_grad: float | None = option(None, positive=True,  # 0 was taken and ignored (no clipping)
                                     expect="null (no clipping) or a number > 0 (the largest gradient norm)")
    seed: int = option(0, minimum=0, maximum=SEED_MAX)
    workers: int = option(0, minimum=0)
    export: str | None = option(None, expect="a file path")  # a copy of the final weights (rank 0)

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    """torch (random init, drop path), numpy (K-Medoids' first medoid) and random (timm's mixup draws its lambda and
    mode from numpy and random)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(device: torch.device | None = None) -> dict:
    """CPU generators, and on a CUDA ``device`` that device's generator (drop path and dropout draw from it).

    Only the training device's CUDA state is kept, not every GPU's: reading another GPU's state would
    create a context there (every DDP rank sees all GPUs of its node). All ranks consume their CUDA
    generator alike (same seeds, same shapes), so rank 0's state restores every rank."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def loader_seed(seed: int, epoch: int, rank: int, first_step: int) -> int:
    """The DataLoader's base seed (its workers seed torch, numpy and random from it): distinct per rank, so
    ranks draw different augmentations, and per first step, so a resumed epoch does not replay the
    streams of its start on other images. Augmentations seeded per image (``set_epoch`` datasets such as
    Fashion-MNIST's) do not depend on it and resume exactly."""
    return int(digest([seed, epoch, rank, first_step], 15), 16)


def reduce_totals(totals: list[float], device: torch.device, world_size: int) -> list[float]:
    """Sum the epoch's (loss sum, correct, seen) over the ranks. The tensor lives on the training device:
    NCCL reduces CUDA tensors only."""
    reduced = torch.tensor(totals, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(reduced)
    return reduced.cpu().tolist()


def lr_at(step: int, total_steps: int, warmup_steps: int, opts: FinetuneOptions) -> float:
    """Linear warm-up from 0, then cosine from ``lr`` down to ``min_lr``."""
    if step < warmup_steps:
        return opts.lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return opts.min_lr + (opts.lr - opts.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class EpochBatches:
    """The batches of one epoch on one rank: a permutation seeded by (seed, epoch), cut into global
    batches (last partial one dropped), each split into ``world_size`` shares. A share of an even size takes its
    two halves from both ends of the global batch (rank r: images r*h.. and N-(r+1)*h.. of it, h = half a share):
    timm's Mixup pairs each image of a process's batch with its mirror image (``x.flip(0)``), so every process
    then mixes the pairs one process mixes in the whole global batch (image i with image N-1-i). With one process,
    and for odd shares (no mixup), the shares are contiguous."""

    def __init__(self, size: int, opts: FinetuneOptions, epoch: int, rank: int, world_size: int) -> None:
        if opts.batch_size % world_size:
            raise ValueError(f"finetune.batch_size {opts.batch_size} is not divisible by {world_size} processes")
        order = torch.randperm(size, generator=torch.Generator().manual_seed(opts.seed * 10_007 + epoch)).tolist()
        total = opts.batch_size
        share = total // world_size
        half = share // 2 if share % 2 == 0 else None
        self.batches = []
        for start in range(0, size - total + 1, total):
            batch = order[start : start + total]
            if half is None:
                self.batches.append(batch[rank * share : (rank + 1) * share])
            else:
                self.batches.append(batch[rank * half : (rank + 1) * half] + batch[total - (rank + 1) * half : total - rank * half])

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - a torn or foreign file must not be silently resumed from
        raise ValueError(f"{path}: unreadable fine-tuning checkpoint ({error}); delete it to restart") from None


def finetune(
    model: nn.Module,
    train_set: Dataset,
    opts: FinetuneOptions,
    checkpoint_dir: Path,
    device: torch.device,
    dtype: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stop_after_epoch: int | None = None,
    redone_history: list[dict] | None = None,
) -> dict:
    """Train ``model`` (a ``bench.apply`` result: the method is active) in place; returns the history.

    ``checkpoint_dir/last.pth`` is written after every epoch (rank 0) and resumed from when present.
    ``redone_history``: the history recorded by a finished run that is being redone (``--force``). A
    checkpoint holding exactly that history is the finished run's: it is not resumed, training starts at
    epoch 0 (and overwrites it). A checkpoint written since, by the redo itself (preempted and requeued,
    or interrupted), is resumed. ``stop_after_epoch`` ends early after that epoch (tests of resumption)."""
    import timm.optim
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    vit = model.vit if hasattr(model, "vit") else model
    model.to(device)
    optimizer = timm.optim.create_optimizer_v2(vit, "adamw", lr=opts.lr, weight_decay=opts.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=(device.type == "cuda" and dtype == "fp16"))
    steps_per_epoch = len(train_set) // opts.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"finetune.batch_size {opts.batch_size} is larger than the training set ({len(train_set)})")
    total_steps, warmup_steps = opts.epochs * steps_per_epoch, int(opts.warmup_epochs * steps_per_epoch)

    history: list[dict] = []
    resumes: list[dict] = []  # where each resumption started: {"epoch": e (0-based), "step": s}
    start_epoch, start_step, partial, partial_seconds = 0, 0, None, 0.0
    state = load_checkpoint(checkpoint_dir / "last.pth")
    if state is not None and redone_history is not None and _as_json(state["history"]) == _as_json(redone_history):
        log(f"training from epoch 0: {checkpoint_dir / 'last.pth'} holds the finished run that is being redone")
        state = None
    if state is not None:
        vit.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"]:  # empty: saved disabled (CPU, or not fp16); fp16 on CUDA then starts its own scale
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"], state["history"]
        start_step, partial = state.get("step", 0), state.get("partial")
        partial_seconds, resumes = state.get("partial_seconds") or 0.0, list(state.get("resumes", []))
        if start_epoch < opts.epochs:  # training goes on (not a run interrupted after its last epoch)
            resumes.append({"epoch": start_epoch, "step": start_step})
        where = f"epoch {start_epoch + 1}, step {start_step}" if start_step else f"the end of epoch {start_epoch}"
        log(f"resuming from {checkpoint_dir / 'last.pth'} at {where}")

    train_model: nn.Module = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mixup = None
    if opts.mixup > 0 or opts.cutmix > 0:
        mixup = Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, label_smoothing=opts.label_smoothing,
                      num_classes=vit.num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=opts.label_smoothing)
    base_set = train_set.dataset if isinstance(train_set, Subset) else train_set

    def save(epoch_done: int, step: int = 0, partial_totals: list[float] | None = None, seconds: float = 0.0) -> None:
        if rank == 0:
            atomic_torch_save({"epoch": epoch_done, "step": step, "partial": partial_totals, "partial_seconds": seconds,
                               "rng": rng_state(device), "model": vit.state_dict(),
                               "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                               "history": history, "resumes": resumes, "options": opts.to_dict()},
                              checkpoint_dir / "last.pth")

    with PreemptionGuard() as guard:
        for epoch in range(start_epoch, opts.epochs):
            if stop_after_epoch is not None and epoch > stop_after_epoch:
                break
            seed_everything(opts.seed * 10_007 + epoch)  # drop path, mixup: the same streams after a resume
            first_step, totals, before = 0, [0.0, 0.0, 0.0], 0.0  # loss sum, correct, seen; seconds before a resume
            if epoch == start_epoch and start_step:
                first_step, totals, before = start_step, list(partial), partial_seconds
                set_rng_state(state["rng"], device)
            if hasattr(base_set, "set_epoch"):
                base_set.set_epoch(epoch, seed=opts.seed)  # Fashion-MNIST's crops and flips follow the seed too
            batches = EpochBatches(len(train_set), opts, epoch, rank, world_size)
            loader = DataLoader(train_set, batch_sampler=batches.batches[first_step:], num_workers=opts.workers,
                                pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(loader_seed(opts.seed, epoch, rank, first_step)))
            model.train()
            started = time.time()
            bar = _progress(loader, f"finetune epoch {epoch + 1}/{opts.epochs}", progress and rank == 0)
            done = first_step  # steps of this epoch finished
            try:
                for step, (images, targets) in enumerate(bar, start=first_step):
                    interrupts.check()
                    global_step = epoch * steps_per_epoch + step
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(global_step, total_steps, warmup_steps, opts)
                    images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                    hard_targets = targets
                    if mixup is not None:
                        images, targets = mixup(images, targets)
                    with autocast(device, dtype):
                        logits = train_model(images)
                        loss = criterion(logits, targets)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if opts.clip_grad:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(vit.parameters(), opts.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    totals[0] += loss.item() * images.shape[0]
                    totals[1] += (logits.argmax(-1) == hard_targets).sum().item()
                    totals[2] += images.shape[0]
                    # A preemption signal is acted on here, between two steps: the checkpoint is consistent
                    # and the requeued job continues with the next step, not from the epoch's start.
                    guard.at_step_boundary(lambda step=step, totals=totals, epoch=epoch, started=started, before=before:
                                           save(epoch, step + 1, list(totals), before + time.time() - started))
                    done = step + 1
            except KeyboardInterrupt:  # a Ctrl-C between two epoch checkpoints: this epoch's steps are lost
                if rank == 0:
                    resume = (f"at step {first_step} of epoch {epoch + 1}" if first_step
                              else f"at the start of epoch {epoch + 1}")
                    log(f"fine-tuning interrupted in epoch {epoch + 1}/{opts.epochs} after {done} of {steps_per_epoch} "
                        f"steps: the next invocation resumes {resume} (the checkpoint is written after every epoch; "
                        "mid-epoch only at a SLURM preemption)")
                raise
            loss_sum, correct, seen = reduce_totals(totals, device, world_size)
            record = {
                "epoch": epoch + 1,
                "train_loss": loss_sum / seen,
                "train_top1": 100.0 * correct / seen,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": before + time.time() - started,  # a resumed epoch: both parts (not the requeue wait)
                **({"resumed_at_step": first_step} if first_step else {}),
            }
            history.append(record)
            log(f"epoch {record['epoch']}/{opts.epochs}: loss {record['train_loss']:.4f} "
                f"train top-1 {record['train_top1']:.2f}% ({record['seconds']:.0f} s)")
            save(epoch + 1)
            if world_size > 1:
                dist.barrier()
    return {"history": history, "epochs_done": len(history), **({"resumes": resumes} if resumes else {})}


def _as_json(history: list[dict]) -> str:
    """A history as its record holds it (JSON): a NaN loss compares equal to itself."""
    return json.dumps(history, sort_keys=True)


class PreemptionGuard:
    """Inside a submitit SLURM job, defer the preemption signal (USR2 by default) to the next step
    boundary of the training loop: save a consistent checkpoint there, then hand the signal to submitit,
    which calls the job's ``checkpoint()`` and requeues it. Elsewhere it does nothing."""

    def __init__(self) -> None:
        self.pending: tuple | None = None
        self.original = None
        self.signum: int | None = None

    def __enter__(self) -> PreemptionGuard:
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            self.signum = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
            self.original = signal.getsignal(self.signum)
            signal.signal(self.signum, self._defer)
        return self

    def _defer(self, signum, frame) -> None:
        self.pending = (signum, frame)

    def at_step_boundary(self, save: Callable[[], None]) -> None:
        if self.pending is None:
            return
        save()
        self._hand_over()

    def _hand_over(self) -> None:
        pending, self.pending = self.pending, None
        signal.signal(self.signum, self.original)
        if callable(self.original):
            self.original(*pending)  # submitit: checkpoint(), requeue, exit

    def __exit__(self, *exc) -> None:
        if self.signum is not None:
            if self.pending is not None:
                self._hand_over()
            signal.signal(self.signum, self.original)


def _progress(iterable, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True, mininterval=2.0)
