"""A resident site worker: one job that does a site's rounds one after another, pulling each round's plan.

Per-round train jobs each wait in the queue, start Python, import torch and build the model again;
with rounds of minutes that dominates. A resident site (`sites.<name>.resident: true`) has instead
one job per allocation (rule `resident`, a Snakemake checkpoint) that starts at round `start` and,
round after round, waits for the round's signed plan and global model on the blackboard, trains
exactly as the train job would (`train.run_train_job`: the same files, checks, receipts and status
records) and, when the site holds held-out data, waits for the round's candidate and signs its
scores of it (`evaluate.run`, as the evaluate_site job would). It opens no port and writes only
its round's files.

It ends, writing its segment record `rounds/r<start>/sites/<site>/resident.json`:
- `done`: every round of the federation is done (next_round = rounds.count);
- `time`: its allocation would end before another round could finish; the workflow starts a
  new job at `next_round` (under Slurm a new job, queued as any other);
- `failed`: round r's work failed on the last attempt the workflow allows; the next job starts
  at r + 1 with fresh attempts, as the next round's train job would.
An earlier attempt's failure, and nothing to do for `idle` minutes (the coordinator stopped), end
the job with an error and no record: Snakemake retries it, or reports it, and a rerun resumes it.
Work already done is skipped (a round with a status record, scores of the same model), so a job
killed anywhere and run again trains no site-round twice.

A site of several ranks runs this loop on every rank, in one process group kept from round to
round. Rank 0 alone looks at the blackboard, keeps the clock, writes records and scores; each of
its decisions reaches the other ranks by a broadcast, which they wait in, so all ranks take the
same path. A rank's failure in training ends the job on every attempt (its launcher stops the
others), since ranks cannot agree to go on without it.
"""

from __future__ import annotations

import io
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedhpc.config.federation import Config
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.stages import train as train_stage
from fedhpc.stages.context import Ctx, blackboard_poll
from fedhpc.stages.exchange import exchange_action, stopped_before, try_pull
from fedhpc.stages.failures import attempt_path, invocation, record_exit, record_start, status_path
from fedhpc.training import distributed
from fedhpc.training.distributed import World
from fedhpc.trust.audit import AuditLog


class ResidentIdle(FedhpcError, RuntimeError):
    """No plan (or candidate to score) came for too long: the coordinator has stopped (a retry or a
    rerun resumes)."""


class CoordinatorStopped(FedhpcError, RuntimeError):
    """The coordinator announced that the federation stopped before the round the job waits for
    (a round short of quorum); a rerun resumes."""


@dataclass
class Clock:
    """The job's time: when it must have ended (None: no limit) and how long a round takes at most."""

    deadline: float | None
    margin: float
    longest: float = 0.0

    def room_for(self, seconds: float) -> bool:
        """Whether `seconds` of work and the margin still fit before the end."""
        return self.deadline is None or time.time() + seconds + self.margin < self.deadline

    def room_for_a_round(self) -> bool:
        return self.room_for(self.longest)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def fileno(self) -> int:  # for code that writes to the descriptor itself (faulthandler): the job's log
        return self.streams[0].fileno()


@contextmanager
def tee_output(path: Path | None):
    """While inside, what Python prints goes to `path` too (None: nowhere else): a round's own
    train.log, as a train job's would be, which a multi-site run publishes with the update."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as log:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


def job_deadline(walltime_minutes: float, started: float) -> float | None:
    """When this job's allocation ends: the end time Slurm gave the job (SLURM_JOB_END_TIME, set by
    newer Slurm versions), else the rule's runtime counted from the job's start (SLURM_JOB_START_TIME,
    else this process's, later by the job's start-up, which the margin covers); None without either."""
    env = os.environ
    if env.get("SLURM_JOB_END_TIME", "").isdigit() and int(env["SLURM_JOB_END_TIME"]) > 0:
        return float(env["SLURM_JOB_END_TIME"])
    if walltime_minutes <= 0:
        return None
    start = float(env["SLURM_JOB_START_TIME"]) if env.get("SLURM_JOB_START_TIME", "").isdigit() else started
    return start + walltime_minutes * 60


def idle_limit(cfg: Config, site: str) -> float:
    """Seconds a worker waits for a plan before it gives up: a round's deadline and an hour for
    the coordinator's stages, unless the site says."""
    spec = cfg.sites[site]
    minutes = spec.resident_idle_minutes
    return 60 * (minutes if minutes is not None else cfg.rounds.deadline_minutes + 60)


def round_ready(layout: RunLayout, r: int) -> bool:
    """The round's plan and global model are published (both written atomically, metadata last)."""
    return layout.plan(r).exists() and layout.global_meta(r).exists()


def previous_seconds(layout: RunLayout, r: int, site: str) -> float:
    """How long this site's job of round r - 1 took, from its status record (0 when none)."""
    try:
        return float(read_json(status_path(layout, r - 1, site)).get("seconds") or 0.0)
    except (FileNotFoundError, ValueError):
        return 0.0


