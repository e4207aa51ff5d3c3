#!/usr/bin/env python3
"""GPU smoke check: every registered method on DeiT-S (random weights) on this machine's GPU, in minutes.

    python scripts/gpu_check.py                      # CUDA: DeiT-S, batch 64
    python scripts/gpu_check.py --device cpu --small # a dry run on CPU (tiny 12-block ViT, seconds)

Per method: the max |logit| difference between the run on the device and the same model on CPU (fp32,
same weights and images; TF32 and kernel choice make it non-zero on GPU, a discrete choice that flips
makes it large), images/s and speed-up over the dense model in fp32 and bf16 (timed alternately in this
process, ``bench.compare_throughput``), on CUDA the bf16 speed-up of CUDA-graph replays of both models
(``bench.throughput.capture``: the kernels' time without Python's dispatch; ``n/a`` for a forward that
synchronises with the host), the SDPA kernels each forward dispatched to, then 2 steps of
DDP fine-tuning through the pipeline's own ``finetune`` (NCCL with 2 processes when 2 GPUs exist, else one
process; ``--ddp-procs`` overrides, gloo on CPU, on CUDA one GPU per process). Exit code 0 when every method passed, 1 otherwise;
methods whose parameters do not fit the model are listed as skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import _repo  # noqa: F401 - this checkout first on sys.path
import torch
from _args import at_least

import bench
import methods
from bench.macs import model_input_size
from bench.pipeline.accelerator import cuda_environment
from bench.sdpa import enabled_backends, kernels_used
from bench.throughput import CaptureError, autocast, capture, device_name

SMALL = {"img_size": 64, "patch_size": 8, "embed_dim": 48, "num_heads": 3, "depth": 12, "num_classes": 10}


def build_vit(args: argparse.Namespace) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    kwargs = SMALL if args.small else {}
    return timm.create_model("vit_tiny_patch16_224" if args.small else args.model, pretrained=False, **kwargs).eval()


def method_params(name: str, vit: torch.nn.Module) -> dict:
    """The method's reference setting for DeiT-S at 224 px (``Method.paper_params``), scaled to this model:
    a token count ``r`` by its patch count (196 at 224 px), ``img_size`` by its patch grid (14 at 224 px)."""
    patch, grid = vit.patch_embed.patch_size[0], vit.patch_embed.grid_size[0]
    params = dict(methods.registered()[name].paper_params)
    if "r" in params:
        params["r"] = max(1, round(params["r"] * vit.patch_embed.num_patches / 196))
    if "img_size" in params:
        params["img_size"] = patch * max(1, round(grid * params["img_size"] / 224))
    return params


def forward(model: torch.nn.Module, batch: torch.Tensor, dtype: str = "fp32") -> torch.Tensor:
    model.eval()
    with torch.inference_mode(), autocast(batch.device, dtype):
        return model(batch).float()


def check_method(name: str, vit_device, vit_cpu, dense, batch_cpu, batch, args, dense_graph=None) -> dict:
    params = method_params(name, vit_cpu)
    model_cpu = bench.apply(vit_cpu, name, **params)  # ValueError: does not fit the model (skipped)
    model = bench.apply(vit_device, name, **params)
    logits = forward(model, batch)
    reference = forward(model_cpu, batch_cpu)
    row = {"method": name, "params": params, "logit_diff": (logits.cpu() - reference).abs().max().item(),
           "tokens_match": model.last_forward.tokens_out == model_cpu.last_forward.tokens_out,
           "finite": bool(torch.isfinite(logits).all())}
    for dtype in ("fp32", "bf16"):
        measured, base = bench.compare_throughput(model, dense, batch, dtype, args.warmup, args.runs)
        row[dtype] = {"images_per_s": measured.images_per_s, "speedup": measured.images_per_s / base.images_per_s,
                      "kernels": kernels_used(model, batch, dtype)}
    if dense_graph is not None:  # CUDA: both models as CUDA-graph replays, bf16
        try:
            measured, base = bench.compare_throughput(capture(model, batch, "bf16", args.warmup), dense_graph,
                                                      batch, "bf16", args.warmup, args.runs)
            row["graph_bf16"] = f"{measured.images_per_s / base.images_per_s:6.2f}x"
        except CaptureError:
            row["graph_bf16"] = "n/a"
    return row


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n: int, size: tuple[int, int, int], classes: int) -> None:
        generator = torch.Generator().manual_seed(2)
        self.images = torch.randn(n, *size, generator=generator)
        self.labels = torch.randint(0, classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def ddp_worker(rank: int, world: int, args: argparse.Namespace, names: list[str], folder: str) -> None:
    """One process of the fine-tuning check: its GPU is made current before anything touches CUDA."""
    import torch.distributed as dist

    from bench.pipeline.train import FinetuneOptions, finetune

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{folder}/store",
                                rank=rank, world_size=world)
    results = {}
    try:
        vit = build_vit(args)
        per_rank = 2 if args.small else 8
        options = FinetuneOptions(epochs=1, batch_size=per_rank * world, lr=1e-4, min_lr=1e-5, workers=0)
        data = Synthetic(2 * per_rank * world, model_input_size(vit), vit.num_classes)
        for name in names:
            started = time.perf_counter()
            try:
                model = bench.apply(copy.deepcopy(vit), name, **method_params(name, vit)).to(device)
                result = finetune(model, data, options, Path(folder) / "ckpt" / name, device,
                                  "bf16" if device.type == "cuda" else "fp32", rank=rank, world_size=world,
                                  progress=False, log=lambda message: None)
                loss = result["history"][-1]["train_loss"]
                results[name] = {"ok": bool(loss == loss), "loss": loss, "seconds": time.perf_counter() - started}
            except Exception as error:  # noqa: BLE001 - reported per method
                results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300],
                                 "traceback": traceback.format_exc()}
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        Path(folder, "ddp.json").write_text(json.dumps(results))


def ddp_procs_error(procs: int | None, device: torch.device, gpus: int) -> str | None:
    """Why ``--ddp-procs procs`` cannot run on ``device`` with ``gpus`` GPUs (each CUDA rank takes GPU ``rank``;
    gloo on CPU takes any number), or None."""
    if procs is not None and device.type == "cuda" and procs > gpus:
        return f"error: --ddp-procs {procs} needs {procs} GPUs (one per process); {gpus} found"
    return None


def run_ddp(args: argparse.Namespace, names: list[str], world: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        if world > 1:
            import torch.multiprocessing as mp

            mp.spawn(ddp_worker, args=(world, args, names, folder), nprocs=world, join=True)
        else:
            ddp_worker(0, 1, args, names, folder)
        return json.loads(Path(folder, "ddp.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--small", action="store_true", help="a tiny 12-block ViT at 64 px (CPU dry run)")
    parser.add_argument("--batch-size", type=at_least(1), default=None, help="default 64 (--small: 4)")
    parser.add_argument("--warmup", type=at_least(0), default=None, help="default 5 (--small: 1)")
    parser.add_argument("--runs", type=at_least(1), default=None, help="default 20 (--small: 1)")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--ddp-procs", type=at_least(1), default=None, help="default: 2 when 2 GPUs exist, else 1")
    parser.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or (4 if args.small else 64)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    args.runs = args.runs or (1 if args.small else 20)
    if args.device not in ("cuda", "cpu"):  # the checks run on GPU 0 (and 1 for DDP), or on the CPU
        print(f"error: --device {args.device!r} not allowed; allowed: cuda, cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available here; --device cpu runs the same checks on CPU", file=sys.stderr)
        return 2
    names = args.methods.split(",") if args.methods else methods.names()
    unknown = [name for name in names if name not in methods.names()]
    if unknown:
        print(f"error: unknown method {unknown[0]!r}; allowed: {', '.join(methods.names())}", file=sys.stderr)
        return 2
    refused = ddp_procs_error(args.ddp_procs, device, torch.cuda.device_count())
    if refused:
        print(refused, file=sys.stderr)
        return 2
    world = args.ddp_procs or (2 if device.type == "cuda" and torch.cuda.device_count() >= 2 else 1)
    if device.type == "cuda":
        torch.cuda.set_device(0)  # the checks below run on GPU 0; DDP ranks take GPU 0 and 1

    env = cuda_environment(device)
    print(f"torch {torch.__version__}, {device_name(device)} ({device}); CUDA {env['cuda_version']}, "
          f"cuDNN {env['cudnn_version']}, driver {env['driver_version']}, TF32 {env['tf32']}")
    print(f"SDPA backends enabled: {', '.join(enabled_backends())}")
    vit_cpu = build_vit(args)
    vit_device = copy.deepcopy(vit_cpu).to(device)
    size = model_input_size(vit_cpu)
    batch_cpu = torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(1))
    batch = batch_cpu.to(device)
    dense = bench.apply(vit_device, "baseline")
    label = "small ViT (12 blocks, 64 px)" if args.small else args.model
    print(f"{label}, random weights, batch {args.batch_size}, {args.runs} timed runs after {args.warmup} warm-up")
    dense_graph = capture(dense, batch, "bf16", args.warmup) if device.type == "cuda" else None
    header = (f"{'method':13s} {'max|dlogit|':>11s} {'tokens':>6s} {'fp32 x':>7s} {'bf16 x':>7s} {'graph x':>7s} "
              f"{'fp32 img/s':>10s} {'bf16 img/s':>10s}  SDPA kernels fp32 / bf16")
    print(header)
    print("-" * len(header))
    failed, skipped, passed = [], [], []
    for name in names:
        try:
            row = check_method(name, vit_device, vit_cpu, dense, batch_cpu, batch, args, dense_graph)
        except ValueError as error:
            skipped.append(name)
            print(f"{name:13s} skipped: {str(error).splitlines()[0]}")
            continue
        except Exception as error:  # noqa: BLE001 - every method is checked
            failed.append(name)
            print(f"{name:13s} FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        if not row["finite"]:
            failed.append(name)
        else:
            passed.append(name)
        print(f"{name:13s} {row['logit_diff']:11.2e} {'same' if row['tokens_match'] else 'DIFF':>6s} "
              f"{row['fp32']['speedup']:6.2f}x {row['bf16']['speedup']:6.2f}x {row.get('graph_bf16', '-'):>7s} "
              f"{row['fp32']['images_per_s']:10.1f} "
              f"{row['bf16']['images_per_s']:10.1f}  {'+'.join(row['fp32']['kernels']) or '-'} / "
              f"{'+'.join(row['bf16']['kernels']) or '-'}{'' if row['finite'] else '  NON-FINITE LOGITS'}")
    print(f"(max|dlogit|: {device} vs CPU, fp32; tokens: the same token counts per block on both; graph x: bf16,"
          f" CUDA-graph replays of both models, n/a: the forward synchronises with the host, -: not on CUDA)")

    backend = "NCCL" if device.type == "cuda" and world > 1 else "gloo" if world > 1 else "no process group"
    print(f"\nfine-tuning, 2 steps, {world} process(es) ({backend}), "
          f"{'bf16' if device.type == 'cuda' else 'fp32'}:")
    started = time.perf_counter()
    ddp = run_ddp(args, passed, world)
    for name in passed:
        outcome = ddp[name]
        if outcome["ok"]:
            print(f"  {name:13s} ok: train loss {outcome['loss']:.4f} ({outcome['seconds']:.1f} s)")
        else:
            failed.append(name)
            print(f"  {name:13s} FAILED: {outcome.get('error', 'non-finite loss')}")
    print(f"  ({time.perf_counter() - started:.1f} s)")
    print(f"\n{len(passed) - len(set(failed) & set(passed))} passed, {len(set(failed))} failed"
          f"{', skipped (do not fit the model): ' + ', '.join(skipped) if skipped else ''}")
    if failed:
        print(f"FAILED: {', '.join(sorted(set(failed)))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
