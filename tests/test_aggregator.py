"""The streaming aggregator on update files: equal to the pure strategies in memory for every rule,
optimiser and chunk size; clipping, DP noise, server state across rounds, compressed updates,
empty rounds, its memory bound, and MPI runs bitwise equal to serial ones."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fedhpc.aggregation.compress import Codec, codec_metadata, decode, encode, error_bound
from fedhpc.aggregation.strategies import (
    SERVER_STATE,
    coordinate_median,
    krum_select,
    pairwise_sq_distances,
    server_step,
    trimmed_mean,
    weighted_sum,
)
from fedhpc.aggregation.streaming import Combine, ServerOpt, SiteInput, aggregate, partition
from fedhpc.core.rawtensors import TensorReader
from fedhpc.core.tensorfile import TensorFileError, TensorSpec, load_state, read_metadata, save_state

T = torch.tensor
REPO = Path(__file__).resolve().parents[1]


def rand(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so -0.0 differs from 0.0 and NaNs compare equal to themselves."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(bits(a[k]), bits(b[k])) for k in a
    )


# ---------------------------------------------------------------- one round of five sites, one of them an outlier

SHAPES = {"enc.w": (4, 6), "enc.b": (6,), "head": (3, 5), "emb": (7, 2)}
WEIGHTS = {"a": 0.3, "b": 0.25, "c": 0.2, "d": 0.15, "e": 0.1}
OUTLIER = "e"


def make_round(tmp: Path, server: str = "fedavg") -> tuple[dict, dict, dict | None, list[SiteInput]]:
    base = {n: rand(s, i) for i, (n, s) in enumerate(sorted(SHAPES.items()))}
    base["emb"] = base["emb"].to(torch.bfloat16)  # the model keeps its dtype
    save_state(tmp / "base.safetensors", base)
    updates = {}
    for j, site in enumerate(sorted(WEIGHTS)):
        scale = 50.0 if site == OUTLIER else 0.1
        updates[site] = {n: rand(s, 100 * j + i, scale) for i, (n, s) in enumerate(sorted(SHAPES.items()))}
        save_state(tmp / f"{site}.safetensors", updates[site])
    state = None
    if SERVER_STATE[server]:
        # A non-zero previous state, so that reading it back is checked too (v > 0 for the adaptive ones).
        state = {
            f"{n}@{k}": rand(s, 7 + i, 1e-2).abs()
            for i, (n, s) in enumerate(SHAPES.items())
            for k in SERVER_STATE[server]
        }
        save_state(tmp / "state_in.safetensors", state)
    inputs = [SiteInput(s, tmp / f"{s}.safetensors", w) for s, w in WEIGHTS.items()]
    return base, updates, state, inputs


def expected(base, updates, weights, state, rule: str, faulty: int, server: ServerOpt, select=None, clip=None):
    """The round computed on whole tensors in memory with the pure functions of aggregation/strategies.py."""
    sites, names = sorted(updates), sorted(base)
    n = len(sites)
    scale = [1.0] * n
    if clip is not None:
        norms = [math.sqrt(sum(float((updates[s][k].double() ** 2).sum()) for k in names)) for s in sites]
        scale = [1.0 if nm <= clip else clip / nm for nm in norms]
    chosen = list(range(n))
    if rule in ("krum", "multikrum"):
        flat = torch.stack(
            [torch.cat([updates[s][k].reshape(-1) for k in names]) * scale[i] for i, s in enumerate(sites)]
        )
        x = flat.double()
        chosen = krum_select(pairwise_sq_distances(x @ x.T), faulty, 1 if rule == "krum" else (select or n - faulty))
    share = sum(weights[sites[i]] for i in chosen)
    model, new_state = {}, {}
    for k in names:
        ups = [updates[sites[i]][k] * scale[i] if clip is not None else updates[sites[i]][k] for i in chosen]
        if rule == "median":
            delta = coordinate_median(torch.stack(ups))
        elif rule == "trimmed_mean":
            delta = trimmed_mean(torch.stack(ups), faulty)
        elif rule == "krum":
            delta = weighted_sum(ups, [1.0])
        else:
            delta = weighted_sum(
                [updates[sites[i]][k] for i in chosen], [weights[sites[i]] / share * scale[i] for i in chosen]
            )
        prev = {key: state[f"{k}@{key}"] for key in SERVER_STATE[server.name]} if state else {}
        x, s = server.step(base[k], delta, prev)
        model[k] = x.to(base[k].dtype)
        new_state.update({f"{k}@{key}": v for key, v in s.items()})
    return model, new_state, [sites[i] for i in chosen]


RULES = [
    ("mean", 0, None),
    ("median", 1, None),
    ("trimmed_mean", 1, None),
    ("krum", 1, None),
    ("multikrum", 1, None),
    ("multikrum", 1, 2),
]
SERVERS = [
    ServerOpt("fedavg", lr=1.0),
    ServerOpt("fedavgm", lr=0.8, momentum=0.5),
    ServerOpt("diloco", lr=0.7, momentum=0.9),
    ServerOpt("fedadam", lr=0.01),
    ServerOpt("fedyogi", lr=0.02, beta1=0.8, beta2=0.95, tau=1e-2),
]


@pytest.mark.parametrize("server", SERVERS, ids=lambda s: s.name)
@pytest.mark.parametrize("rule,faulty,select", RULES, ids=lambda x: str(x))
def test_engine_equals_the_pure_functions_for_every_rule_optimiser_and_chunk_size(
    tmp_path, rule, faulty, select, server
):
    base, updates, state, inputs = make_round(tmp_path, server.name)
    want_model, want_state, want_selected = expected(base, updates, WEIGHTS, state, rule, faulty, server, select)
    if rule in ("krum", "multikrum"):
        assert OUTLIER not in want_selected  # the rule has something to reject
    outputs = []
    # 16 MiB: each tensor in one chunk; 64 bytes: 16 elements; 20 bytes: 5 elements, across row boundaries
    for chunk in (16 << 20, 64, 20):
        out, sout = tmp_path / f"out{chunk}.safetensors", tmp_path / f"state{chunk}.safetensors"
        res = aggregate(
            tmp_path / "base.safetensors",
            list(reversed(inputs)),  # input order does not matter: sites are sorted
            out,
            server=server,
            combine=Combine(rule=rule, faulty=faulty, select=select),
            state_in=tmp_path / "state_in.safetensors" if state else None,
            state_out=sout,
            chunk_bytes=chunk,
            metadata={"round": "4"},
        )
        assert same(load_state(out), want_model), (chunk, rule, server.name)
        assert read_metadata(out) == {"round": "4"}
        if SERVER_STATE[server.name]:
            assert same(load_state(sout), want_state), chunk
            assert read_metadata(sout) == {"optimizer": server.name}
        else:
            assert not sout.exists()
        assert res.selected == want_selected
        if rule == "krum":
            assert res.coefficients == {want_selected[0]: 1.0}
        elif rule in ("median", "trimmed_mean"):
            assert res.coefficients == {s: 0.2 for s in WEIGHTS}
        else:
            share = sum(WEIGHTS[s] for s in want_selected)
            assert res.coefficients == {s: WEIGHTS[s] / share for s in want_selected}
        outputs.append(out.read_bytes())
    # identical files whatever the chunk size (mean and median included, bit for bit)
    assert outputs[0] == outputs[1] == outputs[2]


def test_mean_uses_the_sites_fednova_coefficients_by_hand(tmp_path):
    save_state(tmp_path / "base.safetensors", {"w": T([1.0, 1.0])})
    save_state(tmp_path / "a.safetensors", {"w": T([1.0, 2.0])})
    save_state(tmp_path / "b.safetensors", {"w": T([4.0, 8.0])})
    # p = [0.5, 0.5], effort [1, 4]: coefficients [1.25, 0.3125]; Δ = 1.25 [1, 2] + 0.3125 [4, 8] = [2.5, 5]
    inputs = [
        SiteInput("a", tmp_path / "a.safetensors", 0.5, coef=1.25),
        SiteInput("b", tmp_path / "b.safetensors", 0.5, coef=0.3125),
    ]
    res = aggregate(tmp_path / "base.safetensors", inputs, tmp_path / "out.safetensors")
    assert torch.equal(load_state(tmp_path / "out.safetensors")["w"], T([3.5, 6.0]))
    assert res.coefficients == {"a": 1.25, "b": 0.3125} and res.selected == ["a", "b"]


# ---------------------------------------------------------------- clipping and layer-wise normalisation


def test_clipping_averages_the_clipped_updates_and_reports_norms_and_scales(tmp_path):
    save_state(tmp_path / "base.safetensors", {"v": T([0.0]), "w": T([0.0, 0.0])})
    save_state(tmp_path / "a.safetensors", {"v": T([4.0]), "w": T([3.0, 0.0])})  # ‖a‖ = 5 (over both tensors)
    save_state(tmp_path / "b.safetensors", {"v": T([0.8]), "w": T([0.0, 0.6])})  # ‖b‖ = 1
    inputs = [SiteInput(s, tmp_path / f"{s}.safetensors", 0.5) for s in "ab"]
    for chunk in (1 << 20, 4):
        res = aggregate(
            tmp_path / "base.safetensors",
            inputs,
            tmp_path / "out.safetensors",
            combine=Combine(clip=2.0),
            chunk_bytes=chunk,
        )
        assert res.norms == {"a": 5.0, "b": pytest.approx(1.0, rel=1e-7)}
        assert res.scales == {"a": 0.4, "b": 1.0}  # a clipped to norm 2, b inside
        out = load_state(tmp_path / "out.safetensors")
        # 0.5 · 0.4 · a + 0.5 · b = [0.6, 0.3] and [0.8 + 0.4]
        assert out["w"].tolist() == pytest.approx([0.6, 0.3], rel=1e-6)
        assert out["v"].tolist() == pytest.approx([1.2], rel=1e-6)
        for k in ("v", "w"):
            a, b = load_state(tmp_path / "a.safetensors")[k], load_state(tmp_path / "b.safetensors")[k]
            assert torch.equal(out[k], weighted_sum([a, b], [0.5 * 0.4, 0.5 * 1.0]))


def test_clipping_with_a_robust_rule_equals_the_pure_functions(tmp_path):
    base, updates, state, inputs = make_round(tmp_path, "fedadam")
    server = ServerOpt("fedadam", lr=0.01)
    for rule, faulty in (("mean", 0), ("median", 1), ("multikrum", 1)):
        res = aggregate(
            tmp_path / "base.safetensors",
            inputs,
            tmp_path / "out.safetensors",
            server=server,
            combine=Combine(rule=rule, faulty=faulty, clip=1.0),
            state_in=tmp_path / "state_in.safetensors",
            state_out=tmp_path / "state.safetensors",
        )
        model, new_state, selected = expected(base, updates, WEIGHTS, state, rule, faulty, server, clip=1.0)
        got = load_state(tmp_path / "out.safetensors")
        for k in model:  # the norms are summed chunk by chunk in float64: equal up to the last bits
            torch.testing.assert_close(got[k].float(), model[k].float(), rtol=1e-6, atol=1e-6)
        assert res.selected == selected
        assert res.scales[OUTLIER] < 0.01 and res.norms[OUTLIER] > 100


def test_layerwise_normalisation_equalises_each_tensor_to_the_weighted_mean_norm(tmp_path):
    save_state(tmp_path / "base.safetensors", {"t1": T([0.0, 0.0]), "t2": T([0.0, 0.0])})
    save_state(tmp_path / "a.safetensors", {"t1": T([3.0, 4.0]), "t2": T([1.0, 0.0])})  # norms 5, 1
    save_state(tmp_path / "b.safetensors", {"t1": T([0.0, 1.0]), "t2": T([0.0, 3.0])})  # norms 1, 3
    inputs = [SiteInput("a", tmp_path / "a.safetensors", 0.75), SiteInput("b", tmp_path / "b.safetensors", 0.25)]
    # weighted mean norms: t1 0.75·5 + 0.25·1 = 4, t2 0.75·1 + 0.25·3 = 1.5
    # scaled: a.t1 ×0.8 = [2.4, 3.2], a.t2 ×1.5 = [1.5, 0]; b.t1 ×4 = [0, 4], b.t2 ×0.5 = [0, 1.5]
    res = aggregate(
        tmp_path / "base.safetensors", inputs, tmp_path / "out.safetensors", combine=Combine(layerwise=True)
    )
    out = load_state(tmp_path / "out.safetensors")
    assert out["t1"].tolist() == pytest.approx([1.8, 3.4], rel=1e-6)  # 0.75 a + 0.25 b
    assert out["t2"].tolist() == pytest.approx([1.125, 0.375], rel=1e-6)
    # every site's norm is now √(4² + 1.5²), so none dominates; nothing clipped
    assert res.norms == pytest.approx({"a": math.sqrt(18.25), "b": math.sqrt(18.25)}, rel=1e-12)
    assert res.scales == {"a": 1.0, "b": 1.0}
    # ...and then clipped as a whole to 4
    aggregate(
        tmp_path / "base.safetensors",
        inputs,
        tmp_path / "clipped.safetensors",
        combine=Combine(layerwise=True, clip=4.0),
    )
    clipped = load_state(tmp_path / "clipped.safetensors")
    f = 4.0 / math.sqrt(18.25)
    assert clipped["t1"].tolist() == pytest.approx([1.8 * f, 3.4 * f], rel=1e-6)
    assert clipped["t2"].tolist() == pytest.approx([1.125 * f, 0.375 * f], rel=1e-6)


# ---------------------------------------------------------------- differential privacy noise

DP_N = 250_000


def dp_round(tmp: Path, key: bytes, chunk: int, name: str, z: float = 0.8, clip: float = 1.5):
    if not (tmp / "base.safetensors").exists():
        save_state(tmp / "base.safetensors", {"w": rand(DP_N, 1)})
        for s in "abc":
            save_state(tmp / f"{s}.safetensors", {"w": torch.zeros(DP_N)})
    inputs = [SiteInput(s, tmp / f"{s}.safetensors", w) for s, w in zip("abc", (0.5, 0.3, 0.2), strict=True)]
    out = tmp / f"{name}.safetensors"
    res = aggregate(
        tmp / "base.safetensors",
        inputs,
        out,
        combine=Combine(clip=clip, noise_multiplier=z, noise_key=key),
        chunk_bytes=chunk,
    )
    return res, load_state(out)["w"].double() - load_state(tmp / "base.safetensors")["w"].double()


def test_dp_noise_has_the_stated_std_and_is_reproducible_per_key_and_chunk_size(tmp_path):
    res, noise = dp_round(tmp_path, b"k" * 32, 1 << 18, "one")
    assert res.noise_std == 0.8 * 1.5 * 0.5  # z · C · max weight
    assert res.noise_std == pytest.approx(0.6)
    assert float(noise.std()) == pytest.approx(0.6, rel=0.05)
    assert abs(float(noise.mean())) < 5 * 0.6 / math.sqrt(DP_N)
    assert res.norms == {"a": 0.0, "b": 0.0, "c": 0.0} and res.scales == {"a": 1.0, "b": 1.0, "c": 1.0}
    # same key, same chunk size: the same noise
    _, again = dp_round(tmp_path, b"k" * 32, 1 << 18, "again")
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "again.safetensors").read_bytes()
    assert torch.equal(noise, again)
    # another key: other noise
    _, other = dp_round(tmp_path, b"j" * 32, 1 << 18, "other")
    assert float((other == noise).double().mean()) < 0.01
    assert float(other.std()) == pytest.approx(0.6, rel=0.05)
    # The noise is drawn per (tensor, chunk start): reproducing a round needs the same chunk_bytes
    # (serial or MPI alike), a different chunk size draws different (equally distributed) noise.
    _, rechunked = dp_round(tmp_path, b"k" * 32, 1 << 20, "rechunked")
    assert not torch.equal(rechunked, noise)
    assert float(rechunked.std()) == pytest.approx(0.6, rel=0.05)


def test_dp_noise_needs_a_clip_norm_and_a_secret_key(tmp_path):
    save_state(tmp_path / "base.safetensors", {"w": torch.zeros(3)})
    save_state(tmp_path / "a.safetensors", {"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="differential privacy needs a clip norm"):
        aggregate(
            tmp_path / "base.safetensors",
            [SiteInput("a", tmp_path / "a.safetensors", 1.0)],
            tmp_path / "out.safetensors",
            combine=Combine(noise_multiplier=1.0, noise_key=b"k" * 32),
        )
    with pytest.raises(ValueError, match="differential privacy needs a secret noise_key"):
        aggregate(
            tmp_path / "base.safetensors",
            [SiteInput("a", tmp_path / "a.safetensors", 1.0)],
            tmp_path / "out.safetensors",
            combine=Combine(clip=1.0, noise_multiplier=1.0),
        )
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------- server state across rounds


@pytest.mark.parametrize("name", ["fedadam", "diloco", "fedyogi", "fedavgm"])
def test_server_state_persisted_on_disk_equals_an_in_memory_loop(tmp_path, name):
    server = ServerOpt(name, lr={"fedadam": 0.01, "fedyogi": 0.01, "diloco": 0.7, "fedavgm": 0.5}[name])
    shapes = {"a": (5, 3), "b": (4,)}
    x = {n: rand(s, i) for i, (n, s) in enumerate(sorted(shapes.items()))}
    save_state(tmp_path / "model0.safetensors", x)
    state: dict[str, dict[str, torch.Tensor]] = {n: {} for n in shapes}
    for r in range(3):
        ups = {
            s: {n: rand(sh, 1000 * r + 10 * j + i, 0.1) for i, (n, sh) in enumerate(sorted(shapes.items()))}
            for j, s in enumerate("pq")
        }
        for s in ups:
            save_state(tmp_path / f"r{r}_{s}.safetensors", ups[s])
        aggregate(
            tmp_path / f"model{r}.safetensors",
            [
                SiteInput("p", tmp_path / f"r{r}_p.safetensors", 0.625),
                SiteInput("q", tmp_path / f"r{r}_q.safetensors", 0.375),
            ],
            tmp_path / f"model{r + 1}.safetensors",
            server=server,
            state_in=tmp_path / f"state{r}.safetensors",  # round 0: no file yet, the state starts at its initial value
            state_out=tmp_path / f"state{r + 1}.safetensors",
            chunk_bytes=24,
        )
        for n in shapes:
            delta = weighted_sum([ups["p"][n], ups["q"][n]], [0.625, 0.375])
            x[n], state[n] = server_step(name, x[n], delta, state[n], lr=server.lr)
    assert same(load_state(tmp_path / "model3.safetensors"), x)
    want_state = {f"{n}@{k}": v.reshape(shapes[n]) for n in shapes for k, v in state[n].items()}
    assert same(load_state(tmp_path / "state3.safetensors"), want_state)
    assert read_metadata(tmp_path / "state3.safetensors") == {"optimizer": name}


# ---------------------------------------------------------------- compressed updates

CODECS = [Codec("bf16"), Codec("fp16"), Codec("int8", block=4), Codec("topk", topk_fraction=0.3)]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.scheme)
def test_compressed_updates_aggregate_like_their_decoded_fp32_and_within_the_error_bound(tmp_path, codec):
    shapes = {"enc.w": (4, 6), "head": (3, 5)}
    save_state(tmp_path / "base.safetensors", {n: torch.zeros(s) for n, s in shapes.items()})
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    updates = {}
    for j, site in enumerate(weights):
        updates[site] = {n: rand(s, 10 * j + i) for i, (n, s) in enumerate(sorted(shapes.items()))}
        stored, decoded = {}, {}
        for n, t in updates[site].items():
            parts = encode(n, t, codec)
            stored.update(parts)
            decoded[n] = decode(parts, n, t.shape, codec)
        save_state(tmp_path / f"{site}.z.safetensors", stored, codec_metadata(codec))
        save_state(tmp_path / f"{site}.dec.safetensors", decoded)
        save_state(tmp_path / f"{site}.raw.safetensors", updates[site])
    for rule in ("mean", "median"):
        outs = {}
        for kind in ("z", "dec", "raw"):
            inputs = [SiteInput(s, tmp_path / f"{s}.{kind}.safetensors", w) for s, w in weights.items()]
            out = tmp_path / f"{rule}.{kind}.safetensors"
            # 28 bytes = 7 elements: ranges that cut int8 blocks and fall between topk indices
            aggregate(tmp_path / "base.safetensors", inputs, out, combine=Combine(rule=rule), chunk_bytes=28)
            outs[kind] = load_state(out)
        assert same(outs["z"], outs["dec"]), rule
        for n in shapes:
            bounds = [error_bound(codec, updates[s][n]) for s in weights]
            # the mean moves by at most Σ w_i e_i, the median (1-Lipschitz per coordinate) by max e_i
            bound = sum(w * e for w, e in zip(weights.values(), bounds, strict=True)) if rule == "mean" else max(bounds)
            err = float((outs["z"][n] - outs["raw"][n]).abs().max())
            assert err <= bound * (1 + 1e-6) + 1e-7, (rule, n, err, bound)
            if codec.scheme != "topk":
                assert err > 0  # lossy codecs really lost something on random updates


# ---------------------------------------------------------------- an empty round


def test_no_inputs_leave_the_model_and_the_state_bit_for_bit(tmp_path):
    base = {
        "w": T([-0.0, 0.0, 1.5, math.inf, 1e-45, -3.25]),
        "h": T([-0.0, 2.0, -1.0], dtype=torch.bfloat16),
    }
    save_state(tmp_path / "base.safetensors", base)
    state = {f"{n}@{k}": rand(base[n].shape, i).abs() for i, n in enumerate(base) for k in ("m", "v")}
    save_state(tmp_path / "state_in.safetensors", state)
    for chunk in (1 << 20, 8):
        res = aggregate(
            tmp_path / "base.safetensors",
            [],
            tmp_path / "out.safetensors",
            server=ServerOpt("fedadam", lr=0.01),
            combine=Combine(clip=1.0, noise_multiplier=2.0, noise_key=b"k" * 32),
            state_in=tmp_path / "state_in.safetensors",
            state_out=tmp_path / "state_out.safetensors",
            chunk_bytes=chunk,
        )
        assert same(load_state(tmp_path / "out.safetensors"), base)
        assert bits(load_state(tmp_path / "out.safetensors")["w"])[0] == bits(T(-0.0))
        assert same(load_state(tmp_path / "state_out.safetensors"), state)  # momentum does not move an empty round
        assert res.noise_std == 0.0 and res.selected == [] and res.coefficients == {}
    # no previous state: the state starts at zero; no state_out asked for: none written (and no crash)
    aggregate(
        tmp_path / "base.safetensors",
        [],
        tmp_path / "out2.safetensors",
        server=ServerOpt("diloco"),
        state_out=tmp_path / "fresh.safetensors",
    )
    assert same(load_state(tmp_path / "out2.safetensors"), base)
    assert same(
        load_state(tmp_path / "fresh.safetensors"), {"h@momentum": torch.zeros(3), "w@momentum": torch.zeros(6)}
    )
    aggregate(tmp_path / "base.safetensors", [], tmp_path / "out3.safetensors", server=ServerOpt("fedadam"))
    assert same(load_state(tmp_path / "out3.safetensors"), base)


def test_a_stateful_optimiser_without_state_out_still_writes_the_model(tmp_path):
    save_state(tmp_path / "base.safetensors", {"w": T([1.0, 2.0])})
    save_state(tmp_path / "a.safetensors", {"w": T([0.1, -0.2])})
    aggregate(
        tmp_path / "base.safetensors",
        [SiteInput("a", tmp_path / "a.safetensors", 1.0)],
        tmp_path / "out.safetensors",
        server=ServerOpt("fedadam", lr=0.01),
    )
    want, _ = server_step("fedadam", T([1.0, 2.0]), T([0.1, -0.2]), {}, lr=0.01)
    assert torch.equal(load_state(tmp_path / "out.safetensors")["w"], want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "base.safetensors", "out.safetensors"]


# ---------------------------------------------------------------- memory bound

MEM_NUMEL = 8 << 20  # 32 MiB of fp32
MEM_SITES = 8


def test_memory_stays_bounded_by_the_chunk_size_not_the_model_or_the_site_count(tmp_path):
    t = torch.empty(MEM_NUMEL)
    g = torch.Generator().manual_seed(0)
    save_state(tmp_path / "base.safetensors", {"w": t.normal_(generator=g)})
    for i in range(MEM_SITES):
        save_state(tmp_path / f"u{i}.safetensors", {"w": t.normal_(generator=g).mul_(0.01)})
    del t
    save_state(tmp_path / "tiny.safetensors", {"w": torch.zeros(4)})
    # ru_maxrss of an exec'd child starts at the RSS of the process that spawned it (Linux carries the
    # old mm's high-water mark across exec), so pytest's own few hundred MiB would hide any growth.
    # A process forked before torch is imported starts its count afresh: it does the measuring.
    code = textwrap.dedent(
        f"""
        import os, resource, sys
        pid = os.fork()
        if pid:
            sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        from pathlib import Path
        from fedhpc.aggregation.streaming import SiteInput, aggregate
        d = Path({str(tmp_path)!r})
        # warm up on a tiny file so lazily loaded code and kernels are not counted
        aggregate(d / "tiny.safetensors", [SiteInput("t", d / "tiny.safetensors", 1.0)], d / "warm.safetensors")
        inputs = [SiteInput(f"s{{i}}", d / f"u{{i}}.safetensors", 1 / {MEM_SITES}) for i in range({MEM_SITES})]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        res = aggregate(d / "base.safetensors", inputs, d / "out.safetensors", chunk_bytes=1 << 20)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(before, after, res.bytes_read)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    before_kb, after_kb, bytes_read = map(int, run.stdout.split())
    growth_mb = (after_kb - before_kb) / 1024
    print(
        f"maxrss {before_kb / 1024:.1f} MiB -> {after_kb / 1024:.1f} MiB (+{growth_mb:.1f} MiB) for {bytes_read / 2**20:.0f} MiB read"
    )
    assert before_kb < 1024 * 1024, "the baseline still holds another process's peak"
    assert bytes_read > (MEM_SITES + 1) * 32 * 2**20  # 288 MiB went through...
    assert growth_mb < 48, f"peak memory grew by {growth_mb:.1f} MiB"  # ...in a few MiB of buffers
    # and the result is right: check a slice against the pure mean
    with TensorReader(tmp_path / "out.safetensors") as out, TensorReader(tmp_path / "base.safetensors") as base:
        a, b = MEM_NUMEL - 1000, MEM_NUMEL
        readers = [TensorReader(tmp_path / f"u{i}.safetensors") for i in range(MEM_SITES)]
        try:
            delta = weighted_sum([r.read("w", a, b).clone() for r in readers], [1 / MEM_SITES] * MEM_SITES)
        finally:
            for r in readers:
                r.close()
        assert torch.equal(out.read("w", a, b), base.read("w", a, b) + delta)


