"""Secure aggregation: pairwise masks cancel in the sum, one masked update tells the coordinator
nothing, dropped sites are recovered from the survivors' reveals, and the aggregate equals the plain one."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedhpc.aggregation import masking as secagg
from fedhpc.aggregation.masking import SecureAggregationError
from fedhpc.aggregation.secure import SCHEME, masked_update, recover, reveal_seeds
from fedhpc.aggregation.streaming import SiteInput, aggregate
from fedhpc.config.schema import ConfigError
from fedhpc.core.files import read_json, write_json
from fedhpc.core.tensorfile import load_state, save_state
from fedhpc.stages.aggregate import aggregate_round
from fedhpc.stages.verify import verify_round
from fedhpc.tasks.validation import validate
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.checkpoints import load_global_meta
from fedhpc.trust.signing import COORDINATOR, sign_document
from tests.test_verify import RoundBuilder
from tests.workflow_util import tiny_config

BITS = 32

# ---------------------------------------------------------------- the arithmetic


def test_mask_streams_are_random_access_and_differ_per_seed():
    s1, s2 = os.urandom(32), os.urandom(32)
    whole = secagg.mask_stream(s1, 0, 1001)
    assert all((secagg.mask_stream(s1, a, b) == whole[a:b]).all() for a, b in [(0, 1), (1, 2), (3, 998), (999, 1001)])
    assert not (secagg.mask_stream(s2, 0, 1001) == whole).any()
    # uniform over uint64: the top bit is set about half the time
    assert 0.45 < float((secagg.mask_stream(s1, 0, 100_000) >> np.uint64(63)).mean()) < 0.55


def sites_masks(n: int, size: int, seed: int = 0):
    """n sites' plain fp32 updates, weights, pairwise seeds and masked encodings (start offset 0)."""
    rng = np.random.default_rng(seed)
    names = [f"s{i}" for i in range(n)]
    xs = {s: rng.normal(0, 1e-2, size).astype(np.float32) for s in names}
    ws = {s: float(rng.uniform(0.1, 1)) for s in names}
    seeds = {tuple(sorted((a, b))): os.urandom(32) for a in names for b in names if a < b}
    masked = {}
    for s in names:
        mine = {o: seeds[tuple(sorted((s, o)))] for o in names if o != s}
        masked[s] = secagg.add_masks(secagg.encode(xs[s], ws[s], BITS, n), mine, s, 0)
    return names, xs, ws, seeds, masked


def test_masks_cancel_exactly_in_the_sum_and_the_mean_is_the_weighted_mean():
    names, xs, ws, _, masked = sites_masks(4, 5000)
    total = secagg.modular_sum(masked.values())
    encoded = secagg.modular_sum(secagg.encode(xs[s], ws[s], BITS, 4) for s in names)
    assert (total == encoded).all()  # bit for bit: modular arithmetic has no rounding
    mean = secagg.decode(total, BITS, sum(ws.values()))
    plain = sum(ws[s] * xs[s].astype(np.float64) for s in names) / sum(ws.values())
    assert np.abs(mean - plain).max() < 4 * 2.0**-BITS


def test_one_masked_update_alone_tells_nothing():
    names, xs, ws, _, masked = sites_masks(3, 20_000)
    alone = secagg.decode(masked["s1"], BITS, ws["s1"])
    # The values look like uniform noise over ±2^31/w, not like an update of scale 1e-2.
    assert np.abs(alone).mean() > 1e6
    assert abs(np.corrcoef(alone, xs["s1"])[0, 1]) < 0.05


def test_dropped_sites_masks_are_removed_with_the_survivors_reveals():
    names, xs, ws, seeds, masked = sites_masks(5, 3000, seed=3)
    survivors, dropped = ["s0", "s2", "s3"], ["s1", "s4"]
    total = secagg.modular_sum(masked[s] for s in survivors)
    corrections = [(seeds[tuple(sorted((i, j)))], secagg.pair_sign(i, j)) for i in survivors for j in dropped]
    plain_sum = secagg.remove_masks(total, corrections, 0)
    assert (plain_sum == secagg.modular_sum(secagg.encode(xs[s], ws[s], BITS, 5) for s in survivors)).all()
    # Without the corrections the survivors' sum is noise.
    assert np.abs(secagg.decode(total, BITS, 1.0)).mean() > 1e6


