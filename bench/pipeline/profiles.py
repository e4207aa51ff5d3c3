"""Cluster profiles: ``slurm/<name>.yaml`` (or a path to a .yaml file), validated against ``Profile``.

Every key is optional but ``timeout_min`` (minutes, at least 2: submitit writes a limit into every job, 5
minutes where none is given, and signals the job 90 s before it). A profile describes the fine-tuning job's
node: ``tasks_per_node`` DDP processes (one per GPU, so at most ``gpus_per_node``), each with ``cpus_per_task``
CPUs, ``mem_gb`` per node. An evaluation run uses one GPU, so its job asks for one task, one GPU and one GPU's
share of the node: the node's CPUs (``tasks_per_node * cpus_per_task``) and memory divided by ``gpus_per_node``
(by ``tasks_per_node`` on a CPU-only profile), rounded down, at least 1 (``eval_resources``). ``max_requeue`` is
how often a job may be requeued after its time limit, ``setup`` shell lines run before the job (e.g. module
loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.pipeline.files import REPO
from bench.pipeline.schema import FileError, SchemaError, option, parse
from bench.pipeline.yamlload import load_yaml

# submitit signals a job 90 s before its time limit (USR2: checkpoint and requeue); a limit must leave time to run
SIGNAL_LEAD_MIN = 2


class ProfileError(FileError):
    """One bad value in a cluster profile: ``<file>: <key>: <problem>``."""


@dataclass(frozen=True)
class Profile:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int | None = option(None, minimum=0)
    tasks_per_node: int = option(1, minimum=1)
    cpus_per_task: int | None = option(None, minimum=1)
    mem_gb: int | None = option(None, minimum=1)
    timeout_min: int | None = option(None, minimum=SIGNAL_LEAD_MIN)  # required: load_profile
    constraint: str | None = None
    array_parallelism: int | None = option(None, minimum=1)
    max_requeue: int = option(3, minimum=0)
    setup: list[str] = option([], expect="a list of shell lines")


def profile_path(name: str) -> Path:
    """A path ending in .yaml / .yml as it is (existing or not: a missing one is named as given), else the
    profile ``slurm/<name>.yaml``."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        shipped = REPO / "slurm" / name  # a bare file name of a profile: example_gpu.yaml
        return shipped if not candidate.exists() and candidate.name == name and shipped.is_file() else candidate
    return REPO / "slurm" / f"{name}.yaml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in (REPO / "slurm").glob("*.yaml"))


def load_profile(name: str) -> Profile:
    path = profile_path(name)
    if not path.exists():
        raise ProfileError(path, "", f"no such cluster profile; available: {', '.join(available_profiles()) or 'none'}")
    raw = load_yaml(path, ProfileError) or {}  # one loader: UTF-8 only, duplicate keys and alias bombs refused
    try:
        profile = parse(Profile, raw)
    except SchemaError as error:
        raise ProfileError.of(path, error) from None
    if profile.gpus_per_node and profile.tasks_per_node > profile.gpus_per_node:
        raise ProfileError(path, "tasks_per_node", f"{profile.tasks_per_node} exceeds gpus_per_node "
                           f"{profile.gpus_per_node}; allowed: 1 to {profile.gpus_per_node} (one DDP process per GPU)")
    if profile.timeout_min is None:  # submitit writes a time limit into every job: its default is 5 minutes
        raise ProfileError(path, "timeout_min", "required: the jobs' time limit in minutes (left out, submitit asks "
                           f"SLURM for 5); allowed: {SIGNAL_LEAD_MIN} or more")
    return profile


def eval_resources(profile: Profile) -> dict[str, int | None]:
    """An evaluation job's gpus / cpus_per_task / mem_gb: one GPU and that GPU's share of the node the
    profile describes (None where the profile leaves the value to the cluster's defaults)."""
    shares = profile.gpus_per_node or profile.tasks_per_node
    node_cpus = None if profile.cpus_per_task is None else profile.cpus_per_task * profile.tasks_per_node
    return {
        "gpus_per_node": min(1, profile.gpus_per_node) if profile.gpus_per_node is not None else None,
        "cpus_per_task": None if node_cpus is None else max(1, node_cpus // shares),
        "mem_gb": None if profile.mem_gb is None else max(1, profile.mem_gb // shares),
    }