@dataclass
class Job:
    """One resident job of one site: what it may do, its clock, and what it has done."""

    ctx: Ctx
    site: str
    threads: int
    clock: Clock
    idle: float
    evaluates: bool  # the site holds held-out data and scores each candidate on it
    attempt: int = 1
    attempts: int = 1
    world: World = field(default_factory=World)
    start: int = 0  # the job's first round
    done: list = field(default_factory=list)

    def agree(self, value):
        """Rank 0's `value`, on every rank."""
        return distributed.broadcast(value, self.world)

    @property
    def hub(self) -> bool:
        """A site's own run (multi-site): rounds come from the hub, and what it makes goes there."""
        return self.ctx.cfg.exchange.role == "site"

    def ready(self, r: int) -> bool:
        """Round r's plan and global model are here (pulled from the hub, every file checked)."""
        if self.hub:
            return try_pull(self.ctx.cfg, self.ctx.layout, self.ctx.trust, "pull", r)
        return round_ready(self.ctx.layout, r) or self.not_stopped("pull", r)

    def not_stopped(self, action: str, r: int) -> bool:
        """False, unless the coordinator stopped the federation before the round that `action` of
        round r needs: then an error, now rather than after `idle` minutes of waiting."""
        if why := stopped_before(self.ctx.layout, self.ctx.trust, action, r):
            raise CoordinatorStopped(
                f"site {self.site}: the coordinator stopped the federation ({why}); run the workflow again to resume"
            )
        return False

    def candidate(self, r: int) -> str | None:
        """'score' once round r's candidate is here to be scored; 'moved on' when its scores are no
        longer wanted (merged without this site, or the round promoted); None while neither."""
        layout, cfg = self.ctx.layout, self.ctx.cfg
        if self.hub:  # the coordinator's merge is not visible from here; a late part is harmless
            return "score" if try_pull(cfg, layout, self.ctx.trust, "pull-candidate", r) else None
        if layout.candidate_eval(r).exists() or layout.global_meta(r + 1).exists():
            return "moved on"
        if layout.aggregate_record(r).exists():  # written after the candidate
            return "score"
        return self.not_stopped("pull-candidate", r) or None

    def publish(self, action: str, r: int, which: str = "") -> None:
        """Send what this site made in round r to the hub (multi-site only), as the publish rules do."""
        if self.hub and self.world.is_main:
            print(exchange_action(self.ctx.cfg, self.ctx.layout, self.ctx.trust, action, r, which), flush=True)

    def wait(self, ready, what: str, need: float | None):
        """Wait until `ready()` gives something: that, or None once `need` seconds of work no longer
        fit before the job's end with the margin (rank 0 only); `need` None waits regardless."""
        # A hub is asked as often as a site's pull rule asks it; a local blackboard as the stages look.
        poll = self.ctx.cfg.exchange.poll_seconds if self.hub else blackboard_poll(self.ctx.cfg)
        since = time.monotonic()
        while not (got := ready()):
            if need is not None and not self.clock.room_for(need):
                return None
            if time.monotonic() - since > self.idle:
                raise ResidentIdle(
                    f"site {self.site}: no {what} after {self.idle / 60:g} min; the coordinator has "
                    "stopped (sites.<name>.resident_idle_minutes sets the wait)"
                )
            time.sleep(poll)
        return got

    def do(self, r: int, work: str, fn) -> bool:
        """Run one piece of round r's work; False when it failed on the workflow's last attempt
        (the round is then lost for this site, as a per-round job's would be)."""
        t0 = time.monotonic()
        try:
            state = fn()
        except Exception as exc:
            if self.attempt < self.attempts or self.world.distributed:
                raise  # Snakemake retries the job; the retry redoes this piece
            AuditLog(self.ctx.layout.audit).append(
                "resident.gave_up", site=self.site, round=r, work=work, error=f"{type(exc).__name__}: {exc}"
            )
            print(f"fedhpc resident: round {r} {work} failed on the last attempt: {exc}", file=sys.stderr)
            return False
        self.done.append({"round": r, "work": work, "state": state, "seconds": round(time.monotonic() - t0, 3)})
        return True

    def train(self, r: int) -> str:
        cfg, layout, main = self.ctx.cfg, self.ctx.layout, self.world.is_main
        if main:  # the witness gather reads if the job dies
            record_start(layout, r, self.site, self.attempt, self.attempts)
        status = status_path(layout, r, self.site)
        try:
            with tee_output(layout.train_log(r, self.site) if main else None):
                result = train_stage.run_train_job(
                    cfg,
                    layout,
                    self.ctx.trust,
                    r,
                    self.site,
                    self.threads,
                    status,
                    self.attempt,
                    self.attempts,
                    keep_group=self.world.distributed,
                )
        except Exception:
            if main and self.attempt >= self.attempts:
                write_json(status, {"state": "failed", "round": r, "site": self.site, "attempt": self.attempt})
            raise
        self.publish("publish", r)
        return result["state"]

    def score(self, r: int, which: str) -> str:
        """This site's signed scores of round r's `which` model, unless already there for that model."""
        from fedhpc.stages import evaluate

        layout = self.ctx.layout
        part, model = layout.eval_part(r, which, self.site), evaluate.model_of(layout, r, which)
        if not (part.exists() and read_json(part).get("model_sha256") == sha256_file(model)):
            evaluate.run(self.ctx, r, which, self.site, self.threads)
        self.publish("publish-eval", r, which)
        return "scored"

    def round(self, r: int) -> str | None:
        """Round r's work for this site: None when done, else why the job stops before it is:
        'time' before training, 'failed', or 'scores left' (trained; the time ran out waiting for
        the candidate, which the next job scores)."""
        layout, main = self.ctx.layout, self.world.is_main
        t0 = time.monotonic()
        if self.agree(main and status_path(layout, r, self.site).exists()):  # an earlier job trained it
            if not status_path(layout, r + 1, self.site).exists():
                self.publish("publish", r)  # the round a killed job may have left half-sent
        else:
            plan = f"plan for round {r} in {layout.plan(r).parent}"
            # The job's first round is waited for regardless: a job that ended before it would say
            # the next starts where it did, which the chain cannot follow.
            need = None if r == self.start else self.clock.longest
            ready = main and bool(self.wait(lambda: self.ready(r), plan, need))
            if not self.agree(ready):
                return "time"
            if not self.do(r, "train", lambda: self.train(r)):
                return "failed"
        stop = self.scores(r) if self.evaluates and main else None
        self.clock.longest = max(self.clock.longest, time.monotonic() - t0)
        return self.agree("scores left" if stop == "time" else stop)

    def scores(self, r: int) -> str | None:
        """This site's scores of round r's candidate (and in round 0 of the initial model), by rank 0
        alone: None when done, else why the job stops before they are."""
        if r == 0 and not self.ctx.layout.global_eval(0).exists():
            if not self.do(0, "score initial", lambda: self.score(0, "global")):
                return "failed"
        # Only the scoring must still fit; the last round's scores have no next job to go to (a job
        # Slurm stops for time is retried, and the retry scores them).
        last = r == self.ctx.cfg.rounds.count - 1
        state = self.wait(lambda: self.candidate(r), f"candidate of round {r}", None if last else 0.0)
        if not state:
            return "time"
        if state == "score" and not self.do(r, "score candidate", lambda: self.score(r, "candidate")):
            return "failed"
        return None


