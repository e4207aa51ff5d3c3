"""Multi-process fine-tuning inside a SLURM job launched by submitit (``tasks_per_node`` = GPUs).

Every task of the job runs the same function; this context initialises ``torch.distributed`` from
submitit's job environment (NCCL on GPU, gloo on CPU) and tears it down. Outside a multi-task submitit
job it is a no-op: rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device


def job_world() -> tuple[int, int, int]:
    """(global rank, world size, local rank) of this process in a submitit job; (0, 1, 0) elsewhere."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return 0, 1, 0
    import submitit

    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks, env.local_rank


def rank_device(device: torch.device) -> torch.device:
    """This process's device, made current before anything touches CUDA: ``cuda:<local rank>`` in a
    multi-task job (each rank its own GPU, none first initialises GPU 0), ``device`` unchanged elsewhere.
    The runner calls it before moving the model; ``distributed_context`` then finds the same device."""
    if device.type != "cuda":
        return device
    _, world_size, local_rank = job_world()
    if world_size == 1:
        return device
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


MASTER_PORTS = (20000, 32767)  # below Linux's ephemeral ports (32768-60999), which the node's connections take


def master_port(job_id: str) -> int:
    """The rendezvous port of a multi-task job, the same in every task without any exchange: drawn from
    ``MASTER_PORTS`` by the job id. submitit's own choice (20000-60000) falls mostly among the ephemeral ports,
    where any outgoing connection of the node (srun's, slurmd's) may hold it: rank 0 then failed with
    ``EADDRINUSE`` while the other tasks waited for it."""
    return random.Random(f"tokenbench-{job_id}").randint(*MASTER_PORTS)


@contextlib.contextmanager
def distributed_context(device: torch.device) -> Iterator[DistributedContext]:
    rank, world_size, local_rank = job_world()
    if world_size == 1:
        yield DistributedContext(0, 1, device)
        return
    import submitit

    if "MASTER_PORT" not in os.environ:  # one a profile's setup line exports stays (the submitting shell's is unset)
        os.environ["MASTER_PORT"] = str(master_port(submitit.JobEnvironment().job_id))
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    device = rank_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    try:
        yield DistributedContext(rank, world_size, device)
    finally:
        dist.destroy_process_group()