def test_encoding_refuses_non_finite_and_overflowing_updates():
    with pytest.raises(SecureAggregationError, match="NaN or Inf"):
        secagg.encode(np.array([1.0, np.nan]), 1.0, BITS, 3)
    with pytest.raises(SecureAggregationError, match="lower strategy.secure_aggregation.fraction_bits"):
        secagg.encode(np.array([2.0**30]), 1.0, BITS, 3)
    with pytest.raises(SecureAggregationError, match="no mask with itself"):
        secagg.pair_sign("a", "a")


# ---------------------------------------------------------------- the protocol on the blackboard

SITES = ["a100", "laptop", "lumi"]


def secure_round(tmp_path, sites=SITES):
    b = RoundBuilder(tmp_path, sites)
    cfg = b.config()
    cfg.strategy.secure_aggregation.enabled = True
    cfg.rounds.late_updates = "drop"
    return b, cfg


def publish_masked(b: RoundBuilder, cfg, site: str, tokens: int = 1000, **receipt) -> dict[str, torch.Tensor]:
    """Site `site` masks its update as stages/train.py does and publishes it; returns the plain update."""
    plain = b.good_update(site)
    plan = read_json(b.layout.plan(b.r))
    tensors, meta, extra = masked_update(cfg, b.trust, plan, site, plain, tokens, tokens // cfg.model.seq_len)
    b.publish(site, tensors, metadata=meta, tokens=tokens, **{**extra, **receipt})
    return plain


def plain_aggregate(b: RoundBuilder, tmp_path, updates: dict[str, dict], tokens: dict[str, int]):
    """The same round aggregated in the clear: FedAvg of the plain updates by tokens."""
    total = sum(tokens.values())
    inputs = []
    for s, u in sorted(updates.items()):
        save_state(tmp_path / f"plain-{s}.safetensors", u)
        inputs.append(SiteInput(s, tmp_path / f"plain-{s}.safetensors", tokens[s] / total, tokens[s] / total))
    aggregate(b.layout.global_model(b.r), inputs, tmp_path / "plain.safetensors")
    return load_state(tmp_path / "plain.safetensors")


def run_coordinator(b: RoundBuilder, cfg, arrived: list[str]):
    b.write_arrivals(arrived)
    verdicts = verify_round(cfg, b.layout, b.trust, b.r, load_global_meta(b.layout, b.trust, b.r))
    recovery = recover(cfg, b.layout, b.trust, b.r)
    record = aggregate_round(cfg, b.layout, b.r, load_global_meta(b.layout, b.trust, b.r), b.trust)
    return verdicts, recovery, record, load_state(b.layout.candidate(b.r))


def assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-7, rtol=0), (k, (got[k] - want[k]).abs().max())


def test_the_aggregate_equals_the_plain_one_while_each_update_the_coordinator_holds_is_masked(tmp_path):
    b, cfg = secure_round(tmp_path)
    tokens = {"a100": 1000, "laptop": 400, "lumi": 700}
    plain = {s: publish_masked(b, cfg, s, tokens[s]) for s in SITES}
    verdicts, recovery, record, candidate = run_coordinator(b, cfg, SITES)
    assert verdicts["accepted"] == SITES and recovery["dropped"] == [] and recovery["corrections"] == []
    assert all("norm declared by the site" in read_json(b.layout.verdict(1, s))["flags"][0] for s in SITES)
    assert_close(candidate, plain_aggregate(b, tmp_path, plain, tokens))
    assert record["weights"] == pytest.approx({s: t / 2100 for s, t in tokens.items()})
    # What the coordinator holds of any one site: the file decodes to noise, not to the update.
    for s in SITES:
        held = load_state(b.layout.update(1, s))
        w = read_json(b.layout.receipt(1, s))["secure_aggregation"]["weight"]
        for name, t in held.items():
            assert t.dtype == torch.int64
            seen = t.numpy().view(np.uint64).view(np.int64).astype(np.float64) / 2.0**BITS / w
            assert np.abs(seen).mean() > 1e3 * plain[s][name].abs().mean().item()


