"""Aggregation strategies as pure, typed functions on tensors (no I/O), like Flower's aggregate.py."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i · t_i accumulated in fp32, in the given order (so results are reproducible)."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"{len(tensors)} tensors and {len(weights)} weights")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for t, w in zip(tensors, weights):
        acc.add_(t.to(torch.float32), alpha=float(w))
    return acc


def fedavg(global_tensor: torch.Tensor, updates: Sequence[torch.Tensor], weights: Sequence[float],
           server_lr: float = 1.0) -> torch.Tensor:
    """FedAvg on updates (local − global): global + server_lr · Σ w_i Δ_i, in the global's dtype."""
    step = weighted_sum(updates, weights)
    return (global_tensor.to(torch.float32) + server_lr * step).to(global_tensor.dtype)
