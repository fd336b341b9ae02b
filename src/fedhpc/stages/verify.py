"""Verification of every published update before it may reach the aggregate."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from pathlib import Path

import torch

from fedhpc.aggregation.compress import CompressionError, codec_from_metadata
from fedhpc.aggregation.streaming import UpdateFile, expected_specs
from fedhpc.config.federation import Config, VerificationConfig
from fedhpc.core.documents import check_document
from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.core.tensorfile import TensorFileError, TensorSpec, read_header, read_metadata, read_specs
from fedhpc.stages.context import Ctx
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.checkpoints import load_global_meta
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore, sign_document, verify_document


def check_update(
    layout: RunLayout,
    trust: TrustStore,
    run: str,
    r: int,
    site: str,
    base: dict,
    v: VerificationConfig,
    cfg: Config | None = None,
) -> dict:
    """Checks one site's update on its own. Returns {"reasons": [...], "flags": [...], ...stats}.

    `cfg` (the whole config) is needed for masked updates (strategy.secure_aggregation)."""
    out: dict = {"site": site, "reasons": [], "flags": []}
    path = layout.receipt(r, site)
    try:
        receipt = read_json(path, max_bytes=MAX_RECEIPT)
        verify_document(receipt, trust, site, f"receipt of {site}")
        check_document("receipt", receipt, f"receipt of {site}")
    except (ValueError, SignatureError) as exc:  # DocumentError is a ValueError
        out["reasons"].append(f"receipt: {exc}")
        return out
    out["receipt_sha256"] = sha256_file(path)
    for key, want in (("run", run), ("round", r), ("site", site)):
        if receipt.get(key) != want:
            out["reasons"].append(
                f"receipt is for {key} {receipt.get(key)!r}, expected {want!r} (replayed or misplaced)"
            )
    if receipt.get("base_sha256") != base["sha256"]:
        out["reasons"].append("update was trained on a different global model (stale or wrong base)")
    if out["reasons"]:
        return out
    if (claim := _plan_claim(layout, r, site, receipt)) is not None:
        out["reasons"].append(claim)
        return out
    update = layout.update(r, site)
    if not update.exists():
        out["reasons"].append("update.safetensors is missing")
        return out
    if sha256_file(update) != receipt.get("update_sha256"):
        out["reasons"].append("update.safetensors does not match the sha256 in its receipt (corrupt or tampered)")
        return out
    out["update_sha256"] = receipt["update_sha256"]
    if receipt.get("control_sha256") is not None and (
        not layout.control_update(r, site).exists()
        or sha256_file(layout.control_update(r, site)) != receipt["control_sha256"]
    ):
        out["reasons"].append("control.safetensors does not match the sha256 in its receipt (corrupt or tampered)")
        return out
    try:
        got, want, meta = read_specs(update), read_specs(layout.global_model(r)), read_metadata(update)
        codec = codec_from_metadata(meta)
    except (TensorFileError, CompressionError) as exc:
        out["reasons"].append(str(exc))
        return out
    out["content_sha256"] = content_sha256(update)
    if "secure_aggregation" in meta or (cfg is not None and cfg.strategy.secure_aggregation.enabled):
        norm, why = _masked_norm(cfg, layout, r, site, receipt, meta, got, want)
        if why:
            out["reasons"].append(why)
            return out
        out["norm"] = norm
        out["flags"].append("norm declared by the site: a masked update cannot be measured (secure aggregation)")
        return _receipt_checks(out, receipt, layout, r, site, v)
    expected = expected_specs(want, codec)
    if got != expected and not (codec.scheme == "none" and got == want):
        diff = (
            sorted(set(got) ^ set(expected))[:3]
            + [
                f"{k}: {got[k]} vs expected {expected[k]}"
                for k in sorted(set(got) & set(expected))
                if got[k] != expected[k]
            ][:3]
        )
        out["reasons"].append(
            "tensor names/shapes/dtypes differ from the global model"
            + (f" (compression {codec.scheme})" if codec.scheme != "none" else "")
            + f": {'; '.join(map(str, diff))}"
        )
        return out
    try:
        sq, bad = update_sq_norm(update, want)
    except (ValueError, RuntimeError, IndexError) as exc:  # a decode of hostile indices or values
        out["reasons"].append(f"update cannot be decoded: {exc}")
        return out
    if bad is not None or not math.isfinite(sq):
        out["reasons"].append(f"tensor {bad} has NaN or Inf values" if bad else "update norm overflows")
        return out
    out["norm"] = math.sqrt(sq)
    return _receipt_checks(out, receipt, layout, r, site, v)


def _masked_norm(cfg, layout, r, site, receipt, meta, got, want) -> tuple[float | None, str | None]:
    if cfg is None:
        return None, "the update is masked, but secure aggregation is off"
    from fedhpc.aggregation.secure import check_masked

    return check_masked(cfg, read_json(layout.plan(r)), site, receipt, meta, got, want)


def _receipt_checks(out: dict, receipt: dict, layout: RunLayout, r: int, site: str, v: VerificationConfig) -> dict:
    """The checks on what the site reports (norm cap, local losses, training curve)."""
    out["steps"] = int(receipt.get("steps", 0))
    out["tokens"] = int(receipt.get("tokens", 0))
    if v.max_update_norm is not None and out["norm"] > v.max_update_norm:
        out["reasons"].append(
            f"update norm {out['norm']:.4g} exceeds verification.max_update_norm {v.max_update_norm:g}"
        )
    before, after = receipt.get("loss_before"), receipt.get("loss_after")
    out.update(loss_before=before, loss_after=after)
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (before, after)):
        out["reasons"].append(f"receipt reports non-finite local losses ({before}, {after})")
    elif after > before * v.divergence_ratio:
        out["reasons"].append(f"diverged: local held-out loss rose from {before:.4f} to {after:.4f}")
    elif after >= before:
        msg = f"underfitting: local held-out loss did not improve ({before:.4f} → {after:.4f})"
        (out["reasons"] if v.reject_underfit else out["flags"]).append(msg)
    curve = curve_anomaly(layout.metrics(r, site), v.loss_spike_ratio)
    if curve is not None:
        out["reasons"].append(curve)
    return out


MAX_RECEIPT = 1 << 20


def content_sha256(path: Path) -> str:
    """Hash of an update's tensors alone (names, dtypes, shapes and data, not the metadata), so a
    copy re-saved under another site's metadata is still recognised as the same update."""
    header = read_header(path)
    h = hashlib.sha256(repr(sorted((k, v.dtype, v.shape) for k, v in header.specs.items())).encode())
    with open(path, "rb") as fh:
        fh.seek(header.data_start)
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _plan_claim(layout: RunLayout, r: int, site: str, receipt: dict) -> str | None:
    """What a receipt claims beyond its plan entry: other shards, or more tokens than planned
    (weights follow the claimed tokens, so an inflated count would buy a site the aggregate)."""
    entry = read_json(layout.plan(r))["sites"].get(site)
    if entry is None:
        return f"site {site!r} was not planned in round {r}"
    if sorted(receipt["shards"]) != sorted(entry["shards"]):
        return f"receipt names shards {receipt['shards'][:5]} but the plan gave {entry['shards'][:5]}"
    planned = entry.get("tokens")
    if isinstance(planned, int) and receipt["tokens"] > planned:
        return f"receipt claims {receipt['tokens']} tokens trained; the plan gave {planned}"
    return None