def test_after_a_site_drops_the_survivors_reveals_recover_the_aggregate_of_the_others(tmp_path):
    b, cfg = secure_round(tmp_path)
    cfg.strategy.chunk_mb = 12 / (1 << 20)  # 3-element chunks: masks are removed range by range
    plain = {s: publish_masked(b, cfg, s) for s in ["a100", "lumi"]}  # laptop committed, then vanished
    verdicts, recovery, record, candidate = run_coordinator(b, cfg, ["a100", "lumi"])
    assert recovery["survivors"] == ["a100", "lumi"] and recovery["dropped"] == ["laptop"]
    assert sorted((c["site"], c["peer"]) for c in recovery["corrections"]) == [("a100", "laptop"), ("lumi", "laptop")]
    assert_close(candidate, plain_aggregate(b, tmp_path, plain, {"a100": 1000, "lumi": 1000}))
    assert record["secure_aggregation"] == {"survivors": ["a100", "lumi"], "pairs_unmasked": 2}
    kinds = [e["event"] for e in AuditLog(b.layout.audit).events()]
    assert kinds.count("secagg.revealed") == 2 and "secagg.recovered" in kinds
    for s in ("a100", "lumi"):  # each reveal is the survivor's own signed document, naming only laptop
        doc = read_json(b.layout.secagg_reveal(1, s))
        assert doc["signature"]["signer"] == s and sorted(doc["seeds"]) == ["laptop"]


def test_a_rejected_update_counts_as_dropped_and_is_recovered(tmp_path):
    b, cfg = secure_round(tmp_path, ["a", "b", "c", "d"])
    plain = {s: publish_masked(b, cfg, s) for s in ["a", "b", "c"]}
    publish_masked(b, cfg, "d", loss_before=2.0, loss_after=9.0)  # diverged: rejected by verification
    verdicts, recovery, _, candidate = run_coordinator(b, cfg, ["a", "b", "c", "d"])
    assert verdicts["accepted"] == ["a", "b", "c"] and recovery["dropped"] == ["d"]
    assert_close(candidate, plain_aggregate(b, tmp_path, plain, {"a": 1000, "b": 1000, "c": 1000}))


def test_a_reveal_that_does_not_match_its_commitment_stops_the_round(tmp_path, monkeypatch):
    b, cfg = secure_round(tmp_path)
    for s in ["a100", "lumi"]:
        publish_masked(b, cfg, s)
    import fedhpc.aggregation.secure as secure

    real = secure.pair_seeds
    monkeypatch.setattr(
        secure,
        "pair_seeds",
        lambda cfg_, trust, r, site, peers: (
            {p: bytes(32) for p in peers} if site == "lumi" else real(cfg_, trust, r, site, peers)
        ),
    )
    with pytest.raises(SecureAggregationError, match="lumi's revealed seed for its pair with laptop does not match"):
        run_coordinator(b, cfg, ["a100", "lumi"])


def test_a_site_reveals_only_for_a_request_that_cannot_expose_a_survivor(tmp_path):
    b, cfg = secure_round(tmp_path)
    for s in SITES:
        publish_masked(b, cfg, s)

    def request(survivors, dropped):
        doc = {"run": b.run, "round": 1, "survivors": survivors, "dropped": dropped}
        write_json(b.layout.secagg_request(1), sign_document(doc, COORDINATOR, b.trust.private_key(COORDINATOR)))

    request(["lumi"], ["a100", "laptop"])  # lumi's sum alone would be lumi's update
    with pytest.raises(SecureAggregationError, match="fewer than 2 survivors"):
        reveal_seeds(cfg, b.layout, b.trust, 1, "lumi")
    request(["lumi", "a100"], ["laptop", "ghost"])
    with pytest.raises(SecureAggregationError, match="survivors and dropped are not the committed sites"):
        reveal_seeds(cfg, b.layout, b.trust, 1, "lumi")
    request(["lumi", "a100"], ["laptop"])
    assert sorted(reveal_seeds(cfg, b.layout, b.trust, 1, "lumi")["seeds"]) == ["laptop"]
    request(["lumi", "laptop"], ["a100"])  # a second request that would unmask a100 as well
    with pytest.raises(SecureAggregationError, match=r"already revealed for \['laptop'\]"):
        reveal_seeds(cfg, b.layout, b.trust, 1, "lumi")


