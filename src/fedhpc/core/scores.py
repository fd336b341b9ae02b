"""Pooling per-domain held-out scores into one token-weighted summary."""

from __future__ import annotations

import math

from fedhpc.core.files import finite_or_none


def summary_of(domains: dict[str, dict]) -> dict:
    """Token-weighted loss over `domains`, with perplexity and the floor where every domain has one."""
    total = sum(d["tokens"] for d in domains.values())
    if any(d["loss"] is None for d in domains.values()):
        loss = float("nan")
    else:
        loss = sum(d["loss"] * d["tokens"] for d in domains.values()) / max(total, 1)
    floors = [d.get("entropy_floor") for d in domains.values()]
    floor = (
        None
        if (not floors or None in floors)
        else sum(d["entropy_floor"] * d["tokens"] for d in domains.values()) / total
    )
    return {
        "loss": finite_or_none(loss),
        "perplexity": finite_or_none(math.exp(min(loss, 700))),
        "tokens": total,
        "entropy_floor": floor,
        "gap_to_floor": None if floor is None else finite_or_none(loss - floor),
    }