def _rss_file_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


def test_the_mapped_reader_unmaps_what_it_handed_out_as_it_goes(tmp_path):
    # 64 MiB read in 1 MiB views: resident mapped pages stay near a release span, not the file.
    path = tmp_path / "big.safetensors"
    save_state(path, {"w": torch.arange(16 << 20, dtype=torch.float32)})
    with TensorReader(path) as r:
        before, peak = _rss_file_kb(), 0
        for a in range(0, 16 << 20, 1 << 18):
            v = r.read("w", a, a + (1 << 18))
            assert float(v[0]) == a and float(v[-1]) == a + (1 << 18) - 1
            peak = max(peak, _rss_file_kb() - before)
    assert peak < 16 * 1024, f"{peak / 1024:.1f} MiB of the file stayed mapped"


def test_a_file_truncated_under_the_reader_is_refused_by_name(tmp_path):
    path = tmp_path / "u0.safetensors"
    save_state(path, {"w": torch.ones(4096)})
    with TensorReader(path) as r:
        assert float(r.read("w", 0, 4096).sum()) == 4096
        os.truncate(path, 1000)
        with pytest.raises(TensorFileError, match=r"u0\.safetensors: shorter than when it was opened"):
            r.read("w", 0, 16)


def test_views_do_not_outlive_their_reader_badly(tmp_path):
    # A view held past close() keeps its mapping alive instead of pointing at unmapped memory.
    path = tmp_path / "u.safetensors"
    save_state(path, {"w": torch.arange(1000, dtype=torch.float32)})
    r = TensorReader(path)
    v = r.read("w", 10, 20)
    r.close()
    assert v.tolist() == [float(i) for i in range(10, 20)]


