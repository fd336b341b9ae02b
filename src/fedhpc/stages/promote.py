"""The evaluation gate: promote the round's candidate to the next global model, or roll back."""

from __future__ import annotations

import math
from pathlib import Path

from fedhpc.config.federation import Config
from fedhpc.core.files import link_atomic, read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.stages.context import Ctx
from fedhpc.stages.evaluate import comparable
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.checkpoints import load_global_meta, publish_global
from fedhpc.trust.ledger import sign_head
from fedhpc.trust.signing import TrustStore

# Fields of model.json that belong to one global model, not to the model family.
_PER_ROUND = {"round", "sha256", "signature", "source", "reason", "parent_sha256", "from_round", "eval_loss", "run"}


def gate(
    baseline_loss: float | None, candidate_loss: float | None, max_regression: float, domains: list[str] | None = None
) -> tuple[bool, str]:
    """Accept the candidate unless its held-out loss is missing/non-finite or regressed too far."""
    over = f" over {', '.join(domains)}" if domains else ""
    if candidate_loss is None or not math.isfinite(candidate_loss):
        return False, f"candidate's held-out loss{over} is not finite"
    if baseline_loss is not None and candidate_loss > baseline_loss * (1 + max_regression):
        return False, (
            f"held-out loss{over} regressed from {baseline_loss:.4f} to {candidate_loss:.4f} "
            f"(more than evaluation.max_regression = {max_regression:.0%})"
        )
    return True, f"held-out loss{over} within the gate"


def _place(src: Path, dst: Path) -> None:
    """A symlink to the file, not a second copy of a model that may be 128 GB. Not a hard link:
    it would share the candidate's mtime, and Snakemake, which touches every output when a job
    ends, would make the candidate newer than its own evaluations and redo the round. A
    symlink's own mtime is what Snakemake reads and touches for an output."""
    link_atomic(src, dst)


def _carry_server_state(layout: RunLayout, r: int, accepted: bool) -> None:
    """Global r+1 takes the candidate's server state, or global r's on rollback. The privacy
    ledger always comes from the candidate: its noised aggregate was computed and evaluated."""
    state = layout.candidate_state(r) if accepted else layout.server_state(r)
    if state.exists():
        _place(state, layout.server_state(r + 1))
    if layout.candidate_meta(r).exists():
        meta = read_json(layout.candidate_meta(r))
        if not accepted:
            old = read_json(layout.server_meta(r)) if layout.server_meta(r).exists() else {}
            meta = {**old, "privacy": meta.get("privacy"), "rolled_back_round": r}
        write_json(layout.server_meta(r + 1), meta)


def promote_round(cfg: Config, layout: RunLayout, trust: TrustStore, r: int, base: dict) -> dict:
    baseline = read_json(layout.global_eval(r))
    candidate = read_json(layout.candidate_eval(r))
    # Both models judged on the domains both were scored on (a site may have missed one).
    cand_loss, base_loss, common = comparable(candidate, baseline)
    ok, reason = gate(base_loss, cand_loss, cfg.evaluation.max_regression, common)
    failed = {k: g for k, g in sorted((candidate.get("guards") or {}).items()) if not g.get("ok", True)}
    if ok and failed:
        ok = False
        reason = "; ".join(f"guard {k} failed: {g.get('reason') or 'not ok'}" for k, g in failed.items())
    if candidate.get("missing"):
        reason += f"; no held-out scores from {', '.join(candidate['missing'])}"
    src, chosen_eval = (layout.candidate(r), candidate) if ok else (layout.global_model(r), baseline)
    _place(src, layout.global_model(r + 1))
    _carry_server_state(layout, r, ok)
    write_json(layout.global_eval(r + 1), chosen_eval)
    meta = publish_global(
        layout,
        trust,
        r + 1,
        layout.global_model(r + 1),
        {
            "run": cfg.run,
            "source": "aggregate" if ok else "rollback",
            "reason": reason,
            "parent_sha256": base["sha256"],
            "from_round": r,
            # What describes the model (task, vocabulary, shape, base checkpoint) carries over.
            **{k: v for k, v in base.items() if k not in _PER_ROUND},
            "eval_loss": chosen_eval["loss"],
        },
    )
    AuditLog(layout.audit).append(
        "global.published" if ok else "round.rolled_back",
        round=r + 1,
        from_round=r,
        sha256=meta["sha256"],
        reason=reason,
        eval_loss=chosen_eval["loss"],
        candidate_loss=candidate["loss"],
        failed_guards=sorted(failed),
    )
    sign_head(layout, trust, cfg.run, r)  # after the round's last event: the anchor of its ledger lines
    return meta


def run(ctx: Ctx, r: int) -> dict:
    """The promote stage: round r+1's global model, the candidate or (rollback) round r's."""
    return promote_round(ctx.cfg, ctx.layout, ctx.trust, r, load_global_meta(ctx.layout, ctx.trust, r))
