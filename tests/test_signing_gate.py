"""Signatures, the evaluation gate, the federation-wide LR schedule, and closing a round (gather)."""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import pytest
import torch

import fedhpc.stages.gather as gather_mod
from fedhpc.config.federation import ModelConfig, SiteConfig, TrainingConfig
from fedhpc.core.files import read_json
from fedhpc.stages.gather import QuorumError, gather
from fedhpc.stages.promote import gate
from fedhpc.training.distributed import World
from fedhpc.training.engines import Engine
from fedhpc.training.loop import local_round, lr_at, lr_scale, to_windows
from fedhpc.training.model import GPT
from fedhpc.training.sites import BatchShape, batch_shape
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import SignatureError, TrustStore, load_private_key, sign_document, verify_document
from tests.test_verify import RoundBuilder

# ================================================================= signing


@pytest.fixture()
def trust(tmp_path: Path) -> TrustStore:
    for name in ("coordinator", "lumi", "a100"):
        create_keypair(tmp_path / "keys", name)
    return TrustStore(tmp_path / "keys")


DOC = {
    "round": 3,
    "site": "lumi",
    "loss": 2.5,
    "shards": ["a", "b"],
    "note": "µ-batch ✓",
    "nested": {"z": 1, "a": None},
}


def test_keypair_files_and_modes(tmp_path):
    key = create_keypair(tmp_path / "k", "lumi")
    assert key == tmp_path / "k" / "lumi.key"
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert (tmp_path / "k" / "lumi.pub").is_file()
    with pytest.raises(FileExistsError, match="refusing to replace an identity"):
        create_keypair(tmp_path / "k", "lumi")


def test_sign_verify_round_trip(trust):
    signed = sign_document(DOC, "lumi", trust.private_key("lumi"))
    assert {k: v for k, v in signed.items() if k != "signature"} == DOC
    assert signed["signature"]["signer"] == "lumi" and signed["signature"]["alg"] == "ed25519"
    verify_document(signed, trust, "lumi", "doc")
    # Canonical JSON: key order does not matter, and re-signing replaces the old signature.
    verify_document(dict(reversed(list(signed.items()))), trust, "lumi", "doc")
    again = sign_document(signed, "a100", trust.private_key("a100"))
    verify_document(again, trust, "a100", "doc")


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(loss=2.4),
        lambda d: d.update(extra=True),
        lambda d: d.pop("note"),
        lambda d: d["shards"].append("c"),
        lambda d: d["nested"].update(z=2),
    ],
)
def test_a_tampered_body_fails_verification(trust, change):
    signed = sign_document(DOC, "lumi", trust.private_key("lumi"))
    tampered = {**signed, "shards": list(signed["shards"]), "nested": dict(signed["nested"])}
    change(tampered)
    with pytest.raises(SignatureError, match="^doc: signature does not verify$"):
        verify_document(tampered, trust, "lumi", "doc")


def test_wrong_signer_is_refused(trust):
    signed = sign_document(DOC, "a100", trust.private_key("a100"))
    with pytest.raises(SignatureError, match="^doc: signed by 'a100', expected 'lumi'$"):
        verify_document(signed, trust, "lumi", "doc")


def test_claiming_another_signer_with_ones_own_key_is_refused(trust):
    forged = sign_document(DOC, "lumi", trust.private_key("a100"))  # a100's key, lumi's name
    with pytest.raises(SignatureError, match="signature does not verify"):
        verify_document(forged, trust, "lumi", "doc")


def test_unknown_signer_is_refused(trust, tmp_path):
    create_keypair(tmp_path / "elsewhere", "ghost")
    signed = sign_document(DOC, "ghost", TrustStore(tmp_path / "elsewhere").private_key("ghost"))
    with pytest.raises(SignatureError, match="unknown signer 'ghost'"):
        verify_document(signed, trust, "ghost", "doc")


@pytest.mark.parametrize("sig", [None, "abc", {"signer": "lumi"}, {"signer": "lumi", "value": 5}])
def test_missing_or_malformed_signature_is_refused(trust, sig):
    doc = dict(DOC) if sig is None else {**DOC, "signature": sig}
    with pytest.raises(SignatureError, match="^doc: unsigned$"):
        verify_document(doc, trust, "lumi", "doc")


