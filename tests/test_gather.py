"""Closing a round at its deadline: quorum met, quorum missed (fail or wait, as configured)."""

from __future__ import annotations

import threading
import time

import pytest

from fedhpc.audit import AuditLog
from fedhpc.gather import QuorumError, gather
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
    time.sleep(1.0)
    assert t.is_alive() and not b.layout.arrivals(b.r).exists()  # past the deadline, still waiting
    b.publish("c")
    t.join(timeout=30)
    assert not t.is_alive()
    assert result["arrived"] == SITES and result["missing"] == []
    events = [e["event"] for e in AuditLog(b.layout.audit).events()]
    assert events.count("round.waiting_for_quorum") == 1 and events[-1] == "round.gathered"


def test_a_staged_update_that_does_not_match_its_signed_index_is_not_an_arrival(tmp_path):
    from fedhpc.exchange import SITE_FILES, present, write_index

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


def test_a_coordinator_that_fails_a_round_tells_the_sites_through_the_hub_and_takes_it_back_on_rerun(tmp_path):
    import yaml

    from fedhpc.cli import main
    from fedhpc.exchange import SITE_FILES, STOPPED, Shared, present, stop_notice, write_index

    b = RoundBuilder(tmp_path, SITES, run="run")  # its run directory is tmp_path/run
    raw = {
        "run": b.run,
        "output_dir": str(tmp_path),
        "sites": {s: {} for s in SITES},
        "data": {"synth": {"domains": [{"name": "web"}]}},
        "rounds": {"quorum": 1.0, "on_no_quorum": "fail"},
        "exchange": {"kind": "shared", "role": "coordinator", "hub": str(b.layout.root)},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["gather", "--config", str(tmp_path / "c.yaml"), "--round", str(b.r)]) == 1  # nobody published
    why = stop_notice(Shared(b.layout.root), tmp_path / "probe", b.trust, b.r + 1)
    assert why.startswith(f"round {b.r}: round {b.r}: deadline passed with 0 of 3 planned updates")
    for s in SITES:  # the sites publish after all; the operator reruns the coordinator
        b.publish(s)
        d = b.layout.site_dir(b.r, s)
        write_index(d, present(d, SITE_FILES), s, b.trust.private_key(s))
    assert main(["gather", "--config", str(tmp_path / "c.yaml"), "--round", str(b.r)]) == 0
    assert not (b.layout.root / STOPPED).exists()
