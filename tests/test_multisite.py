"""Multi-site mode: a coordinator and sites, each its own `fedhpc run` in its own directory,
sharing nothing but the hub: an S3 object store (moto on loopback), or the coordinator's run
directory reached with rsync over SSH (loopback sshd)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedhpc.core.files import read_json, sha256_file
from fedhpc.core.layout import RunLayout
from fedhpc.exchange.hub import INDEX, SITE_FILES, complete
from fedhpc.stages.status import round_states
from fedhpc.trust.audit import verify_ledger
from fedhpc.trust.signing import TrustStore

from .multisite_util import (
    RUN,
    env_with,
    fault_shim,
    held_shards,
    join,
    kill,
    own_data_files,
    prepare,
    run_all,
    running,
    side_config,
    slow_steps,
    start,
    wait,
    wait_for,
)
from .workflow_util import tiny_config, write_config

pytestmark = pytest.mark.e2e


def events(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_federation_over_an_s3_hub_with_a_site_killed_and_a_site_joining_between_rounds(tmp_path, s3_hub):
    """The hub is an object store (as LUMI-O would be): everyone is a client of it. Round 0
    runs with lumi and a100 (lumi SIGKILLed mid-training and rerun); then laptop joins: its
    key is installed at the coordinator, every side's config gains it and a second round,
    and every side reruns its command."""
    cfg = tiny_config(tmp_path, rounds=1)
    laptop = cfg["sites"].pop("laptop")
    cfg["sites"]["lumi"]["batch_tokens"] = 128  # many steps, each made to take 30 ms: killed in the middle of them
    hub_url = f"s3://federation/{tmp_path.name}"
    exchange = {"kind": "s3", "hub": hub_url, "s3_endpoint": s3_hub, "poll_seconds": 1}
    coord, sides = prepare(tmp_path, side_config(cfg, exchange), ["lumi", "a100"])
    hub = coord / RUN
    with running() as procs:
        procs["coordinator"] = start(coord, "--role", "coordinator")
        slow = env_with(slow_steps(tmp_path / "shim-lumi", 0.03))
        procs.update({s: start(side, "--site", s, environ=slow if s == "lumi" else None) for s, side in sides.items()})
        # Fault: lumi's whole side (Snakemake and its training job) is SIGKILLed mid-round,
        # once its training has logged progress; rerunning the same command resumes it.
        metrics = sides["lumi"] / RUN / "rounds/r0000/sites/lumi/metrics.jsonl"
        wait_for(metrics, "lumi training", procs["lumi"], sides["lumi"], poll=0.02)
        assert not metrics.with_name("receipt.json").exists(), "lumi finished training before it could be killed"
        kill(procs["lumi"])
        procs["lumi"] = start(sides["lumi"], "--site", "lumi")
        for s in sides:
            wait(procs[s], sides[s], timeout=900)
        wait(procs["coordinator"], coord, timeout=300)

    # laptop joins for round 1.
    cfg["sites"]["laptop"], cfg["rounds"]["count"] = laptop, 2
    sides["laptop"] = join(tmp_path, coord, "laptop")
    for side in (coord, *sides.values()):
        write_config(side, side_config(cfg, exchange))
    run_all(coord, sides)

    layout = RunLayout(hub)
    trust = TrustStore(hub / "keys")
    assert read_json(layout.summary)["rounds_completed"] == 2
    assert [read_json(layout.plan(r))["participants"] for r in range(2)] == [
        ["a100", "lumi"],
        ["a100", "laptop", "lumi"],
    ]
    assert "laptop" in read_json(layout.aggregate_record(1))["weights"]
    for r in range(2):
        participants = read_json(layout.plan(r))["participants"]
        arrivals = read_json(layout.arrivals(r))
        assert arrivals["arrived"] == participants and arrivals["missing"] == []
        assert sorted(read_json(layout.verdicts(r))["accepted"]) == participants
        for s in participants:
            there = RunLayout(sides[s] / RUN)
            # What the site trained from is bit for bit the coordinator's global model and plan.
            assert sha256_file(there.global_model(r)) == sha256_file(layout.global_model(r))
            assert read_json(there.plan(r)) == read_json(layout.plan(r))
            # What the hub received is complete against the site's signed index, and is
            # exactly the update the site wrote.
            assert complete(layout.site_dir(r, s), trust, s)
            assert sha256_file(layout.update(r, s)) == sha256_file(there.update(r, s))
            # Only the published names reach the hub: no status, logs, site state or data.
            assert {p.name for p in layout.site_dir(r, s).iterdir()} <= {*SITE_FILES, INDEX}
            assert set(object_names(s3_hub, hub_url, f"rounds/r{r:04d}/sites/{s}/")) <= {*SITE_FILES, INDEX}
            planned = set(read_json(layout.plan(r))["sites"][s]["shards"])
            assert planned <= held_shards(sides[s], s), f"{s} was planned shards it does not hold"
            # Pinned data was scored where it lives: the site's signed scores, for this candidate.
            if s != "laptop":
                part = read_json(layout.eval_part(r, "candidate", s))
                assert part["signature"]["signer"] == s and part["model_sha256"] == sha256_file(layout.candidate(r))
                assert set(object_names(s3_hub, hub_url, f"rounds/r{r:04d}/candidate/evals/{s}/")) == {
                    "eval.json",
                    INDEX,
                }
        assert read_json(layout.candidate_eval(r))["missing"] == []
    assert verify_ledger(layout.audit).ok
    # The killed round counted once: one verdict, no drop, no late update.
    coord_events = events(layout.audit)
    assert not [e for e in coord_events if e["event"] in ("site.dropped", "update.late")]
    verdicts = [e for e in coord_events if e["event"] == "update.verdict" and e["round"] == 0 and e["site"] == "lumi"]
    assert len(verdicts) == 1 and verdicts[0]["accepted"]
    # Round 0 was not redone when the federation grew: planned and aggregated once.
    assert [e["round"] for e in coord_events if e["event"] == "round.planned"] == [0, 1]
    assert [e["round"] for e in coord_events if e["event"] == "round.aggregated"] == [0, 1]
    # The site's own ledger tells its side: training started twice in round 0, published once.
    lumi = events(sides["lumi"] / RUN / "audit.jsonl")
    assert [e["event"] for e in lumi if e.get("round") == 0] == ["train.started", "train.started", "update.published"]
    assert [e["event"] for e in lumi if "round" not in e] == ["data.catalogued"]
    assert verify_ledger(sides["lumi"] / RUN / "audit.jsonl").ok
    # `fedhpc status` on a site shows that site's own rounds, nothing of the others.
    for s, side in sides.items():
        assert [(row["round"], row["sites"]) for row in round_states(RunLayout(side / RUN))] == [
            (0, {s: "published" if s != "laptop" else "-"}),
            (1, {s: "published"}),
        ]

    # Sites packed their own data: the coordinator holds none of it, only each site's signed
    # catalogue, and planned from those (lumi's and a100's domains are theirs alone).
    catalogued = {s: {e["id"] for e in read_json(layout.catalogue(s))["shards"]} for s in sides}
    assert catalogued["lumi"] and catalogued["a100"] and not catalogued["laptop"]
    for s in sides:
        assert {p.name for p in layout.site_data(s).iterdir()} == {"catalogue.json", INDEX}
        assert set(object_names(s3_hub, hub_url, f"data/sites/{s}/")) == {"catalogue.json", INDEX}
    assert {p.name.removesuffix(".zarr") for p in (hub / "data/shards").iterdir()}.isdisjoint(
        catalogued["lumi"] | catalogued["a100"]
    )
    assert (
        not (hub / "data/corpus/law.jsonl").exists()
        and (sides["lumi"] / RUN / "data/sites/lumi/corpus/law.jsonl").exists()
    )
    # No raw data ever leaves a site: nothing of the data a site holds of its own, whole file
    # or any 64-byte piece of it, is in anything the site published.
    for s, side in sides.items():
        published = [p for p in hub.rglob("*") if p.is_file() and f"/sites/{s}/" in p.as_posix()]
        published += [p for p in hub.rglob(f"evals/{s}/*") if p.is_file()]
        blobs = [p.read_bytes() for p in published]
        hashes = {sha256_file(p) for p in published}
        data_files = own_data_files(side, s)
        assert data_files or s == "laptop"
        for f in data_files:
            raw = f.read_bytes()
            assert sha256_file(f) not in hashes
            for i in range(0, max(1, len(raw) - 64), 4096):
                piece = raw[i : i + 64]
                if len(piece) == 64 and len(set(piece)) > 4:  # headers of zeros prove nothing
                    assert not any(piece in b for b in blobs), f"{f} leaked into {s}'s publications"


def object_names(endpoint: str, hub_url: str, under: str) -> list[str]:
    import boto3

    bucket, _, prefix = hub_url.removeprefix("s3://").partition("/")
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{under}")
    names = [o["Key"].removeprefix(f"{prefix}/{under}") for o in listing.get("Contents", [])]
    assert names, f"nothing in {hub_url}/{under}"
    return names


def scontrol_job(cluster, job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True, env=cluster.env()
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def train_job_logs(side: Path, job: str) -> str:
    """The Slurm logs of a site's training jobs, newest lines of each: what to read when a
    requeue went another way than the test expects."""
    logs = sorted((side / ".snakemake" / "slurm_logs" / "rule_train" / job).glob("*.log"))
    text = "\n".join(f"== {p.name}\n" + "\n".join(p.read_text().splitlines()[-40:]) for p in logs)
    head = [
        ln for ln in (side / "run.log").read_text().splitlines() if any(w in ln for w in ("SLURM", "Error", "fail"))
    ]
    return (text or "no Slurm logs kept") + "\n== run.log\n" + "\n".join(head[-40:])


def test_two_slurm_clusters_a_late_site_a_requeued_job_a_coordinator_killed_while_aggregating_and_rollbacks(
    tmp_path, sshd_hub, slurm, slurm_b
):
    """lumi trains on one Slurm cluster and a100 on another; a100 is held past round 0's
    deadline, round 1's global model is corrupted on its way to a100, lumi's round-1 job is
    requeued by Slurm mid-training, the coordinator is
    SIGKILLed in round 1's aggregation and rerun, and a server step far too large makes
    every candidate regress, so each round rolls back."""
    sites = ["lumi", "a100"]
    cfg = tiny_config(tmp_path, rounds=2)
    del cfg["sites"]["laptop"]
    # Round 1's deadline must leave room for lumi's whole recovery under load: in one CI run the
    # executor's retry of the requeued job published 49 s after the round was planned, and its
    # exchange to the hub missed a 1-minute deadline.
    cfg["rounds"].update(deadline_minutes=1.5, quorum=0.5)
    cfg["evaluation"]["deadline_minutes"] = 1.0
    cfg["strategy"] = {"name": "fedavg", "server_lr": 40.0}
    cfg["sites"]["lumi"]["batch_tokens"] = 128  # many steps, each made to take 30 ms: requeued in the middle
    coord, sides = prepare(tmp_path, side_config(cfg, sshd_hub.exchange_config(tmp_path / "coordinator" / RUN)), sites)
    hub = coord / RUN
    hung = tmp_path / "aggregate-r0001-hung"
    coord_env = env_with(
        fault_shim(
            tmp_path / "shim-coordinator",
            # The first attempt at round 1's aggregation hangs (and is killed with the coordinator).
            f'if [[ "$1" == aggregate && " $* " == *" --round 0001 "* && ! -e {hung} ]]; then '
            f"touch {hung}; sleep 600; fi",
        )
    )
    shims = fault_shim(
        tmp_path / "shim-a100",
        # a100's round 0 training starts only once the coordinator closed round 0 without it.
        f'if [[ "$1" == train && " $* " == *" --round 0000 "* ]]; then '
        f"while [ ! -e {hub}/rounds/r0000/arrivals.json ]; do sleep 0.5; done; fi",
    )
    # A bad link: the first copy of round 1's global model that reaches a100 has one byte flipped.
    flipped = tmp_path / "model-flipped"
    real_rsync = shutil.which("rsync")
    (shims / "rsync").write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys\n"
        f"code = subprocess.call([{real_rsync!r}, *sys.argv[1:]])\n"
        "dest = sys.argv[-1]\n"
        f"if code == 0 and dest.endswith('/r0001/.exchange-staging/global__model.safetensors'):\n"
        f"    import pathlib\n"
        f"    mark = pathlib.Path({str(flipped)!r})\n"
        "    if not mark.exists():\n"
        "        mark.touch()\n"
        "        with open(dest, 'r+b') as fh:\n"
        "            fh.seek(4096); b = fh.read(1); fh.seek(4096); fh.write(bytes([b[0] ^ 0xFF]))\n"
        "sys.exit(code)\n"
    )
    (shims / "rsync").chmod(0o755)
    a100_env = env_with(shims, SLURM_CONF=str(slurm_b.conf))
    with running() as procs:
        procs["coordinator"] = start(coord, "--role", "coordinator", environ=coord_env)
        lumi_env = env_with(slow_steps(tmp_path / "shim-lumi", 0.03), **slurm.env())
        procs["lumi"] = start(sides["lumi"], "--site", "lumi", profile="ci-slurm", environ=lumi_env)
        procs["a100"] = start(sides["a100"], "--site", "a100", profile="ci-slurm", environ=a100_env)
        # Fault: the node under lumi's round-1 training job "fails": Slurm requeues the job
        # (what slurm-requeue asks for), and it trains again.
        metrics = sides["lumi"] / RUN / "rounds/r0001/sites/lumi/metrics.jsonl"
        wait_for(metrics, "lumi's round-1 training", procs["lumi"], sides["lumi"], timeout=600, poll=0.05)
        assert not metrics.with_name("receipt.json").exists(), "lumi finished before its job could be requeued"
        [job] = [e["slurm_job_id"] for e in events(sides["lumi"] / RUN / "audit.jsonl") if e.get("round") == 1]
        subprocess.run(["scontrol", "requeue", job], check=True, env=slurm.env())
        # Slurm holds a requeued job back for about two minutes (node clean-up); let it start now.
        deadline = time.time() + 60
        while scontrol_job(slurm, job)["JobState"] != "PENDING":
            assert time.time() < deadline, f"job {job} never went back to PENDING after requeue"
            time.sleep(0.2)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=slurm.env())
        wait_for(hung, "round 1's aggregation", procs["coordinator"], coord, timeout=600)
        kill(procs["coordinator"])
        procs["coordinator"] = start(coord, "--role", "coordinator", environ=coord_env)
        for s in sites:
            wait(procs[s], sides[s], timeout=600)
        wait(procs["coordinator"], coord, timeout=300)

    layout = RunLayout(hub)
    story = events(layout.audit)
    assert verify_ledger(layout.audit).ok
    assert read_json(layout.summary)["rounds_completed"] == 2
    # Round 0 closed at its deadline with lumi alone; a100 was dropped for it...
    assert read_json(layout.arrivals(0))["missing"] == ["a100"]
    assert [(e["round"], e["site"], e["reason"]) for e in story if e["event"] == "site.dropped"][0] == (
        0,
        "a100",
        "no update by the deadline",
    )
    # ...and its late round-0 update was folded into round 1 with a staleness-decayed weight.
    assert [(e["site"], e["from_round"]) for e in story if e["event"] == "update.late" and e["round"] == 1] == [
        ("a100", 0)
    ]
    assert "a100@r0000" in read_json(layout.verdicts(1))["late_accepted"]
    weights = read_json(layout.aggregate_record(1))["weights"]
    assert 0 < weights["a100@r0000"] < weights["lumi"]
    # The coordinator killed mid-aggregation redid it once on rerun: one aggregation per round.
    assert [e["round"] for e in story if e["event"] == "round.aggregated"] == [0, 1]
    # Every candidate regressed: each round was rolled back, with the numbers, and the global
    # model the sites pulled next is the previous one, restored bit for bit.
    rolled = [e for e in story if e["event"] == "round.rolled_back"]
    assert [e["round"] for e in rolled] == [1, 2]
    # (over the domains both models were scored on, when a holder's scores missed the evaluation
    # deadline under load)
    assert all(re.match(r"held-out loss( over [\w, ]+)? regressed from \d", e["reason"]) for e in rolled), rolled
    assert sha256_file(layout.global_model(2)) == sha256_file(layout.global_model(0))
    assert sha256_file(RunLayout(sides["lumi"] / RUN).global_model(1)) == sha256_file(layout.global_model(0))
    # lumi trained round 1 again after the fault and published once; the coordinator saw one
    # update from it, in time. Either recovery the profile configures may be the one that ran:
    # usually Slurm's requeue (the same job id trains again), but Slurm shows an admin-requeued
    # job as FAILED for a moment, and if the executor polls in that moment it counts a failure
    # and `retries: 1` resubmits (a new job id, which Snakemake logs as a failed attempt). Then
    # the requeued job may train as well: the publish lock lets one of the two publish and the
    # other drop its update.
    lumi = [e for e in events(sides["lumi"] / RUN / "audit.jsonl") if e.get("round") == 1]
    jobs_seen = train_job_logs(sides["lumi"], "0001_lumi")
    kinds = [e["event"] for e in lumi]
    started = [e["slurm_job_id"] for e in lumi if e["event"] == "train.started"]
    assert kinds.count("update.published") == 1 and kinds[:2] == ["train.started", "train.started"], jobs_seen
    assert started[0] == job and len(started) in (2, 3), jobs_seen
    if len(started) == 3:
        assert kinds.count("update.duplicate_dropped") == 1 and len(set(started)) == 2, jobs_seen
    published_by = read_json(RunLayout(sides["lumi"] / RUN).receipt(1, "lumi"))["slurm_job_id"]
    assert published_by in started[1:], jobs_seen
    if set(started) != {job}:
        retried = f"SLURM-job '{job}' failed, SLURM status is: 'FAILED'"
        assert retried in (sides["lumi"] / "run.log").read_text(), jobs_seen
    assert "lumi" in read_json(layout.arrivals(1))["arrived"]
    # The corrupted copy was caught by its hash, recorded, fetched again, and a100 trained
    # round 1 from the coordinator's model, bit for bit.
    assert flipped.exists()
    a100 = events(sides["a100"] / RUN / "audit.jsonl")
    assert [(e["round"], e["file"], e["attempt"]) for e in a100 if e["event"] == "transfer.rejected"] == [
        (1, "global/model.safetensors", 1)
    ]
    there = RunLayout(sides["a100"] / RUN)
    assert sha256_file(there.global_model(1)) == sha256_file(layout.global_model(1))
    # Each site's jobs ran on its own cluster.
    for s, cluster in (("lumi", slurm), ("a100", slurm_b)):
        receipt = read_json(layout.receipt(0, s))
        assert receipt["slurm_cluster"] == cluster.name
        job = scontrol_job(cluster, receipt["slurm_job_id"])
        assert job["JobState"] == "COMPLETED" and job["WorkDir"] == str(sides[s])
