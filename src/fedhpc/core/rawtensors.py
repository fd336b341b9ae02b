"""Safetensors read (memory-mapped) and written (pwrite) by element range, for the streaming aggregator.

Reading maps each file once and hands out views of it: no copy out of the page cache, which
is what the aggregator's speed depends on (benchmarks/README.md: reading every input with
pread alone takes longer than the bandwidth goal allows for the whole aggregation). The mapping is shared and read-only, so nothing can
change a file through it. Pages a stream has finished with are unmapped again (MADV_DONTNEED
on the previous range of the same stream), so the resident set stays at a chunk per stream
whatever the file sizes. A file truncated underneath is refused with its name when the size
check before each read sees it; one truncated in the middle of a read faults (SIGBUS), which
the CLI reports with faulthandler's traceback, and the job fails before anything is renamed.

Writing at known offsets lets several threads or MPI ranks fill one output file in parallel;
writeback is started every few MiB (sync_file_range) so the closing fsync does not wait for
the whole file.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import stat
import struct
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from fedhpc.core.tensorfile import DTYPE_NAMES, TORCH_DTYPES, TensorFileError, TensorSpec, parse_header

RELEASE_BYTES = 2 << 20  # a reader unmaps the pages it handed out after this many bytes
FOLIO_BYTES = 2 << 20  # the largest page-cache folio a fault may map (x86-64: PMD size)
WRITEBACK_BYTES = 16 << 20  # start writeback of a writer's dirty pages after this many bytes
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in TORCH_DTYPES.items()}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE[dtype]


def _libc(name: str, *argtypes):
    """A function of libc (Linux) taking `argtypes` and returning an int, or None where it has none."""
    try:
        f = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    f.argtypes, f.restype = list(argtypes), ctypes.c_int
    return f


_SYNC_FILE_RANGE = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_FALLOCATE = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
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
            self._map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            with warnings.catch_warnings():
                # torch warns that the buffer is read-only: it is, on purpose (see the module docstring).
                warnings.simplefilter("ignore", UserWarning)
                self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        except Exception:
            os.close(self.fd)
            raise
        self._spans: dict[int, list[int]] = {}  # per thread: [lowest, highest byte handed out, bytes]

    def _parse(self) -> None:
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise TensorFileError(f"{self.path}: not a regular file")
        self.size = st.st_size
        header = parse_header(self.path, os.pread(self.fd, 8, 0), lambda n, at: os.pread(self.fd, n, at), self.size)
        self.metadata: dict[str, str] = header.metadata
        self.specs: dict[str, TensorSpec] = header.specs
        self.offsets: dict[str, int] = header.offsets

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of flattened tensor `name`, in its stored dtype: a read-only view
        of the mapped file (copy it before changing it).

        The pages a reader has handed out are unmapped again every RELEASE_BYTES (the page
        cache keeps them): a view stays valid, but one kept long faults its pages in again.
        """
        spec = self.specs.get(name)
        if spec is None:
            raise TensorFileError(f"{self.path}: has no tensor {name!r}")
        if not 0 <= start <= stop <= _numel(spec.shape):
            raise TensorFileError(f"{self.path}: range {start}..{stop} is outside tensor {name!r}")
        if os.fstat(self.fd).st_size < self.size:
            raise TensorFileError(f"{self.path}: shorter than when it was opened (truncated while reading?)")
        dtype, item = TORCH_DTYPES[spec.dtype], _itemsize(spec.dtype)
        at, end = self.offsets[name] + start * item, self.offsets[name] + stop * item
        if end == at:
            return torch.empty(0, dtype=dtype)
        self._note(at, end)
        if at % item == 0:
            return self._bytes[at:end].view(dtype)
        # A tensor stored off its alignment (possible in a foreign file): an aligned copy.
        return self._bytes[at:end].clone().view(dtype)

    def _note(self, a: int, b: int) -> None:
        # One span per thread: a span shared by threads would be reset under a range another
        # thread is still reading, whose pages then fault back in and are never released.
        # The range being handed out joins the span after the release: it is still to be read.
        span = self._spans.setdefault(threading.get_ident(), [self.size, 0, 0])
        if span[2] >= RELEASE_BYTES:
            self._unmap(span[0], span[1])
            span[0], span[1], span[2] = self.size, 0, 0
        span[0], span[1], span[2] = min(span[0], a), max(span[1], b), span[2] + b - a

    def _unmap(self, a: int, b: int) -> None:
        # A fault maps the whole page-cache folio around it (up to 2 MiB), so pages on either
        # side of the span may be mapped too (those below again, after the last release): they
        # go as well. Outward to whole pages: a page another thread still reads faults in again.
        a, b = max(0, a - FOLIO_BYTES), min(b + FOLIO_BYTES, self.size)
        a -= a % mmap.PAGESIZE
        if b > a:
            self._map.madvise(mmap.MADV_DONTNEED, a, b - a)

    def close(self) -> None:
        if self.fd >= 0:
            # Not mmap.close(): torch does not hold the buffer export, so that would unmap
            # pages under views still alive. Every view holds the mmap object; the mapping
            # goes with the last of them.
            self._bytes = self._map = None
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
            # Blocks reserved up front, for the threads and ranks that fill their ranges of the
            # file (benchmarks/README.md: what that saves, where measured). Not posix_fallocate:
            # where the filesystem cannot, glibc's emulation would write the whole file once
            # more; there a sparse file will do.
            if _FALLOCATE is None or _FALLOCATE(fd, 0, 0, self.size) != 0:
                os.ftruncate(fd, self.size)
        finally:
            os.close(fd)

    def open(self) -> TensorWriter:
        self.fd = os.open(self.tmp, os.O_WRONLY)
        return self

    def write(self, name: str, start: int, values: torch.Tensor) -> None:
        spec = self.specs[name]
        if DTYPE_NAMES.get(values.dtype) != spec.dtype:
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
