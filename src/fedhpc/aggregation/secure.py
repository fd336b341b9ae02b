"""Secure aggregation on the blackboard: masked updates, seed reveals for dropped sites, recovery.

Sites mask their update at publish time, survivors reveal the seeds they shared with dropped
sites, the coordinator checks the reveals and hands the aggregator what it needs to unmask the
survivors' sum (`aggregation/masking.py` holds the arithmetic).

Round r: the signed plan lists the committed sites; each masks with every other one (seeds by
X25519, `trust/agreement.py`) and commits to those seeds in its signed receipt. After verification
the coordinator signs `secagg/request.json` (survivors = accepted updates, dropped = the other
committed sites); each survivor checks the request and signs `secagg/reveal-<site>.json` with
the seeds of its pairs with dropped sites only, which must match its own commitments; the
coordinator signs `secagg/recovery.json` for the aggregator.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np
import torch

from fedhpc.aggregation import masking as secagg
from fedhpc.aggregation.masking import SecureAggregationError
from fedhpc.config.federation import Config
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.core.tensorfile import TensorSpec
from fedhpc.trust.agreement import agreement_key, pair_seed, peer_public, seed_commitment
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.checkpoints import load_plan
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore, sign_document, verify_document

SCHEME = "pairwise-masks-v1"


def site_weight(cfg: Config, plan: dict, tokens: int, sequences: int) -> float:
    """The factor a site multiplies its update by before masking: its weighting basis over a constant
    every party knows from the plan, so Σ masked / Σ weights is the weighted mean of the plain updates."""
    how = cfg.strategy.weighting
    if how == "uniform":
        return 1.0 / max(1, len(plan["participants"]))
    total = max(1, int(plan.get("tokens") or 0))
    return tokens / total if how == "tokens" else sequences * cfg.model.seq_len / total


def pair_seeds(cfg: Config, trust: TrustStore, r: int, site: str, peers: list[str]) -> dict[str, bytes]:
    mine = agreement_key(trust.private_key(site))
    return {p: pair_seed(mine, peer_public(trust, p), cfg.run, r, site, p) for p in peers if p != site}


def masked_update(
    cfg: Config, trust: TrustStore, plan: dict, site: str, update: dict[str, torch.Tensor], tokens: int, sequences: int
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """(masked tensors (int64), metadata entries, receipt fields) of a site's fp32 update."""
    sa = cfg.strategy.secure_aggregation
    r, peers = int(plan["round"]), sorted(plan["participants"])
    seeds = pair_seeds(cfg, trust, r, site, peers)
    weight = site_weight(cfg, plan, tokens, sequences)
    offsets = secagg.element_offsets({k: tuple(v.shape) for k, v in update.items()})
    tensors, sq = {}, 0.0
    for name in sorted(update):
        x = update[name].detach().to("cpu", torch.float32).reshape(-1)
        sq += float((x.double() ** 2).sum())
        enc = secagg.encode(x.numpy(), weight, sa.fraction_bits, len(peers))
        masked = secagg.add_masks(enc, seeds, site, offsets[name])
        tensors[name] = torch.from_numpy(masked.view(np.int64)).reshape(update[name].shape)
    declared = {
        "scheme": SCHEME,
        "weight": weight,
        "norm": math.sqrt(sq),  # declared by the site: the coordinator cannot measure a masked update
        "fraction_bits": sa.fraction_bits,
        "peers": peers,
        "commitments": {p: seed_commitment(s) for p, s in sorted(seeds.items())},
    }
    return (
        tensors,
        {"secure_aggregation": SCHEME, "fraction_bits": str(sa.fraction_bits)},
        {"secure_aggregation": declared},
    )


