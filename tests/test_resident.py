"""Resident site workers (issue 21, item 3): one job trains a site's rounds in turn, ends before its
time limit and is followed by the next; a killed one resumes without training a site-round twice."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.exchange.hub import announce_stop
from fedhpc.stages import resident
from fedhpc.stages import train as train_stage
from fedhpc.stages.context import context
from fedhpc.stages.failures import read_failure, status_path
from fedhpc.trust.identity import create_keypair
from tests.multisite_util import RUN, prepare, run_all, side_config
from tests.workflow_util import events, kill_when, run_workflow, tiny_config, write_config


def _config(tmp: Path, rounds: int, **site) -> dict:
    cfg = tiny_config(tmp, rounds=rounds)
    cfg["sites"]["lumi"].update(resident=True, **site)
    cfg["sites"]["laptop"].update(resident=True)
    return cfg


def _chain(layout: RunLayout, site: str, rounds: int) -> list[dict]:
    """The site's segment records in order, each starting where the one before stopped."""
    records, r = [], 0
    while r < rounds:
        record = read_json(layout.resident(r, site))
        assert record["start"] == r and record["next_round"] > r
        records.append(record)
        r = record["next_round"]
    return records


def _published_once(run: Path, rounds: int, sites: int) -> None:
    published = Counter((e["round"], e["site"]) for e in events(run) if e["event"] == "update.published")
    assert set(published.values()) == {1}, f"a site-round was trained twice: {published}"
    assert len(published) == rounds * sites


# The worker's loop, on a blackboard whose rounds appear on cue and whose training is a stand-in.


@pytest.fixture
def board(tmp_path, monkeypatch):
    cfg = _config(tmp_path, 4, resident_idle_minutes=0.02)
    path = write_config(tmp_path, cfg)
    ctx = context(str(path), with_task=False)
    trained: list[int] = []

    def fake_train(cfg, layout, trust, r, site, threads, status, attempt, attempts, keep_group=False):
        if r in fail_rounds:
            raise RuntimeError(f"device lost in round {r}")
        trained.append(r)
        time.sleep(seconds_per_round)
        write_json(status, {"state": "published", "round": r, "seconds": seconds_per_round})
        return {"state": "published"}

    fail_rounds: set[int] = set()
    seconds_per_round = 0.01
    monkeypatch.setattr("fedhpc.stages.train.run_train_job", fake_train)

    def publish(*rounds: int) -> None:
        for r in rounds:
            ctx.layout.plan(r).parent.mkdir(parents=True, exist_ok=True)
            write_json(ctx.layout.plan(r), {"round": r})
            write_json(ctx.layout.global_meta(r), {"round": r})

    return ctx, publish, trained, fail_rounds


def test_a_worker_trains_every_round_in_order_and_skips_those_already_done(board, tmp_path):
    ctx, publish, trained, _ = board
    publish(0, 1, 2, 3)
    write_json(status_path(ctx.layout, 1, "lumi"), {"state": "published", "seconds": 1.0})
    rec = resident.run(ctx, "lumi", 0, 1, tmp_path / "seg.json")
    assert trained == [0, 2, 3]
    assert rec["reason"] == "done" and rec["next_round"] == 4
    assert read_json(tmp_path / "seg.json") == rec


def test_a_worker_ends_before_its_time_limit_and_says_where_the_next_starts(board, tmp_path):
    ctx, publish, trained, _ = board
    publish(0, 1, 2, 3)
    # An allocation of 0.3 minutes with a margin of 0.3: round 0, then no room for another.
    ctx.cfg.sites["lumi"].resident_margin_minutes = 0.3
    rec = resident.run(ctx, "lumi", 0, 1, tmp_path / "seg.json", walltime_minutes=0.3)
    assert trained == [0], "the first round always runs, and then there was no room"
    assert rec["reason"] == "time" and rec["next_round"] == 1


def test_a_waiting_worker_ends_for_time_while_the_next_plan_is_late(board, tmp_path):
    ctx, publish, trained, _ = board
    publish(0)
    ctx.cfg.sites["lumi"].resident_margin_minutes = 0.25
    ctx.cfg.sites["lumi"].resident_idle_minutes = 5
    t0 = time.monotonic()
    rec = resident.run(ctx, "lumi", 0, 1, tmp_path / "seg.json", walltime_minutes=0.3)
    assert trained == [0] and rec["reason"] == "time" and rec["next_round"] == 1
    assert time.monotonic() - t0 < 10, "it waited past the point where a round could still fit"


