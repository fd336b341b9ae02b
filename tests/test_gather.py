"""Closing a round at its deadline: quorum met, quorum missed (fail or wait, as configured)."""

from __future__ import annotations

import threading
import time

import pytest

from fedhpc.core.files import write_json
from fedhpc.stages.failures import (
    INVOCATION_ENV,
    failure_path,
    final_failure,
    read_failure,
    record_exit,
    record_failure,
    status_path,
)
from fedhpc.stages.gather import QuorumError, gather
from fedhpc.trust.audit import AuditLog
from tests.test_verify import RoundBuilder

SITES = ["a", "b", "c"]


def builder(tmp_path, mode: str) -> tuple[RoundBuilder, object]:
    b = RoundBuilder(tmp_path, SITES)
    cfg = b.config()
    cfg.rounds.quorum, cfg.rounds.on_no_quorum = 1.0, mode
    b.publish("a")
    b.publish("b")
    return b, cfg


def test_without_quorum_fail_mode_stops_the_round_naming_who_is_missing(tmp_path):
    b, cfg = builder(tmp_path, "fail")
    with pytest.raises(
        QuorumError, match=r"round 1: deadline passed with 2 of 3 planned updates \(a, b\); quorum needs 3. Missing: c"
    ):
        gather(cfg, b.layout, b.trust, b.r, poll_seconds=0, now=1e12)
    assert [e["event"] for e in AuditLog(b.layout.audit).events()][-1] == "round.no_quorum"
    assert not b.layout.arrivals(b.r).exists()


def test_without_quorum_wait_mode_keeps_waiting_past_the_deadline_until_quorum(tmp_path):
    b, cfg = builder(tmp_path, "wait")
    result = {}
    t = threading.Thread(target=lambda: result.update(gather(cfg, b.layout, b.trust, b.r, poll_seconds=0.05, now=1e12)))
    t.start()
    # Once it has said it waits for quorum (however long a busy machine took to get there) ...
    deadline = time.time() + 30
    while "round.waiting_for_quorum" not in [e["event"] for e in AuditLog(b.layout.audit).events()]:
        assert time.time() < deadline and t.is_alive(), "gather never said it waits for quorum"
        time.sleep(0.05)
    time.sleep(0.3)  # ... and looked again a few times
    assert t.is_alive() and not b.layout.arrivals(b.r).exists()  # past the deadline, still waiting
    b.publish("c")
    t.join(timeout=30)
    assert not t.is_alive()
    assert result["arrived"] == SITES and result["missing"] == []
    events = [e["event"] for e in AuditLog(b.layout.audit).events()]
    assert events.count("round.waiting_for_quorum") == 1 and events[-1] == "round.gathered"


def test_a_staged_update_that_does_not_match_its_signed_index_is_not_an_arrival(tmp_path):
    from fedhpc.exchange.hub import SITE_FILES, present, write_index

    b, cfg = builder(tmp_path, "fail")
    b.publish("c")
    cfg.exchange.kind, cfg.rounds.quorum = "rsync", 0.5
    for s in SITES:
        d = b.layout.site_dir(b.r, s)
        write_index(d, present(d, SITE_FILES), s, b.trust.private_key(s))
    # c's update is damaged on the hub after it was published (disk, or someone tampering).
    with open(b.layout.update(b.r, "c"), "r+b") as fh:
        fh.seek(100)
        fh.write(b"\xff\xfe")
    rec = gather(cfg, b.layout, b.trust, b.r, poll_seconds=0, now=1e12)
    assert rec["arrived"] == ["a", "b"] and rec["missing"] == ["c"]
    dropped = [e for e in AuditLog(b.layout.audit).events() if e["event"] == "site.dropped"]
    assert [(e["site"], e["reason"]) for e in dropped] == [
        ("c", "its update arrived incomplete or corrupted (files do not match the signed bundle index)")
    ]


