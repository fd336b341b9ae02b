"""Issue 19, redone smaller: four sites of uneven text in four languages finish every round
(through the epoch boundary that used to give the smallest site less than one optimizer step),
and a site whose job fails (a deterministic error, or a process killed outright) closes its
round in seconds instead of at the deadline."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fedhpc.core.files import read_json
from fedhpc.core.layout import RunLayout
from tests.uneven_util import uneven_config
from tests.workflow_util import REPO, env, events, run_workflow, snakemake_cmd, summary, write_config

pytestmark = pytest.mark.e2e


def test_four_uneven_languages_finish_every_round_through_the_epoch_boundary(tmp_path):
    cfg = uneven_config(tmp_path)
    cfg["sites"]["site_sv"].update(ranks_per_node=2, engine="ddp")  # the smallest site trains on two ranks
    cfg["strategy"] = {"weighting": "tokens"}
    write_config(tmp_path, cfg)
    run_workflow(tmp_path)
    layout = RunLayout.of(Path(cfg["output_dir"]) / cfg["run"])

    s = summary(tmp_path, cfg)
    assert s["rounds_completed"] == 2 and s["rollbacks"] == []
    # Round 1 is site_sv's short last shard: fewer sequences than one step of 32 (it used to fail).
    sv = read_json(layout.plan(1))["sites"]["site_sv"]
    assert 0 < sv["train_tokens"] < 32 * 32 and sv["steps"] == 1 and "a smaller step" in sv["reason"]
    for r in range(2):
        plan, agg = read_json(layout.plan(r)), read_json(layout.aggregate_record(r))
        trained = {}
        for site in plan["participants"]:
            receipt = read_json(layout.receipt(r, site))
            assert receipt["tokens"] == plan["sites"][site]["train_tokens"], (r, site)
            trained[site] = receipt["tokens"]
        assert len(trained) == 4
        assert agg["weights"] == pytest.approx({k: v / sum(trained.values()) for k, v in trained.items()})
    assert read_json(layout.receipt(1, "site_sv"))["ranks"] == 2
    losses = [read_json(layout.global_eval(r))["loss"] for r in range(3)]
    assert all(math.isfinite(x) for x in losses) and losses[0] > losses[1] > losses[2], losses


class JobKiller(threading.Thread):
    """SIGKILLs the whole Slurm job (batch shell included) of the chosen attempts of a site, as
    soon as the attempt notes its start in `attempt` (fedhpc.stages.failures.record_start)."""

    def __init__(self, attempt: Path, attempts: set[int]):
        super().__init__(daemon=True)
        self.attempt, self.attempts, self.killed = attempt, attempts, []
        self.done = threading.Event()

    def run(self) -> None:
        seen = set()
        while not self.done.is_set():
            try:
                rec = read_json(self.attempt)
            except (FileNotFoundError, ValueError):
                rec = None
            if rec and rec["attempt_id"] not in seen and rec["attempt"] in self.attempts:
                seen.add(rec["attempt_id"])
                subprocess.run(["scancel", "--signal=KILL", rec["slurm_job_id"]], env=env(), check=True)
                self.killed.append((rec["attempt"], rec["slurm_job_id"]))
            time.sleep(0.05)


class Killer(threading.Thread):
    """SIGKILLs the training process of chosen sites and attempts of this run only (never the
    shell around it, nor the command that records its end), as an OOM killer or a crash would."""

    def __init__(self, config: str, targets: dict[str, set[int]]):
        super().__init__(daemon=True)
        self.config, self.targets, self.killed = config, targets, []
        self.done = threading.Event()

    def processes(self):
        for d in Path("/proc").iterdir():
            try:
                args = [a.decode() for a in (d / "cmdline").read_bytes().split(b"\0") if a]
            except (OSError, ValueError):
                continue
            if "train" in args and "--exited" not in args and self.config in args and "--site" in args:
                yield int(d.name), args[args.index("--site") + 1], int(args[args.index("--attempt") + 1])

    def run(self) -> None:
        while not self.done.is_set():
            for pid, site, attempt in list(self.processes()):
                if attempt in self.targets.get(site, set()) and (site, attempt) not in self.killed:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((site, attempt))
            time.sleep(0.02)


def test_a_site_whose_job_fails_closes_the_round_in_seconds_not_at_the_deadline(tmp_path):
    failing_round(tmp_path, "--retries", "1")


def test_through_slurm_a_site_whose_job_fails_closes_the_round_in_seconds(slurm, tmp_path):
    # Here site_fi's whole Slurm job, shell and all, is killed in both attempts (scancel
    # --signal=KILL, as a time limit or a node failure would): nothing of it writes a record.
    failing_round(tmp_path, "--profile", str(REPO / "profiles" / "ci-slurm"), jobs_killed=True)  # its retries: 1


def failing_round(tmp_path: Path, *profile: str, jobs_killed: bool = False) -> None:
    cfg = uneven_config(tmp_path, rounds=1, quorum=0.5)  # deadline: 5 minutes
    write_config(tmp_path, cfg)
    layout = RunLayout.of(Path(cfg["output_dir"]) / cfg["run"])
    # The sites pack their data; then site_sv's shards are damaged on its disk: a deterministic error.
    run_workflow(tmp_path, "--until", "shard_site")
    for chunk in (layout.site_data("site_sv") / "shards").rglob("c/*"):
        if chunk.is_file():
            data = chunk.read_bytes()
            chunk.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    # site_fi's process (or its Slurm job) is killed in both its attempts; site_de's only in its first.
    killer = Killer(str(layout.config), {"site_de": {1}} if jobs_killed else {"site_fi": {1, 2}, "site_de": {1}})
    job_killer = JobKiller(layout.site_dir(0, "site_fi") / "attempt.json", {1, 2})
    killer.start()
    if jobs_killed:
        job_killer.start()
    try:
        proc = subprocess.run(snakemake_cmd(tmp_path, *profile), capture_output=True, text=True, env=env(), timeout=600)
    finally:
        killer.done.set()
        job_killer.done.set()
    assert sorted(killer.killed + [("site_fi", a) for a, _ in job_killer.killed]) == [
        ("site_de", 1),
        ("site_fi", 1),
        ("site_fi", 2),
    ]
    # The workflow finishes its round and report; it exits 1 because one job, site_fi's training
    # (killed in every attempt), failed for good. site_sv's ended "failed" without failing the job.
    assert proc.returncode == 1, proc.stderr[-3000:]
    statuses = {p.parent.name: read_json(p)["state"] for p in layout.round_dir(0).glob("sites/*/status.json")}
    assert statuses == {"site_de": "published", "site_en": "published", "site_sv": "failed"}

    arrivals = read_json(layout.arrivals(0))
    planned = read_json(layout.plan(0))["created"]
    assert arrivals["arrived"] == ["site_de", "site_en"] and sorted(arrivals["failed"]) == ["site_fi", "site_sv"]
    assert arrivals["closed_at"] < arrivals["deadline"] == planned + 300, "the round waited for the deadline"
    sv, fi = arrivals["failed"]["site_sv"], arrivals["failed"]["site_fi"]
    assert sv["deterministic"] and sv["attempt"] == 1 and "sha256" in sv["error"]
    assert not fi["deterministic"] and (fi["attempt"], fi["attempts"]) == (2, 2)
    if jobs_killed:
        assert fi["error"].startswith(f"Slurm job {job_killer.killed[-1][1]} ended "), fi["error"]
    else:
        assert "SIGKILL" in fi["error"]
    # The retry that published leaves no failure behind; the audit log keeps every attempt (but
    # the coordinator may never see a killed job's first attempt: its retry can start first).
    assert not (layout.site_dir(0, "site_de") / "failure.json").exists()
    failed = sorted((e["site"], e["attempt"]) for e in events(layout.root) if e["event"] == "train.failed")
    expected = [("site_de", 1), ("site_fi", 1), ("site_fi", 2), ("site_sv", 1)]  # sv: not retried
    if jobs_killed and ("site_fi", 1) not in failed:
        expected.remove(("site_fi", 1))
    assert failed == expected
    assert sorted(e["site"] for e in events(layout.root) if e["event"] == "site.failed") == ["site_fi", "site_sv"]
    assert summary(tmp_path, cfg)["rounds_completed"] == 1
