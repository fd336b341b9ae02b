"""Update codecs against hand-computed numbers, their stated error bounds, range decoding and error feedback."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from safetensors import safe_open
from safetensors.torch import save_file

from fedhpc.aggregation.compress import (
    SCHEMES,
    SUFFIXES,
    Codec,
    CompressionError,
    codec_from_metadata,
    codec_metadata,
    decode,
    decode_range,
    encode,
    encode_with_feedback,
    error_bound,
    logical_name,
    stored_names,
    stored_specs,
    topk_count,
)
from fedhpc.core.errors import FedhpcError

T = torch.tensor
F32 = torch.float32
PROPERTY = settings(max_examples=200, deadline=None)

# Largest magnitudes each scheme can encode without overflowing its stored dtype.
FP32_MAX = float(torch.finfo(torch.float32).max)
LIMIT = {"none": FP32_MAX, "bf16": float(np.float32(3.38e38)), "fp16": 65504.0, "int8": FP32_MAX, "topk": FP32_MAX}


def roundtrip(x: torch.Tensor, codec: Codec) -> torch.Tensor:
    return decode(encode("w", x, codec), "w", tuple(x.shape), codec)


def max_err(x: torch.Tensor, y: torch.Tensor) -> float:
    # In float64 so the test's own subtraction cannot round the measured error down.
    return float((x.double() - y.double()).abs().max()) if x.numel() else 0.0


def nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


@st.composite
def codecs(draw, schemes=SCHEMES) -> Codec:
    return Codec(
        draw(st.sampled_from(schemes)),
        draw(st.integers(1, 70)),
        draw(st.sampled_from([0.001, 0.01, 0.1, 0.25, 0.5, 1.0]) | st.floats(1e-6, 1.0, exclude_min=True)),
    )


@st.composite
def update_and_codec(draw, schemes=SCHEMES) -> tuple[torch.Tensor, Codec]:
    codec = draw(codecs(schemes))
    limit = LIMIT[codec.scheme]
    values = st.floats(-limit, limit, width=32, allow_nan=False, allow_infinity=False)
    # Values at one magnitude scale too, so blocks and topk see ties and near-uniform data, not only wild spreads.
    scale = draw(st.sampled_from([1e-42, 1e-20, 1e-3, 1.0, 1e4]))
    if draw(st.booleans()):
        values = st.floats(-1, 1, width=32).map(lambda v: float(np.float32(v * scale)))
    arr = draw(arrays(np.float32, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9), elements=values))
    return torch.from_numpy(arr.copy()), codec


# ---------------------------------------------------------------- codec settings and names


def test_codec_validates_its_settings():
    assert Codec() == Codec("none", 256, 0.01)
    with pytest.raises(CompressionError, match="unknown compression scheme 'int4'; expected one of none, bf16"):
        Codec("int4")
    for block in (0, -3, 2.0, True):
        with pytest.raises(CompressionError, match="int8 block size must be an integer >= 1"):
            Codec("int8", block=block)
    for fraction in (0.0, -0.1, 1.5, math.nan, math.inf):
        with pytest.raises(CompressionError, match=r"topk fraction must be a number in \(0, 1\]"):
            Codec("topk", topk_fraction=fraction)
    assert isinstance(CompressionError("x"), FedhpcError) and isinstance(CompressionError("x"), ValueError)


def test_stored_and_logical_names():
    assert SUFFIXES == ("@q", "@scale", "@idx", "@val")
    assert stored_names("a.b", Codec("none")) == ["a.b"]
    assert stored_names("a.b", Codec("bf16")) == ["a.b"]
    assert stored_names("a.b", Codec("fp16")) == ["a.b"]
    assert stored_names("a.b", Codec("int8")) == ["a.b@q", "a.b@scale"]
    assert stored_names("a.b", Codec("topk")) == ["a.b@idx", "a.b@val"]
    for scheme in SCHEMES:
        assert {logical_name(s) for s in stored_names("layer.0.w", Codec(scheme))} == {"layer.0.w"}
    assert logical_name("a.b@q") == "a.b" and logical_name("a.b@scale") == "a.b" and logical_name("a.b") == "a.b"
    with pytest.raises(CompressionError, match="tensor name 'w@q' must be a non-empty string without '@'"):
        encode("w@q", T([1.0]), Codec())


def test_stored_specs_match_what_encode_writes():
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    for codec in (
        Codec("none"),
        Codec("bf16"),
        Codec("fp16"),
        Codec("int8", block=4),
        Codec("topk", topk_fraction=0.2),
    ):
        got = {k: (v.dtype, tuple(v.shape)) for k, v in encode("w", x, codec).items()}
        assert got == stored_specs("w", (3, 5), codec)
    assert stored_specs("w", (3, 5), Codec("int8", block=4)) == {
        "w@q": (torch.int8, (15,)),
        "w@scale": (F32, (4,)),
    }
    assert stored_specs("w", (3, 5), Codec("topk", topk_fraction=0.2)) == {
        "w@idx": (torch.int64, (3,)),
        "w@val": (F32, (3,)),
    }


def test_metadata_round_trip_and_defaults():
    assert codec_from_metadata({}) == Codec("none")
    assert codec_from_metadata({"run": "x"}) == Codec("none")
    assert codec_metadata(Codec("int8", 64)) == {"compression": "int8", "block": "64", "topk_fraction": "0.01"}
    for codec in (Codec(), Codec("int8", 7), Codec("topk", topk_fraction=0.1 + 0.2), Codec("fp16", 1, 1.0)):
        meta = codec_metadata(codec)
        assert all(isinstance(v, str) for v in meta.values())
        assert codec_from_metadata(meta) == codec
    assert codec_from_metadata({"compression": "topk", "topk_fraction": "0.05"}) == Codec("topk", 256, 0.05)
    with pytest.raises(CompressionError, match="metadata block '2.5' is not an integer"):
        codec_from_metadata({"compression": "int8", "block": "2.5"})
    with pytest.raises(CompressionError, match="metadata topk_fraction 'lots' is not a number"):
        codec_from_metadata({"compression": "topk", "topk_fraction": "lots"})
    with pytest.raises(CompressionError, match="unknown compression scheme 'zstd'"):
        codec_from_metadata({"compression": "zstd"})


# ---------------------------------------------------------------- hand-computed examples


def test_none_stores_fp32_unchanged():
    x = T([[1.5, -2.0], [0.0, 3.25]])
    parts = encode("w", x, Codec("none"))
    assert list(parts) == ["w"] and parts["w"].dtype == F32 and torch.equal(parts["w"], x)
    assert torch.equal(roundtrip(x, Codec("none")), x)
    assert error_bound(Codec("none"), x) == 0.0


def test_bf16_rounds_to_nearest_even():
    # bf16 keeps 8 significant bits: the ulp at 1 is 2^-7, so 1 + 2^-8 is a tie (down to the even 1.0) and
    # 1 + 3·2^-8 is a tie (up to the even 1 + 2^-6).
    x = T([1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, 0.0])
    parts = encode("w", x, Codec("bf16"))
    assert parts["w"].dtype == torch.bfloat16
    assert roundtrip(x, Codec("bf16")).tolist() == [1.0, 1.0 + 2**-6, -2.5, 0.0]
    assert error_bound(Codec("bf16"), x) == 2.5 * 2**-8 + 2**-134


def test_fp16_rounds_and_refuses_overflow():
    x = T([1.0 + 2**-11, 65504.0, 2**-25, 3 * 2**-25])
    parts = encode("w", x, Codec("fp16"))
    assert parts["w"].dtype == torch.float16
    # 2^-25 and 3·2^-25 are ties between fp16 subnormals (spacing 2^-24): to even, 0 and 2^-23.
    assert roundtrip(x, Codec("fp16")).tolist() == [1.0, 65504.0, 0.0, 2**-23]
    assert error_bound(Codec("fp16"), x) == 65504.0 * 2**-11 + 2**-24
    with pytest.raises(CompressionError, match=r"tensor 'blk.3.w': max \|x\| 65505 exceeds fp16's 65504"):
        encode("blk.3.w", T([1.0, -65505.0]), Codec("fp16"))
    with pytest.raises(CompressionError, match="tensor 'blk.3.w'"):
        error_bound(Codec("fp16"), T([70000.0]), name="blk.3.w")


def test_bf16_refuses_values_that_would_round_to_inf():
    edge = (2 - 2**-8) * 2**127  # halfway between bf16's largest finite value and 2^128
    below = float(np.nextafter(np.float32(edge), np.float32(0)))
    assert torch.isfinite(roundtrip(T([below]), Codec("bf16"))).all()
    with pytest.raises(CompressionError, match="tensor 'emb': max .* overflows bf16 to inf"):
        encode("emb", T([edge]), Codec("bf16"))


def test_int8_by_hand():
    codec = Codec("int8", block=2)
    parts = encode("w", T([0.5, -1.0, 0.25, 0.0]), codec)
    s0, s1 = T(1.0) / 127, T(0.25) / 127  # absmax/127 in fp32
    # 0.5/s0 = 63.5 exactly in fp32: round half to even gives 64.
    assert parts["w@q"].dtype == torch.int8 and parts["w@q"].tolist() == [64, -127, 127, 0]
    assert parts["w@scale"].dtype == F32 and torch.equal(parts["w@scale"], torch.stack([s0, s1]))
    out = decode(parts, "w", (2, 2), codec)
    assert out.shape == (2, 2) and torch.equal(out.reshape(-1), torch.stack([64 * s0, -127 * s0, 127 * s1, 0 * s1]))
    # 0.5 lands exactly half a step from both neighbours: the worst case the bound allows.
    assert max_err(out.reshape(-1), T([0.5, -1.0, 0.25, 0.0])) == pytest.approx(float(s0) / 2, rel=1e-6)
    assert error_bound(codec, T([0.5, -1.0, 0.25, 0.0])) == float(s0) * (0.5 + 2**-14) + 2**-149


def test_int8_zero_blocks_and_a_short_last_block():
    codec = Codec("int8", block=2)
    parts = encode("w", T([0.0, 0.0, 3.0, -1.5, 2.0]), codec)  # blocks [0,0] [3,-1.5] [2]
    assert parts["w@q"].tolist() == [0, 0, 127, -64, 127]  # -1.5/(3/127) = -63.5 -> -64 (even)
    assert torch.equal(parts["w@scale"], torch.stack([T(0.0), T(3.0) / 127, T(2.0) / 127]))
    assert roundtrip(T([0.0, 0.0, 3.0, -1.5, 2.0]), codec)[[0, 1, 4]].tolist() == [0.0, 0.0, 2.0]
    assert error_bound(codec, T([0.0, 0.0])) == 0.0


def test_int8_subnormal_scale_never_clamps_far_from_x():
    # 190·2^-149 / 127 rounds to the subnormal 2^-149, which would clamp q at 127 and decode to 127·2^-149;
    # the scale is nudged up one ulp instead.
    x = T([190 * 2**-149, 3 * 2**-149])
    parts = encode("w", x, Codec("int8", block=4))
    assert parts["w@scale"].tolist() == [2 * 2**-149]
    assert parts["w@q"].tolist() == [95, 2]
    assert max_err(roundtrip(x, Codec("int8", block=4)), x) <= error_bound(Codec("int8", block=4), x)


def test_int8_at_the_top_of_fp32_decodes_finite():
    # fl(max/127)·127 rounds past fp32's largest value to inf; the scale is nudged down one ulp instead.
    x = T([FP32_MAX, -FP32_MAX])
    codec = Codec("int8", block=2)
    parts = encode("w", x, codec)
    assert parts["w@q"].tolist() == [127, -127] and float(parts["w@scale"][0]) * 127 <= FP32_MAX
    out = roundtrip(x, codec)
    assert torch.isfinite(out).all() and max_err(out, x) <= error_bound(codec, x)


def test_topk_keeps_the_largest_magnitudes():
    x = T([0.1, -3.0, 2.0, 0.5, -2.0, 1.0])
    codec = Codec("topk", topk_fraction=0.5)  # k = 3
    parts = encode("w", x, codec)
    assert parts["w@idx"].dtype == torch.int64 and parts["w@idx"].tolist() == [1, 2, 4]
    assert parts["w@val"].dtype == F32 and parts["w@val"].tolist() == [-3.0, 2.0, -2.0]
    assert roundtrip(x, codec).tolist() == [0.0, -3.0, 2.0, 0.0, -2.0, 0.0]
    assert error_bound(codec, x) == 1.0  # the largest dropped magnitude
    assert error_bound(Codec("topk", topk_fraction=1.0), x) == 0.0


def test_topk_breaks_ties_by_lowest_index_and_counts_k_exactly():
    parts = encode("w", T([1.0, -1.0, 1.0, 1.0, 0.5]), Codec("topk", topk_fraction=0.4))
    assert parts["w@idx"].tolist() == [0, 1] and parts["w@val"].tolist() == [1.0, -1.0]
    # k = max(1, ceil(fraction·numel)), with 0.01·300 counted as 3 although the float product is 3.0000000000000004.
    assert [topk_count(n, 0.01) for n in (1, 10, 100, 101, 300, 1000)] == [1, 1, 1, 2, 3, 10]
    assert topk_count(0, 0.5) == 0 and topk_count(7, 1.0) == 7
    assert encode("w", T(5.0), Codec("topk"))["w@idx"].tolist() == [0]  # a 0-d tensor keeps its one element


def test_empty_tensors_encode_and_decode():
    for scheme in SCHEMES:
        codec = Codec(scheme, block=4)
        out = roundtrip(torch.zeros(0, 3), codec)
        assert out.shape == (0, 3) and out.dtype == F32
        assert error_bound(codec, torch.zeros(0, 3)) == 0.0


# ---------------------------------------------------------------- error bounds on random tensors


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (257,), (3, 100), (2, 3, 85)])
def test_round_trip_is_within_the_stated_bound(scheme, shape):
    g = torch.Generator().manual_seed(len(shape) * 1000 + math.prod(shape))
    # Magnitudes spread over six decades, so blocks and the fp16 subnormal range see very different values.
    x = torch.randn(shape, generator=g) * 10 ** (torch.rand(shape, generator=g) * 6 - 3)
    codec = Codec(scheme, block=64, topk_fraction=0.1)  # 257, 300 and 510 elements are not multiples of 64
    out = roundtrip(x, codec)
    assert out.shape == x.shape and out.dtype == F32
    assert max_err(out, x) <= error_bound(codec, x)
    if scheme == "none":
        assert torch.equal(out, x)


@pytest.mark.parametrize("scheme, tightness", [("bf16", 0.45), ("fp16", 0.45), ("int8", 0.9)])
def test_bounds_are_reasonably_tight(scheme, tightness):
    # A bound far above the real error would say nothing; on 10k normals the worst element gets close to it.
    # (A float's rounding error is half an ulp of its own binade, between 1/2 and 1 of max|x|·2^-p.)
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    codec = Codec(scheme, block=256)
    assert max_err(roundtrip(x, codec), x) >= tightness * error_bound(codec, x)


@PROPERTY
@given(update_and_codec())
def test_property_round_trip_within_bound(case):
    x, codec = case
    out = roundtrip(x, codec)
    assert out.shape == x.shape and out.dtype == F32 and torch.isfinite(out).all()
    assert max_err(out, x) <= error_bound(codec, x)


@PROPERTY
@given(update_and_codec(schemes=("topk",)))
def test_property_topk_keeps_k_largest(case):
    x, codec = case
    flat = x.reshape(-1)
    parts = encode("w", x, codec)
    k = topk_count(flat.numel(), codec.topk_fraction)
    idx = parts["w@idx"]
    assert idx.numel() == k and torch.equal(idx, idx.sort().values) and idx.unique().numel() == k
    assert torch.equal(parts["w@val"], flat[idx])
    if 0 < k < flat.numel():
        dropped = torch.ones(flat.numel(), dtype=torch.bool)
        dropped[idx] = False
        assert flat[idx].abs().min() >= flat[dropped].abs().max()


# ---------------------------------------------------------------- decoding by range


def test_decode_range_fetches_only_what_it_needs():
    x = torch.arange(1.0, 10.0)  # 9 elements, int8 blocks of 2: [1,2] [3,4] [5,6] [7,8] [9]
    int8 = Codec("int8", block=2)
    parts = encode("w", x, int8)
    calls = []

    def fetch(stored, a, b):
        calls.append((stored, a, b))
        return parts[stored][a:b]

    out = decode_range(fetch, "w", 9, int8, 3, 7)
    assert calls == [("w@q", 3, 7), ("w@scale", 1, 4)]
    assert torch.equal(out, decode(parts, "w", (9,), int8)[3:7])

    topk = Codec("topk", topk_fraction=0.3)  # k = 3 of 9: the 9, 8 and 7 at indices 8, 7, 6
    parts = encode("w", x, topk)
    calls.clear()
    assert decode_range(fetch, "w", 9, topk, 2, 8).tolist() == [0, 0, 0, 0, 7.0, 8.0]
    assert calls == [("w@idx", 0, 3), ("w@val", 0, 2)]  # whole index list, values only for 6 and 7
    calls.clear()
    assert decode_range(fetch, "w", 9, topk, 0, 5).tolist() == [0.0] * 5
    assert calls == [("w@idx", 0, 3)]


@PROPERTY
@given(update_and_codec(), st.data())
def test_property_decode_range_equals_slice_of_full_decode(case, data):
    x, codec = case
    n = x.numel()
    parts = encode("w", x, codec)
    full = decode(parts, "w", tuple(x.shape), codec).reshape(-1)
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(a, n))

    def fetch(stored, lo, hi):
        return parts[stored].reshape(-1)[lo:hi]

    out = decode_range(fetch, "w", n, codec, a, b)
    assert out.dtype == F32 and out.shape == (b - a,)
    assert torch.equal(out, full[a:b])


def test_decode_range_from_a_safetensors_file(tmp_path):
    # How the aggregator reads: chunks of a memory-mapped file, never the whole stored tensor.
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    for codec in (Codec("bf16"), Codec("int8", block=64), Codec("topk", topk_fraction=0.05)):
        path = tmp_path / f"{codec.scheme}.safetensors"
        save_file(encode("w", x, codec), str(path), metadata=codec_metadata(codec))
        with safe_open(str(path), framework="pt") as f:
            assert codec_from_metadata(f.metadata()) == codec

            def fetch(stored, a, b, f=f):
                return f.get_slice(stored)[a:b]

            chunks = [decode_range(fetch, "w", 1000, codec, a, min(a + 300, 1000)) for a in range(0, 1000, 300)]
        assert torch.equal(torch.cat(chunks), roundtrip(x, codec))


# ---------------------------------------------------------------- error feedback


@pytest.mark.parametrize(
    "codec", [Codec("bf16"), Codec("fp16"), Codec("int8", block=64), Codec("topk", topk_fraction=0.1)]
)
def test_error_feedback_keeps_the_summed_update_on_track(codec):
    steps, n = 50, 1000
    delta = torch.randn(n, generator=torch.Generator().manual_seed(4))
    sent, residual, peaks = torch.zeros(n, dtype=torch.float64), None, []
    for _ in range(steps):
        last_input = delta if residual is None else delta + residual
        parts, residual = encode_with_feedback("w", delta, codec, residual)
        sent += decode(parts, "w", (n,), codec).double()
        peaks.append(float(residual.abs().max()))
    with_feedback = max_err(sent, steps * delta.double())
    # The summed error is exactly the residual left at the site (up to fp32 rounding of delta + residual), and the
    # residual is one step's compression error: within one step's stated bound, however many steps were taken.
    assert with_feedback == pytest.approx(peaks[-1], rel=1e-5)
    assert with_feedback <= error_bound(codec, last_input) + steps * float(delta.abs().max()) * 2**-23
    assert max(peaks[25:]) <= 1.1 * max(peaks[:25])  # the residual stops growing

    one_step = max_err(roundtrip(delta, codec), delta)
    without_feedback = max_err(steps * roundtrip(delta, codec).double(), steps * delta.double())
    assert without_feedback == pytest.approx(steps * one_step, rel=1e-6)  # grows linearly
    if codec.scheme == "topk":
        assert with_feedback < without_feedback / 10
    else:
        assert with_feedback <= 1.01 * error_bound(codec, delta)


def test_error_feedback_none_is_lossless_and_flushes_the_residual():
    delta, residual = T([1.0, 2.0]), T([0.25, -0.5])
    parts, new = encode_with_feedback("w", delta, Codec("none"), residual)
    assert new is None and parts["w"].tolist() == [1.25, 1.5]
    parts, new = encode_with_feedback("w", delta, Codec("topk", topk_fraction=0.5), None)
    assert parts["w@idx"].tolist() == [1] and new.tolist() == [1.0, 0.0]


# ---------------------------------------------------------------- stored bytes


def test_stored_bytes_per_scheme():
    n = 10_000
    x = torch.randn(100, 100, generator=torch.Generator().manual_seed(5))
    assert nbytes(encode("w", x, Codec("none"))) == 4 * n
    assert nbytes(encode("w", x, Codec("bf16"))) == 2 * n
    assert nbytes(encode("w", x, Codec("fp16"))) == 2 * n
    # int8: one byte per element plus one fp32 scale per block of 256 (ceil(10000/256) = 40).
    assert nbytes(encode("w", x, Codec("int8", block=256))) == n + 4 * 40
    # topk 1%: 100 entries of an int64 index and an fp32 value, 12 bytes each = fraction·12 bytes per element.
    assert nbytes(encode("w", x, Codec("topk", topk_fraction=0.01))) == 100 * 12 == round(0.01 * 12 * n)


# ---------------------------------------------------------------- bad input


def test_non_finite_updates_are_refused_naming_the_tensor():
    for scheme in SCHEMES:
        with pytest.raises(CompressionError, match=r"tensor 'blk.0.attn': 2 of 3 values are not finite"):
            encode("blk.0.attn", T([1.0, math.nan, math.inf]), Codec(scheme))
    with pytest.raises(CompressionError, match="tensor 'blk.0.attn'"):
        error_bound(Codec("int8"), T([math.nan]), name="blk.0.attn")
    with pytest.raises(CompressionError, match="tensor 'blk.0.attn': update plus residual overflows fp32"):
        encode_with_feedback("blk.0.attn", T([3e38]), Codec("int8"), T([3e38]))


def test_wrong_dtype_or_residual_shape_is_refused():
    with pytest.raises(CompressionError, match=r"tensor 'w': update dtype torch.float64 is not fp32"):
        encode("w", T([1.0], dtype=torch.float64), Codec())
    with pytest.raises(CompressionError, match=r"tensor 'w': update dtype torch.int64"):
        encode("w", T([1]), Codec())
    assert encode("w", T([1.5], dtype=torch.bfloat16), Codec())["w"].dtype == F32  # lossless upcast
    with pytest.raises(CompressionError, match=r"tensor 'w': residual shape \[3\] does not match update shape \[2\]"):
        encode_with_feedback("w", T([1.0, 2.0]), Codec("int8"), torch.zeros(3))


def test_bad_ranges_and_bad_stored_data_are_refused_naming_the_tensor():
    x = torch.arange(1.0, 10.0)
    int8, topk = Codec("int8", block=4), Codec("topk", topk_fraction=0.3)
    parts = {**encode("w", x, int8), **encode("w", x, topk)}

    def fetch(stored, a, b):
        return parts[stored][a:b]

    for start, stop in [(-1, 3), (5, 4), (0, 10)]:
        with pytest.raises(CompressionError, match=rf"tensor 'w': range \[{start}, {stop}\) is not within its 9"):
            decode_range(fetch, "w", 9, int8, start, stop)
    with pytest.raises(CompressionError, match="tensor 'w': stored tensor 'w@scale' is missing"):
        decode({"w@q": parts["w@q"]}, "w", (9,), int8)
    with pytest.raises(CompressionError, match="stored tensor 'w@q' has 9 elements, expected 8"):
        decode(parts, "w", (2, 4), int8)
    with pytest.raises(CompressionError, match="stored tensor 'w' is torch.float32, expected torch.bfloat16"):
        decode({"w": x}, "w", (9,), Codec("bf16"))
    with pytest.raises(CompressionError, match="tensor 'w': stored indices are not strictly increasing"):
        decode({"w@idx": T([8, 6, 7]), "w@val": T([9.0, 7.0, 8.0])}, "w", (9,), topk)
    with pytest.raises(CompressionError, match="tensor 'w': stored indices are not strictly increasing"):
        decode({"w@idx": T([6, 7, 9]), "w@val": T([7.0, 8.0, 9.0])}, "w", (9,), topk)
    with pytest.raises(CompressionError, match="tensor 'w': stored int8 data has a negative scale or q = -128"):
        decode({"w@q": parts["w@q"], "w@scale": -parts["w@scale"]}, "w", (9,), int8)
    with pytest.raises(CompressionError, match=r"tensor 'w': decoded values in \[0, 2\) are not all finite"):
        decode({"w": T([1.0, math.inf], dtype=torch.bfloat16)}, "w", (2,), Codec("bf16"))
    with pytest.raises(CompressionError, match=r"stored tensor 'w@q': asked for elements \[0, 9\), got 4"):
        decode_range(lambda s, a, b: parts[s][:4], "w", 9, int8, 0, 9)
