"""The coordinator's stop notice: signed when one of its jobs fails for good, withdrawn when its head starts again.

Resident site jobs, and the sites of a multi-site run, wait for the coordinator's next plan or
candidate. When a coordinator job (plan, gather, verify, aggregate, an evaluation, its merge,
promote) fails on its last attempt, that file never comes, and they would wait for their idle
or exchange limit, holding their GPUs. The rule's shell then runs `fedhpc stop`, which signs the
notice they already read (`stopped.json`, the one gather signs for a round short of quorum), so
they stop at once, naming the job and its log. A head that starts again withdraws it (the
workflow's onstart), since its rerun of the failed job may well succeed.
"""

from __future__ import annotations

from fedhpc.exchange.hub import STOPPED, announce_stop, read_stop, withdraw_stop
from fedhpc.stages.context import Ctx
from fedhpc.trust.audit import AuditLog

# Jobs of round r whose failure means round r's own plan (or what it needs) never comes; any
# other coordinator job's failure means round r + 1's plan never comes.
BEFORE_THE_PLAN = ("plan", "merge_eval_initial")


def stop_round(stage: str, r: int, which: str | None) -> int:
    """The round a notice names: sites stop waiting for anything of a later round (and for that
    round's candidate); see `stages.exchange.needed_round`."""
    return r - 1 if stage in BEFORE_THE_PLAN or which == "global" else r


def run(ctx: Ctx, stage: str, r: int, which: str | None, attempt: int, attempts: int, exited: int, log: str) -> bool:
    """After coordinator job `stage` of round r failed with `exited`: on its last attempt, sign the
    stop notice and record it in the audit log. Whether it did."""
    if attempt < attempts:
        return False  # Snakemake runs it again
    at = stop_round(stage, r, which)
    notice = ctx.layout.root / STOPPED
    if read_stop(notice, ctx.trust, at + 1, str(notice)):
        return False  # the job said why itself (gather, a round short of quorum): keep its words
    what = f"{stage} of round {r}" + (f" ({which})" if which else "")
    reason = f"{what} failed on its last attempt ({attempt} of {attempts}, exit {exited}); its log: {log}"
    announce_stop(ctx.cfg.exchange, ctx.layout, ctx.trust, at, reason)
    AuditLog(ctx.layout.audit).append("federation.stopped", round=r, stage=stage, reason=reason)
    return True


def withdraw(ctx: Ctx) -> None:
    """The head starts again: take back the notice of its earlier run."""
    withdraw_stop(ctx.cfg.exchange, ctx.layout)