def test_the_output_is_the_same_where_the_filesystem_cannot_preallocate(tmp_path, monkeypatch):
    import fedhpc.core.rawtensors as rawtensors

    write_mpi_round(tmp_path)
    mpi_round(tmp_path, "preallocated")
    monkeypatch.setattr(rawtensors, "_FALLOCATE", None)
    mpi_round(tmp_path, "sparse")
    for suffix in ("safetensors", "state.safetensors"):
        assert (tmp_path / f"sparse.{suffix}").read_bytes() == (tmp_path / f"preallocated.{suffix}").read_bytes()


# ---------------------------------------------------------------- MPI

MPI_SHAPES = {"a.w": (100,), "b.w": (33, 7), "c.b": (5,), "d.w": (64, 3), "e.b": (1,), "f.w": (9, 9)}
MPI_SITES = {"s1": 0.3, "s2": 0.25, "s3": 0.2, "s4": 0.15, "s5": 0.1}


def mpi_round(d: Path, tag: str, comm=None, workers: int = 1) -> dict:
    """One krum + clip + DP + fedadam round; the serial run and each MPI rank call exactly this."""
    res = aggregate(
        d / "base.safetensors",
        [SiteInput(s, d / f"{s}.safetensors", w) for s, w in MPI_SITES.items()],
        d / f"{tag}.safetensors",
        server=ServerOpt("fedadam", lr=0.05),
        combine=Combine(rule="krum", faulty=1, clip=20.0, noise_multiplier=0.01, noise_key=b"n" * 32),
        state_in=d / "state_in.safetensors",
        state_out=d / f"{tag}.state.safetensors",
        chunk_bytes=256,
        metadata={"round": "3"},
        comm=comm,
        workers=workers,
    )
    return {
        "selected": res.selected,
        "norms": res.norms,
        "scales": res.scales,
        "coefficients": res.coefficients,
        "noise_std": res.noise_std,
    }