def test_garbage_signature_value_is_refused(trust):
    signed = sign_document(DOC, "lumi", trust.private_key("lumi"))
    signed["signature"]["value"] = "not base64!"
    with pytest.raises(SignatureError, match="signature does not verify"):
        verify_document(signed, trust, "lumi", "doc")


def test_a_private_key_readable_by_others_is_refused_with_the_fix(trust):
    path = trust.keys_dir / "lumi.key"
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError) as info:
        trust.private_key("lumi")
    assert f"chmod 600 {path}" in str(info.value) and "0o644" in str(info.value)
    os.chmod(path, 0o600)
    assert load_private_key(path) is not None


def test_a_missing_private_key_says_how_to_create_it(trust):
    with pytest.raises(FileNotFoundError, match="fedhpc keys init --site leonardo"):
        trust.private_key("leonardo")


# ================================================================= the evaluation gate


@pytest.mark.parametrize("baseline, candidate", [(2.0, 1.5), (2.0, 2.0), (2.0, 2.4), (2.0, 2.5), (None, 7.0)])
def test_gate_accepts_within_max_regression(baseline, candidate):
    assert gate(baseline, candidate, 0.25) == (True, "held-out loss within the gate")


def test_gate_rejects_a_regression_beyond_max_regression_and_names_the_numbers():
    ok, reason = gate(2.0, 2.6, 0.25)
    assert not ok
    assert reason == "held-out loss regressed from 2.0000 to 2.6000 (more than evaluation.max_regression = 25%)"
    assert gate(2.0, 2.0001, 0.0)[0] is False  # max_regression 0: any regression rolls back


def test_gate_rejects_a_missing_candidate_loss():
    assert gate(2.0, None, 0.25) == (False, "candidate's held-out loss is not finite")
    assert gate(None, None, 0.25)[0] is False


@pytest.mark.parametrize("baseline, candidate", [(2.0, math.nan), (None, math.inf), (None, math.nan)])
def test_gate_rejects_non_finite_floats(baseline, candidate):
    assert gate(baseline, candidate, 0.25)[0] is False


# ================================================================= the learning-rate schedule

T = TrainingConfig(lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)


def test_warm_up_is_linear_from_zero_to_peak():
    assert lr_at(0.05, T) == pytest.approx(0.5e-3, rel=1e-6)  # half way through warm-up: half the peak
    assert lr_at(0.025, T) == pytest.approx(0.25e-3, rel=1e-6)
    assert 0 < lr_at(0.0, T) < 1e-10
    assert lr_at(0.1, T) == pytest.approx(1e-3, rel=1e-12)


def test_cosine_value_by_hand():
    # (0.5 - 0.1) / 0.9 = 4/9; cos(4*pi/9) = cos(80 deg) = 0.173648...
    # lr = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + 0.173648)) = 6.28142e-4
    assert lr_at(0.5, T) == pytest.approx(6.281416799e-4, rel=1e-9)
    assert lr_at(1.0, T) == pytest.approx(1e-4, rel=1e-12)  # min_lr at the end
    assert lr_at(1.7, T) == lr_at(1.0, T) and lr_at(-0.3, T) == lr_at(0.0, T)  # clamped


def test_only_one_warm_up_for_the_whole_federation():
    t = TrainingConfig(lr=1e-3, warmup_fraction=0.05, min_lr_ratio=0.1)
    rounds = 4
    starts = [lr_at(r / rounds, t) for r in range(rounds)]
    # Round 0 starts at ~0 (warming up); later rounds start where the previous one ended.
    assert starts[0] < 1e-9
    assert t.lr * t.min_lr_ratio < starts[2] < t.lr  # round 2 of 4: progress 0.5, in the cosine
    assert starts[1] > starts[2] > starts[3]
    for r in range(1, rounds):
        end_of_previous = lr_at((r - 1 + (1 - 1e-9)) / rounds, t)
        assert starts[r] == pytest.approx(end_of_previous, rel=1e-6)


def test_schedule_rises_during_warm_up_and_never_rises_after_it():
    grid = [i / 1000 for i in range(1001)]
    values = [lr_at(p, T) for p in grid]
    warm = [v for p, v in zip(grid, values) if p <= 0.1]
    after = [v for p, v in zip(grid, values) if p >= 0.1]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert max(values) == pytest.approx(1e-3) and min(after) == pytest.approx(1e-4)


