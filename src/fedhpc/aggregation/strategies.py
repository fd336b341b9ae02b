"""Aggregation strategies as pure, typed functions on tensors (no I/O), like Flower's aggregate.py.

Three families compose into one aggregation (see aggregation/streaming.py for the streaming driver):
- site weights and their modifiers (tokens/samples, staleness decay, heterogeneity, domain cap);
- combine rules over the sites' (scaled) updates: weighted mean, coordinate-wise median,
  trimmed mean, Krum / Multi-Krum selection, and the per-site scale factors of norm clipping
  and layer-wise normalisation;
- server optimisers applied to the combined update Δ (the negative pseudo-gradient):
  FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad and DiLoCo's outer Nesterov SGD.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from fedhpc.config.tolerance import tolerance_problem  # noqa: F401  (re-exported: part of the strategy API)

# ----------------------------------------------------------------------------- weights


def site_weights(receipts: Mapping[str, Mapping], weighting: str) -> dict[str, float]:
    """Normalised weight of each site: by tokens trained, by sequences trained, or uniform."""
    if not receipts:
        return {}
    if weighting == "uniform":
        raw = {s: 1.0 for s in receipts}
    else:
        key = {"tokens": "tokens", "samples": "sequences"}[weighting]
        raw = {s: float(r[key]) for s, r in receipts.items()}
    return normalise(raw, what=f"receipts' {weighting}")


def normalise(raw: Mapping[str, float], what: str = "weights") -> dict[str, float]:
    total = sum(raw.values())
    if not raw:
        return {}
    if total <= 0 or not math.isfinite(total) or any(v < 0 for v in raw.values()):
        raise ValueError(f"aggregation weights from {what} sum to {total} (or are negative); cannot normalise")
    return {s: w / total for s, w in sorted(raw.items())}


def staleness_factor(staleness: int, decay: str, exponent: float = 0.5, hinge: int = 4) -> float:
    """Weight multiplier of an update built `staleness` rounds ago (FedAsync's decay functions).

    constant: 1; polynomial: (1 + s)^-a; hinge: 1 up to `hinge` rounds, then 1 / (a·(s − hinge) + 1);
    exponential: e^(−a·s).
    """
    s = max(0, int(staleness))
    if decay == "constant":
        return 1.0
    if decay == "polynomial":
        return (1.0 + s) ** (-exponent)
    if decay == "hinge":
        return 1.0 if s <= hinge else 1.0 / (exponent * (s - hinge) + 1.0)
    if decay == "exponential":
        return math.exp(-exponent * s)
    raise ValueError(f"unknown staleness decay {decay!r}")


def heterogeneity_coefficients(weights: Mapping[str, float], effort: Mapping[str, float]) -> dict[str, float]:
    """FedNova-style coefficients for sites that took different numbers of steps at different lrs.

    A site's update grows with its local effort a_i (Σ of its step learning rates): a site
    that trained with 4× the batch takes 4× fewer steps and moves ~4× less. Averaging raw
    updates then under-weights it and drifts towards the many-step sites. Normalising each
    update by a_i and rescaling by the mean effort τ = Σ p_i a_i gives coefficients
    p_i · τ / a_i (they sum to 1 only when efforts are equal).
    """
    if any(effort[s] <= 0 for s in weights):
        bad = sorted(s for s in weights if effort[s] <= 0)
        raise ValueError(f"sites {bad} report no training effort (steps × lr); cannot normalise their updates")
    tau = sum(p * effort[s] for s, p in weights.items())
    return {s: p * tau / effort[s] for s, p in sorted(weights.items())}


def cap_domain_share(
    weights: Mapping[str, float], mix: Mapping[str, Mapping[str, float]], cap: float, iterations: int = 200
) -> tuple[dict[str, float], dict[str, float]]:
    """Reweight sites so that no domain holds more than `cap` of the aggregate.

    `mix[site][domain]` is the fraction of the site's tokens from that domain. Sites heavy in
    an over-represented domain are scaled down (multiplicatively, proportional fitting) and the
    weights renormalised, until every domain's share is ≤ cap (or the best reachable when the
    sites' mixes make the cap infeasible). Returns (weights, domain shares).
    """
    w = dict(weights)
    domains = sorted({d for s in w for d in mix[s]})

    def shares(cur: Mapping[str, float]) -> dict[str, float]:
        return {d: sum(cur[s] * mix[s].get(d, 0.0) for s in cur) for d in domains}

    for _ in range(iterations):
        sh = shares(w)
        if max(sh.values(), default=0.0) <= cap + 1e-9:
            break
        factor = {d: min(1.0, cap / sh[d]) if sh[d] > 0 else 1.0 for d in domains}
        w = normalise({s: w[s] * sum(mix[s].get(d, 0.0) * factor[d] for d in domains) for s in w})
    return w, shares(w)


# ----------------------------------------------------------------------------- combine rules


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


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over dim 0 (sites); the mean of the two middle values when even."""
    n = stack.shape[0]
    ordered = stack.to(torch.float32).sort(dim=0).values
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, trim: int) -> torch.Tensor:
    """Coordinate-wise mean over dim 0 after dropping the `trim` smallest and `trim` largest values."""
    n = stack.shape[0]
    if n <= 2 * trim:
        raise ValueError(f"trimmed mean of {n} updates cannot drop {trim} from each end")
    ordered = stack.to(torch.float32).sort(dim=0).values
    return ordered[trim : n - trim].mean(dim=0)


