"""A site job killed together with its shell (time limit, scancel, node failure) leaves no record:
the coordinator asks Slurm about the job its last attempt noted, and closes the round at once."""

from __future__ import annotations

import time

import pytest

import fedhpc.stages.gather
from fedhpc.core.files import write_json
from fedhpc.stages.failures import (
    INVOCATION_ENV,
    final_failure,
    read_failure,
    record_start,
    record_vanished,
    status_path,
)
from fedhpc.stages.slurm_jobs import GONE, JobWatch, job_state, local_cluster
from fedhpc.trust.audit import AuditLog
from tests.test_gather import gather_in_thread, open_round


@pytest.fixture
def slurm_cli(tmp_path, monkeypatch):
    """`scontrol show config` naming the cluster "alpha" and an `squeue` that answers with the
    contents of squeue.out (or fails as for an unknown job id when it holds INVALID)."""
    bindir = tmp_path / "slurm-bin"
    bindir.mkdir()
    answer = tmp_path / "squeue.out"
    calls = tmp_path / "squeue.calls"
    (bindir / "scontrol").write_text('#!/bin/sh\necho "ClusterName             = alpha"\n')
    # The answer is read once: a test rewriting it between two reads made one call answer half
    # of each (an "INVALID" job state; CI failed on it).
    (bindir / "squeue").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\na=$(cat {answer})\n'
        'case "$a" in *INVALID*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac\n'
        'echo "$a"\n'
    )
    for f in bindir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setenv(INVOCATION_ENV, "this-head")
    local_cluster.cache_clear()
    yield answer, calls
    local_cluster.cache_clear()


def started(b, site: str, attempt: int, attempts: int, monkeypatch, job: str = "4242", cluster: str = "alpha") -> None:
    """What `fedhpc train` notes as it starts, inside Slurm job `job` of `cluster`."""
    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("SLURM_CLUSTER_NAME", cluster)
    record_start(b.layout, b.r, site, attempt, attempts)
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.delenv("SLURM_CLUSTER_NAME")


def test_a_last_attempt_whose_job_ended_without_a_word_closes_the_round_at_once_naming_the_job(
    tmp_path, monkeypatch, slurm_cli
):
    answer, _ = slurm_cli
    b, cfg = open_round(tmp_path, quorum=0.5)  # deadline two hours away
    started(b, "c", attempt=2, attempts=2, monkeypatch=monkeypatch)
    answer.write_text("TIMEOUT\n")
    t, result = gather_in_thread(b, cfg)
    t.join(timeout=10)
    assert not t.is_alive(), "gather waited for the deadline of a site whose job Slurm says has ended"
    assert result["arrived"] == ["a", "b"] and result["missing"] == ["c"]
    c = result["failed"]["c"]
    assert (c["attempt"], c["attempts"], c["deterministic"]) == (2, 2, False)
    assert c["error"].startswith("Slurm job 4242 ended TIMEOUT without a word")
    rec = read_failure(b.layout, b.r, "c")
    assert rec["final"] and rec["slurm_state"] == "TIMEOUT" and rec["slurm_job_id"] == "4242"
    events = AuditLog(b.layout.audit).events()
    assert [(e["event"], e["site"]) for e in events if e["event"] in ("train.failed", "site.failed")] == [
        ("train.failed", "c"),
        ("site.failed", "c"),
    ]


def test_a_running_job_is_waited_for_and_its_end_closes_the_round(tmp_path, monkeypatch, slurm_cli):
    answer, _ = slurm_cli
    b, cfg = open_round(tmp_path, quorum=1.0)
    monkeypatch.setattr(fedhpc.stages.gather, "JobWatch", lambda: JobWatch(every=0))
    started(b, "c", attempt=1, attempts=1, monkeypatch=monkeypatch)
    answer.write_text("RUNNING\n")
    t, result = gather_in_thread(b, cfg)
    time.sleep(1.0)
    assert t.is_alive() and read_failure(b.layout, b.r, "c") is None
    # Replaced whole while gather polls: ended long ago, slurmctld forgot it.
    (tmp_path / "squeue.new").write_text("INVALID\n")
    (tmp_path / "squeue.new").replace(answer)
    t.join(timeout=10)
    assert not t.is_alive()
    assert "Slurm job 4242 ended GONE" in str(result["error"]) and "quorum out of reach" in str(result["error"])


def test_an_earlier_attempt_that_vanished_is_recorded_but_not_final(tmp_path, monkeypatch, slurm_cli):
    answer, _ = slurm_cli
    b, _ = open_round(tmp_path, quorum=1.0)
    started(b, "c", attempt=1, attempts=2, monkeypatch=monkeypatch)
    answer.write_text("NODE_FAIL\n")
    rec = record_vanished(b.layout, b.r, "c", JobWatch().ended)
    assert rec is not None and not rec["final"] and final_failure(b.layout, b.r, "c") is None  # Snakemake retries it
    # Asked again, the attempt has its record: nothing new is written or audited.
    assert record_vanished(b.layout, b.r, "c", JobWatch().ended) is None
    assert len([e for e in AuditLog(b.layout.audit).events() if e["event"] == "train.failed"]) == 1


@pytest.mark.parametrize(
    "case",
    ["job still running", "job wrote its status", "job on another cluster", "earlier invocation", "no Slurm job"],
)
def test_what_is_not_a_vanished_job(tmp_path, monkeypatch, slurm_cli, case):
    answer, _ = slurm_cli
    b, _ = open_round(tmp_path, quorum=1.0)
    answer.write_text("RUNNING\n" if case == "job still running" else "CANCELLED\n")
    if case == "earlier invocation":
        monkeypatch.setenv(INVOCATION_ENV, "crashed-head")
    if case == "no Slurm job":
        record_start(b.layout, b.r, "c", 1, 1)
    else:
        started(b, "c", 1, 1, monkeypatch, cluster="beta" if case == "job on another cluster" else "alpha")
    monkeypatch.setenv(INVOCATION_ENV, "this-head")
    if case == "job wrote its status":
        write_json(status_path(b.layout, b.r, "c"), {"state": "published"})
    assert record_vanished(b.layout, b.r, "c", JobWatch().ended) is None
    assert read_failure(b.layout, b.r, "c") is None


def test_squeue_answers_are_read_and_asked_no_more_than_every_period(tmp_path, monkeypatch, slurm_cli):
    answer, calls = slurm_cli
    answer.write_text("CANCELLED\n")
    assert job_state("17") == "CANCELLED"
    assert calls.read_text().split() == ["--noheader", "--states=all", "--jobs", "17", "--format=%T"]
    answer.write_text("INVALID\n")
    assert job_state("17") == GONE
    answer.write_text("")
    assert job_state("17") == GONE
    calls.unlink()
    watch = JobWatch(every=60)
    answer.write_text("COMPLETING\n")
    assert watch.ended("17", "alpha") is None  # still ending: its shell may yet write its record
    answer.write_text("FAILED\n")
    assert watch.ended("17", "alpha") is None  # the answer of a moment ago stands for a minute
    assert len(calls.read_text().splitlines()) == 1
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert job_state("17") is None  # no Slurm here: nothing can be said