def check_masked(
    cfg: Config, plan: dict, site: str, receipt: dict, meta: dict, got: dict, global_specs: dict
) -> tuple[float | None, str | None]:
    """(declared norm, None) for a well-formed masked update of this round, or (None, reason)."""
    on = cfg.strategy.secure_aggregation.enabled
    masked = meta.get("secure_aggregation") == SCHEME
    if on != masked:
        return None, (
            "secure aggregation is on, but the update is not masked (it would be exposed)"
            if on
            else "the update is masked, but secure aggregation is off"
        )
    if got != {n: TensorSpec("I64", s.shape) for n, s in global_specs.items()}:
        return None, "masked tensors do not match the global model's names and shapes (as I64)"
    d = receipt.get("secure_aggregation")
    if not isinstance(d, dict):
        return None, "receipt declares no secure-aggregation fields"
    peers = sorted(plan["participants"])
    want_w = site_weight(cfg, plan, receipt["tokens"], int(receipt.get("sequences", 0)))
    problems = [
        (d.get("scheme") != SCHEME, f"scheme {d.get('scheme')!r}"),
        (d.get("peers") != peers, f"masked with {d.get('peers')}, but the plan committed {peers}"),
        (d.get("fraction_bits") != cfg.strategy.secure_aggregation.fraction_bits, "other fraction_bits"),
        (
            not isinstance(d.get("commitments"), dict) or sorted(d["commitments"]) != [p for p in peers if p != site],
            "no seed commitment for every other committed site",
        ),
        (
            not isinstance(d.get("weight"), float | int) or not math.isclose(d["weight"], want_w, rel_tol=1e-12),
            f"weight {d.get('weight')!r} is not what its tokens give ({want_w:.6g})",
        ),
        (
            not isinstance(d.get("norm"), float | int) or not 0 <= d["norm"] < math.inf,
            f"declared norm {d.get('norm')!r}",
        ),
    ]
    bad = [why for wrong, why in problems if wrong]
    if bad:
        return None, "secure aggregation: " + "; ".join(bad)
    return float(d["norm"]), None


# ---------------------------------------------------------------- dropout recovery


def _request(cfg: Config, layout: RunLayout, trust: TrustStore, r: int) -> dict:
    path = layout.secagg_request(r)
    doc = read_json(path, max_bytes=1 << 20)
    verify_document(doc, trust, COORDINATOR, str(path))
    if doc.get("run") != cfg.run or doc.get("round") != r:
        raise SecureAggregationError(f"{path}: is for run {doc.get('run')!r} round {doc.get('round')!r}")
    return doc


def reveal_seeds(cfg: Config, layout: RunLayout, trust: TrustStore, r: int, site: str) -> dict:
    """Site `site`'s answer to the coordinator's request: the seeds it shared with the dropped sites,
    after checking the request could not unmask anyone but them."""

    req = _request(cfg, layout, trust, r)
    committed = sorted(load_plan(layout, trust, r)["participants"])
    survivors, dropped = req.get("survivors"), req.get("dropped")
    min_sites = cfg.strategy.secure_aggregation.min_sites
    refuse = [
        (site not in (survivors or []), f"{site!r} is not among the survivors"),
        (sorted((survivors or []) + (dropped or [])) != committed, "survivors and dropped are not the committed sites"),
        (len(survivors or []) < min_sites, f"fewer than {min_sites} survivors: their sum would expose them"),
    ]
    # A second request naming other dropped sites would, with the first, unmask more: one answer per round,
    # remembered where only the site writes.
    record = layout.site_state(site) / f"secagg-reveal-r{r:04d}.json"
    if record.exists() and read_json(record).get("dropped") != sorted(dropped or []):
        refuse.append((True, f"it already revealed for {read_json(record).get('dropped')} in this round"))
    if bad := [why for wrong, why in refuse if wrong]:
        raise SecureAggregationError(f"{site} refuses to reveal seeds for round {r}: {'; '.join(bad)}")
    write_json(record, {"round": r, "dropped": sorted(dropped)})
    seeds = pair_seeds(cfg, trust, r, site, sorted(dropped))
    doc = {
        "run": cfg.run,
        "round": r,
        "site": site,
        "dropped": sorted(dropped),
        "seeds": {j: base64.b64encode(seeds[j]).decode() for j in sorted(dropped)},
    }
    doc = sign_document(doc, site, trust.private_key(site))
    write_json(layout.secagg_reveal(r, site), doc)
    AuditLog(layout.audit).append("secagg.revealed", round=r, site=site, dropped=sorted(dropped))
    return doc


