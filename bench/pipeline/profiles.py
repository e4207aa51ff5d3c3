"""Cluster profiles: ``slurm/<name>.yaml`` (or a path to a .yaml file), validated against ``Profile``.

Every key is optional; ``tasks_per_node`` applies to fine-tuning runs (one DDP process per GPU),
evaluation runs use one task. ``max_requeue`` is how often a job may be requeued after its time limit,
``setup`` shell lines run before the job (e.g. module loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.pipeline.files import REPO
from bench.pipeline.schema import FileError, SchemaError, option, parse


class ProfileError(FileError):
    """One bad value in a cluster profile: ``<file>: <key>: <problem>``."""


@dataclass(frozen=True)
class Profile:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int | None = option(None, minimum=0)
    tasks_per_node: int = option(1, minimum=0)
    cpus_per_task: int | None = option(None, minimum=0)
    mem_gb: int | None = option(None, minimum=0)
    timeout_min: int | None = option(None, minimum=0)
    constraint: str | None = None
    array_parallelism: int | None = option(None, minimum=0)
    max_requeue: int = option(3, minimum=0)
    setup: list[str] = option([], expect="a list of shell lines")


def profile_path(name: str) -> Path:
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    return REPO / "slurm" / f"{name}.yaml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in (REPO / "slurm").glob("*.yaml"))


def load_profile(name: str) -> Profile:
    path = profile_path(name)
    if not path.exists():
        raise ProfileError(path, "", f"no such cluster profile; available: {', '.join(available_profiles()) or 'none'}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ProfileError(path, "", f"malformed YAML ({str(error).splitlines()[0]})") from None
    try:
        return parse(Profile, raw)
    except SchemaError as error:
        raise ProfileError.of(path, error) from None
