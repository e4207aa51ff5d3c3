"""The stages of a run: one module each, run in the order of ``STAGES``.

Each module ``bench.pipeline.stages.<name>`` has ``run(ctx: StageContext) -> dict | list``: it measures
``ctx.model`` (see ``bench.pipeline.context``) and returns the JSON-able entry ``metrics[<name>]`` of the
run's record. Adding a stage = one module here + its name in ``STAGES``; experiment files may then list
it under ``stages``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STAGES = ("finetune", "eval", "macs", "throughput", "tokens")  # run order


def stage(name: str) -> ModuleType:
    """The module of stage ``name`` (looked up at call time, so a test may replace its ``run``)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    return importlib.import_module(f"{__name__}.{name}")