def test_no_warm_up_starts_at_peak():
    t = TrainingConfig(lr=2e-3, warmup_fraction=0.0, min_lr_ratio=0.0)
    assert lr_at(0.0, t) == 2e-3 and lr_at(0.5, t) == pytest.approx(1e-3) and lr_at(1.0, t) == pytest.approx(0.0)


def test_local_round_of_a_later_round_does_not_warm_up_again():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=8, seq_len=8)
    model = GPT(cfg, 16)
    t = TrainingConfig(lr=1e-3, warmup_fraction=0.05, min_lr_ratio=0.1)
    windows = to_windows(torch.randint(0, 16, (8 * 8 + 1,)), 8)
    r, rounds = 2, 4
    res = local_round(
        Engine(model, t, World(), torch.device("cpu")),
        windows,
        BatchShape(2, 1, 1, 8),
        t,
        torch.device("cpu"),
        lambda f: (r + f) / rounds,
        torch.Generator().manual_seed(0),
    )
    assert res.steps == 4
    assert res.lr_first == lr_at(0.5, t) and res.lr_last == lr_at((2 + 3 / 4) / 4, t)
    assert t.lr > res.lr_first > res.lr_last > t.lr * t.min_lr_ratio


@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("sqrt", 2.0)])
def test_a_site_on_four_times_the_batch_trains_at_sqrt_four_times_the_lr(scaling, factor):
    # 4 sequences of 8 tokens per step against a federation batch of 8 tokens: sqrt(32 / 8) = 2.
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=8, seq_len=8)
    t = TrainingConfig(lr=1e-3, batch_tokens=8, warmup_fraction=0.0, min_lr_ratio=0.1, lr_batch_scaling=scaling)
    windows = to_windows(torch.randint(0, 16, (16 * 8 + 1,)), 8)
    engine = Engine(GPT(cfg, 16), t, World(), torch.device("cpu"))
    res = local_round(
        engine,
        windows,
        BatchShape(2, 2, 1, 8),
        t,
        torch.device("cpu"),
        lambda f: (1 + f) / 4,
        torch.Generator().manual_seed(0),
    )
    assert res.steps == 4
    # What the optimizer stepped with, not only what the round reports.
    assert {g["lr"] for g in engine.optimizer.param_groups} == {res.lr_last}
    assert res.lr_first == pytest.approx(factor * lr_at(0.25, t), rel=1e-12)
    assert res.lr_last == pytest.approx(factor * lr_at((1 + 3 / 4) / 4, t), rel=1e-12)
    # The effort heterogeneity-aware weighting divides by carries the same factor.
    unscaled = sum(lr_at((1 + k / 4) / 4, t) for k in range(4))
    assert res.lr_sum == pytest.approx(factor * unscaled, rel=1e-12)


def test_a_site_on_the_federation_batch_keeps_the_lr_when_batch_tokens_is_no_multiple_of_seq_len():
    # 8192 tokens of 100-token sequences: steps of 81 sequences (8100 tokens) are the federation's batch.
    t = TrainingConfig(batch_tokens=8192, lr_batch_scaling="sqrt")
    model = ModelConfig(n_layer=1, n_head=2, d_model=8, seq_len=100)
    shape = batch_shape("s", SiteConfig(accelerator="cpu", memory_gb=16), model, 16, 8192, 32, 1)
    assert shape.tokens_per_step == 8100
    assert lr_scale(shape, t) == 1.0
    assert lr_scale(BatchShape(81, 4, 1, 100), t) == 2.0


# ================================================================= gather (closing a round)


class Waiting(Exception):
    """gather would have slept: it is still waiting for updates."""


@pytest.fixture()
def no_sleep(monkeypatch):
    def sleep(_):
        raise Waiting

    monkeypatch.setattr(gather_mod, "time", types.SimpleNamespace(time=gather_mod.time.time, sleep=sleep))


