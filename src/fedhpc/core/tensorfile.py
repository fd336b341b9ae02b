"""Safetensors files read lazily and written tensor by tensor, so memory stays at one tensor."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import atomic_path, parse_json

# torch dtype -> its safetensors name, and back; the raw-tensor reader and the aggregator use them too.
DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class TensorFileError(FedhpcError, ValueError):
    """A safetensors file is missing, truncated or malformed."""


class TensorSpec:
    __slots__ = ("dtype", "shape")

    def __init__(self, dtype: str, shape: tuple[int, ...]):
        self.dtype, self.shape = dtype, tuple(shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorSpec) and (self.dtype, self.shape) == (other.dtype, other.shape)

    def __repr__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=TORCH_DTYPES[self.dtype]).element_size()
        for s in self.shape:
            n *= s
        return n


MAX_HEADER = 100_000_000  # bytes of JSON header; the format's own reference limit
MAX_TENSORS = 1_000_000
MAX_NDIM = 16
MAX_METADATA = 1_000_000  # bytes of __metadata__ strings


@dataclass(frozen=True)
class Header:
    """A checked safetensors header: tensors (sorted by name), their absolute byte offsets, metadata."""

    specs: dict[str, TensorSpec]
    offsets: dict[str, int]
    metadata: dict[str, str]
    data_start: int


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(path: str | os.PathLike, head8: bytes, read: Callable[[int, int], bytes], size: int) -> Header:
    """Check a safetensors header as hostile input: every malformation is a TensorFileError naming `path`.

    `read(n, offset)` returns up to n bytes at offset; `size` is the file's length. Names must be
    non-empty strings without control characters, dtypes known, shapes short lists of ints >= 0,
    and the tensors must tile the data section exactly (no overlap, gap or trailing bytes), so
    nothing in the file is unaccounted for and no tensor reaches outside it.
    """
    if len(head8) != 8:
        raise TensorFileError(f"{path}: truncated (no header)")
    (n,) = struct.unpack("<Q", head8)
    if n > MAX_HEADER or n > size - 8:
        raise TensorFileError(f"{path}: header length {n} is larger than the file or implausible")
    raw = read(n, 8)
    if len(raw) != n:
        raise TensorFileError(f"{path}: truncated header")
    try:
        header = parse_json(raw, str(path))
    except ValueError:
        raise TensorFileError(f"{path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TensorFileError(f"{path}: __metadata__ must map strings to strings")
    if sum(len(k) + len(v) for k, v in meta.items()) > MAX_METADATA:
        raise TensorFileError(f"{path}: __metadata__ is implausibly large")
    if len(header) > MAX_TENSORS:
        raise TensorFileError(f"{path}: {len(header)} tensors is implausible")
    data_start = 8 + n
    specs, offsets, spans = {}, {}, []
    for name, entry in sorted(header.items()):
        if not name or any(ord(c) < 32 or c == "\x7f" for c in name) or len(name) > 1024:
            raise TensorFileError(f"{path}: tensor name {name[:80]!r} is empty, too long or has control characters")
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise TensorFileError(f"{where} has a malformed header entry")
        dtype, shape, span = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in TORCH_DTYPES:
            raise TensorFileError(f"{where} has dtype {str(dtype)[:40]!r}; known: {', '.join(sorted(TORCH_DTYPES))}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_int(d) and d >= 0 for d in shape):
            raise TensorFileError(f"{where} has shape {str(shape)[:80]}: not a list of at most {MAX_NDIM} ints >= 0")
        if not isinstance(span, list) or len(span) != 2 or not all(_int(x) for x in span):
            raise TensorFileError(f"{where} has data_offsets {str(span)[:80]}: not two integers")
        spec = TensorSpec(dtype, tuple(shape))
        a, b = span
        if a < 0 or b - a != spec.nbytes or data_start + b > size:
            raise TensorFileError(
                f"{where} spans bytes {a}..{b} but needs {spec.nbytes} within the file (truncated or malformed)"
            )
        specs[name], offsets[name] = spec, data_start + a
        spans.append((a, b, name))
    end = 0
    for a, b, name in sorted(spans):
        if a != end:
            raise TensorFileError(
                f"{path}: tensor {name!r} starts at byte {a} of the data, expected {end} (overlapping or gapped tensors)"
            )
        end = b
    if data_start + end != size:
        raise TensorFileError(f"{path}: {size - data_start - end} bytes after the last tensor (appended data)")
    return Header(specs, offsets, dict(meta), data_start)


def read_header(path: str | os.PathLike) -> Header:
    """The checked header of a safetensors file (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size

            def read(n: int, offset: int) -> bytes:
                fh.seek(offset)
                return fh.read(n)

            return parse_header(path, fh.read(8), read, size)
    except FileNotFoundError:
        raise TensorFileError(f"{path}: missing") from None
    except IsADirectoryError:
        raise TensorFileError(f"{path}: is a directory") from None


def read_specs(path: str | os.PathLike) -> dict[str, TensorSpec]:
    """Names, dtypes and shapes from the header alone (no tensor data is read)."""
    return read_header(path).specs


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path).metadata


@contextmanager
def open_tensors(path: str | os.PathLike) -> Iterator[Mapping[str, torch.Tensor]]:
    """A lazy name → tensor mapping over a memory-mapped file."""
    read_header(path)  # our checks first: the library maps the file and trusts more than we do
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise TensorFileError(f"{path}: cannot open as safetensors ({exc})") from None

    class _Lazy(Mapping):
        def __getitem__(self, name: str) -> torch.Tensor:
            return handle.get_tensor(name)

        def __iter__(self):
            return iter(sorted(handle.keys()))

        def __len__(self) -> int:
            return len(handle.keys())

    with handle:
        yield _Lazy()


def write_tensors(
    path: str | os.PathLike,
    specs: Mapping[str, TensorSpec],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors come one at a time from `produce(name)`.

    The header is laid out from `specs` first; each tensor is then computed, checked
    against its spec, written and dropped, so only one output tensor is ever in memory.
    """
    names = sorted(specs)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in names:
        end = offset + specs[name].nbytes
        header[name] = {"dtype": specs[name].dtype, "shape": list(specs[name].shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format wants the data section 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            t = produce(name)
            want = specs[name]
            if DTYPE_NAMES.get(t.dtype) != want.dtype or tuple(t.shape) != want.shape:
                raise ValueError(
                    f"tensor {name}: produced {DTYPE_NAMES.get(t.dtype)}{list(t.shape)}, header says {want}"
                )
            if t.numel():
                fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy: buffer protocol


def save_state(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    specs = {k: TensorSpec(DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
    write_tensors(path, specs, lambda name: tensors[name], metadata)


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    with open_tensors(path) as f:
        return {k: f[k] for k in f}
