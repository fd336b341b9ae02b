"""Aggregation strategies as pure, typed functions on tensors (no I/O), like Flower's aggregate.py."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch


def site_weights(receipts: Mapping[str, Mapping], weighting: str) -> dict[str, float]:
    """Normalised weight of each site: by tokens trained, by sequences trained, or uniform."""
    if not receipts:
        return {}
    if weighting == "uniform":
        raw = {s: 1.0 for s in receipts}
    else:
        key = {"tokens": "tokens", "samples": "sequences"}[weighting]
        raw = {s: float(r[key]) for s, r in receipts.items()}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"aggregation weights sum to {total}; receipts report no {weighting}")
    return {s: w / total for s, w in sorted(raw.items())}


def weighted_sum(tensors: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i · t_i accumulated in fp32, in the given order (so results are reproducible).

    `tensors` may be a lazy iterable: only one of them needs to exist at a time.
    """
    acc = None
    it = iter(tensors)
    # No zip/enumerate: their reused result tuple would keep the previous tensor alive
    # while the next one is read.
    for w in weights:
        t = next(it, None)
        if t is None:
            raise ValueError(f"fewer tensors than the {len(weights)} weights")
        if acc is None:
            acc = torch.zeros(t.shape, dtype=torch.float32)
        acc.add_(t.to(torch.float32), alpha=float(w))
        del t
    if next(it, None) is not None:
        raise ValueError(f"more tensors than the {len(weights)} weights")
    if acc is None:
        raise ValueError("no tensors to sum")
    return acc


def fedavg(
    global_tensor: torch.Tensor, updates: Iterable[torch.Tensor], weights: Sequence[float], server_lr: float = 1.0
) -> torch.Tensor:
    """FedAvg on updates (local − global): global + server_lr · Σ w_i Δ_i, in the global's dtype."""
    step = weighted_sum(updates, weights)
    return (global_tensor.to(torch.float32) + server_lr * step).to(global_tensor.dtype)
