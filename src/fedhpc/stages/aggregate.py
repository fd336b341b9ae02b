"""One round's aggregation: weights from receipts, the configured strategy, server state and privacy."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhpc.aggregation import strategies as st
from fedhpc.aggregation.privacy import PrivacyLedger
from fedhpc.aggregation.streaming import Combine, ServerOpt, SiteInput, aggregate
from fedhpc.config.federation import Config
from fedhpc.config.strategy import StrategyConfig
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import clear_stale_parts, read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.data.catalogue import load_data
from fedhpc.stages.context import Ctx
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.checkpoints import load_global_meta
from fedhpc.trust.signing import COORDINATOR, TrustStore


class AggregationError(FedhpcError, RuntimeError):
    """The inputs of aggregation are not the ones verification accepted, or cannot meet the strategy."""


def server_opt(s: StrategyConfig) -> ServerOpt:
    return ServerOpt(
        name=s.name,
        lr=s.server_lr if s.server_lr is not None else st.DEFAULT_SERVER_LR.get(s.name, 1.0),
        momentum=s.momentum if s.momentum is not None else st.DEFAULT_MOMENTUM.get(s.name, 0.9),
        beta1=s.beta1,
        beta2=s.beta2,
        tau=s.tau,
    )


def effort(receipt: dict) -> float:
    """Σ of the learning rates of a site's local steps (its receipt's `lr_sum`)."""
    if "lr_sum" in receipt:
        return float(receipt["lr_sum"])
    return float(receipt["steps"]) * (float(receipt["lr_first"]) + float(receipt["lr_last"])) / 2


def domain_mix(receipts: dict[str, dict], manifest: dict) -> dict[str, dict[str, float]]:
    """Fraction of each site's round tokens per data domain, from the shards it trained on."""
    shards = {s["id"]: s for s in manifest["shards"]}
    mix = {}
    for site, rec in receipts.items():
        tokens: dict[str, float] = {}
        for sid in rec["shards"]:
            tokens[shards[sid]["domain"]] = tokens.get(shards[sid]["domain"], 0.0) + shards[sid]["tokens"]
        total = sum(tokens.values()) or 1.0
        mix[site] = {d: t / total for d, t in sorted(tokens.items())}
    return mix


def round_weights(
    s: StrategyConfig, r: int, receipts: dict[str, dict], mix: dict[str, dict[str, float]] | None
) -> tuple[dict[str, float], dict[str, float], dict]:
    """(normalised weights p_i, mean coefficients, explanation) for the accepted sites of round r."""
    why: dict = {"base": st.site_weights(receipts, s.weighting)}
    decay = {
        site: st.staleness_factor(
            r - int(rec.get("base_round", r)), s.staleness.decay, s.staleness.exponent, s.staleness.hinge
        )
        for site, rec in receipts.items()
    }
    p = st.normalise({site: why["base"][site] * decay[site] for site in receipts}) if receipts else {}
    why["staleness"] = {site: r - int(rec.get("base_round", r)) for site, rec in receipts.items()}
    if s.domain_cap is not None and mix:
        p, shares = st.cap_domain_share(p, mix, s.domain_cap)
        why["domain_shares"] = shares
    coef = dict(p)
    if s.heterogeneity_aware and receipts:
        efforts = {site: effort(rec) for site, rec in receipts.items()}
        coef = st.heterogeneity_coefficients(p, efforts)
        why["effort"] = efforts
    return p, coef, why


def _verified_receipt(path, sha: str | None, r: int) -> dict:
    """A receipt, refused if it changed after verification: its token count sets the site's weight."""
    if sha is not None and sha256_file(path) != sha:
        raise AggregationError(f"{path} changed after verification; refusing to aggregate round {r}")
    return read_json(path)