def run(
    ctx: Ctx,
    site: str,
    start: int,
    threads: int,
    record: Path,
    walltime_minutes: float = 0.0,
    attempt: int = 1,
    attempts: int = 1,
    evaluates: bool = False,
    config: str | None = None,
) -> dict | None:
    """Do `site`'s rounds from `start` on until the federation ends or the job's time is up;
    write and return the segment record (rank 0; other ranks return None). A site of several
    ranks that no launcher started is re-executed as its ranks (`fedhpc resident --config config`)."""
    cfg, layout = ctx.cfg, ctx.layout
    started = time.time()
    if config is not None:
        argv = ["resident", "--config", config, "--round", str(start), "--site", site, "--record", str(record)]
        argv += [f"--walltime-minutes={walltime_minutes}", f"--attempt={attempt}", f"--attempts={attempts}"]
        threads = train_stage.start_ranks(site, cfg.sites[site], argv + ["--evaluate"] * evaluates, threads)
    world, idle = distributed.detect(), idle_limit(cfg, site)
    if world.distributed:  # one group for the job: rank 0's waits are the others' broadcasts
        train_stage.join_ranks(cfg, site, world, timeout=idle + 3600)
    margin = 60 * cfg.sites[site].resident_margin_minutes
    clock = Clock(job_deadline(walltime_minutes, started), margin, previous_seconds(layout, start, site))
    job = Job(ctx, site, threads, clock, idle, evaluates, attempt, attempts, world, start)
    audit = AuditLog(layout.audit)
    if world.is_main:
        audit.append(
            "resident.started", site=site, round=start, attempt=attempt, deadline=clock.deadline, ranks=world.size
        )
    if evaluates and 0 < start < cfg.rounds.count:  # the job before may have left its last candidate unscored
        job.agree(world.is_main and job.scores(start - 1))
    r, reason = start, "done"
    while r < cfg.rounds.count:
        stop = job.round(r)
        if stop == "time":
            reason = "time"
            break
        r += 1
        if stop in ("failed", "scores left"):  # the next job gives the next round its own attempts
            reason = "failed" if stop == "failed" else "time"
            break
        if r < cfg.rounds.count and not job.agree(clock.room_for_a_round()):
            reason = "time"
            break
    distributed.shutdown()
    if not world.is_main:
        return None
    doc = {
        "site": site,
        "start": start,
        "next_round": r,
        "reason": reason,
        "rounds": sorted({d["round"] for d in job.done if d["work"] == "train"}),
        "work": job.done,
        "attempt": attempt,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "seconds": round(time.time() - started, 3),
    }
    audit.append("resident.ended", site=site, round=start, next_round=r, reason=reason, pieces=len(job.done))
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