def round_with(tmp_path: Path, arrived: list[str], quorum: float = 0.6) -> tuple[RoundBuilder, object]:
    """Plan created at t=1000 s with a 30-minute deadline (t=2800 s) for lumi, a100 and laptop."""
    b = RoundBuilder(tmp_path, ["a100", "laptop", "lumi"], created=1000.0)
    for s in arrived:
        b.publish(s)
    cfg = b.config()
    cfg.rounds.deadline_minutes, cfg.rounds.quorum = 30.0, quorum
    return b, cfg


def events(b: RoundBuilder, kind: str) -> list[dict]:
    return [e for e in AuditLog(b.layout.audit).events() if e["event"] == kind]


def test_gather_returns_at_once_when_every_planned_receipt_is_there(tmp_path, no_sleep):
    b, cfg = round_with(tmp_path, ["a100", "laptop", "lumi"])
    rec = gather(cfg, b.layout, b.trust, b.r, now=1001.0)  # long before the deadline
    assert rec["arrived"] == ["a100", "laptop", "lumi"] and rec["missing"] == []
    assert rec["deadline"] == 2800.0 and rec["quorum"] == 2  # ceil(0.6 * 3)
    assert read_json(b.layout.arrivals(b.r)) == rec
    assert events(b, "site.dropped") == [] and len(events(b, "round.gathered")) == 1


def test_gather_keeps_waiting_before_the_deadline(tmp_path, no_sleep):
    b, cfg = round_with(tmp_path, ["a100", "lumi"])
    with pytest.raises(Waiting):
        gather(cfg, b.layout, b.trust, b.r, poll_seconds=0.01, now=2799.0)
    assert not b.layout.arrivals(b.r).exists()


def test_a_half_written_receipt_is_not_an_arrival(tmp_path, no_sleep):
    b, cfg = round_with(tmp_path, ["a100", "lumi"])
    b.layout.receipt(b.r, "laptop").parent.mkdir(parents=True, exist_ok=True)
    b.layout.receipt(b.r, "laptop").write_text('{"run": "t", "rou')
    with pytest.raises(Waiting):
        gather(cfg, b.layout, b.trust, b.r, now=1500.0)


def test_after_the_deadline_with_quorum_the_missing_sites_are_dropped(tmp_path, no_sleep):
    b, cfg = round_with(tmp_path, ["a100", "lumi"])
    rec = gather(cfg, b.layout, b.trust, b.r, now=2800.0)  # the deadline itself closes the round
    assert rec["arrived"] == ["a100", "lumi"] and rec["missing"] == ["laptop"]
    assert read_json(b.layout.arrivals(b.r))["missing"] == ["laptop"]
    dropped = events(b, "site.dropped")
    assert [(e["round"], e["site"], e["reason"]) for e in dropped] == [(1, "laptop", "no update by the deadline")]
    [gathered] = events(b, "round.gathered")
    assert gathered["missing"] == ["laptop"]


def test_without_quorum_gather_raises_naming_the_missing_sites(tmp_path, no_sleep):
    b, cfg = round_with(tmp_path, ["lumi"])
    with pytest.raises(QuorumError) as info:
        gather(cfg, b.layout, b.trust, b.r, now=5000.0)
    msg = str(info.value)
    assert "1 of 3 planned updates (lumi); quorum needs 2" in msg and msg.endswith("Missing: a100, laptop")
    assert not b.layout.arrivals(b.r).exists()
    [no_quorum] = events(b, "round.no_quorum")
    assert no_quorum["missing"] == ["a100", "laptop"] and no_quorum["needed"] == 2
    assert events(b, "site.dropped") == []


def test_full_quorum_needs_every_site(tmp_path, no_sleep):
    b, cfg = round_with(tmp_path, ["a100", "lumi"], quorum=1.0)
    with pytest.raises(QuorumError, match="quorum needs 3. Missing: laptop"):
        gather(cfg, b.layout, b.trust, b.r, now=5000.0)


def test_gather_refuses_an_unsigned_plan(tmp_path, no_sleep):
    b, cfg = round_with(tmp_path, ["a100", "laptop", "lumi"])
    plan = read_json(b.layout.plan(b.r))
    plan.pop("signature")
    b.layout.plan(b.r).write_text(json.dumps(plan))
    with pytest.raises(SignatureError, match="unsigned"):
        gather(cfg, b.layout, b.trust, b.r, now=1001.0)
