"""Close a round: wait on the round directory until every planned site published, or the deadline."""

from __future__ import annotations

import math
import time

from fedhpc.config.federation import Config
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.exchange.hub import (
    CompletenessCache,
    TransferError,
    announce_stop,
    audit_rejects,
    pull,
    transport_for,
    withdraw_stop,
)
from fedhpc.stages.context import Ctx, blackboard_poll
from fedhpc.stages.failures import final_failure, record_vanished
from fedhpc.stages.slurm_jobs import JobWatch
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.checkpoints import load_plan
from fedhpc.trust.signing import TrustStore


class QuorumError(FedhpcError, RuntimeError):
    """The deadline passed before enough sites published an update."""


def arrived_sites(layout: RunLayout, r: int, planned: list[str], bundles: CompletenessCache | None = None) -> list[str]:
    """The planned sites whose receipt is in. With staged transfer (`bundles` given), only those
    whose signed bundle index is in and matches every file: a partial or corrupted transfer is
    not an arrival, and the site's next publish attempt can still complete it."""
    arrived = []
    for site in planned:
        try:
            read_json(layout.receipt(r, site))
        except (FileNotFoundError, ValueError):
            continue  # not there yet, or not parseable yet: not an arrival
        if bundles is not None and not bundles.complete(layout.site_dir(r, site), site):
            continue
        arrived.append(site)
    return arrived


def failed_sites(layout: RunLayout, r: int, sites: list[str], jobs: JobWatch | None = None) -> dict[str, dict]:
    """{site: its failure record} of the sites whose training job failed for good. With `jobs`,
    a site whose Slurm job ended without a record (killed with its shell) gets one first."""
    if jobs is not None:
        for s in sites:
            record_vanished(layout, r, s, jobs.ended)
    return {s: rec for s in sites if (rec := final_failure(layout, r, s)) is not None}


def describe_failure(rec: dict) -> str:
    if rec["deterministic"]:
        return "a deterministic error, not retried"
    return f"attempt {rec['attempt']} of {rec['attempts']}"


def bundle_checks(cfg: Config, trust: TrustStore) -> CompletenessCache | None:
    """With staged transfer, what checks a site's bundle; None when sites write in place."""
    return CompletenessCache(trust) if cfg.exchange.kind != "local" else None


def fetch_bundles(
    cfg: Config, layout: RunLayout, trust: TrustStore, r: int, sites: list[str], bundles: CompletenessCache | None
) -> None:
    """Where the hub is remote to the coordinator too (an object store), pull each site's
    bundle of round r that is not complete here yet; sites publishing into this run directory
    (rsync, shared) need nothing."""
    if cfg.exchange.kind != "s3" or bundles is None:
        return
    transport = transport_for(cfg.exchange)
    for site in sites:
        d = layout.site_dir(r, site)
        if bundles.complete(d, site):
            continue
        try:
            rel = d.relative_to(layout.root).as_posix()
            pull(transport, rel, d, trust, site, on_reject=audit_rejects(layout, rel))
        except TransferError as exc:
            print(f"round {r}: {site}'s update is not usable yet: {exc}", flush=True)


def late_arrivals(cfg: Config, layout: RunLayout, r: int, trust: TrustStore | None = None) -> list[dict]:
    """Updates of earlier rounds (up to `rounds.max_staleness` back) that arrived after their
    round closed and were not already taken up by a round in between."""
    late, bundles = [], bundle_checks(cfg, trust)
    for k in range(max(0, r - cfg.rounds.max_staleness), r):
        if not layout.arrivals(k).exists():
            continue
        closed = read_json(layout.arrivals(k))
        seen = {
            (x["round"], x["site"])
            for j in range(k + 1, r)
            if layout.arrivals(j).exists()
            for x in read_json(layout.arrivals(j)).get("late", [])
            + read_json(layout.arrivals(j)).get("late_dropped", [])
        }
        fetch_bundles(cfg, layout, trust, k, [s for s in closed["missing"] if (k, s) not in seen], bundles)
        for site in closed["missing"]:
            if (k, site) not in seen and arrived_sites(layout, k, [site], bundles):
                late.append({"round": k, "site": site})
    return late


