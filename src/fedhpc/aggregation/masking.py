"""Secure aggregation's arithmetic: fixed-point encoding, pairwise masks from seeds, and their cancellation.

Pure functions, no I/O. Sites encode their weighted update w·x as integers modulo 2^64 with
`fraction_bits` fractional bits and add, for every other committed site j, the mask stream of
the seed they share, with sign +1 if their name sorts before j's and -1 otherwise. Summed
over all committed sites the masks cancel exactly (modular arithmetic has no rounding), so
the coordinator learns Σ w·x and nothing about any one site's. When some committed sites
drop out, the survivors reveal the seeds they shared with them and the coordinator removes
those masks from the survivors' sum (`remove_masks`).

Masks are AES-256-CTR keystreams keyed by the 32-byte seed, read as little-endian uint64: a
cryptographic PRG with random access, so any element range of any tensor can be masked or
unmasked on its own (the streaming aggregator works chunk by chunk). Element e of the model
(tensors in sorted name order, flattened) takes the stream's bytes 8e..8e+7.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedhpc.core.errors import FedhpcError


class SecureAggregationError(FedhpcError, ValueError):
    """An update cannot be encoded, or masks cannot be removed; the message says which and why."""


def element_offsets(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Offset of each tensor's first element in the model's mask stream (names in sorted order)."""
    out, at = {}, 0
    for name in sorted(shapes):
        out[name] = at
        n = 1
        for d in shapes[name]:
            n *= d
        at += n
    return out


def mask_stream(seed: bytes, start: int, stop: int) -> np.ndarray:
    """Mask elements [start, stop) of the stream of `seed`, as uint64."""
    if len(seed) != 32:
        raise SecureAggregationError(f"a mask seed has 32 bytes, not {len(seed)}")
    n = stop - start
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    block, skip = divmod(start, 2)  # two uint64 per 16-byte AES block
    counter = block.to_bytes(16, "big")
    enc = Cipher(algorithms.AES(seed), modes.CTR(counter)).encryptor()
    raw = enc.update(bytes(8 * (n + skip)))
    return np.frombuffer(raw, dtype="<u8")[skip:].astype(np.uint64, copy=False)


def pair_sign(me: str, other: str) -> int:
    """+1 if `me` adds the pair's mask, -1 if it subtracts it: one of each, so the pair cancels."""
    if me == other:
        raise SecureAggregationError(f"site {me!r} shares no mask with itself")
    return 1 if me < other else -1


def encode(values: np.ndarray, weight: float, fraction_bits: int, sites: int) -> np.ndarray:
    """round(weight · values · 2^bits) as uint64 (two's complement), refusing what could overflow
    the sum of `sites` such encodings, or is not finite."""
    x = np.asarray(values, dtype=np.float64) * (weight * 2.0**fraction_bits)
    if not np.isfinite(x).all():
        raise SecureAggregationError("the update has NaN or Inf values: it cannot be encoded, nor published")
    limit = 2.0**63 / max(sites, 1)
    if x.size and np.abs(x).max() >= limit:
        raise SecureAggregationError(
            f"|weight·update| reaches {np.abs(x).max() / 2.0**fraction_bits:.3g}, beyond what "
            f"{sites} sites' sum can hold at fraction_bits {fraction_bits}; lower strategy.secure_aggregation.fraction_bits"
        )
    return np.rint(x).astype(np.int64).view(np.uint64)


def add_masks(encoded: np.ndarray, seeds: Mapping[str, bytes], me: str, start: int) -> np.ndarray:
    """A site's masked values: its encoded elements [start, start+n) plus ± each pair's mask."""
    out = np.array(encoded, dtype=np.uint64, copy=True)
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        for other in sorted(seeds):
            stream = mask_stream(seeds[other], start, start + out.size)
            out = out + stream if pair_sign(me, other) > 0 else out - stream
    return out


def modular_sum(parts: Iterable[np.ndarray]) -> np.ndarray:
    total = None
    with np.errstate(over="ignore"):
        for p in parts:
            total = np.array(p, dtype=np.uint64, copy=True) if total is None else total + p
    if total is None:
        raise SecureAggregationError("nothing to sum")
    return total


def remove_masks(total: np.ndarray, corrections: Iterable[tuple[bytes, int]], start: int) -> np.ndarray:
    """The survivors' sum with the masks of dropped pairs taken out. Each correction is (seed, sign)
    with the sign the *survivor* used for that pair: what it added is subtracted, and vice versa."""
    out = np.array(total, dtype=np.uint64, copy=True)
    with np.errstate(over="ignore"):
        for seed, sign in corrections:
            stream = mask_stream(seed, start, start + out.size)
            out = out - stream if sign > 0 else out + stream
    return out


def decode(total: np.ndarray, fraction_bits: int, weight_sum: float) -> np.ndarray:
    """Σ w·x back to floats, divided by Σ w: the weighted mean of the updates (float64)."""
    if not weight_sum > 0:
        raise SecureAggregationError(f"the weights of the summed updates add up to {weight_sum}")
    return total.view(np.int64).astype(np.float64) / (2.0**fraction_bits * weight_sum)
