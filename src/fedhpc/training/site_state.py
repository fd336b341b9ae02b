"""Optimizer state a site keeps between rounds: per rank, never published, newest round wins."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fedhpc.core.layout import RunLayout
from fedhpc.training.distributed import World

_NAME = re.compile(r"^optimizer-r(\d{4})-rank(\d+)-of(\d+)\.pt$")


def _path(layout: RunLayout, site: str, r: int, world: World) -> Path:
    return layout.site_state(site) / f"optimizer-r{r:04d}-rank{world.rank}-of{world.size}.pt"


def latest(layout: RunLayout, site: str, before: int, world: World) -> tuple[Path | None, int | None]:
    """This rank's state from the newest round before `before`, if saved with the same world size."""
    best: tuple[Path, int] | None = None
    for p in layout.site_state(site).glob("optimizer-r*.pt"):
        m = _NAME.match(p.name)
        if m and int(m.group(2)) == world.rank and int(m.group(3)) == world.size:
            k = int(m.group(1))
            if k < before and (best is None or k > best[1]):
                best = (p, k)
    return best if best else (None, None)


def save(layout: RunLayout, site: str, r: int, world: World, state: dict) -> None:
    path = _path(layout, site, r, world)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    torch.save(state, tmp)
    tmp.replace(path)


def prune(layout: RunLayout, site: str, keep_from: int) -> None:
    """Drop states older than round `keep_from` (rank 0 does it once the round is published)."""
    for p in layout.site_state(site).glob("optimizer-r*.pt"):
        m = _NAME.match(p.name)
        if m and int(m.group(1)) < keep_from:
            p.unlink(missing_ok=True)


# Whole-model tensors a site keeps on rank 0 (compression residuals, SCAFFOLD's c_i), by round.
_TENSORS = re.compile(r"^(residual|control)-r(\d{4})\.safetensors$")


def save_tensors(layout: RunLayout, site: str, kind: str, r: int, tensors: dict[str, torch.Tensor]) -> None:
    from fedhpc.core.tensorfile import save_state

    path = layout.site_state(site) / f"{kind}-r{r:04d}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state(path, {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in tensors.items()})


def latest_tensors(layout: RunLayout, site: str, kind: str, before: int) -> tuple[dict[str, torch.Tensor], int | None]:
    """The newest `kind` tensors saved for a round before `before` ({} and None when there are none)."""
    from fedhpc.core.tensorfile import load_state

    best: tuple[Path, int] | None = None
    for p in layout.site_state(site).glob(f"{kind}-r*.safetensors"):
        m = _TENSORS.match(p.name)
        if m and m.group(1) == kind and int(m.group(2)) < before and (best is None or int(m.group(2)) > best[1]):
            best = (p, int(m.group(2)))
    return (load_state(best[0]), best[1]) if best else ({}, None)


def prune_tensors(layout: RunLayout, site: str, keep_from: int) -> None:
    for p in layout.site_state(site).glob("*-r*.safetensors"):
        m = _TENSORS.match(p.name)
        if m and int(m.group(2)) < keep_from:
            p.unlink(missing_ok=True)
