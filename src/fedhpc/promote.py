"""The evaluation gate: promote the round's candidate to the next global model, or roll back."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from .audit import AuditLog
from .checkpoints import publish_global
from .config import Config
from .files import atomic_path, read_json, write_json
from .layout import RunLayout
from .ledger import sign_head
from .signing import TrustStore


def gate(baseline_loss: float | None, candidate_loss: float | None, max_regression: float) -> tuple[bool, str]:
    """Accept the candidate unless its held-out loss is missing/non-finite or regressed too far."""
    if candidate_loss is None or not math.isfinite(candidate_loss):
        return False, "candidate's held-out loss is not finite"
    if baseline_loss is not None and candidate_loss > baseline_loss * (1 + max_regression):
        return False, (
            f"held-out loss regressed from {baseline_loss:.4f} to {candidate_loss:.4f} "
            f"(more than evaluation.max_regression = {max_regression:.0%})"
        )
    return True, "held-out loss within the gate"


def _place(src: Path, dst: Path) -> None:
    """Copy, not hard-link: a link shares the source's mtime, and Snakemake's mtime
    trigger would then see the new global as older than its inputs and redo the round."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


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
    ok, reason = gate(baseline["loss"], candidate["loss"], cfg.evaluation.max_regression)
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
            "vocab_size": base["vocab_size"],
            "model": base["model"],
            "parameters": base["parameters"],
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
    )
    sign_head(layout, trust, cfg.run, r)  # after the round's last event: the anchor of its ledger lines
    return meta
