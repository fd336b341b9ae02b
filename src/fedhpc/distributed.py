"""Ranks inside one site: who am I, how many are we, and the process group that joins us.

A site's training runs as N ranks launched by `srun` (rank, local rank and world size from
Slurm's environment, master = first node of the step) or by torch's launcher (RANK,
WORLD_SIZE, …). A single process is a world of one and never touches torch.distributed.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # none | slurm | torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0]


def detect() -> World:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    # Inside an srun step (a batch script alone has no SLURM_STEP_ID of a task step).
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    return World()


def init(world: World, device: torch.device) -> None:
    """Join the site's process group (gloo on CPU, nccl/rccl on GPUs)."""
    if not world.distributed or dist.is_initialized():
        return
    if world.launcher == "slurm":
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or socket.gethostname()
        os.environ.setdefault("MASTER_ADDR", _first_host(nodes))
        # One port per job step, so several sites' steps can share a node.
        job, step = int(os.environ.get("SLURM_JOB_ID", 0)), int(os.environ.get("SLURM_STEP_ID", 0))
        os.environ.setdefault("MASTER_PORT", str(20000 + (job * 7 + step) % 20000))
        os.environ.setdefault("RANK", str(world.rank))
        os.environ.setdefault("WORLD_SIZE", str(world.size))
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], world: World) -> list[float]:
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj: object, world: World) -> object:
    """Rank 0's value on every rank (used for decisions only rank 0 may take)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
