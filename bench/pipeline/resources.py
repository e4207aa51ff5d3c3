"""What ``--executor slurm`` would ask SLURM for, per job shape: printed by ``run_bench --dry-run``.

Evaluation runs (no ``finetune`` stage) and fine-tuning runs go to separate job arrays with different
resources (``bench.pipeline.slurm.executor_parameters``); each line below is what one job of that array
requests, from the same function the submission uses.
"""

from __future__ import annotations

from typing import Any

from bench.pipeline.profiles import Profile, load_profile, profile_path
from bench.pipeline.slurm import executor_parameters, thread_notes

# (submitit parameter, label) in the order they are printed
_FIELDS = (("slurm_partition", "partition"), ("slurm_account", "account"), ("slurm_qos", "qos"),
           ("nodes", "nodes"), ("tasks_per_node", "tasks"), ("gpus_per_node", "gpus"),
           ("cpus_per_task", "cpus_per_task"), ("mem_gb", "mem"), ("timeout_min", "time"),
           ("slurm_constraint", "constraint"))


def job_shapes(runs: list[Any], profile: Profile) -> list[dict[str, Any]]:
    """One entry per shape (eval, finetune): the array size and the resources of each of its jobs."""
    shapes = []
    for shape, finetune in (("eval", False), ("finetune", True)):
        params = executor_parameters(profile, finetune)
        resources = {label: params.get(name) for name, label in _FIELDS}
        resources["gpus"] = resources["gpus"] or 0
        shapes.append({"shape": shape, "array_size": sum(("finetune" in run.stages) == finetune for run in runs),
                       "array_parallelism": params.get("slurm_array_parallelism"), **resources})
    return shapes


def describe(runs: list[Any], profile_name: str) -> list[str]:
    """Printable lines: the profile, then one line per job shape, then any note on the runs' threads."""
    profile = load_profile(profile_name)
    lines = [f"SLURM job arrays (--executor slurm) with profile {profile_name} ({profile_path(profile_name)}):"]
    for entry in job_shapes(runs, profile):
        parts = [f"{entry['array_size']} job(s)"]
        for _, label in _FIELDS:
            value = entry[label]
            if value is None:
                continue
            parts.append(f"{label}={value}G" if label == "mem" else f"{label}={value}min" if label == "time"
                         else f"{label}={value}")
        if entry["array_parallelism"]:
            parts.append(f"at most {entry['array_parallelism']} at once")
        lines.append(f"  {entry['shape']:9s} " + " ".join(parts))
    return lines + [f"  {note}" for note in thread_notes(runs, profile)]
