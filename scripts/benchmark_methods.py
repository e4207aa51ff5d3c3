#!/usr/bin/env python3
"""Throughput of every method against the dense model, in one run on the current device.

    python scripts/benchmark_methods.py                     # DeiT-S, batch 32, CPU, fp32
    python scripts/benchmark_methods.py --device cuda --dtype fp16 --batch-size 256

For each method: images/s (median of the timed forwards), the speed-up over the dense baseline timed in
the same process (alternating forwards, see bench.compare_throughput), and the MAC-ideal speed-up
(dense MACs / method MACs, torchprofile). Random weights (MACs and timings do not depend on them; no
download); inputs are random too, so PPT's per-image branch choice is arbitrary here: its two branches
remove the same number of tokens, and the pooled fraction is printed next to it.
"""

from __future__ import annotations

import argparse
import sys

import timm
import torch

import bench
from bench.macs import model_input_size
from bench.throughput import DTYPES, device_name

SETTINGS = [
    ("baseline", {}),
    ("tome", {"r": 13}),
    ("ppt", {"r": 50, "layers": [3, 6, 9], "threshold": 7e-5}),
    ("pruning", {"r": 50, "layers": [3, 6, 9]}),
    ("pooling", {"r": 50, "layers": [3, 6, 9]}),
    ("evit", {"keep_rate": 0.7}),
    ("topk", {"keep_rate": 0.7}),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    vit = timm.create_model(args.model, pretrained=False).eval().to(device)
    dense = bench.apply(vit, "baseline")
    dense_macs = bench.count_macs(dense)
    size = model_input_size(dense)
    batch = torch.randn(args.batch_size, *size, generator=torch.Generator().manual_seed(1)).to(device)
    print(f"{args.model}, batch {args.batch_size}, {args.dtype}, {device_name(device)} "
          f"({device}), {torch.get_num_threads()} threads, {args.runs} timed runs after {args.warmup} warm-up")
    header = f"{'method':10s} {'params':38s} {'GMACs':>6s} {'images/s':>9s} {'base img/s':>10s} {'speed-up':>8s} {'MAC-ideal':>9s}"
    print(header)
    print("-" * len(header))
    for name, params in SETTINGS:
        model = bench.apply(vit, name, **params)
        macs = bench.count_macs(model)
        measured, baseline = bench.compare_throughput(model, dense, batch, args.dtype, args.warmup, args.runs)
        extra = ""
        if model.last_forward.stats:
            fractions = [round(s["pooled_fraction"], 2) for s in model.last_forward.stats.values()]
            extra = f"  pooled fraction per layer {fractions}"
        text = ", ".join(f"{k}={v}" for k, v in params.items())
        print(f"{name:10s} {text:38s} {macs / 1e9:6.3f} {measured.images_per_s:9.1f} {baseline.images_per_s:10.1f} "
              f"{measured.images_per_s / baseline.images_per_s:7.2f}x {dense_macs / macs:8.2f}x{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