def _checked_reveal(layout: RunLayout, trust: TrustStore, r: int, site: str, dropped: list[str], receipt: dict):
    path = layout.secagg_reveal(r, site)
    try:
        doc = read_json(path, max_bytes=1 << 20)
        verify_document(doc, trust, site, str(path))
    except (FileNotFoundError, ValueError, SignatureError) as exc:
        raise SecureAggregationError(f"round {r}: no valid seed reveal from {site} ({exc})") from None
    commitments = receipt["secure_aggregation"]["commitments"]
    seeds = doc.get("seeds") if isinstance(doc.get("seeds"), dict) else {}
    out = []
    for j in dropped:
        try:
            seed = base64.b64decode(str(seeds.get(j)), validate=True)
        except ValueError:
            seed = b""
        if seed_commitment(seed) != commitments.get(j):
            raise SecureAggregationError(
                f"round {r}: {site}'s revealed seed for its pair with {j} does not match the commitment in its "
                "receipt; the survivors' sum cannot be unmasked"
            )
        out.append({"site": site, "peer": j, "sign": secagg.pair_sign(site, j), "seed": seeds[j]})
    return out


def recover(cfg: Config, layout: RunLayout, trust: TrustStore, r: int) -> dict:
    """The coordinator's side: request reveals for the dropped sites, check them, sign the recovery.

    With the sites on this machine or cluster (exchange.kind 'local'), each survivor's reveal is
    made here with that survivor's own key, as its own signed document.
    """

    sa = cfg.strategy.secure_aggregation
    committed = sorted(load_plan(layout, trust, r)["participants"])
    accepted = sorted(read_json(layout.verdicts(r))["accepted"])
    survivors = accepted if len(accepted) >= sa.min_sites else []
    dropped = [s for s in committed if s not in survivors]
    note = None
    if accepted and not survivors:
        note = f"{len(accepted)} accepted update(s), fewer than min_sites {sa.min_sites}: nothing is summed"
    request = {"run": cfg.run, "round": r, "survivors": survivors, "dropped": dropped}
    write_json(layout.secagg_request(r), sign_document(request, COORDINATOR, trust.private_key(COORDINATOR)))
    audit = AuditLog(layout.audit)
    audit.append("secagg.requested", round=r, survivors=survivors, dropped=dropped, note=note)
    receipts = {s: read_json(layout.receipt(r, s)) for s in survivors}
    corrections = []
    if survivors and dropped:
        for site in survivors:
            reveal_seeds(cfg, layout, trust, r, site)  # the site's act, with the site's key
            corrections += _checked_reveal(layout, trust, r, site, dropped, receipts[site])
    weight_sum = sum(float(rec["secure_aggregation"]["weight"]) for rec in receipts.values())
    doc = {
        "run": cfg.run,
        "round": r,
        "survivors": survivors,
        "dropped": dropped,
        "weight_sum": weight_sum,
        "fraction_bits": sa.fraction_bits,
        "corrections": corrections,
        "note": note,
    }
    write_json(layout.secagg_recovery(r), sign_document(doc, COORDINATOR, trust.private_key(COORDINATOR)))
    audit.append("secagg.recovered", round=r, survivors=survivors, dropped=dropped, pairs_revealed=len(corrections))
    return doc


@dataclass(frozen=True)
class SecureSum:
    """What the aggregator needs to turn the survivors' masked updates into their weighted mean."""

    fraction_bits: int
    weight_sum: float
    corrections: tuple[tuple[bytes, int], ...]
    offsets: dict[str, int]
    survivors: tuple[str, ...]


def secure_sum(layout: RunLayout, trust: TrustStore, r: int, specs: dict[str, TensorSpec]) -> SecureSum:
    path = layout.secagg_recovery(r)
    doc = read_json(path, max_bytes=64 << 20)
    verify_document(doc, trust, COORDINATOR, str(path))
    return SecureSum(
        fraction_bits=int(doc["fraction_bits"]),
        weight_sum=float(doc["weight_sum"]),
        corrections=tuple((base64.b64decode(c["seed"]), int(c["sign"])) for c in doc["corrections"]),
        offsets=secagg.element_offsets({n: s.shape for n, s in specs.items()}),
        survivors=tuple(doc["survivors"]),
    )


def masked_sum_range(sec: SecureSum, parts, name: str, a: int) -> torch.Tensor:
    """Weighted mean of the plain updates over elements [a, a+n) of tensor `name`, from the survivors'
    masked ranges (`parts`: uint64 arrays), as fp32."""
    total = secagg.modular_sum(parts)
    plain = secagg.remove_masks(total, sec.corrections, sec.offsets[name] + a)
    return torch.from_numpy(secagg.decode(plain, sec.fraction_bits, sec.weight_sum).astype(np.float32))
