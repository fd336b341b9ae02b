"""Update compression codecs: encode an fp32 update tensor for storage and decode it back, whole or by range."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal

import torch

from fedhpc.core.errors import FedhpcError

SCHEMES: tuple[str, ...] = ("none", "bf16", "fp16", "int8", "topk")
SUFFIXES = ("@q", "@scale", "@idx", "@val")

FP16_MAX = 65504.0
# bf16 keeps fp32's exponent, so only values within half a bf16 ulp of fp32's top round up to inf.
_BF16_OVERFLOW = (2.0 - 2.0**-8) * 2.0**127
_FP32_TINY = torch.finfo(torch.float32).tiny
_FP32_MAX = torch.finfo(torch.float32).max
_LOSSLESS_TO_FP32 = (torch.float32, torch.bfloat16, torch.float16)
_CAST = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Fetch = Callable[[str, int, int], torch.Tensor]


class CompressionError(FedhpcError, ValueError):
    """An update tensor, a codec setting or a stored compressed tensor is not valid."""


@dataclass(frozen=True)
class Codec:
    scheme: str = "none"
    block: int = 256  # int8 block size, >= 1
    topk_fraction: float = 0.01  # in (0, 1]

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise CompressionError(f"unknown compression scheme {self.scheme!r}; expected one of {', '.join(SCHEMES)}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise CompressionError(f"int8 block size must be an integer >= 1, got {self.block!r}")
        f = self.topk_fraction
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
            raise CompressionError(f"topk fraction must be a number in (0, 1], got {f!r}")


def stored_names(name: str, codec: Codec) -> list[str]:
    """Names of the stored tensors that together encode update tensor `name`."""
    _check_name(name)
    if codec.scheme == "int8":
        return [name + "@q", name + "@scale"]
    if codec.scheme == "topk":
        return [name + "@idx", name + "@val"]
    return [name]


def logical_name(stored: str) -> str:
    """The update tensor a stored tensor belongs to: "a.b@q" -> "a.b"."""
    for suffix in SUFFIXES:
        if stored.endswith(suffix):
            return stored[: -len(suffix)]
    return stored


def topk_count(numel: int, fraction: float) -> int:
    """k = max(1, ceil(fraction * numel)), capped at numel (0 for an empty tensor)."""
    # Decimal of the float's shortest repr: 0.01 * 300 is exactly 3, not 3.0000000000000004 rounded up to 4.
    return min(numel, max(1, math.ceil(Decimal(repr(float(fraction))) * numel)))


def stored_specs(name: str, shape: tuple[int, ...], codec: Codec) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Dtype and shape of every stored tensor for an update tensor of `shape`, to check a file's header."""
    _check_name(name)
    numel = math.prod(shape)
    if codec.scheme in _CAST:
        return {name: (_CAST[codec.scheme], tuple(shape))}
    if codec.scheme == "int8":
        return {name + "@q": (torch.int8, (numel,)), name + "@scale": (torch.float32, (-(-numel // codec.block),))}
    k = topk_count(numel, codec.topk_fraction)
    return {name + "@idx": (torch.int64, (k,)), name + "@val": (torch.float32, (k,))}


def encode(name: str, delta: torch.Tensor, codec: Codec) -> dict[str, torch.Tensor]:
    """Tensors to store for one fp32 update tensor (any shape).

    With "none" the returned tensor may share memory with `delta`. Outputs stay on `delta`'s device.
    """
    x = _checked(name, delta)
    if codec.scheme == "none":
        return {name: x.contiguous()}
    if codec.scheme == "bf16":
        _check_bf16_range(name, x)
        return {name: x.to(torch.bfloat16).contiguous()}
    if codec.scheme == "fp16":
        _check_fp16_range(name, x)
        return {name: x.to(torch.float16).contiguous()}
    flat = x.reshape(-1)
    if codec.scheme == "int8":
        q, scale = _quantize_int8(flat, codec.block)
        return {name + "@q": q, name + "@scale": scale}
    idx = _topk_indices(flat, topk_count(flat.numel(), codec.topk_fraction))
    return {name + "@idx": idx, name + "@val": flat[idx].contiguous()}


def decode_range(fetch: Fetch, name: str, numel: int, codec: Codec, start: int, stop: int) -> torch.Tensor:
    """fp32 flat slice [start, stop) of the decoded update tensor `name` of `numel` elements.

    `fetch(stored_name, a, b)` returns elements [a, b) of the flattened stored tensor in its stored dtype.
    With "none" the result may share memory with what `fetch` returned.
    """
    _check_name(name)
    if not 0 <= start <= stop <= numel:
        raise CompressionError(f"tensor {name!r}: range [{start}, {stop}) is not within its {numel} elements")
    if codec.scheme in _CAST:
        out = _fetched(fetch, name, start, stop, _CAST[codec.scheme]).to(torch.float32)
    elif codec.scheme == "int8":
        out = _decode_int8(fetch, name, codec.block, start, stop)
    else:
        out = _decode_topk(fetch, name, numel, topk_count(numel, codec.topk_fraction), start, stop)
    # A stored file is untrusted input: a crafted inf or NaN must not reach the aggregate.
    if not bool(torch.isfinite(out).all()):
        raise CompressionError(f"tensor {name!r}: decoded values in [{start}, {stop}) are not all finite")
    return out


def decode(parts: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...], codec: Codec) -> torch.Tensor:
    """Whole fp32 tensor (convenience built on decode_range)."""
    specs = stored_specs(name, tuple(shape), codec)
    for stored, (_, want) in specs.items():
        if stored not in parts:
            raise CompressionError(f"tensor {name!r}: stored tensor {stored!r} is missing")
        if parts[stored].numel() != math.prod(want):
            raise CompressionError(
                f"tensor {name!r}: stored tensor {stored!r} has {parts[stored].numel()} elements, "
                f"expected {math.prod(want)} for shape {list(shape)} with {codec.scheme}"
            )

    def fetch(stored: str, a: int, b: int) -> torch.Tensor:
        return parts[stored].reshape(-1)[a:b]

    numel = math.prod(shape)
    return decode_range(fetch, name, numel, codec, 0, numel).reshape(shape)


def encode_with_feedback(
    name: str, delta: torch.Tensor, codec: Codec, residual: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Error feedback (kept at the site, never sent): compress delta + residual; new residual = (delta + residual) − decoded.

    For lossless "none" return residual None.
    """
    x = _checked(name, delta)
    if residual is not None:
        r = _checked(name, residual)
        if r.shape != x.shape:
            raise CompressionError(
                f"tensor {name!r}: residual shape {list(r.shape)} does not match update shape {list(x.shape)}"
            )
        x = x + r
        # delta and residual are each finite, yet their sum can still overflow fp32.
        if not bool(torch.isfinite(x).all()):
            raise CompressionError(f"tensor {name!r}: update plus residual overflows fp32")
    parts = encode(name, x, codec)
    if codec.scheme == "none":
        return parts, None
    return parts, x - decode(parts, name, tuple(x.shape), codec)


def error_bound(codec: Codec, delta: torch.Tensor, name: str = "update") -> float:
    """Stated worst-case max-abs elementwise error of encode→decode for this tensor.

    none 0; bf16 max|x|·2^-8 (+ subnormal floor 2^-134); fp16 max|x|·2^-11 (+ subnormal floor 2^-24);
    int8 max over blocks of scale·(1/2 + 2^-14) (+ 2^-149 when any scale is nonzero), the 2^-14 covering the
    fp32 rounding of x/scale and q·scale; topk the largest dropped magnitude (0 if nothing dropped).
    """
    x = _checked(name, delta)
    if codec.scheme == "none" or x.numel() == 0:
        return 0.0
    flat = x.reshape(-1)
    amax = float(flat.abs().max())
    if codec.scheme == "bf16":
        _check_bf16_range(name, flat)
        return amax * 2.0**-8 + 2.0**-134
    if codec.scheme == "fp16":
        _check_fp16_range(name, flat)
        return amax * 2.0**-11 + 2.0**-24
    if codec.scheme == "int8":
        smax = float(_int8_scales(flat, codec.block).max())
        return smax * (0.5 + 2.0**-14) + (2.0**-149 if smax > 0 else 0.0)
    n, k = flat.numel(), topk_count(flat.numel(), codec.topk_fraction)
    if k == n:
        return 0.0
    # The (n-k)-th smallest magnitude is the (k+1)-th largest: the biggest one topk drops.
    return float(torch.kthvalue(flat.abs(), n - k).values)


def codec_from_metadata(meta: Mapping[str, str]) -> Codec:
    """The codec recorded in a safetensors file's metadata; no "compression" key means "none"."""
    default = Codec()
    scheme = meta.get("compression", "none")
    try:
        block = int(meta.get("block", default.block))
    except ValueError:
        raise CompressionError(f"metadata block {meta['block']!r} is not an integer") from None
    try:
        fraction = float(meta.get("topk_fraction", default.topk_fraction))
    except ValueError:
        raise CompressionError(f"metadata topk_fraction {meta['topk_fraction']!r} is not a number") from None
    return Codec(scheme, block, fraction)


def codec_metadata(codec: Codec) -> dict[str, str]:
    """Metadata entries that codec_from_metadata reads back to an equal codec."""
    # All three keys always, so the round trip is exact whatever the scheme.
    return {"compression": codec.scheme, "block": str(codec.block), "topk_fraction": repr(float(codec.topk_fraction))}


# ---------------------------------------------------------------- internals


def _check_name(name: str) -> None:
    # "@" would make logical_name ambiguous: "w@q" stored under "none" would read back as "w".
    if not isinstance(name, str) or not name or "@" in name:
        raise CompressionError(f"tensor name {name!r} must be a non-empty string without '@'")


def _checked(name: str, t: torch.Tensor) -> torch.Tensor:
    _check_name(name)
    if not isinstance(t, torch.Tensor):
        raise CompressionError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _LOSSLESS_TO_FP32:
        # fp64 would be rounded to fp32 silently; integer updates are a caller bug.
        raise CompressionError(f"tensor {name!r}: update dtype {t.dtype} is not fp32 (or bf16/fp16)")
    t = t.detach().to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CompressionError(f"tensor {name!r}: {bad} of {t.numel()} values are not finite (inf or NaN)")
    return t


def _check_bf16_range(name: str, x: torch.Tensor) -> None:
    if x.numel() and float(x.abs().max()) >= _BF16_OVERFLOW:
        raise CompressionError(f"tensor {name!r}: max |x| {float(x.abs().max()):.6g} overflows bf16 to inf")


def _check_fp16_range(name: str, x: torch.Tensor) -> None:
    # Beyond fp16's largest finite value the cast silently produces inf.
    if x.numel() and float(x.abs().max()) > FP16_MAX:
        raise CompressionError(
            f"tensor {name!r}: max |x| {float(x.abs().max()):.6g} exceeds fp16's {FP16_MAX:g}; use bf16 or int8"
        )


def _blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """flat zero-padded to whole blocks, as (blocks, block)."""
    pad = -flat.numel() % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, block)


def _int8_scales(flat: torch.Tensor, block: int) -> torch.Tensor:
    if flat.numel() == 0:
        return flat.new_zeros(0)
    absmax = _blocks(flat, block).abs().amax(dim=1)
    scale = absmax / 127
    # A subnormal scale is rounded in absolute, not relative, terms and may land below absmax/127 (even at 0),
    # which would clamp q far from x; one ulp up restores scale·127 >= absmax.
    low = (scale < _FP32_TINY) & (scale.double() * 127 < absmax.double())
    scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    # Near fp32's top, absmax/127 rounded up would decode 127·scale to inf; one ulp down stays finite.
    high = scale.double() * 127 > _FP32_MAX
    return torch.where(high, torch.nextafter(scale, torch.zeros_like(scale)), scale)


def _quantize_int8(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    scale = _int8_scales(flat, block)
    if n == 0:
        return torch.zeros(0, dtype=torch.int8, device=flat.device), scale
    # All-zero blocks have scale 0; dividing by 1 there keeps q at 0 instead of NaN.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (_blocks(flat, block) / safe[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.reshape(-1)[:n].contiguous(), scale


def _topk_indices(flat: torch.Tensor, k: int) -> torch.Tensor:
    n = flat.numel()
    if k == n:
        return torch.arange(n, dtype=torch.int64, device=flat.device)
    mag = flat.abs()
    # Threshold by the k-th largest magnitude and break ties by lowest index, so every run keeps the same
    # entries (torch.topk's tie order is unspecified) in O(n) rather than a full sort.
    kth = torch.kthvalue(mag, n - k + 1).values
    above = torch.nonzero(mag > kth).reshape(-1)
    at = torch.nonzero(mag == kth).reshape(-1)[: k - above.numel()]
    return torch.cat([above, at]).sort().values


def _fetched(fetch: Fetch, stored: str, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
    t = fetch(stored, a, b)
    if t.dtype != dtype:
        raise CompressionError(f"stored tensor {stored!r} is {t.dtype}, expected {dtype}")
    if t.numel() != b - a:
        raise CompressionError(f"stored tensor {stored!r}: asked for elements [{a}, {b}), got {t.numel()}")
    return t.reshape(-1)


def _decode_int8(fetch: Fetch, name: str, block: int, start: int, stop: int) -> torch.Tensor:
    q = _fetched(fetch, name + "@q", start, stop, torch.int8)
    if start == stop:
        return torch.zeros(0, dtype=torch.float32, device=q.device)
    first, last = start // block, (stop - 1) // block
    scale = _fetched(fetch, name + "@scale", first, last + 1, torch.float32)
    if bool((scale < 0).any()) or bool((q == -128).any()):
        raise CompressionError(f"tensor {name!r}: stored int8 data has a negative scale or q = -128")
    which = torch.arange(start, stop, device=q.device) // block - first
    return q.to(torch.float32) * scale[which]


def _decode_topk(fetch: Fetch, name: str, numel: int, k: int, start: int, stop: int) -> torch.Tensor:
    # The whole index list is small (k elements); values are fetched only for the entries in range.
    idx = _fetched(fetch, name + "@idx", 0, k, torch.int64)
    if k and (int(idx[0]) < 0 or int(idx[-1]) >= numel or bool((idx[1:] <= idx[:-1]).any())):
        raise CompressionError(
            f"tensor {name!r}: stored indices are not strictly increasing within [0, {numel}) as topk writes them"
        )
    lo = int(torch.searchsorted(idx, start))
    hi = int(torch.searchsorted(idx, stop))
    out = torch.zeros(stop - start, dtype=torch.float32, device=idx.device)
    if hi > lo:
        out[idx[lo:hi] - start] = _fetched(fetch, name + "@val", lo, hi, torch.float32)
    return out
