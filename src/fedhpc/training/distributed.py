"""Ranks inside one site: who am I, how many are we, and the process group that joins us.

A site's training runs as N ranks launched by `srun` (rank, local rank and world size from
Slurm's environment, master = first node of the step) or by torch's launcher (RANK,
WORLD_SIZE, …). A single process is a world of one and never touches torch.distributed.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fedhpc.core.errors import FedhpcError


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


_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _ranges(body: str, expr: str) -> list[tuple[int, int, int]]:
    """`001-003,007` -> [(1, 3, 3), (7, 7, 3)]: (low, high, digits), zero-padded to the low bound's width."""
    out = []
    for part in body.split(","):
        m = _RANGE.fullmatch(part)
        if m is None or int(m.group(2) or m.group(1)) < int(m.group(1)):
            raise ValueError(
                f"Slurm host list {expr!r}: [{body}] holds {part!r}, not a number or a range lo-hi with lo <= hi"
            )
        out.append((int(m.group(1)), int(m.group(2) or m.group(1)), len(m.group(1))))
    return out


def _host_expression(item: str, expr: str) -> list[str | list[tuple[int, int, int]]]:
    """`rack[1-2]-nid[01-03]` -> ['rack', [(1, 2, 1)], '-nid', [(1, 3, 2)], '']."""
    parts: list[str | list[tuple[int, int, int]]] = []
    for i, piece in enumerate(re.split(r"\[([^\[\]]*)\]", item)):
        if i % 2:
            parts.append(_ranges(piece, expr))
        elif "[" in piece or "]" in piece:
            raise ValueError(f"Slurm host list {expr!r}: unbalanced or nested brackets in {item!r}")
        else:
            parts.append(piece)
    return parts


def _expand(parts: list[str | list[tuple[int, int, int]]]) -> Iterator[str]:
    groups = [i for i, p in enumerate(parts) if not isinstance(p, str)]
    # Slurm's nesting (it peels bracket groups off the prefix from the right): the last group
    # varies fastest, then the first, the second, ..., the one before the last slowest.
    order = groups[-2::-1] + groups[-1:]
    slots = [p if isinstance(p, str) else "" for p in parts]

    def fill(k: int) -> Iterator[str]:
        if k == len(order):
            yield "".join(slots)
            return
        i = order[k]
        for lo, hi, width in parts[i]:
            for n in range(lo, hi + 1):
                slots[i] = f"{n:0{width}d}"
                yield from fill(k + 1)

    return fill(0)


def hostnames(expr: str) -> Iterator[str]:
    """The hosts of a Slurm host list (`SLURM_JOB_NODELIST`) in the order `scontrol show hostnames`
    prints them; parsed here because containers have no `scontrol`.

    Host expressions are separated by commas or white space outside brackets; each may hold
    bracket groups of numbers and zero-padded ranges (`nid[001-003,007]`, `rack[1-2]-n[01-02]`)
    with text before, between and after them. The whole list is checked first (ValueError
    naming the fault); the hosts are then produced one by one, so a huge list costs nothing.
    """
    items = [item for item in re.split(r"[,\s]+(?![^\[]*\])", expr) if item]
    parsed = [_host_expression(item, expr) for item in items]
    for parts in parsed:
        yield from _expand(parts)


def first_host(nodelist: str, variable: str) -> str:
    """The first host of `nodelist`, read from environment variable `variable`."""
    try:
        host = next(hostnames(nodelist), None)
    except ValueError as exc:
        raise FedhpcError(f"{variable}: {exc}; set MASTER_ADDR to the first node of the job step") from None
    if host is None:
        raise FedhpcError(f"{variable}={nodelist!r} names no host; set MASTER_ADDR to the first node of the job step")
    return host


def detect() -> World:
    env = os.environ
    # Inside an srun step (a batch script alone has no SLURM_STEP_ID of a task step).
    srun = "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
    slurm = World(
        int(env.get("SLURM_PROCID", 0)), int(env.get("SLURM_NTASKS", 1)), int(env.get("SLURM_LOCALID", 0)), "slurm"
    )
    if "RANK" in env and "WORLD_SIZE" in env:
        # `init` exports srun's ranks as torch's variables (DeepSpeed reads them): they are still
        # srun's, as a resident job's later rounds and the signed receipts must say.
        if srun and (int(env["RANK"]), int(env["WORLD_SIZE"])) == (slurm.rank, slurm.size):
            return slurm
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    return slurm if srun else World()


def backend(device: torch.device) -> str:
    """The process group's backends. Bookkeeping collectives (`all_sum` of plain numbers,
    `broadcast`'s pickled objects, `barrier`) run on CPU tensors, which NCCL and RCCL (the
    same name on ROCm) do not serve: gloo takes those, NCCL the device's tensors."""
    return "gloo" if device.type == "cpu" else f"cpu:gloo,{device.type}:nccl"


def init(world: World, device: torch.device, timeout: float | None = None) -> None:
    """Make `device` this rank's current GPU, then join the site's process group, whose collectives
    wait `timeout` seconds for the slowest rank (None: torch's default)."""
    if device.type == "cuda":
        # Before the group exists: NCCL binds a rank's communicator to the current device, and
        # without this every rank of a node would take GPU 0.
        torch.cuda.set_device(device)
    if not world.distributed or dist.is_initialized():
        return
    if world.launcher == "slurm":
        var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if os.environ.get(v)), None)
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = first_host(os.environ[var], var) if var else socket.gethostname()
        # One port per job step, so several sites' steps can share a node.
        job, step = int(os.environ.get("SLURM_JOB_ID", 0)), int(os.environ.get("SLURM_STEP_ID", 0))
        os.environ.setdefault("MASTER_PORT", str(20000 + (job * 7 + step) % 20000))
        os.environ.setdefault("RANK", str(world.rank))
        os.environ.setdefault("WORLD_SIZE", str(world.size))
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    wait = timedelta(seconds=timeout) if timeout else None
    dist.init_process_group(backend=backend(device), rank=world.rank, world_size=world.size, timeout=wait)


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