@pytest.mark.parametrize("hub", [True, False], ids=["through-a-hub", "in-one-run-directory"])
def test_a_coordinator_that_fails_a_round_tells_the_sites_and_takes_it_back_on_rerun(tmp_path, hub):
    # Through a hub, the sites' pulls stop waiting; in one run directory, resident sites
    # (fedhpc.stages.resident) stop waiting for the next plan instead of resident_idle_minutes.
    import yaml

    from fedhpc.cli.main import main
    from fedhpc.exchange.hub import SITE_FILES, STOPPED, Shared, present, stop_notice, write_index
    from fedhpc.stages.exchange import stopped_before

    b = RoundBuilder(tmp_path, SITES, run="run")  # its run directory is tmp_path/run
    raw = {
        "run": b.run,
        "output_dir": str(tmp_path),
        "sites": {s: {} for s in SITES},
        "data": {"synth": {"domains": [{"name": "web"}]}},
        "rounds": {"quorum": 1.0, "on_no_quorum": "fail"},
    }
    if hub:
        raw["exchange"] = {"kind": "shared", "role": "coordinator", "hub": str(b.layout.root)}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["gather", "--config", str(tmp_path / "c.yaml"), "--round", str(b.r)]) == 1  # nobody published
    if hub:
        why = stop_notice(Shared(b.layout.root), tmp_path / "probe", b.trust, b.r + 1)
    else:
        why = stopped_before(b.layout, b.trust, "pull", b.r + 1)
        assert stopped_before(b.layout, b.trust, "pull-candidate", b.r) == why  # round r's candidate will not come
        assert stopped_before(b.layout, b.trust, "pull", b.r) is None  # round r itself was planned
    assert why.startswith(f"round {b.r}: round {b.r}: deadline passed with 0 of 3 planned updates"), why
    for s in SITES:  # the sites publish after all; the operator reruns the coordinator
        b.publish(s)
        d = b.layout.site_dir(b.r, s)
        write_index(d, present(d, SITE_FILES), s, b.trust.private_key(s))
    assert main(["gather", "--config", str(tmp_path / "c.yaml"), "--round", str(b.r)]) == 0
    assert not (b.layout.root / STOPPED).exists()


# ---------------------------------------------------------------- sites whose job failed for good


def open_round(tmp_path, quorum: float, mode: str = "fail") -> tuple[RoundBuilder, object]:
    """Round 1 planned just now (its deadline two hours away); a and b have published."""
    b = RoundBuilder(tmp_path, SITES, created=time.time())
    cfg = b.config()
    cfg.rounds.quorum, cfg.rounds.on_no_quorum = quorum, mode
    b.publish("a")
    b.publish("b")
    return b, cfg


def fail(b: RoundBuilder, site: str, deterministic: bool, attempt: int = 1, attempts: int = 1) -> None:
    """What a failed training job leaves: its failure record, and for a deterministic error its status."""
    record_failure(b.layout, b.r, site, "shard c-shard: sha256 mismatch", deterministic, attempt, attempts)
    if deterministic:
        write_json(status_path(b.layout, b.r, site), {"state": "failed", "deterministic": True})


def gather_in_thread(b: RoundBuilder, cfg) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def run() -> None:
        try:
            result.update(gather(cfg, b.layout, b.trust, b.r, poll_seconds=0.05))
        except QuorumError as exc:
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def test_a_site_that_failed_deterministically_closes_the_round_at_once_with_quorum(tmp_path):
    b, cfg = open_round(tmp_path, quorum=0.5)
    fail(b, "c", deterministic=True)
    t0 = time.time()
    rec = gather(cfg, b.layout, b.trust, b.r, poll_seconds=0.05)
    assert time.time() - t0 < 5  # not the two hours to the deadline
    assert rec["arrived"] == ["a", "b"] and rec["missing"] == ["c"]
    assert rec["failed"] == {
        "c": {"error": "shard c-shard: sha256 mismatch", "deterministic": True, "attempt": 1, "attempts": 1}
    }
    events = AuditLog(b.layout.audit).events()
    [failed] = [e for e in events if e["event"] == "site.failed"]
    assert (failed["site"], failed["error"], failed["deterministic"]) == ("c", "shard c-shard: sha256 mismatch", True)
    assert not [e for e in events if e["event"] == "site.dropped"]


