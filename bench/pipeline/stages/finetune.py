"""``finetune``: train with the method active (every task of a multi-task job takes part; ``ctx.rank``
tells the runner which one records). Rank 0 saves the final weights (DeiT format) under
``<results>/checkpoints/<key>/final.pth`` and, with ``finetune.export``, a copy there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.pipeline.context import StageContext
from bench.pipeline.distributed import distributed_context
from bench.pipeline.files import atomic_torch_save
from bench.pipeline.train import FinetuneOptions, finetune


def run(ctx: StageContext) -> dict[str, Any]:
    run, model = ctx.run, ctx.model
    options = FinetuneOptions(**run.finetune)
    checkpoint_dir = ctx.results_dir / "checkpoints" / run.key
    with distributed_context(ctx.device) as dist:
        model.to(dist.device)
        result = finetune(model, ctx.dataset("train", augment=True), options, checkpoint_dir, dist.device,
                          run.dtype, rank=dist.rank, world_size=dist.world_size, progress=ctx.progress)
        result["world_size"] = dist.world_size  # processes that trained (tasks of a DDP job)
        if dist.rank == 0:
            final = {"model": model.vit.state_dict()}
            atomic_torch_save(final, checkpoint_dir / "final.pth")
            if options.export:
                atomic_torch_save(final, Path(options.export))
    model.to(ctx.device)
    ctx.rank = dist.rank
    return result
