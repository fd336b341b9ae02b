"""A parallel build of the shared data: the sources' files cut into groups, each tokenised by a part job, then gathered.

The part jobs (`fedhpc shard-part`, one Snakemake job each) only tokenise: where a shard
starts depends on how many tokens every earlier file made, and which documents are held
out on a draw per document in source order, so only the gather (`fedhpc shard`) can pack.
It feeds the parts' documents, in source order, to the same packing code one process runs,
so the signed manifest is the same, byte for byte, whatever the number of parts.
"""

from __future__ import annotations

import functools
import os
import shutil
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from fedhpc.config.federation import SourceConfig
from fedhpc.core.files import fsync_dir, read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.data.ingest import DataError, iter_file, source_files
from fedhpc.data.shards import DocumentStream, Tokenised, token_dtype, tokenised
from fedhpc.data.tokenizer import Tokenizer, load_tokenizer

PART_VERSION = 1
RECORD = "part.json"


@dataclass(frozen=True)
class SourceFile:
    """One file of the shared sources, in packing order: its source's index, its path and size."""

    source: int
    path: Path
    size: int


def file_groups(sources: list[SourceConfig], jobs: int) -> list[list[SourceFile]]:
    """`jobs` runs of consecutive files (sources in order, each source's files sorted), split by size:
    a file goes to the group its middle byte falls in, so each group holds about 1/jobs of the
    bytes. A file is never split, so a group is empty when a few large files cover several."""
    files = [SourceFile(i, p, p.stat().st_size) for i, s in enumerate(sources) for p in source_files(s)]
    total = max(1, sum(f.size for f in files))
    groups: list[list[SourceFile]] = [[] for _ in range(jobs)]
    before = 0
    for f in files:
        groups[min(jobs - 1, (2 * before + f.size) * jobs // (2 * total))].append(f)
        before += f.size
    return groups


def _describe(sources: list[SourceConfig], group: list[SourceFile]) -> list[dict[str, Any]]:
    return [{"source": sources[f.source].name, "path": str(f.path), "size": f.size} for f in group]


@functools.cache
def _tokenizer(path: Path, sha256: str) -> Tokenizer:
    # Once per worker process, not once per file; keyed by the hash, as the file may be rewritten.
    tok = load_tokenizer(path)
    if sha256_file(path) != sha256:
        raise DataError(f"{path}: changed while the part was being tokenised: tokenise it again")
    return tok


def _worker_init() -> None:
    # A part job uses as many cores as it has workers: the Rust tokenizer of each gets one thread.
    os.environ["RAYON_NUM_THREADS"] = "1"


def tokenise_file(source: SourceConfig, path: Path, tok_path: Path, tok_sha: str, out: Path) -> tuple[int, int]:
    """Tokenise one file with the tokenizer at `tok_path` (of hash `tok_sha`) into `out`.ids (the
    documents' ids back to back) and `out`.docs.npy (per document: token count, UTF-8 bytes or -1
    if pre-tokenised); returns (documents, tokens)."""
    tok = _tokenizer(tok_path, tok_sha)
    dtype = token_dtype(tok.vocab_size)
    docs: list[tuple[int, int]] = []
    with open(out.with_suffix(".ids"), "wb") as fh:
        for ids, nbytes in tokenised(iter_file(source, path), tok):
            fh.write(ids.astype(dtype).tobytes())
            docs.append((len(ids), -1 if nbytes is None else nbytes))
        os.fsync(fh.fileno())
    table = np.array(docs, dtype=np.int64).reshape(-1, 2)
    with open(out.with_suffix(".docs.npy"), "wb") as fh:
        np.save(fh, table)
        os.fsync(fh.fileno())
    return len(docs), int(table[:, 0].sum())


def tokenise_part(layout: RunLayout, sources: list[SourceConfig], jobs: int, part: int, workers: int) -> dict[str, Any]:
    """Part `part` of `jobs`: tokenise its file group with `workers` processes (one file each at a
    time) into `layout.shard_part(part)`. The directory appears whole or not at all: it is built
    under a hidden name and renamed, its record written last; returns the record."""
    if not 0 <= part < jobs:
        raise DataError(f"part {part} does not exist: data.shard_jobs is {jobs} (parts 0..{jobs - 1})")
    group = file_groups(sources, jobs)[part]
    final = layout.shard_part(part)
    final.parent.mkdir(parents=True, exist_ok=True)
    # A part job killed earlier left its hidden directory; only this part's job writes it.
    for stale in final.parent.glob(f".{part}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.with_name(f".{part}.{os.getpid()}.tmp")
    tmp.mkdir()
    try:
        tok_sha = sha256_file(layout.tokenizer)
        n = len(group)
        outs = [tmp / f"{j:05d}" for j in range(n)]
        args = (
            [sources[f.source] for f in group],
            [f.path for f in group],
            [layout.tokenizer] * n,
            [tok_sha] * n,
            outs,
        )
        if workers > 1 and n > 1:
            # Fork where no other thread runs (a `fedhpc shard-part` job): spawn re-imports the CLI,
            # a second or so per worker. Where threads run (embedded, tests), a fork could copy a
            # lock mid-use: spawn then.
            ctx = get_context("fork" if threading.active_count() == 1 else "spawn")
            with ProcessPoolExecutor(min(workers, len(group)), mp_context=ctx, initializer=_worker_init) as pool:
                counts = list(pool.map(tokenise_file, *args))
        else:
            _worker_init()  # the job's one core, as a worker's: nothing has started Rust threads yet
            counts = list(map(tokenise_file, *args))
        files = _describe(sources, group)
        for entry, (docs, tokens) in zip(files, counts):
            entry.update(docs=docs, tokens=tokens)
        record = {
            "version": PART_VERSION,
            "part": part,
            "jobs": jobs,
            "tokenizer_sha256": tok_sha,
            "files": files,
        }
        write_json(tmp / RECORD, record)
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _load_record(layout: RunLayout, part: int, jobs: int, expected: list[dict], tok_sha: str) -> dict[str, Any]:
    path = layout.shard_part(part) / RECORD
    if not path.is_file():
        raise DataError(
            f"{path}: missing; part {part} of {jobs} was not tokenised (run `fedhpc shard-part --part {part}`)"
        )
    rec = read_json(path)
    if rec.get("version") != PART_VERSION or rec.get("jobs") != jobs or rec.get("part") != part:
        raise DataError(
            f"{path}: part {rec.get('part')!r} of {rec.get('jobs')!r} (version {rec.get('version')!r}); "
            f"expected part {part} of data.shard_jobs {jobs} (version {PART_VERSION}): tokenise it again"
        )
    if rec.get("tokenizer_sha256") != tok_sha:
        raise DataError(f"{path}: tokenised with another tokenizer than {layout.tokenizer}: tokenise it again")
    got = [{k: f.get(k) for k in ("source", "path", "size")} for f in rec.get("files", [])]
    if got != expected:
        raise DataError(f"{path}: lists other files than the sources hold now (changed since): tokenise it again")
    return rec


def part_documents(layout: RunLayout, sources: list[SourceConfig], jobs: int, dtype: np.dtype) -> DocumentStream:
    """Every source's documents as the part jobs tokenised them, in source order, after checking
    each part's record against the files the sources hold now and the tokenizer in place."""
    tok_sha = sha256_file(layout.tokenizer)
    by_source: dict[str, list[tuple[Path, dict]]] = {s.name: [] for s in sources}
    for part, group in enumerate(file_groups(sources, jobs)):
        rec = _load_record(layout, part, jobs, _describe(sources, group), tok_sha)
        for j, entry in enumerate(rec["files"]):
            by_source[entry["source"]].append((layout.shard_part(part) / f"{j:05d}", entry))

    def documents(source: SourceConfig) -> Tokenised:
        for base, entry in by_source[source.name]:
            ids_path = base.with_suffix(".ids")
            table = np.load(base.with_suffix(".docs.npy"))
            size = ids_path.stat().st_size
            if len(table) != entry["docs"] or size != entry["tokens"] * dtype.itemsize:
                raise DataError(
                    f"{ids_path}: {size} bytes and {len(table)} documents; its record says "
                    f"{entry['tokens']} tokens of {dtype} in {entry['docs']} documents: tokenise the part again"
                )
            ids = np.memmap(ids_path, dtype=dtype, mode="r") if size else np.empty(0, dtype)
            pos = 0
            for n, nbytes in table.tolist():
                yield ids[pos : pos + n], None if nbytes < 0 else nbytes
                pos += n

    return documents


__all__ = ["SourceFile", "file_groups", "part_documents", "tokenise_file", "tokenise_part"]