@pytest.mark.parametrize("mode", ["fail", "wait"])
def test_without_quorum_a_failed_site_fails_the_round_at_once_naming_it_and_its_error(tmp_path, mode):
    b, cfg = open_round(tmp_path, quorum=1.0, mode=mode)
    fail(b, "c", deterministic=True)
    t0 = time.time()
    with pytest.raises(QuorumError) as info:
        gather(cfg, b.layout, b.trust, b.r, poll_seconds=0.05)
    assert time.time() - t0 < 5
    assert str(info.value) == (
        "round 1: quorum out of reach with 2 of 3 planned updates (a, b); quorum needs 3. "
        "c failed (a deterministic error, not retried): shard c-shard: sha256 mismatch"
    )
    assert [e["event"] for e in AuditLog(b.layout.audit).events()][-2:] == ["site.failed", "round.no_quorum"]


def test_a_transient_failure_is_waited_for_while_attempts_are_left_and_the_last_one_is_final(tmp_path):
    b, cfg = open_round(tmp_path, quorum=0.5)
    fail(b, "c", deterministic=False, attempt=1, attempts=2)
    t, result = gather_in_thread(b, cfg)
    time.sleep(1.0)
    assert t.is_alive() and not b.layout.arrivals(b.r).exists()  # Snakemake retries c: wait for it
    fail(b, "c", deterministic=False, attempt=2, attempts=2)
    t.join(timeout=10)
    assert not t.is_alive()
    assert result["missing"] == ["c"] and result["failed"]["c"]["attempt"] == 2


def test_a_retry_that_publishes_after_a_recorded_failure_is_an_arrival(tmp_path):
    b, cfg = open_round(tmp_path, quorum=1.0)
    fail(b, "c", deterministic=False, attempt=1, attempts=2)
    t, result = gather_in_thread(b, cfg)
    time.sleep(0.5)
    b.publish("c")
    t.join(timeout=10)
    assert result["arrived"] == SITES and result["failed"] == {}


def test_a_final_failure_recorded_by_an_earlier_invocation_is_not_final_after_a_rerun(tmp_path, monkeypatch):
    b, cfg = open_round(tmp_path, quorum=1.0)
    monkeypatch.setenv(INVOCATION_ENV, "crashed-head")
    fail(b, "c", deterministic=False, attempt=1, attempts=1)
    assert final_failure(b.layout, b.r, "c") is not None
    monkeypatch.setenv(INVOCATION_ENV, "rerun")  # the rerun retries c; its old failure is history
    t, result = gather_in_thread(b, cfg)
    time.sleep(1.0)
    assert t.is_alive()
    b.publish("c")
    t.join(timeout=10)
    assert result["arrived"] == SITES


def test_a_deterministic_failure_of_an_earlier_invocation_is_final_until_its_job_is_to_run_again(tmp_path, monkeypatch):
    b, cfg = open_round(tmp_path, quorum=1.0)
    monkeypatch.setenv(INVOCATION_ENV, "first")
    fail(b, "c", deterministic=True)
    monkeypatch.setenv(INVOCATION_ENV, "rerun")  # its job ended "failed": the rerun does not redo it
    assert final_failure(b.layout, b.r, "c")["error"] == "shard c-shard: sha256 mismatch"
    status_path(b.layout, b.r, "c").unlink()  # the operator removed the status to rerun c's job
    assert final_failure(b.layout, b.r, "c") is None
    write_json(failure_path(b.layout, b.r, "c"), {"error": 3})  # malformed: no record at all
    assert final_failure(b.layout, b.r, "c") is None


def test_the_shell_records_how_a_silent_attempt_ended_and_keeps_the_process_own_record(tmp_path):
    b, _ = open_round(tmp_path, quorum=1.0)
    rec = record_exit(b.layout, b.r, "c", 137, attempt=1, attempts=2)
    assert rec["error"] == ("the training process was killed by signal 9 (SIGKILL) before it could report an error")
    assert (rec["deterministic"], rec["final"], rec["exit_code"]) == (False, False, 137)
    # The process recorded its own error for attempt 2; the shell only adds the exit code.
    record_failure(b.layout, b.r, "c", "RuntimeError: NCCL timeout", False, 2, 2)
    rec = record_exit(b.layout, b.r, "c", 1, attempt=2, attempts=2)
    assert (rec["error"], rec["exit_code"], rec["final"]) == ("RuntimeError: NCCL timeout", 1, True)
    assert read_failure(b.layout, b.r, "c") == rec
    failed = [e for e in AuditLog(b.layout.audit).events() if e["event"] == "train.failed"]
    assert [(e["attempt"], e["exit_code"]) for e in failed] == [(1, 137), (2, None)]