def aggregate_round(
    cfg: Config, layout: RunLayout, r: int, base: dict, trust: TrustStore | None = None, threads: int = 1
) -> dict:
    """The configured strategy over the accepted updates → rounds/r/candidate/model.safetensors
    (+ server state when the server optimiser keeps any)."""
    s = cfg.strategy
    verdicts = read_json(layout.verdicts(r))
    got = _contributions(cfg, layout, trust, r, verdicts)
    receipts, paths = got.receipts, got.paths
    contributors = sorted(receipts)
    mix = None
    if s.domain_cap is not None and receipts:
        mix = domain_mix(receipts, load_data(layout, trust, sorted({rec["site"] for rec in receipts.values()})))
    weights, coef, why = round_weights(s, r, receipts, mix)
    combine = _combine(s, trust, got.secure if contributors else None)
    opt = server_opt(s)
    keeps_state = bool(st.SERVER_STATE[s.name])
    inputs = [
        SiteInput(
            site,
            paths[site],
            weights[site],
            coef[site],
            paths[site].with_name("control.safetensors") if s.name == "scaffold" else None,
        )
        for site in contributors
    ]
    comm = _mpi_comm(s.ranks)
    if comm is None or comm.Get_rank() == 0:
        # An aggregation killed mid-write leaves temporaries Snakemake does not know about.
        clear_stale_parts(layout.candidate(r).parent)
    if comm is not None:
        comm.Barrier()
    res = aggregate(
        layout.global_model(r),
        inputs,
        layout.candidate(r),
        server=opt,
        combine=combine,
        state_in=layout.server_state(r) if keeps_state else None,
        state_out=layout.candidate_state(r) if keeps_state else None,
        control_scale=1.0 / len(cfg.sites),
        chunk_bytes=int(s.chunk_mb * (1 << 20)),
        metadata={"run": cfg.run, "round": str(r), "source": s.name},
        comm=comm,
        workers=_workers(threads, comm),
    )
    if comm is not None and comm.Get_rank() != 0:
        return {}
    ledger, epsilon = _account_privacy(layout, r, s, noised=s.privacy.noise_multiplier > 0 and bool(contributors))
    record = {
        "round": r,
        "strategy": s.name,
        "rule": s.rule,
        "weighting": s.weighting,
        "server_lr": opt.lr,
        "weights": weights,
        "coefficients": res.coefficients,
        "weights_explained": why,
        "selected": res.selected,
        "norms": res.norms,
        "clip_factors": res.scales,
        "noise_std": res.noise_std,
        "privacy": {"epsilon": epsilon, "delta": s.privacy.delta, "rounds_noised": len(ledger.steps)}
        if ledger.steps
        else None,
        "update_bytes": {site: paths[site].stat().st_size for site in contributors},
        "excluded": verdicts["rejected"],
        "missing": read_json(layout.arrivals(r))["missing"],
        "base_sha256": base["sha256"],
        "output_sha256": sha256_file(layout.candidate(r)),
        "bytes_read": res.bytes_read,
        "seconds": res.seconds,
        "ranks": comm.Get_size() if comm is not None else 1,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "late": sorted(got.late),
        "secure_aggregation": {"survivors": list(got.secure.survivors), "pairs_unmasked": len(got.secure.corrections)}
        if got.secure is not None
        else None,
        "note": None if contributors else "no accepted updates: the candidate equals the base model",
    }
    write_json(layout.aggregate_record(r), record)
    AuditLog(layout.audit).append(
        "round.aggregated",
        round=r,
        strategy=s.name,
        rule=s.rule,
        weights=weights,
        selected=res.selected,
        excluded=sorted(verdicts["rejected"]),
        output_sha256=record["output_sha256"],
        epsilon=epsilon,
    )
    return record


@dataclass
class Contributions:
    """What a round aggregates: each contributor's receipt and update file (late ones under
    their labels), which late updates joined, and secure aggregation's unmasking."""

    receipts: dict[str, dict]
    paths: dict[str, Path]
    late: dict[str, dict]
    secure: Any = None


