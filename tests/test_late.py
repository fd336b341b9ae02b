"""Late updates: an update that arrives after its round closed is folded into the next round with
its weight decayed by staleness, or dropped, as configured; either way the audit log says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedhpc.core.files import read_json, write_json
from fedhpc.core.tensorfile import load_state
from fedhpc.stages.aggregate import aggregate_round
from fedhpc.stages.gather import gather
from fedhpc.stages.plan import missed_shards
from fedhpc.stages.verify import verify_round
from fedhpc.trust.audit import AuditLog
from tests.test_verify import RoundBuilder, small_state

SITES = ["a", "b", "c"]


def late_round(tmp_path: Path, mode: str = "fold") -> tuple[RoundBuilder, object]:
    """Round 1 closed without c; c's round-1 update arrived afterwards; round 2 has a and b."""
    b = RoundBuilder(tmp_path, SITES, r=2)
    cfg = b.config()
    cfg.rounds.quorum, cfg.rounds.late_updates = 0.5, mode
    write_json(b.layout.arrivals(1), {"round": 1, "planned": SITES, "arrived": ["a", "b"], "missing": ["c"]})
    write_json(b.layout.plan(1), {"round": 1, "sites": {s: {"shards": [f"{s}-r1"]} for s in SITES}})
    write_json(b.layout.verdicts(1), {"round": 1, "accepted": ["a", "b"], "rejected": {}, "update_sha256": {}})
    b.r, b.base = 1, b.globals[1]
    b.publish("c", tokens=1000)  # trained on global 1, published after round 1 closed
    b.r, b.base = 2, b.globals[2]
    b.publish("a", tokens=1000)
    b.publish("b", tokens=1000)
    return b, cfg


def test_a_late_update_is_verified_against_its_own_round_and_folded_with_decayed_weight(tmp_path):
    b, cfg = late_round(tmp_path)
    arrivals = gather(cfg, b.layout, b.trust, 2, poll_seconds=0, now=1e12)
    assert arrivals["missing"] == ["c"] and arrivals["late"] == [{"round": 1, "site": "c"}]
    verdicts = verify_round(cfg, b.layout, b.trust, 2, b.base)
    assert verdicts["accepted"] == ["a", "b"] and list(verdicts["late_accepted"]) == ["c@r0001"]
    assert read_json(b.layout.late_verdict(2, "c", 1))["accepted"] is True
    record = aggregate_round(cfg, b.layout, 2, b.base)
    # Equal tokens; c is one round stale: polynomial decay (1 + 1)^-0.5.
    raw = {"a": 1.0, "b": 1.0, "c@r0001": 2**-0.5}
    want_w = {k: v / sum(raw.values()) for k, v in raw.items()}
    assert record["weights"] == pytest.approx(want_w)
    assert record["weights_explained"]["staleness"] == {"a": 0, "b": 0, "c@r0001": 1}
    assert record["late"] == ["c@r0001"]
    # c's delta (relative to global 1) is applied to global 2, FedBuff style.
    out = load_state(b.layout.candidate(2))
    g2 = small_state(102)
    ups = {"a": b.good_update("a"), "b": b.good_update("b"), "c@r0001": b.good_update("c")}
    for name in g2:
        want = g2[name] + sum(want_w[s] * ups[s][name] for s in sorted(ups))
        assert torch.allclose(out[name], want, atol=1e-6), name
    events = [e for e in AuditLog(b.layout.audit).events() if e["event"] == "update.late"]
    assert events and events[0]["site"] == "c" and events[0]["from_round"] == 1 and events[0]["action"] == "fold"


def test_a_late_update_is_folded_once_not_again_in_the_round_after(tmp_path):
    b, cfg = late_round(tmp_path)
    gather(cfg, b.layout, b.trust, 2, poll_seconds=0, now=1e12)
    cfg.rounds.max_staleness = 2
    from fedhpc.stages.gather import late_arrivals

    assert late_arrivals(cfg, b.layout, 3) == []


def test_drop_mode_records_the_late_update_but_leaves_it_out(tmp_path):
    b, cfg = late_round(tmp_path, mode="drop")
    arrivals = gather(cfg, b.layout, b.trust, 2, poll_seconds=0, now=1e12)
    assert arrivals["late"] == [] and arrivals["late_dropped"] == [{"round": 1, "site": "c"}]
    verify_round(cfg, b.layout, b.trust, 2, b.base)
    record = aggregate_round(cfg, b.layout, 2, b.base)
    assert sorted(record["weights"]) == ["a", "b"]
    [event] = [e for e in AuditLog(b.layout.audit).events() if e["event"] == "update.late"]
    assert event["action"] == "drop"


def test_a_late_update_older_than_max_staleness_is_not_folded(tmp_path):
    b, cfg = late_round(tmp_path)
    cfg.rounds.max_staleness = 1
    from fedhpc.stages.gather import late_arrivals

    # Round 3 looks back one round (round 2), not at round 1.
    write_json(b.layout.arrivals(2), {"round": 2, "planned": SITES, "arrived": SITES, "missing": []})
    assert late_arrivals(cfg, b.layout, 3) == []


def test_shards_of_a_late_update_that_will_be_folded_are_not_requeued(tmp_path):
    b, cfg = late_round(tmp_path)
    assert missed_shards(b.layout, 1) == ["c-r1"]
    assert missed_shards(b.layout, 1, fold_late=True) == []


def test_with_staged_transfer_only_a_complete_late_bundle_keeps_its_shards_from_being_requeued(tmp_path):
    from fedhpc.exchange.hub import SITE_FILES, CompletenessCache, present, write_index

    b, cfg = late_round(tmp_path)
    bundles = CompletenessCache(b.trust)
    # c's receipt is in, but its signed index is not: the transfer is not complete.
    assert missed_shards(b.layout, 1, fold_late=True, bundles=bundles) == ["c-r1"]
    d = b.layout.site_dir(1, "c")
    write_index(d, present(d, SITE_FILES), "c", b.trust.private_key("c"))
    assert missed_shards(b.layout, 1, fold_late=True, bundles=bundles) == []