def test_too_few_survivors_sum_nothing(tmp_path):
    b, cfg = secure_round(tmp_path)
    publish_masked(b, cfg, "lumi")
    _, recovery, record, candidate = run_coordinator(b, cfg, ["lumi"])
    assert recovery["survivors"] == [] and "fewer than min_sites 2" in recovery["note"]
    assert record["weights"] == {} and not b.layout.secagg_reveal(1, "lumi").exists()
    assert_close(candidate, load_state(b.layout.global_model(1)))


def test_an_unmasked_update_is_refused_when_secure_aggregation_is_on_and_a_masked_one_when_off(tmp_path):
    b, cfg = secure_round(tmp_path)
    for s in ["a100", "lumi"]:
        publish_masked(b, cfg, s)
    b.publish("laptop")  # in the clear
    verdicts, *_ = run_coordinator(b, cfg, SITES)
    assert verdicts["rejected"]["laptop"] == [
        "secure aggregation is on, but the update is not masked (it would be exposed)"
    ]
    verdicts = verify_round(b.config(), b.layout, b.trust, 1, b.base)  # secure aggregation off
    assert verdicts["rejected"]["lumi"] == ["the update is masked, but secure aggregation is off"]


def test_a_declared_weight_that_does_not_follow_its_tokens_is_refused(tmp_path):
    b, cfg = secure_round(tmp_path)
    for s in ["a100", "lumi"]:
        publish_masked(b, cfg, s)
    publish_masked(b, cfg, "laptop", tokens=1000)
    rec = read_json(b.layout.receipt(1, "laptop"))
    rec["secure_aggregation"]["weight"] *= 10  # claims ten times its share of the sum
    write_json(b.layout.receipt(1, "laptop"), sign_document(rec, "laptop", b.trust.private_key("laptop")))
    verdicts, recovery, *_ = run_coordinator(b, cfg, SITES)
    assert "is not what its tokens give" in verdicts["rejected"]["laptop"][0] and recovery["dropped"] == ["laptop"]
    assert read_json(b.layout.update(1, "lumi").with_name("receipt.json"))["secure_aggregation"]["scheme"] == SCHEME


# ---------------------------------------------------------------- configurations that cannot work


def merged(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        out[k] = merged(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"strategy": {"rule": "median"}}, "strategy.rule: 'median' needs every update on its own"),
        ({"strategy": {"rule": "krum", "faulty_sites": 0}}, "strategy.rule: 'krum' needs every update on its own"),
        ({"strategy": {"rule": "trimmed_mean", "faulty_sites": 1}}, "'trimmed_mean' needs every update on its own"),
        ({"strategy": {"clip_norm": 1.0}}, "strategy.clip_norm: cannot clip each update"),
        ({"strategy": {"privacy": {"noise_multiplier": 1.0}}}, "strategy.privacy.noise_multiplier: cannot clip"),
        ({"strategy": {"heterogeneity_aware": True}}, "strategy.heterogeneity_aware"),
        ({"training": {"compression": {"scheme": "int8"}}}, "compressed updates (int8) would not cancel"),
        ({"sites": {"lumi": {"compression": "topk"}}}, "compressed updates (topk) would not cancel"),
        ({"rounds": {"late_updates": "fold"}}, "folding its update later would expose it"),
        ({"strategy": {"name": "scaffold"}}, "scaffold's control variates are sent in the clear"),
    ],
)
def test_configurations_that_need_single_updates_are_refused_with_the_reason(tmp_path, change, message):
    cfg = tiny_config(tmp_path)
    cfg["rounds"]["late_updates"] = "drop"
    cfg["strategy"] = {"secure_aggregation": {"enabled": True}}
    with pytest.raises(ConfigError) as info:
        validate(merged(cfg, change))
    assert message in str(info.value)


def test_a_valid_secure_configuration_passes(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["rounds"]["late_updates"] = "drop"
    cfg["strategy"] = {"name": "fedadam", "secure_aggregation": {"enabled": True}}
    assert validate(cfg).strategy.secure_aggregation.enabled
