"""``macs``: MACs of one image (torchprofile), the analytic count for the same token schedule, the mean
over ``macs.images`` real images (a seeded draw across classes, ``bench.pipeline.samples``) for methods whose
work depends on the input, and ``extra``: work a method does that torchprofile cannot see (clustering
methods' pairwise distances, ``Method.extra_macs``), reported beside the count, never hidden in it."""

from __future__ import annotations

from typing import Any

from bench.macs import analytic_macs, count_macs, data_macs
from bench.pipeline.calibrate import measured_once
from bench.pipeline.context import StageContext
from bench.pipeline.samples import images_identity, macs_images


def run(ctx: StageContext) -> dict[str, Any]:
    model, run = ctx.model, ctx.run
    named = [run.model, run.model_kwargs]
    if model.method.data_dependent:
        single = count_macs(model)  # of these weights (a calibration counts its images only)
    else:  # MACs that do not depend on the image do not depend on the weights: a calibration's count in this process
        single = measured_once(model, ["one image", named], lambda: count_macs(model))
    analytic = analytic_macs(model)  # the token counts of a forward on the same fixed image
    info = model.last_forward
    ctx.note_tokens(info)
    averaged = float(single)
    if model.method.data_dependent:
        def traced() -> float:
            return data_macs(model, macs_images(ctx.val_set(), run.macs["images"], run.seed))

        weights = run.weights_sha256 or run.weights_path
        if weights is None or "finetune" in run.stages:  # random or fine-tuned weights: not a calibration's model
            averaged = traced()
        else:  # the count of this setting that its calibration traced, when that ran in this process
            averaged = measured_once(model, ["images", named, images_identity(weights, run.data, run.macs["images"],
                                                                              run.seed)], traced)
    extra = getattr(model.method, "extra_macs", None)
    result = {"torchprofile": single, "analytic": analytic, "data_mean": averaged,
              "data_dependent": bool(model.method.data_dependent)}  # the report's GMACs: data_mean then
    if extra is not None:
        result["extra"] = int(extra(info.tokens_in, model.context, model.vit.embed_dim))
    return result