def test_the_deadline_is_slurms_end_time_else_the_runtime_from_the_jobs_start(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    monkeypatch.delenv("SLURM_JOB_START_TIME", raising=False)
    assert resident.job_deadline(0, 1000.0) is None
    assert resident.job_deadline(2, 1000.0) == 1120.0
    monkeypatch.setenv("SLURM_JOB_START_TIME", "990")  # the job started before this process
    assert resident.job_deadline(2, 1000.0) == 1110.0
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1100")
    assert resident.job_deadline(2, 1000.0) == resident.job_deadline(0, 1000.0) == 1100.0


def test_with_no_plan_coming_a_worker_fails_without_a_record(board, tmp_path):
    ctx, publish, trained, _ = board
    publish(0)
    with pytest.raises(resident.ResidentIdle, match="no plan for round 1"):
        resident.run(ctx, "lumi", 0, 1, tmp_path / "seg.json")
    assert trained == [0] and not (tmp_path / "seg.json").exists()


def test_a_worker_stops_at_once_when_the_coordinator_announces_the_federation_stopped(board, tmp_path):
    ctx, publish, trained, _ = board
    create_keypair(ctx.trust.keys_dir, "coordinator")
    ctx.cfg.sites["lumi"].resident_idle_minutes = 5
    publish(0)
    # Round 0 falls short of quorum once lumi trained it: gather's notice at the run's root.
    threading.Timer(2.0, announce_stop, (ctx.cfg.exchange, ctx.layout, ctx.trust, 0, "quorum not met")).start()
    t0 = time.monotonic()
    with pytest.raises(
        resident.CoordinatorStopped, match=r"site lumi: the coordinator stopped .*round 0: quorum not met"
    ):
        resident.run(ctx, "lumi", 0, 1, tmp_path / "seg.json")
    assert time.monotonic() - t0 < 10, "it waited on instead of stopping"
    assert trained == [0] and not (tmp_path / "seg.json").exists()


def test_a_failed_round_is_retried_by_the_job_and_given_up_on_the_last_attempt(board, tmp_path):
    ctx, publish, trained, fail_rounds = board
    publish(0, 1, 2, 3)
    fail_rounds.add(1)
    with pytest.raises(RuntimeError, match="device lost"):
        resident.run(ctx, "lumi", 0, 1, tmp_path / "seg.json", attempt=1, attempts=2)
    assert trained == [0] and not (tmp_path / "seg.json").exists()
    # The last attempt: round 1 is lost for this site and the next job starts at round 2.
    rec = resident.run(ctx, "lumi", 0, 1, tmp_path / "seg.json", attempt=2, attempts=2)
    assert trained == [0] and rec["reason"] == "failed" and rec["next_round"] == 2
    assert read_json(status_path(ctx.layout, 1, "lumi"))["state"] == "failed"
    fail_rounds.clear()
    rec = resident.run(ctx, "lumi", 2, 1, ctx.layout.resident(2, "lumi"))
    assert trained == [0, 2, 3] and rec["reason"] == "done"


def test_a_data_holding_worker_scores_each_candidate_unless_the_merge_went_on_without_it(board, tmp_path, monkeypatch):
    ctx, publish, trained, _ = board
    layout, scored = ctx.layout, []
    train = train_stage.run_train_job  # the board's stand-in

    def coordinator_after_training(cfg, layout_, trust, r, *rest, **kw):
        state = train(cfg, layout_, trust, r, *rest, **kw)
        if r == 1:  # the merge gave up on this site's scores and the round was promoted without them
            write_json(layout.candidate_eval(1), {"missing": ["lumi"]})
            publish(2)
        else:
            write_json(layout.aggregate_record(r), {"round": r})  # the candidate is out
        return state

    def score(ctx, r, which, site, threads):
        scored.append((r, which))
        if which == "candidate" and r + 1 < 4:
            publish(r + 1)  # merged and promoted: the next round is planned

    monkeypatch.setattr("fedhpc.stages.train.run_train_job", coordinator_after_training)
    monkeypatch.setattr("fedhpc.stages.evaluate.run", score)
    publish(0)
    rec = resident.run(ctx, "lumi", 0, 1, tmp_path / "seg.json", evaluates=True)
    assert trained == [0, 1, 2, 3]
    assert scored == [(0, "global"), (0, "candidate"), (2, "candidate"), (3, "candidate")]
    assert [(w["round"], w["work"]) for w in rec["work"]] == [
        (0, "train"),
        (0, "score initial"),
        (0, "score candidate"),
        (1, "train"),
        (2, "train"),
        (2, "score candidate"),
        (3, "train"),
        (3, "score candidate"),
    ]


def test_a_worker_out_of_time_before_its_candidate_came_leaves_the_scoring_to_the_next_job(
    board, tmp_path, monkeypatch
):
    ctx, publish, trained, _ = board
    layout, scored = ctx.layout, []

    def score(ctx, r, which, site, threads):
        scored.append((r, which))
        if which == "candidate":
            publish(r + 1)  # merged and promoted: the next round is planned

    monkeypatch.setattr("fedhpc.stages.evaluate.run", score)
    ctx.cfg.sites["lumi"].resident_margin_minutes = 0.08
    ctx.cfg.sites["lumi"].resident_idle_minutes = 5
    publish(0)
    # 6 s with a 4.8 s margin: the job trains round 0 and scores the initial model, then its time
    # runs out waiting for the candidate. The next job starts at round 1, not again at 0 (the
    # workflow's chain needs each job to start after the one before).
    rec = resident.run(ctx, "lumi", 0, 1, layout.resident(0, "lumi"), walltime_minutes=0.1, evaluates=True)
    assert (rec["reason"], rec["next_round"], trained, scored) == ("time", 1, [0], [(0, "global")])
    write_json(layout.global_eval(0), {"missing": []})  # the initial scores were merged
    write_json(layout.aggregate_record(0), {"round": 0})  # round 0's candidate is out
    rec = resident.run(ctx, "lumi", 1, 1, layout.resident(1, "lumi"), walltime_minutes=0.1, evaluates=True)
    assert (rec["reason"], rec["next_round"], trained) == ("time", 2, [0, 1])
    assert scored == [(0, "global"), (0, "candidate")], "the candidate left over is scored first"
    assert [(w["round"], w["work"]) for w in rec["work"]] == [(0, "score candidate"), (1, "train")]
    # A job that starts by scoring the candidate left over waits for its own first round's plan
    # past the time (ending before it, it would say the next job starts where it did).
    write_json(layout.aggregate_record(1), {"round": 1})
    monkeypatch.setattr("fedhpc.stages.evaluate.run", lambda ctx, r, which, site, threads: scored.append((r, which)))
    threading.Timer(2.5, publish, (2,)).start()
    rec = resident.run(ctx, "lumi", 2, 1, layout.resident(2, "lumi"), walltime_minutes=0.1, evaluates=True)
    assert (rec["next_round"], trained, scored[-1]) == (3, [0, 1, 2], (1, "candidate"))
    # The last round's candidate has no next job to be scored by: the job waits for it past the time.
    publish(3)
    threading.Timer(2.5, write_json, (layout.aggregate_record(3), {"round": 3})).start()
    rec = resident.run(ctx, "lumi", 3, 1, layout.resident(3, "lumi"), walltime_minutes=0.1, evaluates=True)
    assert (rec["reason"], rec["next_round"], scored[-1]) == ("done", 4, (3, "candidate"))


def test_a_worker_that_died_leaves_the_failure_record_of_the_round_it_was_on(board, tmp_path, monkeypatch):
    ctx, publish, trained, _ = board
    layout, train = ctx.layout, train_stage.run_train_job  # the board's stand-in
    publish(0, 1)

    def dies_in_round_1(cfg, layout_, trust, r, *rest, **kw):
        # As a crash or a kill would: none of the worker's own error handling runs.
        return os._exit(137) if r == 1 else train(cfg, layout_, trust, r, *rest, **kw)

    monkeypatch.setattr("fedhpc.stages.train.run_train_job", dies_in_round_1)
    assert resident.record_exited(ctx, "lumi", 0, 137, 1, 2) is None, "nothing begun yet: between rounds"
    pid = os.fork()
    if pid == 0:
        resident.run(ctx, "lumi", 0, 1, tmp_path / "seg.json", attempt=1, attempts=2)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 137
    rec = resident.record_exited(ctx, "lumi", 0, 137, 1, 2)
    assert rec is not None and rec["round"] == 1 and rec["exit_code"] == 137 and rec["attempt"] == 1
    assert read_failure(layout, 1, "lumi") == rec and read_failure(layout, 0, "lumi") is None
    assert not (tmp_path / "seg.json").exists()


# Whole federations on the local profile.


@pytest.mark.e2e
def test_resident_jobs_end_for_time_are_followed_and_a_killed_federation_resumes_without_training_twice(tmp_path):
    # Every site resident (a mix of modes is tested through Slurm and through a hub). lumi's margin is
    # its whole 5-minute allocation: each of its jobs trains the one round it waits for regardless and
    # ends for time, however fast a round is (with a 0.9-minute margin of a 1-minute allocation, 6 s of
    # room, a warm-served job trained two rounds), and the workflow starts the next where each stopped.
    # The laptop's and a100's one job trains every round, with 5 minutes for it; the whole federation
    # is SIGKILLed once the laptop trained round 1, and rerun.
    cfg = _config(tmp_path, 3, resident_margin_minutes=5)
    cfg["sites"]["laptop"]["resident_margin_minutes"] = 0
    cfg["sites"]["a100"].update(resident=True, resident_margin_minutes=0)
    write_config(tmp_path, cfg)
    run = Path(cfg["output_dir"]) / cfg["run"]
    layout = RunLayout.of(run)
    limit = ("--set-resources", "resident:runtime=5")
    kill_when(tmp_path, status_path(layout, 1, "laptop"), *limit)
    assert not layout.resident(0, "laptop").exists()
    run_workflow(tmp_path, *limit)

    _published_once(run, 3, 3)
    lumi = _chain(layout, "lumi", 3)
    assert len(lumi) >= 2 and {r["reason"] for r in lumi[:-1]} == {"time"} and lumi[-1]["reason"] == "done"
    (laptop,) = _chain(layout, "laptop", 3)
    assert laptop["reason"] == "done" and laptop["rounds"] == [2], "the rerun skipped the rounds already trained"
    # Same files as train jobs leave, and no train job ran.
    for r in range(3):
        for site in ("lumi", "laptop", "a100"):
            assert read_json(status_path(layout, r, site))["state"] == "published"
            assert layout.receipt(r, site).exists()
    assert not (run / "benchmarks" / "train").exists()
    # Each round's training output also has the round's own log, as a train job's would.
    for r in range(3):
        assert f"round {r} laptop: step" in (run / "logs" / "train" / f"r{r:04d}-laptop.log").read_text()
    # lumi and a100 hold held-out data: their jobs scored every candidate (and the initial model);
    # only the coordinator's scoring ran as jobs.
    assert {p.name.rsplit("-", 1)[1] for p in (run / "logs" / "evaluate").glob("*.log")} == {
        "coordinator.log",
        "merge.log",
    }
    for r, which in [(0, "global"), (0, "candidate"), (1, "candidate"), (2, "candidate")]:
        merged = read_json(layout.global_eval(0) if which == "global" else layout.candidate_eval(r))
        assert {"law", "clinical"} <= set(merged["domains"]) and not merged["missing"]
        for site in ("lumi", "a100"):
            assert read_json(layout.eval_part(r, which, site))["holder"] == site
    assert "OMP_NUM_THREADS" not in (run / "logs" / "resident" / "r0000-laptop.log").read_text()
    dry = run_workflow(tmp_path, "-n", *limit)
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.e2e
def test_a_resident_site_of_a_multi_site_run_pulls_trains_scores_and_publishes_through_the_hub(tmp_path):
    cfg = tiny_config(tmp_path, rounds=2)
    del cfg["sites"]["laptop"]
    # lumi is resident and trains as two ranks (torch's launcher here, srun under Slurm) in one
    # process group for the whole job; a100 keeps one job per round.
    cfg["sites"]["lumi"].update(resident=True, ranks_per_node=2)
    exchange = {"kind": "shared", "hub": str(tmp_path / "coordinator" / RUN), "poll_seconds": 0.5}
    coord, sides = prepare(tmp_path, side_config(cfg, exchange), ["lumi", "a100"])
    run_all(coord, sides, site_timeout=600)

    hub, lumi = RunLayout(coord / RUN), RunLayout(sides["lumi"] / RUN)
    assert read_json(hub.summary)["rounds_completed"] == 2
    for r in range(2):
        assert read_json(hub.arrivals(r))["missing"] == []
        assert sorted(read_json(hub.verdicts(r))["accepted"]) == ["a100", "lumi"]
        # What arrived is what the resident job wrote, trained from the coordinator's own global model.
        assert sha256_file(hub.update(r, "lumi")) == sha256_file(lumi.update(r, "lumi"))
        assert sha256_file(lumi.global_model(r)) == sha256_file(hub.global_model(r))
        part = read_json(hub.eval_part(r, "candidate", "lumi"))
        assert part["signature"]["signer"] == "lumi" and part["model_sha256"] == sha256_file(hub.candidate(r))
        assert not read_json(hub.candidate_eval(r))["missing"]
    assert read_json(hub.eval_part(0, "global", "lumi"))["signature"]["signer"] == "lumi"
    (record,) = _chain(lumi, "lumi", 2)
    assert record["reason"] == "done" and record["rounds"] == [0, 1], "one job, one group, both rounds"
    assert [read_json(hub.receipt(r, "lumi"))["ranks"] for r in range(2)] == [2, 2]
    assert not (sides["lumi"] / RUN / "benchmarks" / "train").exists(), "a train job ran for the resident site"
    for r in range(2):  # each round's log travels with its update, as a train job's does
        assert f"round {r} lumi: step" in (hub.site_dir(r, "lumi") / "train.log").read_text()
