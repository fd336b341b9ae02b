"""Safetensors files read lazily and written tensor by tensor, so memory stays at one tensor."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import FedhpcError
from .files import atomic_path

_DTYPES = {
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
_NAMES = {v: k for k, v in _DTYPES.items()}


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
        n = torch.empty((), dtype=_NAMES[self.dtype]).element_size()
        for s in self.shape:
            n *= s
        return n


def read_specs(path: str | os.PathLike) -> dict[str, TensorSpec]:
    """Names, dtypes and shapes from the header alone (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise TensorFileError(f"{path}: truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise TensorFileError(f"{path}: header of {n} bytes is implausibly large")
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise TensorFileError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TensorFileError(f"{path}: header is not valid JSON") from None
    header.pop("__metadata__", None)
    return {k: TensorSpec(v["dtype"], v["shape"]) for k, v in sorted(header.items())}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@contextmanager
def open_tensors(path: str | os.PathLike) -> Iterator[Mapping[str, torch.Tensor]]:
    """A lazy name → tensor mapping over a memory-mapped file."""
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
            if _DTYPES.get(t.dtype) != want.dtype or tuple(t.shape) != want.shape:
                raise ValueError(f"tensor {name}: produced {_DTYPES.get(t.dtype)}{list(t.shape)}, header says {want}")
            if t.numel():
                fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy: buffer protocol


def save_state(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    specs = {k: TensorSpec(_DTYPES[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
    write_tensors(path, specs, lambda name: tensors[name], metadata)


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    with open_tensors(path) as f:
        return {k: f[k] for k in f}
