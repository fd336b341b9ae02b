"""Crash-safe file primitives: atomic writes, canonical JSON and streaming hashes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """Bytes that are the same for equal objects, so they can be hashed and signed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def fsync_dir(path: Path) -> None:
    # A rename is only durable once the directory entry itself reaches the disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _clear_dead_writers_parts(path: Path) -> None:
    """Delete the temporaries of `path` that writers on this host left when they were killed.

    A part names its writer's host and pid, so only a dead writer's part goes: a writer of the
    same file still at work keeps its own. Another host's parts stay, as its pids cannot be asked.
    """
    head = f".{path.name}."
    for part in path.parent.glob(f"{glob.escape(head)}*.part"):
        fields = part.name[len(head) : -len(".part")].rsplit(".", 2)
        if len(fields) != 3:
            continue  # not named by its writer (written before parts were)
        host, pid, _ = fields
        if host == _HOST and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            part.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it into place.

    Readers therefore see either the old file or the complete new one, never a torn one,
    even if the process is killed with SIGKILL halfway through; the next write of `path` on
    the same host deletes what such a killed writer left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_dead_writers_parts(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def link_atomic(target: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make `path` a relative symlink to the file `target` finally names (links followed), replacing
    what was there in one rename. Relative, so the run directory can
    move or be bound into a container at another path."""
    path, real = Path(path), Path(os.path.realpath(target))
    if not real.is_file():
        raise FileNotFoundError(f"{target}: no file to link to")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.link.part"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(real, os.path.realpath(path.parent)), tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def clear_stale_parts(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files writers killed mid-write left in `directory`; return them.

    Only the stage that owns the directory may call this, before it writes: a concurrent
    writer's live temporary file would go too.
    """
    gone = sorted(Path(directory).glob(".*.part"))
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created with its directory) for the block; yields
    whether it is held. A filesystem without flock (a Lustre mount without -o flock answers
    ENOSYS or EOPNOTSUPP) runs the block unlocked, yielding False, rather than failing the job."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOLCK):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_bytes(obj: Any) -> bytes:
    """`obj` as write_json writes it: indented, keys sorted, no NaN."""
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, json_bytes(obj))


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def parse_json(data: bytes | str, where: str) -> Any:
    """Strict JSON: no NaN/Infinity (we never write them), no nesting deep enough to exhaust the stack."""
    try:
        return json.loads(data, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{where}: not valid JSON (nested too deeply)") from None


def read_json(path: str | os.PathLike, max_bytes: int | None = None) -> Any:
    """A JSON file; with `max_bytes`, a larger file is refused before it is read (hostile input)."""
    path = Path(path)
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise ValueError(f"{path}: {path.stat().st_size} bytes is more than the {max_bytes} such a file may have")
    try:
        return parse_json(path.read_bytes(), str(path))
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a JSON file") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike) -> str:
    """Hash of every file under `root` (relative names and contents, in sorted order)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(8, "little") + rel)
        h.update(p.stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk (used for metrics, not for the audit ledger)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# How much of a file's end `last_line` reads at a time.
TAIL_CHUNK = 64 * 1024


def last_line(path: str | os.PathLike) -> tuple[bytes | None, int]:
    """(the last complete line of a lines file, None if it has none; the byte length of its
    complete part). Reads from the end, a chunk at a time: the audit ledger and a round's
    metrics are read this way on every append or look, and grow for as long as the run lasts.
    A line without its newline (a write a crash tore) is not complete."""
    with open(path, "rb") as fh:
        pos = fh.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0:
            step = min(TAIL_CHUNK, pos)
            pos -= step
            fh.seek(pos)
            tail = fh.read(step) + tail
            end = tail.rfind(b"\n")
            if end >= 0 and tail.rfind(b"\n", 0, end) >= 0:
                break  # the last complete line and the newline before it are in hand
    end = tail.rfind(b"\n")
    if end < 0:
        return None, 0
    return tail[tail.rfind(b"\n", 0, end) + 1 : end], pos + end + 1


def finite_or_none(x: float) -> float | None:
    """JSON has no NaN/Inf; a diverged number is recorded as null and treated as failed."""
    return x if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") else None