def gather(
    cfg: Config, layout: RunLayout, trust: TrustStore, r: int, poll_seconds: float = 1.0, now: float | None = None
) -> dict:
    """Block until every planned site arrived or failed for good, or the deadline passes; write arrivals.json.

    The deadline counts from the plan's creation, so a restarted coordinator does not
    grant a fresh one. Aggregation depends on this file, not on the sites' jobs, which is
    what lets a round finish without a site whose job died. A site whose job failed for good
    (failures.final_failure: a deterministic error, or its last allowed attempt, or that attempt's
    Slurm job ended without a word) is not waited for: the round closes as soon as nobody else is pending, or at once when quorum can no
    longer be reached.
    """
    plan = load_plan(layout, trust, r)
    planned = plan["participants"]
    deadline = plan["created"] + cfg.rounds.deadline_minutes * 60
    need = max(1, math.ceil(cfg.rounds.quorum * len(planned) - 1e-9)) if planned else 0
    t0 = time.time()
    bundles = bundle_checks(cfg, trust)
    jobs = JobWatch()
    last_report, waiting_reported = 0.0, False
    while True:
        fetch_bundles(cfg, layout, trust, r, planned, bundles)
        arrived = arrived_sites(layout, r, planned, bundles)
        failed = failed_sites(layout, r, [s for s in planned if s not in arrived], jobs)
        pending = [s for s in planned if s not in arrived and s not in failed]
        clock = now if now is not None else time.time()
        if not pending or len(arrived) + len(pending) < need:
            break
        if clock >= deadline:
            if len(arrived) >= need or cfg.rounds.on_no_quorum == "fail":
                break
            if not waiting_reported:
                AuditLog(layout.audit).append("round.waiting_for_quorum", round=r, arrived=arrived, needed=need)
                waiting_reported = True
        if time.time() - last_report >= 60:
            left = (
                f"deadline in {deadline - clock:.0f} s"
                if clock < deadline
                else f"deadline passed; quorum needs {need} (rounds.on_no_quorum: wait)"
            )
            gone = f"; failed for good: {', '.join(failed)}" if failed else ""
            print(
                f"round {r}: {len(arrived)}/{len(planned)} updates in, waiting for {', '.join(pending)}{gone}; {left}",
                flush=True,
            )
            last_report = time.time()
        time.sleep(poll_seconds)
    missing = [s for s in planned if s not in arrived]
    audit = AuditLog(layout.audit)
    for site, rec in failed.items():
        audit.append(
            "site.failed",
            round=r,
            site=site,
            error=rec["error"],
            deterministic=rec["deterministic"],
            attempt=rec["attempt"],
            attempts=rec["attempts"],
        )
    if len(arrived) < need:
        audit.append("round.no_quorum", round=r, arrived=arrived, missing=missing, needed=need)
        why = ""
        if failed:
            why = "; ".join(f"{s} failed ({describe_failure(rec)}): {rec['error']}" for s, rec in failed.items())
        if pending:
            why += f"{'; ' if why else ''}no update from {', '.join(pending)}"
        closed = "deadline passed" if not failed or clock >= deadline else "quorum out of reach"
        raise QuorumError(
            f"round {r}: {closed} with {len(arrived)} of {len(planned)} planned updates "
            f"({', '.join(arrived) or 'none'}); quorum needs {need}. "
            + (f"Missing: {', '.join(missing)}" if not failed else why)
        )
    for site in [s for s in missing if s not in failed]:
        reason = "no update by the deadline"
        if layout.receipt(r, site).exists():
            # Staged transfer: something arrived but does not match its signed index.
            reason = "its update arrived incomplete or corrupted (files do not match the signed bundle index)"
        audit.append("site.dropped", round=r, site=site, reason=reason)
    late = late_arrivals(cfg, layout, r, trust)
    for item in late:
        audit.append(
            "update.late", round=r, site=item["site"], from_round=item["round"], action=cfg.rounds.late_updates
        )
    record = {
        "round": r,
        "planned": planned,
        "arrived": arrived,
        "missing": missing,
        "failed": {
            s: {k: rec[k] for k in ("error", "deterministic", "attempt", "attempts")} for s, rec in failed.items()
        },
        "late": late if cfg.rounds.late_updates == "fold" else [],
        "late_dropped": late if cfg.rounds.late_updates == "drop" else [],
        "quorum": need,
        "waited_seconds": time.time() - t0,
        "deadline": deadline,
        "closed_at": time.time(),
    }
    write_json(layout.arrivals(r), record)
    audit.append("round.gathered", round=r, arrived=arrived, missing=missing)
    return record


def run(ctx: Ctx, r: int) -> dict:
    """The gather stage: close round r (arrivals.json). A round that cannot reach quorum is
    announced to the sites (on the hub, or at the run's root for resident sites in one run
    directory), so they stop waiting for the next; a rerun withdraws that."""
    withdraw_stop(ctx.cfg.exchange, ctx.layout)
    try:
        return gather(ctx.cfg, ctx.layout, ctx.trust, r, blackboard_poll(ctx.cfg))
    except QuorumError as exc:
        announce_stop(ctx.cfg.exchange, ctx.layout, ctx.trust, r, str(exc))
        raise
