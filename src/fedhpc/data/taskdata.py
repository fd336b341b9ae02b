"""Data of tasks that bring their own format: shard and held-out files, hashed into the signed manifest.

A task writes each shard as one file of its choosing (JSON lines, safetensors, …) through a
`DataWriter`; the framework hashes it, records size, domain and residency, and signs the
manifest, so planning, residency, staging and integrity checks are the same as for token shards.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhpc.config.fields import NAME_PATTERN
from fedhpc.core.files import atomic_path, sha256_file, write_bytes
from fedhpc.core.layout import RunLayout
from fedhpc.data.shards import MANIFEST_VERSION, ShardIntegrityError
from fedhpc.trust.signing import sign_bytes


class DataWriter:
    """Collects a task's shards and held-out splits under `data/`, then writes the signed manifest."""

    def __init__(self, layout: RunLayout, seed: int, task: str):
        self.layout, self.seed, self.task = layout, seed, task
        self.shards: list[dict[str, Any]] = []
        self.heldout: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}
        self._name = re.compile(NAME_PATTERN)

    def _check(self, what: str, name: str) -> None:
        if not self._name.match(name):
            raise ValueError(f"{what} {name!r}: not a valid name ({NAME_PATTERN})")

    @contextlib.contextmanager
    def shard(
        self,
        shard_id: str,
        *,
        domain: str,
        size: int,
        site: str | None = None,
        language: str = "und",
        source: str = "generated",
        licence: str = "unknown",
        suffix: str = ".jsonl",
    ) -> Iterator[Path]:
        """A temporary path to write shard `shard_id` to; on exit it is installed and recorded.

        `size` is in the task's unit (examples, rows…): the planner shares out
        `rounds.tokens_per_round` of it, and "tokens" weighting counts it.
        """
        self._check("shard", shard_id)
        path = self.layout.data / "shards" / f"{shard_id}{suffix}"
        with atomic_path(path) as tmp:
            yield tmp
        self.shards.append(
            {
                "id": shard_id,
                "path": path.relative_to(self.layout.root).as_posix(),
                "tokens": int(size),
                "domain": domain,
                "language": language,
                "source": source,
                "licence": licence,
                "residency": site,
                "sha256": sha256_file(path),
                "dtype": None,
            }
        )

    @contextlib.contextmanager
    def split(
        self, name: str, *, size: int, kind: str = "heldout", site: str | None = None, suffix: str = ".jsonl"
    ) -> Iterator[Path]:
        """A held-out split (`kind` lets a task keep several sorts, e.g. retrieval and similarity sets)."""
        self._check("split", name)
        path = self.layout.data / "heldout" / f"{name}{suffix}"
        with atomic_path(path) as tmp:
            yield tmp
        self.heldout.append(
            {
                "domain": name,
                "kind": kind,
                "path": path.relative_to(self.layout.root).as_posix(),
                "tokens": int(size),
                "sha256": sha256_file(path),
                "dtype": None,
                "residency": site,
                "entropy_floor_nats_per_token": None,
            }
        )

    def shard_records(self, shard_id: str, records: list[dict], **kw: Any) -> None:
        with self.shard(shard_id, size=kw.pop("size", len(records)), **kw) as tmp:
            write_records(tmp, records)

    def split_records(self, name: str, records: list[dict], **kw: Any) -> None:
        with self.split(name, size=kw.pop("size", len(records)), **kw) as tmp:
            write_records(tmp, records)

    def finish(self, signer_key: Ed25519PrivateKey) -> dict[str, Any]:
        if not self.shards:
            raise ValueError(f"task {self.task!r} prepared no shards")
        manifest = {
            "version": MANIFEST_VERSION,
            "task": self.task,
            "tokenizer": None,
            "seed": self.seed,
            "shards": sorted(self.shards, key=lambda s: s["id"]),
            "heldout": sorted(self.heldout, key=lambda s: s["domain"]),
            "task_data": self.extra,
        }
        body = (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
        write_bytes(self.layout.manifest, body)
        write_bytes(self.layout.manifest_sig, (sign_bytes(signer_key, body) + "\n").encode())
        return manifest


def write_records(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")


def read_records(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def verified_file(layout: RunLayout, entry: dict[str, Any], what: str) -> Path:
    """The file of a manifest entry, after its sha256 matches the signed manifest."""
    rel = PurePosixPath(entry["path"])
    if rel.is_absolute() or ".." in rel.parts:
        raise ShardIntegrityError(f"{what}: path {entry['path']!r} leaves the run directory")
    path = layout.root / rel
    if not path.is_file():
        raise ShardIntegrityError(f"{what}: {path} is missing")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ShardIntegrityError(f"{what}: {path} has sha256 {actual}, manifest says {entry['sha256']}")
    return path