def _contributions(cfg: Config, layout: RunLayout, trust: TrustStore | None, r: int, verdicts: dict) -> Contributions:
    """The accepted updates (with secure aggregation: the survivors the recovery unmasks), each
    still the file that was verified, enough for the combine rule, plus accepted late updates."""
    s = cfg.strategy
    accepted = sorted(verdicts["accepted"])
    secure = None
    if s.secure_aggregation.enabled:
        # Only the survivors the recovery unmasks are summed (all accepted, or none when too few).
        from fedhpc.aggregation.secure import secure_sum
        from fedhpc.core.tensorfile import read_specs

        if trust is None:
            raise AggregationError("secure aggregation needs the trust store to check the recovery's signature")
        secure = secure_sum(layout, trust, r, read_specs(layout.global_model(r)))
        accepted = [site for site in accepted if site in secure.survivors]
    for site in accepted:
        _still_verified(layout.update(r, site), verdicts["update_sha256"][site], r)
    if accepted and (why := st.tolerance_problem(s.rule, len(accepted), s.faulty_sites, s.multikrum_select)):
        raise AggregationError(
            f"round {r}: {len(accepted)} accepted updates ({', '.join(accepted)}) are too few for strategy.rule "
            f"{s.rule!r} with strategy.faulty_sites = {s.faulty_sites}: {why}"
        )
    receipts = {
        site: _verified_receipt(layout.receipt(r, site), verdicts.get("receipt_sha256", {}).get(site), r)
        for site in accepted
    }
    # Late updates of earlier rounds join with their own receipts (base_round < r: decayed weight).
    late = verdicts.get("late_accepted", {})
    for label, item in sorted(late.items()):
        _still_verified(layout.update(item["round"], item["site"]), item["update_sha256"], r)
        receipts[label] = _verified_receipt(layout.receipt(item["round"], item["site"]), item.get("receipt_sha256"), r)
    paths = {site: layout.update(r, site) for site in accepted}
    paths.update({label: layout.update(item["round"], item["site"]) for label, item in late.items()})
    return Contributions(receipts, paths, late, secure)


def _still_verified(path: Path, sha256: str, r: int) -> None:
    """The update file must still be the one that was verified: nothing may swap it in between."""
    if sha256_file(path) != sha256:
        raise AggregationError(f"{path} changed after verification; refusing to aggregate round {r}")


def _combine(s: StrategyConfig, trust: TrustStore | None, secure) -> Combine:
    """The combine rule with its clipping, and differential privacy's noise seeded from the
    coordinator's key."""
    dp = s.privacy
    clip = s.clip_norm
    if dp.noise_multiplier > 0:
        clip = dp.clip_norm if clip is None else min(clip, dp.clip_norm)
    noise_key = b""
    if dp.noise_multiplier > 0:
        if trust is None:
            raise AggregationError("differential privacy needs the coordinator's key to seed its noise")
        noise_key = hashlib.blake2b(trust.private_key(COORDINATOR).private_bytes_raw(), person=b"fedhpc-dp").digest()
    return Combine(
        rule=s.rule,
        faulty=s.faulty_sites,
        select=s.multikrum_select,
        clip=clip,
        layerwise=s.layerwise_norm,
        noise_multiplier=dp.noise_multiplier,
        noise_key=noise_key,
        secure=secure,
    )


def _account_privacy(layout: RunLayout, r: int, s: StrategyConfig, noised: bool) -> tuple[PrivacyLedger, float | None]:
    """The privacy ledger carried to the candidate's server meta (one more noised step when this
    round added noise) and the (epsilon at delta) it spends so far."""
    prev_meta = read_json(layout.server_meta(r)) if layout.server_meta(r).exists() else {}
    ledger = PrivacyLedger.from_json(prev_meta["privacy"]) if prev_meta.get("privacy") else PrivacyLedger(steps=[])
    if noised:
        # Every configured site takes part in every round: no amplification by sampling (q = 1).
        ledger.record(s.privacy.noise_multiplier, 1.0)
    epsilon = ledger.epsilon(s.privacy.delta)[0] if ledger.steps else None
    write_json(
        layout.candidate_meta(r),
        {"optimizer": s.name, "rounds": prev_meta.get("rounds", 0) + 1, "privacy": ledger.to_json()},
    )
    return ledger, epsilon


def _workers(threads: int, comm) -> int:
    """Threads of this process: Slurm gives each rank its own CPUs; elsewhere ranks share the node's."""
    if "SLURM_CPUS_PER_TASK" in os.environ:
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(1, threads // (comm.Get_size() if comm is not None else 1))


def _mpi_comm(ranks: int):
    """COMM_WORLD when this process runs as one of several MPI ranks, else None (serial)."""
    if ranks <= 1 and not any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return None
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


def run(ctx: Ctx, r: int, threads: int = 1) -> dict | None:
    """The aggregate stage: round r's candidate from its accepted updates; returns aggregate.json
    (on rank 0 of an MPI aggregation, or the only process; None on the other ranks)."""
    return aggregate_round(
        ctx.cfg, ctx.layout, r, load_global_meta(ctx.layout, ctx.trust, r), ctx.trust, threads=threads
    )