MAX_METRICS = 64 << 20


def curve_anomaly(metrics: Path, spike_ratio: float) -> str | None:
    """What is wrong with a site's training curve (a NaN/Inf loss, or a spike), or None.

    A loss more than `spike_ratio` × the median of the (up to 5) records before it is a
    spike: a blow-up the final held-out numbers can hide when the run recovered by luck.
    """
    if not metrics.exists():
        return None
    losses = []
    if metrics.stat().st_size > MAX_METRICS:
        return f"training curve: metrics.jsonl has {metrics.stat().st_size} bytes (more than {MAX_METRICS})"
    for line in metrics.read_bytes().splitlines():
        try:
            rec = json.loads(line)  # NaN and Infinity allowed: a diverged loss is logged as such
        except (ValueError, RecursionError):
            continue  # a torn last line of a killed job
        if not isinstance(rec, dict):
            return "training curve: a record is not a JSON object"
        loss = rec.get("loss")
        if loss is None:
            return f"training curve: step {rec.get('step')} logged no finite loss"
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return f"training curve: loss {loss} at step {rec.get('step')}"
        recent = sorted(losses[-5:])
        if recent:
            median = (recent[(len(recent) - 1) // 2] + recent[len(recent) // 2]) / 2
            if loss > spike_ratio * median:
                return (
                    f"training curve: loss spiked to {loss:.4g} at step {rec.get('step')} (median before {median:.4g})"
                )
        losses.append(float(loss))
    return None


def update_sq_norm(update: Path, global_specs: dict[str, TensorSpec], chunk: int = 1 << 22) -> tuple[float, str | None]:
    """(squared L2 norm of the decoded update in float64, name of the first tensor holding NaN/Inf or None)."""
    u = UpdateFile(update)
    try:
        sq = 0.0
        for name, spec in global_specs.items():
            n = math.prod(spec.shape)
            for a in range(0, n, chunk):
                t = u.read(name, n, a, min(n, a + chunk)).to(torch.float64)
                if not torch.isfinite(t).all():
                    return math.nan, name
                sq += float((t * t).sum())
        return sq, None
    finally:
        u.close()


def outlier_scores(stats: dict[str, float], min_scale: float) -> dict[str, float]:
    """Robust z-score of each value: distance to the median over max(1.4826·MAD, min_scale)."""
    med = statistics.median(stats.values())
    mad = statistics.median(abs(x - med) for x in stats.values())
    scale = max(1.4826 * mad, min_scale)
    return {k: abs(x - med) / scale for k, x in stats.items()}


def verify_round(cfg: Config, layout: RunLayout, trust: TrustStore, r: int, base: dict) -> dict:
    arrivals = read_json(layout.arrivals(r))
    v = cfg.verification
    checks = {s: check_update(layout, trust, cfg.run, r, s, base, v, cfg) for s in arrivals["arrived"]}
    seen = accepted_before(layout, r)
    _mark_duplicates(checks, seen)
    passing = {s: c for s, c in checks.items() if not c["reasons"]}
    # Norm per sqrt(step): sites that take more steps legitimately move further.
    stat = {s: math.log(max(c["norm"], 1e-30) / math.sqrt(max(c["steps"], 1))) for s, c in passing.items()}
    if len(stat) >= 3:
        for s, z in outlier_scores(stat, v.min_log_scale).items():
            checks[s]["outlier_z"] = z
            if z > v.outlier_z:
                checks[s]["reasons"].append(
                    f"outlier: update norm {checks[s]['norm']:.4g} is {z:.1f} robust deviations from the other sites"
                )
    else:
        for s in stat:
            checks[s]["flags"].append(f"outlier screen skipped: {len(stat)} updates (needs 3)")
    audit = AuditLog(layout.audit)
    summary = {
        "round": r,
        "accepted": [],
        "rejected": {},
        "update_sha256": {},
        "receipt_sha256": {},
        "content_sha256": {},
    }
    for site, c in sorted(checks.items()):
        verdict = {"round": r, "site": site, "accepted": not c["reasons"], **c}
        write_json(layout.verdict(r, site), sign_document(verdict, COORDINATOR, trust.private_key(COORDINATOR)))
        audit.append(
            "update.verdict", round=r, site=site, accepted=verdict["accepted"], reasons=c["reasons"], flags=c["flags"]
        )
        if verdict["accepted"]:
            summary["accepted"].append(site)
            summary["update_sha256"][site] = c["update_sha256"]
            summary["receipt_sha256"][site] = c["receipt_sha256"]
            summary["content_sha256"][site] = c["content_sha256"]
            seen[c["content_sha256"]] = f"{site}'s of round {r}"
        else:
            summary["rejected"][site] = c["reasons"]
    summary["late_accepted"], summary["late_rejected"] = _verify_late(
        cfg, layout, trust, r, arrivals.get("late", []), seen
    )
    write_json(layout.verdicts(r), summary)
    return summary


def late_label(site: str, k: int) -> str:
    """How a late update is named among a round's contributions: `site@r0003`."""
    return f"{site}@r{k:04d}"


def accepted_before(layout: RunLayout, r: int) -> dict[str, str]:
    """Content hash of every update accepted in rounds before r (on time or late) → whose it was."""
    seen = {}
    for k in range(r):
        if not layout.verdicts(k).exists():
            continue
        v = read_json(layout.verdicts(k))
        for site, sha in v.get("content_sha256", {}).items():
            seen[sha] = f"{site}'s of round {k}"
        for label, item in v.get("late_accepted", {}).items():
            if "content_sha256" in item:
                seen[item["content_sha256"]] = f"{label}'s"
    return seen


def _mark_duplicates(checks: dict[str, dict], seen: dict[str, str]) -> None:
    """An update byte-identical to an accepted one, or to another site's this round, is a replay or a
    copy: independent training never produces the same bytes. Both copies of a pair are refused."""
    by_sha: dict[str, list[str]] = {}
    for site, c in checks.items():
        if not c["reasons"] and c.get("content_sha256"):
            by_sha.setdefault(c["content_sha256"], []).append(site)
    for sha, sites in by_sha.items():
        for site in sites:
            if sha in seen:
                checks[site]["reasons"].append(f"duplicate submission: the same update as {seen[sha]} (replayed)")
            elif len(sites) > 1:
                others = ", ".join(x for x in sites if x != site)
                checks[site]["reasons"].append(f"duplicate submission: byte-identical to {others}'s update this round")


def _verify_late(
    cfg: Config, layout: RunLayout, trust: TrustStore, r: int, late: list[dict], seen: dict[str, str]
) -> tuple[dict, dict]:
    """Each late update on its own (base: the global model of its own round); no outlier screen,
    since it is not comparable with this round's updates."""

    accepted, rejected = {}, {}
    audit = AuditLog(layout.audit)
    for item in late:
        k, site = item["round"], item["site"]
        c = check_update(layout, trust, cfg.run, k, site, load_global_meta(layout, trust, k), cfg.verification, cfg)
        _mark_duplicates({site: c}, seen)
        verdict = {"round": r, "site": site, "from_round": k, "accepted": not c["reasons"], **c}
        write_json(layout.late_verdict(r, site, k), sign_document(verdict, COORDINATOR, trust.private_key(COORDINATOR)))
        audit.append(
            "update.verdict", round=r, site=site, from_round=k, accepted=verdict["accepted"], reasons=c["reasons"]
        )
        if verdict["accepted"]:
            accepted[late_label(site, k)] = {
                "round": k,
                "site": site,
                "update_sha256": c["update_sha256"],
                "receipt_sha256": c["receipt_sha256"],
                "content_sha256": c["content_sha256"],
            }
            seen[c["content_sha256"]] = f"{late_label(site, k)}'s"
        else:
            rejected[late_label(site, k)] = c["reasons"]
    return accepted, rejected


def run(ctx: Ctx, r: int) -> dict:
    """The verify stage: every update of round r checked against round r's signed global model;
    returns verdicts.json."""
    return verify_round(ctx.cfg, ctx.layout, ctx.trust, r, load_global_meta(ctx.layout, ctx.trust, r))
