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
    weights = run.weights_sha256 or run.weights_path
    # the model its budget's calibration traced, when that ran in this process: its counts (calibrate.measured_once);
    # not after a finetune stage (other weights) nor with random ones
    calibrated = weights is not None and "finetune" not in run.stages
    if model.method.data_dependent:
        single = count_macs(model)  # of these weights (the calibration counts its images only)
    else:  # MACs that do not depend on the image do not depend on the weights: the calibration's random ones
        single = measured_once(model, ["one image", named], lambda: count_macs(model))
    analytic = analytic_macs(model)  # the token counts of a forward on the same fixed image
    info = model.last_forward
    ctx.note_tokens(info)
    if model.method.data_dependent:
        def averaged() -> float:
            return data_macs(model, macs_images(ctx.val_set(), run.macs["images"], run.seed))

        if calibrated:
            averaged_macs = measured_once(model, ["images", named, images_identity(weights, run.data,
                                                                                   run.macs["images"], run.seed)],
                                          averaged)
        else:
            averaged_macs = averaged()
    else:
        averaged_macs = float(single)
    extra = getattr(model.method, "extra_macs", None)
    result = {"torchprofile": single, "analytic": analytic, "data_mean": averaged_macs,
              "data_dependent": bool(model.method.data_dependent)}  # the report's GMACs: data_mean then
    if extra is not None:
        result["extra"] = int(extra(info.tokens_in, model.context, model.vit.embed_dim))
    return result
