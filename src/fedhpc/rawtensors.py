"""Safetensors read and written by element range with pread/pwrite, for the streaming aggregator.

Reading through `pread` into reused buffers costs one copy from the page cache and cannot
fault: a mapped file truncated underneath would kill the coordinator with SIGBUS, a pread
only comes back short (an error naming the file). Writing at known offsets lets several
threads or MPI ranks fill one output file in parallel; writeback is started every few MiB
(sync_file_range) so the closing fsync does not wait for the whole file.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import struct
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from .tensorfile import _DTYPES, _NAMES, TensorFileError, TensorSpec, parse_header

WRITEBACK_BYTES = 16 << 20  # start writeback of a writer's dirty pages after this many bytes
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in _NAMES.items()}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


def _sync_file_range():
    """libc's sync_file_range (Linux), or None."""
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class TensorReader:
    """Element ranges of the tensors of one safetensors file, header checked against the file size."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise TensorFileError(f"{self.path}: missing") from None
        try:
            self._parse()
        except Exception:
            os.close(self.fd)
            raise
        self._bufs: dict[tuple[str, int], bytearray] = {}

    def _parse(self) -> None:
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise TensorFileError(f"{self.path}: not a regular file")
        size = st.st_size
        header = parse_header(self.path, os.pread(self.fd, 8, 0), lambda n, at: os.pread(self.fd, n, at), size)
        self.metadata: dict[str, str] = header.metadata
        self.specs: dict[str, TensorSpec] = header.specs
        self.offsets: dict[str, int] = header.offsets

    def read(self, name: str, start: int, stop: int, slot: str = "") -> torch.Tensor:
        """Elements [start, stop) of flattened tensor `name`, in its stored dtype.

        The result is a view of a buffer reused per `slot` and thread: use it before this
        thread's next read of the slot.
        """
        spec = self.specs.get(name)
        if spec is None:
            raise TensorFileError(f"{self.path}: has no tensor {name!r}")
        if not 0 <= start <= stop <= _numel(spec.shape):
            raise TensorFileError(f"{self.path}: range {start}..{stop} is outside tensor {name!r}")
        item = _itemsize(spec.dtype)
        nbytes = (stop - start) * item
        key = (slot, threading.get_ident())
        buf = self._bufs.get(key)
        if buf is None or len(buf) < nbytes:
            buf = self._bufs[key] = bytearray(max(nbytes, 8))
        view = memoryview(buf)[:nbytes]
        got = os.preadv(self.fd, [view], self.offsets[name] + start * item) if nbytes else 0
        if got != nbytes:
            raise TensorFileError(f"{self.path}: short read of tensor {name!r} (file truncated while reading?)")
        if not nbytes:
            return torch.empty(0, dtype=_NAMES[spec.dtype])
        return torch.frombuffer(buf, dtype=_NAMES[spec.dtype], count=stop - start)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def layout_header(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None) -> tuple[bytes, dict[str, int]]:
    """The header bytes (length prefix included) and each tensor's absolute byte offset, names sorted
    (the same layout tensorfile.write_tensors produces)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, rel = 0, {}
    for name in sorted(specs):
        end = offset + specs[name].nbytes
        header[name] = {"dtype": specs[name].dtype, "shape": list(specs[name].shape), "data_offsets": [offset, end]}
        rel[name] = offset
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    head = struct.pack("<Q", len(blob)) + blob
    return head, {k: len(head) + v for k, v in rel.items()}


class TensorWriter:
    """A safetensors file laid out up front and filled by element ranges, possibly by several processes.

    `create()` (one process) writes the header and sizes the file under a temporary name; every
    writer then `open()`s it and `write()`s its ranges; `commit()` (one process, after all
    writers are done) fsyncs and renames it into place, so a crash never leaves a half file.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.part")
        self.specs = dict(specs)
        self.head, self.offsets = layout_header(self.specs, metadata)
        self.size = len(self.head) + sum(s.nbytes for s in self.specs.values())
        self.fd = -1
        self._unflushed = 0
        self._lock = threading.Lock()

    def create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, self.head, 0)
            os.ftruncate(fd, self.size)
        finally:
            os.close(fd)

    def open(self) -> TensorWriter:
        self.fd = os.open(self.tmp, os.O_WRONLY)
        return self

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        spec = self.specs[name]
        if _DTYPES.get(values.dtype) != spec.dtype:
            raise ValueError(f"tensor {name}: writing {values.dtype}, header says {spec.dtype}")
        if start + values.numel() > _numel(spec.shape):
            raise ValueError(f"tensor {name}: range {start}..{start + values.numel()} exceeds its {spec}")
        data = values.contiguous().reshape(-1).view(torch.uint8).numpy()
        pos, view = self.offsets[name] + start * _itemsize(spec.dtype), memoryview(data)
        while len(view):
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n
        with self._lock:  # writers may be threads
            self._unflushed += data.nbytes
            start_writeback = self._unflushed >= WRITEBACK_BYTES
            if start_writeback:
                self._unflushed = 0
        if start_writeback and _SYNC_FILE_RANGE is not None:
            # Start (not wait for) writeback of the file's dirty pages, so it overlaps the work.
            _SYNC_FILE_RANGE(self.fd, 0, 0, _SYNC_FILE_RANGE_WRITE)

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def commit(self) -> None:
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)