MPI_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from mpi4py import MPI
from tests.test_aggregator import mpi_round
comm = MPI.COMM_WORLD
out = mpi_round(Path(sys.argv[1]), "mpi", comm)
if comm.Get_rank() == 0:
    print(json.dumps({"size": comm.Get_size(), **out}))
"""


def _mpi_or_skip() -> str:
    mpiexec = Path(sys.executable).with_name("mpiexec")
    exe = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        why = f"mpi4py is not importable ({exc})"
    else:
        why = None if exe else "no mpiexec next to the interpreter or on PATH"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the MPI aggregation test, but {why}")
        pytest.skip(why)
    return exe


def write_mpi_round(tmp_path: Path) -> None:
    save_state(tmp_path / "base.safetensors", {n: rand(s, i) for i, (n, s) in enumerate(MPI_SHAPES.items())})
    save_state(
        tmp_path / "state_in.safetensors",
        {f"{n}@{k}": rand(s, 50 + i, 0.01).abs() for i, (n, s) in enumerate(MPI_SHAPES.items()) for k in ("m", "v")},
    )
    for j, s in enumerate(MPI_SITES):
        scale = 30.0 if s == "s5" else 0.5
        save_state(
            tmp_path / f"{s}.safetensors",
            {n: rand(sh, 100 * j + i, scale) for i, (n, sh) in enumerate(MPI_SHAPES.items())},
        )


def test_worker_threads_write_the_same_bytes_as_one_thread(tmp_path):
    write_mpi_round(tmp_path)
    serial = mpi_round(tmp_path, "serial")
    threaded = mpi_round(tmp_path, "threads", workers=3)
    assert threaded == serial
    assert (tmp_path / "threads.safetensors").read_bytes() == (tmp_path / "serial.safetensors").read_bytes()
    assert (tmp_path / "threads.state.safetensors").read_bytes() == (tmp_path / "serial.state.safetensors").read_bytes()


def test_mpi_run_writes_the_same_bytes_as_a_serial_run(tmp_path):
    mpiexec = _mpi_or_skip()
    specs = {n: TensorSpec("F32", s) for n, s in MPI_SHAPES.items()}
    assert all(partition(specs, 2)), "both ranks must own tensors"
    write_mpi_round(tmp_path)
    serial = mpi_round(tmp_path, "serial")
    assert "s5" not in serial["selected"] and serial["scales"]["s5"] < 1.0  # krum and the clip had work to do

    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    }
    (tmp_path / "run.py").write_text(MPI_SCRIPT)
    run = subprocess.run(
        [mpiexec, "-n", "2", "--oversubscribe", sys.executable, str(tmp_path / "run.py"), str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    parallel = json.loads(run.stdout.strip().splitlines()[-1])
    assert parallel.pop("size") == 2
    assert parallel == serial
    assert (tmp_path / "mpi.safetensors").read_bytes() == (tmp_path / "serial.safetensors").read_bytes()
    assert (tmp_path / "mpi.state.safetensors").read_bytes() == (tmp_path / "serial.state.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*.part"))
