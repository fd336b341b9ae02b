"""Held-out evaluation where the held-out data is: signed parts per holder, merged, and the gate on them."""

from __future__ import annotations

import math
import os
import time

import pytest

from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.stages.evaluate import EvaluationError, check_part, comparable, evaluate_part, gather_parts, merge
from fedhpc.stages.init import init_global
from fedhpc.stages.promote import gate
from fedhpc.trust.signing import SignatureError, sign_document
from tests.test_catalogue import federation


def part(holder: str, domains: dict, sha: str = "m") -> dict:
    return {"holder": holder, "model_sha256": sha, "domains": domains}


def test_merge_combines_holders_token_weighted_and_keeps_who_scored_what():
    parts = {
        "coordinator": part("coordinator", {"web": {"loss": 2.0, "tokens": 100, "entropy_floor": 1.0}}),
        "lumi": part("lumi", {"law": {"loss": 3.0, "tokens": 300, "entropy_floor": 2.0}}),
        # law is also held (another source of it) by a100.
        "a100": part("a100", {"law": {"loss": 4.0, "tokens": 100, "entropy_floor": 2.0}}),
    }
    m = merge(parts, "m", missing=["laptop"])
    assert m["domains"]["law"]["loss"] == pytest.approx((3.0 * 300 + 4.0 * 100) / 400)
    assert m["domains"]["law"]["holders"] == ["a100", "lumi"] and m["domains"]["law"]["tokens"] == 400
    assert m["loss"] == pytest.approx((2.0 * 100 + 3.0 * 300 + 4.0 * 100) / 500)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["entropy_floor"] == pytest.approx((1.0 * 100 + 2.0 * 400) / 500)
    assert m["evaluated_by"] == {"a100": ["law"], "coordinator": ["web"], "lumi": ["law"]}
    assert m["missing"] == ["laptop"]


def test_two_models_are_compared_on_the_domains_both_were_scored_on():
    base = merge({"c": part("c", {"web": {"loss": 2.0, "tokens": 10, "entropy_floor": None}})}, "a", [])
    both = {
        "web": {"loss": 1.9, "tokens": 10, "entropy_floor": None},
        "law": {"loss": 9.0, "tokens": 10, "entropy_floor": None},
    }
    cand = merge({"c": part("c", both)}, "b", [])
    # law (not scored on the baseline) would make the candidate look 2.3x worse; it is left out.
    assert comparable(cand, base) == (pytest.approx(1.9), pytest.approx(2.0), ["web"])
    ok, reason = gate(2.0, 1.9, 0.25, ["web"])
    assert ok and reason == "held-out loss over web within the gate"


def test_a_part_for_another_model_by_the_wrong_signer_or_with_absurd_numbers_is_refused(tmp_path):
    cfg, layout, trust = federation(tmp_path)
    m, other = "a" * 64, "b" * 64
    good = sign_document(
        part("lumi", {"law": {"loss": 2.5, "tokens": 64, "entropy_floor": None}}, m), "lumi", trust.private_key("lumi")
    )
    assert check_part(good, trust, "lumi", m, "x")["domains"]["law"]["loss"] == 2.5
    with pytest.raises(EvaluationError, match=f"scores model '{m}', not {other}"):
        check_part(good, trust, "lumi", other, "x")  # a stale part, replayed for a newer candidate
    forged = sign_document(part("lumi", {"law": {"loss": 0.1, "tokens": 64}}, m), "a100", trust.private_key("a100"))
    with pytest.raises(SignatureError, match="signed by 'a100', expected 'lumi'"):
        check_part(forged, trust, "lumi", m, "x")
    for bad in ({"loss": -1.0, "tokens": 64}, {"loss": 1e9, "tokens": 64}, {"loss": 1.0, "tokens": 0}, "x"):
        doc = sign_document(part("lumi", {"law": bad}, m), "lumi", trust.private_key("lumi"))
        with pytest.raises(ValueError, match="implausible|not a valid eval part"):
            check_part(doc, trust, "lumi", m, "x")


def test_each_holder_scores_only_its_own_splits_and_the_merge_waits_for_missing_ones_until_the_deadline(tmp_path):
    cfg, layout, trust = federation(tmp_path)
    init_global(cfg, layout, trust, read_json(layout.manifest))
    model = layout.global_model(0)
    meta = read_json(layout.global_meta(0))
    for holder, domains in (("coordinator", ["web"]), ("lumi", ["law"]), ("laptop", [])):
        doc = evaluate_part(cfg, layout, trust, model, meta, holder, layout.eval_part(0, "global", holder))
        assert sorted(doc["domains"]) == domains and doc["model_sha256"] == sha256_file(model)
        assert doc["signature"]["signer"] == holder
    # a100 holds clinical but never scores it: the merge waits until the deadline, then judges
    # on what came and says who is missing.
    cfg.evaluation.deadline_minutes = 0.02
    t0 = time.time()
    os.utime(model)  # the deadline counts from when the model was written
    res = gather_parts(cfg, layout, trust, 0, "global", model, poll_seconds=0.05)
    assert time.time() - t0 >= 1.0
    assert sorted(res["domains"]) == ["law", "web"] and res["missing"] == ["a100"]
    assert res["loss"] == pytest.approx(sum(d["loss"] * d["tokens"] for d in res["domains"].values()) / res["tokens"])
    # A part that arrives for a different model (or tampered) is refused, and named.
    bad = read_json(layout.eval_part(0, "global", "lumi"))
    bad["domains"]["law"]["loss"] = 0.01
    write_json(layout.eval_part(0, "global", "lumi"), bad)
    res = gather_parts(cfg, layout, trust, 0, "global", model, poll_seconds=0.05)
    assert "lumi" in res["refused"] and "law" not in res["domains"] and res["missing"] == ["a100", "lumi"]
