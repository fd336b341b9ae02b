"""FedAvg against hand-computed numbers, streaming aggregation of a round, and the streaming writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedhpc.aggregation.strategies import fedavg, site_weights, weighted_sum
from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.core.tensorfile import TensorSpec, load_state, read_metadata, read_specs, write_tensors
from fedhpc.stages.aggregate import AggregationError, aggregate_round
from fedhpc.trust.audit import AuditLog
from tests.test_verify import RoundBuilder

T = torch.tensor


# ---------------------------------------------------------------- strategies (pure)


def test_site_weights_by_tokens_samples_or_uniform():
    receipts = {"b": {"tokens": 100, "sequences": 30}, "a": {"tokens": 300, "sequences": 10}}
    assert site_weights(receipts, "tokens") == {"a": 0.75, "b": 0.25}
    assert site_weights(receipts, "samples") == {"a": 0.25, "b": 0.75}
    assert site_weights(receipts, "uniform") == {"a": 0.5, "b": 0.5}
    assert list(site_weights(receipts, "tokens")) == ["a", "b"]  # sorted, so aggregation order is fixed
    assert site_weights({}, "tokens") == {}


def test_site_weights_refuse_a_zero_total():
    with pytest.raises(ValueError, match="weights from receipts. tokens sum to 0.0"):
        site_weights({"a": {"tokens": 0}, "b": {"tokens": 0}}, "tokens")


def test_weighted_sum_by_hand_and_in_fp32():
    assert torch.equal(weighted_sum([T([1.0, 0.0]), T([0.0, 3.0])], [0.75, 0.25]), T([0.75, 0.75]))
    out = weighted_sum([T([1.0, 2.0], dtype=torch.bfloat16), T([4.0, 8.0], dtype=torch.float16)], [0.5, 0.25])
    assert out.dtype == torch.float32 and torch.equal(out, T([1.5, 3.0]))
    with pytest.raises(ValueError):
        weighted_sum([T([1.0])], [0.5, 0.5])
    with pytest.raises(ValueError):
        weighted_sum([], [])


def test_fedavg_by_hand():
    # global [1, 2]; updates [1, 0] and [0, 3] weighted 3:1 -> step [0.75, 0.75]
    g, updates = T([1.0, 2.0]), [T([1.0, 0.0]), T([0.0, 3.0])]
    w = list(site_weights({"a": {"tokens": 3}, "b": {"tokens": 1}}, "tokens").values())
    assert torch.equal(fedavg(g, updates, w), T([1.75, 2.75]))
    assert torch.equal(fedavg(g, updates, w, server_lr=0.5), T([1.375, 2.375]))
    assert torch.equal(fedavg(g, updates, [0.5, 0.5]), T([1.5, 3.5]))  # uniform
    assert torch.equal(g, T([1.0, 2.0]))  # inputs untouched


def test_fedavg_keeps_a_bf16_global_in_bf16():
    g = T([1.0, 2.0], dtype=torch.bfloat16)
    out = fedavg(g, [T([1.0, 0.0]), T([0.0, 3.0])], [0.75, 0.25])
    assert out.dtype == torch.bfloat16 and torch.equal(out, T([1.75, 2.75], dtype=torch.bfloat16))


# ---------------------------------------------------------------- aggregate_round on a round directory

GLOBAL = {"w": T([1.0, 2.0]), "m": T([[0.5, -1.0], [2.0, 0.0]])}
UPDATES = {
    "a": {"w": T([1.0, 0.0]), "m": T([[0.5, 0.0], [0.0, -1.0]])},
    "b": {"w": T([0.0, 3.0]), "m": T([[0.0, 2.0], [4.0, 0.0]])},
    "c": {"w": T([100.0, 100.0]), "m": T([[100.0, 100.0], [100.0, 100.0]])},  # rejected
}
# a: 300 tokens, 10 sequences; b: 100 tokens, 30 sequences
EXPECTED = {
    "tokens": {"w": T([1.75, 2.75]), "m": T([[0.875, -0.5], [3.0, -0.75]])},  # 0.75 a + 0.25 b
    "samples": {"w": T([1.25, 4.25]), "m": T([[0.625, 0.5], [5.0, -0.25]])},  # 0.25 a + 0.75 b
    "uniform": {"w": T([1.5, 3.5]), "m": T([[0.75, 0.0], [4.0, -0.5]])},  # 0.5 a + 0.5 b
}


def build(tmp_path: Path, accepted: list[str], global_state=None, updates=None) -> RoundBuilder:
    b = RoundBuilder(tmp_path, ["a", "b", "c", "d"], global_state=global_state or GLOBAL)
    counts = {"a": (300, 10), "b": (100, 30), "c": (1000, 100)}
    for s, (tokens, seqs) in counts.items():
        b.publish(s, (updates or UPDATES)[s], tokens=tokens, sequences=seqs)
    b.write_arrivals(["a", "b", "c"])  # d never published
    rejected = {s: ["outlier: test"] for s in ("a", "b", "c") if s not in accepted}
    hashes = {s: sha256_file(b.layout.update(b.r, s)) for s in accepted}
    write_json(
        b.layout.verdicts(b.r), {"round": b.r, "accepted": accepted, "rejected": rejected, "update_sha256": hashes}
    )
    return b


def aggregate(b: RoundBuilder, weighting: str = "tokens", server_lr: float = 1.0) -> dict:
    cfg = b.config()
    cfg.strategy.weighting, cfg.strategy.server_lr = weighting, server_lr
    return aggregate_round(cfg, b.layout, b.r, b.base)


@pytest.mark.parametrize("weighting", sorted(EXPECTED))
def test_aggregate_round_matches_hand_computed_fedavg_and_excludes_rejected_sites(tmp_path, weighting):
    b = build(tmp_path, accepted=["a", "b"])
    record = aggregate(b, weighting)
    out = load_state(b.layout.candidate(b.r))
    assert sorted(out) == ["m", "w"]
    for name, want in EXPECTED[weighting].items():
        assert torch.equal(out[name], want), (name, out[name])
        # ...and exactly what the in-memory strategy gives.
        w = site_weights({"a": {"tokens": 300, "sequences": 10}, "b": {"tokens": 100, "sequences": 30}}, weighting)
        assert torch.equal(out[name], fedavg(GLOBAL[name], [UPDATES["a"][name], UPDATES["b"][name]], list(w.values())))
    assert (
        record["weights"]
        == {"tokens": {"a": 0.75, "b": 0.25}, "samples": {"a": 0.25, "b": 0.75}, "uniform": {"a": 0.5, "b": 0.5}}[
            weighting
        ]
    )


def test_aggregate_record_names_weights_exclusions_and_hashes(tmp_path):
    b = build(tmp_path, accepted=["a", "b"])
    record = aggregate(b, server_lr=0.5)
    assert read_json(b.layout.aggregate_record(b.r)) == record
    assert record["weights"] == {"a": 0.75, "b": 0.25} and "c" not in record["weights"]
    assert record["excluded"] == {"c": ["outlier: test"]} and record["missing"] == ["d"]
    assert record["base_sha256"] == b.base["sha256"] and record["server_lr"] == 0.5
    assert record["output_sha256"] == sha256_file(b.layout.candidate(b.r))
    assert record["note"] is None and record["strategy"] == "fedavg" and record["weighting"] == "tokens"
    assert torch.equal(load_state(b.layout.candidate(b.r))["w"], T([1.375, 2.375]))
    assert read_metadata(b.layout.candidate(b.r)) == {"run": "t", "round": "1", "source": "fedavg"}
    [event] = [e for e in AuditLog(b.layout.audit).events() if e["event"] == "round.aggregated"]
    assert event["weights"] == {"a": 0.75, "b": 0.25} and event["excluded"] == ["c"]
    assert event["output_sha256"] == record["output_sha256"]


def test_no_accepted_update_reproduces_the_base_model_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 5, generator=g), "b": torch.randn(5, generator=g)}
    base["b"][0] = -0.0  # a sign bit an arithmetic detour (x + 0) would lose
    zeros = {k: torch.zeros_like(v) for k, v in base.items()}
    b = build(tmp_path, accepted=[], global_state=base, updates={"a": zeros, "b": zeros, "c": zeros})
    record = aggregate(b)
    out = load_state(b.layout.candidate(b.r))
    assert read_specs(b.layout.candidate(b.r)) == read_specs(b.layout.global_model(b.r))
    for k, v in base.items():
        assert torch.equal(out[k].view(torch.int32), v.view(torch.int32)), k
    assert record["weights"] == {} and sorted(record["excluded"]) == ["a", "b", "c"]
    assert record["note"] == "no accepted updates: the candidate equals the base model"


def test_a_bf16_global_is_aggregated_in_bf16(tmp_path):
    bf = {k: v.to(torch.bfloat16) for k, v in GLOBAL.items()}
    ups = {s: {k: v.to(torch.bfloat16) for k, v in u.items()} for s, u in UPDATES.items()}
    b = build(tmp_path, accepted=["a", "b"], global_state=bf, updates=ups)
    aggregate(b)
    out = load_state(b.layout.candidate(b.r))
    assert read_specs(b.layout.candidate(b.r))["w"] == TensorSpec("BF16", (2,))
    assert torch.equal(out["w"], EXPECTED["tokens"]["w"].to(torch.bfloat16))


def test_an_update_changed_after_verification_is_not_aggregated(tmp_path):
    b = build(tmp_path, accepted=["a", "b"])
    # Site b swaps its file after it was accepted (its signed receipt still names the old sha256).
    from fedhpc.core.tensorfile import save_state

    save_state(b.layout.update(b.r, "b"), UPDATES["c"])
    with pytest.raises(AggregationError, match="changed after verification"):
        aggregate(b)
    assert not b.layout.candidate(b.r).exists()


# ---------------------------------------------------------------- the streaming writer


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "f32": torch.randn(4, 6, generator=g),
        "transposed": torch.randn(6, 4, generator=g).T,  # not contiguous
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "i64": torch.arange(-5, 5, dtype=torch.int64),
        "flags": T([True, False, True]),
        "scalar": T(2.5),
        "empty": torch.zeros(0, 3),
    }


def specs_of(ts: dict[str, torch.Tensor]) -> dict[str, TensorSpec]:
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64", torch.bool: "BOOL"}
    return {k: TensorSpec(names[v.dtype], tuple(v.shape)) for k, v in ts.items()}


def test_write_tensors_output_loads_identically_with_safetensors(tmp_path):
    ts = tensors()
    calls = []

    def produce(name):
        calls.append(name)
        return ts[name]

    path = tmp_path / "out.safetensors"
    write_tensors(path, specs_of(ts), produce, {"round": 3})
    assert calls == sorted(ts)  # each tensor produced once, in header order
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(ts)
    for k, v in ts.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape and torch.equal(loaded[k], v), k
    assert read_metadata(path) == {"round": "3"}
    assert read_specs(path) == specs_of(ts)


@pytest.mark.parametrize("bad", [torch.zeros(6, 4), torch.zeros(4, 6, dtype=torch.float64)])
def test_a_producer_returning_the_wrong_tensor_raises_and_leaves_no_file(tmp_path, bad):
    ts = tensors()
    path = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=r"tensor f32: produced .* header says F32\[4, 6\]"):
        write_tensors(path, specs_of(ts), lambda n: bad if n == "f32" else ts[n])
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary part


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    ts = tensors()
    path = tmp_path / "out.safetensors"
    write_tensors(path, specs_of(ts), ts.__getitem__)
    before = path.read_bytes()

    def boom(name):
        if name == "i64":
            raise RuntimeError("producer died")
        return ts[name]

    with pytest.raises(RuntimeError, match="producer died"):
        write_tensors(path, specs_of(ts), boom)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


# ---------------------------------------------------------------- bounded memory


# ---------------------------------------------------------------- strategies at round level


def test_a_round_with_too_few_accepted_updates_for_the_robust_rule_fails_naming_them(tmp_path):
    b = build(tmp_path, accepted=["a", "b"])
    cfg = b.config()
    cfg.strategy.rule, cfg.strategy.faulty_sites = "median", 1
    with pytest.raises(AggregationError, match=r"round 1: 2 accepted updates \(a, b\) are too few .*n ≥ 2f \+ 1 = 3"):
        aggregate_round(cfg, b.layout, b.r, b.base)
    assert not b.layout.candidate(b.r).exists()


def test_server_state_goes_to_the_next_global_on_promotion_and_stays_on_rollback(tmp_path):
    from fedhpc.stages.promote import _carry_server_state

    b = build(tmp_path, accepted=["a", "b"])
    cfg = b.config()
    cfg.strategy.name, cfg.strategy.server_lr = "fedavgm", 1.0
    aggregate_round(cfg, b.layout, b.r, b.base)
    state = load_state(b.layout.candidate_state(b.r))
    # Round 1 starts with zero momentum: m = Δ, the tokens-weighted mean of a and b.
    for name in GLOBAL:
        assert torch.equal(state[f"{name}@momentum"], EXPECTED["tokens"][name] - GLOBAL[name])
    _carry_server_state(b.layout, b.r, accepted=True)
    assert sha256_file(b.layout.server_state(b.r + 1)) == sha256_file(b.layout.candidate_state(b.r))
    assert read_json(b.layout.server_meta(b.r + 1))["rounds"] == 1
    # A rejected candidate leaves the momentum of the global it was built on (none here).
    b.layout.server_state(b.r + 1).unlink()
    _carry_server_state(b.layout, b.r, accepted=False)
    assert not b.layout.server_state(b.r + 1).exists()
    assert read_json(b.layout.server_meta(b.r + 1))["rolled_back_round"] == b.r


def test_compressed_updates_pass_verification_and_aggregate_to_their_decoded_values(tmp_path):
    from fedhpc.aggregation.compress import Codec, codec_metadata, decode, encode
    from fedhpc.core.tensorfile import save_state

    b = RoundBuilder(tmp_path, ["a", "b", "c"], global_state=GLOBAL)
    codecs = {"a": Codec("int8", block=2), "b": Codec("bf16"), "c": Codec("topk", topk_fraction=0.5)}
    decoded = {}
    for s, codec in codecs.items():
        parts = {}
        g = torch.Generator().manual_seed(sum(map(ord, s)))
        for name, delta in {k: 0.1 * torch.randn(v.shape, generator=g) for k, v in GLOBAL.items()}.items():
            parts.update(encode(name, delta, codec))
            decoded.setdefault(s, {})[name] = decode(parts, name, tuple(delta.shape), codec)
        receipt = b.publish(s, None, tokens=100, sequences=10)
        # What a site with this codec sends instead of the fp32 file, under a receipt for it.
        path = b.layout.update(b.r, s)
        save_state(path, parts, {"run": b.run, "round": str(b.r), "site": s, **codec_metadata(codec)})
        _resign(b, s, receipt, path)
    b.write_arrivals(["a", "b", "c"])
    summary = b.verify()
    assert summary["accepted"] == ["a", "b", "c"], summary["rejected"]
    aggregate_round(b.config(), b.layout, b.r, b.base)
    out = load_state(b.layout.candidate(b.r))
    for name in GLOBAL:
        want = fedavg(GLOBAL[name], [decoded[s][name] for s in ("a", "b", "c")], [1 / 3] * 3)
        assert torch.allclose(out[name], want, atol=1e-6), name


def _resign(b: RoundBuilder, site: str, receipt: dict, path: Path) -> None:
    from fedhpc.trust.signing import sign_document

    receipt = {k: v for k, v in receipt.items() if k != "signature"}
    receipt["update_sha256"] = sha256_file(path)
    write_json(b.layout.receipt(b.r, site), sign_document(receipt, site, b.trust.private_key(site)))


def test_round_weights_decay_stale_updates_then_cap_domains_then_normalise_effort():
    from fedhpc.config.strategy import StrategyConfig
    from fedhpc.stages.aggregate import round_weights

    s = StrategyConfig(heterogeneity_aware=True, domain_cap=0.6)
    s.staleness.decay, s.staleness.exponent = "polynomial", 1.0
    receipts = {
        "a": {"tokens": 100, "base_round": 5, "lr_sum": 1.0, "steps": 10},  # built on the global of round 5
        "b": {"tokens": 100, "base_round": 4, "lr_sum": 4.0, "steps": 10},  # one round late: weight × 1/2
    }
    mix = {"a": {"law": 1.0}, "b": {"web": 1.0}}
    p, coef, why = round_weights(s, 5, receipts, mix)
    assert why["staleness"] == {"a": 0, "b": 1}
    # 1 : 1/2 → 2/3, 1/3; law's share 2/3 > 0.6 is capped to 0.6.
    assert p["a"] == pytest.approx(0.6) and p["b"] == pytest.approx(0.4)
    assert why["domain_shares"]["law"] == pytest.approx(0.6)
    # FedNova: τ = 0.6·1 + 0.4·4 = 2.2; coefficients p·τ/a.
    assert coef["a"] == pytest.approx(0.6 * 2.2 / 1.0) and coef["b"] == pytest.approx(0.4 * 2.2 / 4.0)
    assert why["effort"] == {"a": 1.0, "b": 4.0}


def test_aggregation_clears_temporaries_a_killed_attempt_left_in_the_candidate_directory(tmp_path):
    b = build(tmp_path, accepted=["a", "b"])
    stale = b.layout.candidate(b.r).parent / ".server_state.json.x1y2z3.part"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text('{"half": ')
    aggregate(b)
    assert not stale.exists()
    assert sorted(p.name for p in b.layout.candidate(b.r).parent.iterdir()) == [
        "model.safetensors",
        "server_state.json",
    ]
