"""Append-only, hash-chained audit ledger (`audit.jsonl`) and its verifier."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import canonical_json, last_line, parse_json

GENESIS = "0" * 64


class LedgerError(FedhpcError, ValueError):
    """The ledger cannot be appended to or read (its last line is not a ledger entry)."""


def _digest(prev: str, body: dict[str, Any]) -> str:
    return hashlib.sha256(prev.encode() + canonical_json(body)).hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Concurrent jobs (sites training in parallel, local rules) append to one ledger.
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ledger_tail(path: Path) -> tuple[int, str, int]:
    """Return (next seq, hash of last line, byte length of the complete part of the file); reads
    only the file's end, so an append costs the same on round 1000 as on round 1."""
    if not path.exists():
        return 0, GENESIS, 0
    line, complete = last_line(path)
    if line is None:
        return 0, GENESIS, complete
    try:
        last = parse_json(line, str(path))
        seq, digest = last["seq"], last["hash"]
        assert isinstance(seq, int) and isinstance(digest, str)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise LedgerError(
            f"{path}: its last complete line is not a ledger entry; nothing appended (see `fedhpc audit verify`)"
        ) from None
    return seq + 1, digest, complete


class AuditLog:
    """The ledger of one run. Every event names what happened; each line hashes the previous one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            seq, prev, complete = ledger_tail(self.path)
            with open(self.path, "r+b" if self.path.exists() else "wb") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size != complete:
                    # Drop a torn, never-committed line, and say so in the ledger itself.
                    fh.truncate(complete)
                    fh.seek(complete)
                    repair = {
                        "seq": seq,
                        "time": time.time(),
                        "event": "ledger.repaired",
                        "dropped_bytes": size - complete,
                        "prev": prev,
                    }
                    repair["hash"] = _digest(prev, repair)
                    fh.write(json.dumps(repair, sort_keys=True).encode() + b"\n")
                    seq, prev = seq + 1, repair["hash"]
                body = {"seq": seq, "time": time.time(), "event": event, **fields, "prev": prev}
                body["hash"] = _digest(prev, body)
                fh.write(json.dumps(body, sort_keys=True, allow_nan=False).encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
        return body

    def events(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            return [parse_json(line, str(self.path)) for line in self.path.read_bytes().splitlines() if line.strip()]
        except ValueError as exc:
            raise LedgerError(str(exc)) from None


@dataclass(frozen=True)
class LedgerCheck:
    ok: bool
    lines: int
    bad_line: int | None = None  # 1-based line number of the first problem
    reason: str = ""
    hashes: tuple[str, ...] = field(default=(), compare=False, repr=False)  # hash of each intact line, in order
    heads: int = 0  # signed heads checked (ledger.verify_run)


def verify_ledger(path: str | os.PathLike) -> LedgerCheck:
    """Check sequence numbers and the hash chain; report the first line that breaks them."""
    path = Path(path)
    if not path.exists():
        return LedgerCheck(False, 0, None, f"{path} does not exist")
    prev, expected_seq, n, hashes = GENESIS, 0, 0, []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw:
            continue
        try:
            body = parse_json(raw, str(path))
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return LedgerCheck(False, n, n, "not a JSON object", tuple(hashes))
        claimed = body.pop("hash", None)
        if body.get("seq") != expected_seq or isinstance(body.get("seq"), bool):
            return LedgerCheck(
                False,
                n,
                n,
                f"sequence number {body.get('seq')!r}, expected {expected_seq} (a line was removed, inserted or moved)",
                tuple(hashes),
            )
        if body.get("prev") != prev:
            return LedgerCheck(False, n, n, "does not chain to the previous line", tuple(hashes))
        if claimed != _digest(prev, body):
            return LedgerCheck(False, n, n, "content does not match its hash (edited)", tuple(hashes))
        prev, expected_seq = claimed, expected_seq + 1
        hashes.append(claimed)
    return LedgerCheck(True, expected_seq, hashes=tuple(hashes))
