"""``macs``: MACs of one image (torchprofile), the analytic count for the same token schedule, the mean
over ``macs.images`` real images (a seeded draw across classes, ``bench.pipeline.samples``) for methods whose
work depends on the input, and ``extra``: work a method does that torchprofile cannot see (clustering
methods' pairwise distances, ``Method.extra_macs``), reported beside the count, never hidden in it."""

from __future__ import annotations

from typing import Any

from bench.macs import analytic_macs, count_macs, data_macs
from bench.pipeline.context import StageContext
from bench.pipeline.samples import macs_images


def run(ctx: StageContext) -> dict[str, Any]:
    model = ctx.model
    single = count_macs(model)
    info = model.last_forward
    analytic = analytic_macs(model, info)
    ctx.note_tokens(info)
    if model.method.data_dependent:
        averaged = data_macs(model, macs_images(ctx.val_set(), ctx.run.macs["images"], ctx.run.seed))
    else:
        averaged = float(single)
    extra = getattr(model.method, "extra_macs", None)
    result = {"torchprofile": single, "analytic": analytic, "data_mean": averaged,
              "data_dependent": bool(model.method.data_dependent)}  # the report's GMACs: data_mean then
    if extra is not None:
        result["extra"] = int(extra(info.tokens_in, model.context, model.vit.embed_dim))
    return result
