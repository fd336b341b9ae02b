"""A resident site worker: one job that trains a site's rounds one after another, pulling each round's plan.

Per-round train jobs each wait in the queue, start Python, import torch and build the model again;
with rounds of minutes that dominates. A resident site (`sites.<name>.resident: true`) has instead
one job per allocation (rule `resident`, a Snakemake checkpoint) that starts at round `start` and,
round after round, waits for the round's signed plan and global model on the blackboard, trains
exactly as the train job would (`train.run_train_job`: the same files, checks, receipts and status
records) and moves on. It opens no port and pushes nothing but its round's files.

It ends, writing its segment record `rounds/r<start>/sites/<site>/resident.json`:
- `done`: every round of the federation is trained (next_round = rounds.count);
- `time`: its allocation would end before another round could finish; the workflow starts a
  new segment at `next_round` (a new Slurm job, resubmitted);
- `failed`: round r failed on the last attempt the workflow allows; the next segment starts at
  r + 1 with fresh attempts, as the next round's train job would.
An earlier attempt's failure, and no plan for `idle` minutes (the coordinator stopped), end the
job with an error and no record: Snakemake retries it, or reports it, and a rerun resumes it.
A round whose status record exists was finished by an earlier job and is skipped, so a
segment killed anywhere and run again trains no site-round twice.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from fedhpc.config.federation import Config
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.stages.context import Ctx
from fedhpc.stages.failures import attempt_path, invocation, record_exit, record_start, status_path
from fedhpc.trust.audit import AuditLog

# How often a waiting worker looks for the next plan: a stat() of two files, so often is cheap,
# and it is the latency a resident round saves over a queued job.
POLL_SECONDS = 0.25


class ResidentIdle(FedhpcError, RuntimeError):
    """No plan came for too long: the coordinator has stopped (a retry or a rerun resumes)."""


@dataclass
class Clock:
    """The job's time: when it must have ended (None: no limit) and how long a round takes at most."""

    deadline: float | None
    margin: float
    longest: float = 0.0

    def room_for_a_round(self) -> bool:
        return self.deadline is None or time.time() + self.longest + self.margin < self.deadline


def job_deadline(walltime_minutes: float, started: float) -> float | None:
    """When this job's allocation ends: Slurm's own end time if it says (it follows a changed
    limit), else the rule's runtime counted from the job's start; None without either."""
    end = os.environ.get("SLURM_JOB_END_TIME")
    if end and end.isdigit() and int(end) > 0:
        return float(end)
    return started + walltime_minutes * 60 if walltime_minutes > 0 else None


def idle_limit(cfg: Config, site: str) -> float:
    """Seconds a worker waits for a plan before it gives up: a round's deadline and an hour for
    the coordinator's stages, unless the site says."""
    spec = cfg.sites[site]
    minutes = spec.resident_idle_minutes
    return 60 * (minutes if minutes is not None else cfg.rounds.deadline_minutes + 60)


def round_ready(layout: RunLayout, r: int) -> bool:
    """The round's plan and global model are published (both written atomically, metadata last)."""
    return layout.plan(r).exists() and layout.global_meta(r).exists()


def wait_for_round(layout: RunLayout, r: int, clock: Clock, idle: float) -> bool:
    """Wait until round r can be trained: True, or False when the job's time is up first."""
    since = time.monotonic()
    while not round_ready(layout, r):
        if not clock.room_for_a_round():
            return False
        if time.monotonic() - since > idle:
            raise ResidentIdle(
                f"no plan for round {r} in {layout.plan(r).parent} after {idle / 60:.0f} min; "
                "the coordinator has stopped (sites.<name>.resident_idle_minutes sets the wait)"
            )
        time.sleep(POLL_SECONDS)
    return True


def previous_seconds(layout: RunLayout, r: int, site: str) -> float:
    """How long this site's job of round r - 1 took, from its status record (0 when none)."""
    try:
        return float(read_json(status_path(layout, r - 1, site)).get("seconds") or 0.0)
    except (FileNotFoundError, ValueError):
        return 0.0


def run(
    ctx: Ctx,
    site: str,
    start: int,
    threads: int,
    record: Path,
    walltime_minutes: float = 0.0,
    attempt: int = 1,
    attempts: int = 1,
) -> dict:
    """Train `site`'s rounds from `start` on until the federation ends or the job's time is up;
    write and return the segment record."""
    from fedhpc.stages.train import run_train_job  # torch: imported once, after the cheap checks

    cfg, layout = ctx.cfg, ctx.layout
    started = time.time()
    margin = 60 * cfg.sites[site].resident_margin_minutes
    clock = Clock(job_deadline(walltime_minutes, started), margin, previous_seconds(layout, start, site))
    idle = idle_limit(cfg, site)
    audit = AuditLog(layout.audit)
    audit.append("resident.started", site=site, round=start, attempt=attempt, deadline=clock.deadline)
    r, trained, reason = start, [], "done"
    while r < cfg.rounds.count:
        status = status_path(layout, r, site)
        if status.exists():  # finished by an earlier job of this site
            r += 1
            continue
        # A job's first round always runs: a segment that ended before it would start over forever.
        if not wait_for_round(layout, r, clock if trained else Clock(None, 0.0), idle):
            reason = "time"
            break
        record_start(layout, r, site, attempt, attempts)  # the witness gather reads if the job dies
        t0 = time.monotonic()
        try:
            result = run_train_job(cfg, layout, ctx.trust, r, site, threads, status, attempt, attempts)
        except Exception:
            if attempt < attempts:
                raise  # Snakemake retries the segment; the retry redoes this round
            # The last attempt: the round is lost for this site, as a train job's would be, and
            # the next segment gives the next round its own attempts.
            write_json(status, {"state": "failed", "round": r, "site": site, "attempt": attempt, "resident": True})
            r, reason = r + 1, "failed"
            break
        clock.longest = max(clock.longest, time.monotonic() - t0)
        trained.append({"round": r, "state": result["state"], "seconds": round(time.monotonic() - t0, 3)})
        r += 1
        if r < cfg.rounds.count and not clock.room_for_a_round():
            reason = "time"
            break
    doc = {
        "site": site,
        "start": start,
        "next_round": r,
        "reason": reason,
        "rounds": trained,
        "attempt": attempt,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "seconds": round(time.time() - started, 3),
    }
    audit.append("resident.ended", site=site, round=start, next_round=r, reason=reason, trained=len(trained))
    write_json(record, doc)
    return doc


def record_exited(ctx: Ctx, site: str, start: int, code: int, attempt: int, attempts: int) -> dict | None:
    """The job's shell, after the worker died with exit `code`: the failure record of the round it
    was on (the one it noted starting in this invocation and left without a status), as a train
    job's shell writes one. None when it died between rounds."""
    layout = ctx.layout
    for r in range(start, ctx.cfg.rounds.count):
        try:
            begun = read_json(attempt_path(layout, r, site))
        except (FileNotFoundError, ValueError):
            continue
        if begun.get("invocation") == invocation() and not status_path(layout, r, site).exists():
            return record_exit(layout, r, site, code, attempt, attempts)
    return None