def pairwise_sq_distances(gram: torch.Tensor) -> torch.Tensor:
    """‖x_i − x_j‖² from the Gram matrix G_ij = <x_i, x_j> (float64, clamped at 0)."""
    g = gram.to(torch.float64)
    d = torch.diag(g)
    return (d[:, None] + d[None, :] - 2 * g).clamp_min(0)


def krum_select(sq_dist: torch.Tensor, faulty: int, select: int = 1) -> list[int]:
    """Indices chosen by (Multi-)Krum: the `select` updates with the smallest score, where a
    score is the sum of squared distances to the n − f − 2 nearest other updates.
    Ties break by index, so the choice is deterministic."""
    n = sq_dist.shape[0]
    k = n - faulty - 2
    if n <= 2 * faulty + 2:
        raise ValueError(f"Krum needs n > 2f + 2 updates; got n = {n}, f = {faulty}")
    if not 1 <= select <= n - faulty:
        raise ValueError(f"Multi-Krum can select 1 … n − f = {n - faulty} updates, not {select}")
    scores = []
    for i in range(n):
        others = torch.cat([sq_dist[i, :i], sq_dist[i, i + 1 :]])
        scores.append(float(others.sort().values[:k].sum()))
    return sorted(sorted(range(n), key=lambda i: (scores[i], i))[:select])


def clip_factor(norm: float, clip: float | None) -> float:
    """Scale that brings an update of L2 norm `norm` within `clip` (1 when already inside)."""
    if clip is None or norm <= clip:
        return 1.0
    return clip / norm


def layerwise_scales(norms: Mapping[str, float], weights: Mapping[str, float]) -> dict[str, float]:
    """Scale each site's tensor to the weighted mean norm of that tensor across sites.

    No site then dominates a layer by the size of its step (sites with a hotter learning rate
    or a smaller batch move some layers far more); directions are kept. A zero update stays zero.
    """
    total = sum(weights[s] for s in norms)
    ref = sum(weights[s] * norms[s] for s in norms) / total if total > 0 else 0.0
    return {s: (ref / n if n > 0 else 0.0) for s, n in sorted(norms.items())}


# ----------------------------------------------------------------------------- server optimisers

# The state tensors each server optimiser keeps per model tensor (saved between rounds).
SERVER_STATE: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": (),
    "scaffold": ("control",),
    "fedavgm": ("momentum",),
    "diloco": ("momentum",),
    "fedadam": ("m", "v"),
    "fedyogi": ("m", "v"),
    "fedadagrad": ("m", "v"),
}

# Server learning rate and momentum when the config leaves them null (DiLoCo: Douillard et
# al. 2023; adaptive: Reddi et al. 2021 use η ≈ 10^-2 … 10^-1 with τ = 10^-3).
DEFAULT_SERVER_LR = {"diloco": 0.7, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.01}
DEFAULT_MOMENTUM = {"fedavgm": 0.9, "diloco": 0.9}


def fedavg(
    global_tensor: torch.Tensor, updates: Iterable[torch.Tensor], weights: Sequence[float], server_lr: float = 1.0
) -> torch.Tensor:
    """FedAvg on updates (local − global): global + server_lr · Σ w_i Δ_i, in the global's dtype."""
    step = weighted_sum(updates, weights)
    return (global_tensor.to(torch.float32) + server_lr * step).to(global_tensor.dtype)


def server_step(
    name: str,
    x: torch.Tensor,
    delta: torch.Tensor,
    state: Mapping[str, torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.9,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One server-optimiser step on combined update Δ (fp32). Returns (new x, new state).

    fedavg/fedprox/scaffold: x + η Δ.  fedavgm: m = μ m + Δ; x + η m.
    diloco: outer Nesterov SGD on g = −Δ: b = μ b + g; x − η (g + μ b).
    fedadam/fedyogi/fedadagrad (Reddi et al. 2021): m = β1 m + (1 − β1) Δ;
    v = β2 v + (1 − β2) Δ² | v − (1 − β2) Δ² sign(v − Δ²) | v + Δ²; x + η m / (√v + τ).
    Missing state tensors start at zero (round 0), except Yogi/Adagrad v at τ² as in the paper.
    """
    x32, d = x.to(torch.float32), delta.to(torch.float32)

    def prev(key: str, init: float = 0.0) -> torch.Tensor:
        t = state.get(key)
        # A copy: the in-place updates below must not touch the caller's state tensors.
        return t.to(torch.float32, copy=True) if t is not None else torch.full_like(d, init)

    if name in ("fedavg", "fedprox", "scaffold"):
        return torch.add(x32, d, alpha=lr), {}
    if name == "fedavgm":
        m = prev("momentum").mul_(momentum).add_(d)
        return x32 + lr * m, {"momentum": m}
    if name == "diloco":
        g = -d
        b = prev("momentum").mul_(momentum).add_(g)
        # The same operations as torch.optim.SGD(nesterov=True), so the two agree bit for bit.
        return x32.add(g.add(b, alpha=momentum), alpha=-lr), {"momentum": b}
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        m = prev("m").mul_(beta1).add_(d, alpha=1 - beta1)
        d2 = d * d
        if name == "fedadam":
            v = prev("v").mul_(beta2).add_(d2, alpha=1 - beta2)
        elif name == "fedyogi":
            v0 = prev("v", tau * tau)
            v = v0 - (1 - beta2) * d2 * torch.sign(v0 - d2)
        else:
            v = prev("v", tau * tau).add_(d2)
        return x32 + lr * m / (v.sqrt() + tau), {"m": m, "v": v}
    raise ValueError(f"unknown server optimiser {name!r}")
