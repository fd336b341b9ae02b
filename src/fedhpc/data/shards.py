"""Pack tokenised sources into zarr shards and held-out splits, and write, sign and verify the data manifest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import zarr
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from zarr.codecs import ZstdCodec

from fedhpc.config.federation import DataConfig, SourceConfig
from fedhpc.core.documents import check_document
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import fsync_dir, parse_json, sha256_file, sha256_tree, write_bytes
from fedhpc.core.layout import RunLayout
from fedhpc.data.ingest import DataError, Document, iter_source
from fedhpc.data.tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from fedhpc.trust.envelope import DataKey, EnvelopeError, is_sealed, opened_store, sealed_store
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore, sign_bytes, verify_bytes

MANIFEST_VERSION = 1
CHUNK_TOKENS = 1 << 20
# Text documents are tokenised in batches so the Rust tokenizer can use every core.
_BATCH_DOCS = 512
_BATCH_CHARS = 8 << 20


class ShardIntegrityError(FedhpcError, ValueError):
    """A shard or held-out split on disk does not match the manifest (tampered, truncated or unreadable)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def source_seed(seed: int, name: str) -> int:
    # Python's hash() is salted per process; a digest gives the same split on every machine and run.
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "little")


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(d)


def _install_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; `os.replace` cannot overwrite a non-empty directory."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{os.getpid()}.old")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _ZarrStream:
    """Appends tokens to a 1-D zarr array in a hidden sibling directory; `commit` moves it into place.

    Only whole chunks are written until `commit`, so memory stays at one chunk whatever the array size.
    """

    def __init__(
        self, final: Path, dtype: np.dtype, chunk: int, attributes: dict[str, Any], readers: list[DataKey] | None = None
    ):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        # Sealed: zarr writes through an encrypting store, so no plaintext chunk touches the disk.
        store = sealed_store(self.tmp, sealed_context(final), readers) if readers else str(self.tmp)
        self.sealed_for = [k.name for k in readers] if readers else None
        self.arr = zarr.create_array(
            store=store,
            shape=(0,),
            chunks=(chunk,),
            dtype=dtype,
            fill_value=0,
            # The checksum catches a corrupt chunk even when a reader skips the tree hash.
            compressors=[ZstdCodec(level=3, checksum=True)],
            attributes=attributes,
            zarr_format=3,
        )
        self.buf = np.empty(chunk, dtype=dtype)
        self.fill = 0
        self.written = 0

    @property
    def tokens(self) -> int:
        return self.written + self.fill

    def append(self, ids: np.ndarray) -> None:
        pos = 0
        while pos < len(ids):
            take = min(len(self.buf) - self.fill, len(ids) - pos)
            self.buf[self.fill : self.fill + take] = ids[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                self._flush()

    def _flush(self) -> None:
        if self.fill:
            end = self.written + self.fill
            self.arr.resize((end,))
            self.arr[self.written : end] = self.buf[: self.fill]
            self.written, self.fill = end, 0

    def commit(self) -> str:
        self._flush()
        _fsync_tree(self.tmp)
        _install_dir(self.tmp, self.final)
        return sha256_tree(self.final)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass(frozen=True)
class DataDirs:
    """Where one party's packed arrays go: `root` is the run directory (entries' paths are
    relative to it), shards and held-out splits below it. The coordinator packs the shared
    sources into `data/`, each site its own into `data/sites/<site>/`."""

    root: Path
    base: Path

    @classmethod
    def shared(cls, layout: RunLayout) -> DataDirs:
        return cls(layout.root, layout.data)

    @classmethod
    def site(cls, layout: RunLayout, site: str) -> DataDirs:
        return cls(layout.root, layout.site_data(site))

    def shard(self, shard_id: str) -> Path:
        return self.base / "shards" / f"{shard_id}.zarr"

    def heldout(self, domain: str) -> Path:
        return self.base / "heldout" / f"{domain}.zarr"

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def sealed_context(path: Path) -> str:
    """What a sealed array's ciphertexts are bound to: `shards/<id>` or `heldout/<domain>`."""
    return f"{path.parent.name}/{path.name.removesuffix('.zarr')}"


# Who may read an array: (kind "shard" or "heldout", residency) -> their data keys; None: no sealing.
Sealing = Callable[[str, str | None], list[DataKey]] | None


class _ShardPacker:
    """Cuts one source's training stream into shards of exactly `shard_tokens` (the last may be shorter)."""

    def __init__(
        self, source: SourceConfig, dirs: DataDirs, shard_tokens: int, dtype: np.dtype, sealing: Sealing = None
    ):
        self.source, self.dirs, self.shard_tokens, self.dtype = source, dirs, shard_tokens, dtype
        self.readers = sealing("shard", source.site) if sealing else None
        self.entries: list[dict[str, Any]] = []
        self.writer: _ZarrStream | None = None
        self.shard_id = ""

    def add(self, ids: np.ndarray) -> None:
        pos = 0
        while pos < len(ids):
            if self.writer is None:
                self.shard_id = f"{self.source.name}-{len(self.entries):05d}"
                chunk = min(CHUNK_TOKENS, self.shard_tokens)
                attrs = {"fedhpc": {"shard": self.shard_id, "source": self.source.name, "domain": self.source.domain}}
                self.writer = _ZarrStream(self.dirs.shard(self.shard_id), self.dtype, chunk, attrs, self.readers)
            take = min(self.shard_tokens - self.writer.tokens, len(ids) - pos)
            self.writer.append(ids[pos : pos + take])
            pos += take
            if self.writer.tokens == self.shard_tokens:
                self._commit()

    def _commit(self) -> None:
        assert self.writer is not None
        sealed_for = self.writer.sealed_for
        tokens, sha = self.writer.tokens, self.writer.commit()
        s = self.source
        entry = {
            "id": self.shard_id,
            "path": self.dirs.rel(self.dirs.shard(self.shard_id)),
            "tokens": tokens,
            "domain": s.domain,
            "language": s.language,
            "source": s.source or s.path,
            "licence": s.licence,
            "residency": s.site,
            "sha256": sha,
            "dtype": str(self.dtype),
        }
        if sealed_for:
            entry["sealed_for"] = sealed_for
        self.entries.append(entry)
        self.writer = None

    def finish(self) -> list[dict[str, Any]]:
        if self.writer is not None:
            self._commit()
        return self.entries

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


@dataclass
class _Domain:
    writer: _ZarrStream | None = None
    text_bytes: int = 0
    pretokenised: bool = False
    sites: set[str | None] = field(default_factory=set)


# What packing consumes of one source: (ids, UTF-8 bytes of the text or None if pre-tokenised)
# per document, in source order. One process tokenises as it goes (`tokenised`); the gather of
# a parallel build reads what its part jobs tokenised (data/parts.py).
Tokenised = Iterator[tuple[np.ndarray, int | None]]
DocumentStream = Callable[[SourceConfig], Tokenised]


def tokenised(docs: Iterable[Document], tok: Tokenizer) -> Tokenised:
    """(ids, UTF-8 bytes of the text or None if pre-tokenised) per document of `docs`, in order."""
    texts: list[str] = []
    chars = 0

    def flush() -> Iterator[tuple[np.ndarray, int | None]]:
        for text, ids in zip(texts, tok.encode_batch(texts)):
            yield ids, len(text.encode("utf-8"))

    for doc in docs:
        if isinstance(doc.data, str):
            texts.append(doc.data)
            chars += len(doc.data)
            if len(texts) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
                yield from flush()
                texts, chars = [], 0
            continue
        ids = doc.data
        bad = (ids < 0) | (ids >= tok.vocab_size)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{doc.origin}: token id {int(ids[i])} at position {i} is outside the tokenizer vocabulary 0..{tok.vocab_size - 1}"
            )
        yield ids, None
    yield from flush()


def _with_eos(ids: np.ndarray, eos: int) -> np.ndarray:
    out = np.empty(len(ids) + 1, dtype=np.int64)
    out[:-1] = ids
    out[-1] = eos
    return out


def _clean_data_dirs(dirs: DataDirs, keep: set[Path] | None) -> None:
    """Drop temporaries of a killed build and, given `keep`, arrays the new listing no longer has."""
    for d in (dirs.shard("x").parent, dirs.heldout("x").parent):
        if d.is_dir():
            for p in d.iterdir():
                leftover = p.name.startswith(".") and p.name.endswith((".tmp", ".old"))
                stale = keep is not None and p.suffix == ".zarr" and p not in keep
                if leftover or stale:
                    shutil.rmtree(p, ignore_errors=True)


def build_shards(
    sources: list[SourceConfig],
    data: DataConfig,
    tokenizer: Tokenizer,
    layout: RunLayout,
    seed: int,
    signer_key: Ed25519PrivateKey,
    domain_entropy: dict[str, float | None],
    sealing: Sealing = None,
    documents: DocumentStream | None = None,
) -> dict[str, Any]:
    """Tokenise, split and pack `sources` into `data/`; write the tokenizer and the coordinator's signed manifest.

    With `sealing`, every array is encrypted for the readers it names (trust/envelope.py). With
    `documents` (the gather of a parallel build), the sources were tokenised already, with the
    tokenizer file that is in place: it is kept, not written again."""
    # No valid manifest may point at shards while they are being rewritten.
    layout.manifest_sig.unlink(missing_ok=True)
    layout.manifest.unlink(missing_ok=True)
    if documents is None:
        save_tokenizer(tokenizer, layout.tokenizer)
    tok_sha = sha256_file(layout.tokenizer)
    dirs = DataDirs.shared(layout)
    shards, heldout = pack_sources(sources, data, tokenizer, dirs, seed, domain_entropy, sealing, documents)
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "tokenizer": {
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "sha256": tok_sha,
        },
        "shard_tokens": data.shard_tokens,
        "heldout_fraction": data.heldout_fraction,
        "seed": seed,
        "shards": shards,
        "heldout": heldout,
    }
    body = (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    write_bytes(layout.manifest, body)
    write_bytes(layout.manifest_sig, (sign_bytes(signer_key, body) + "\n").encode())
    return manifest


def pack_sources(
    sources: list[SourceConfig],
    data: DataConfig,
    tokenizer: Tokenizer,
    dirs: DataDirs,
    seed: int,
    domain_entropy: dict[str, float | None],
    sealing: Sealing = None,
    documents: DocumentStream | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Tokenise, split and pack every source into `dirs`: (shard entries, held-out entries).

    `documents` gives each source's tokenised documents (default: read and tokenised here).
    Arrays of an earlier build that the new listing does not have are removed from `dirs`
    (and nothing outside it), so several parties can pack into one run directory.
    """
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"data.sources: duplicate source names {dupes} (shard ids would collide)")
    _clean_data_dirs(dirs, None)
    dtype = token_dtype(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    frac = data.heldout_fraction
    shards: list[dict[str, Any]] = []
    domains: dict[str, _Domain] = {}
    packer: _ShardPacker | None = None
    try:
        for source in sources:
            dom = domains.setdefault(source.domain, _Domain())
            dom.sites.add(source.site)
            dom.pretokenised |= source.format == "hdf5"
            rng = np.random.default_rng(source_seed(seed, source.name))
            packer = _ShardPacker(source, dirs, data.shard_tokens, dtype, sealing)
            held: list[tuple[np.ndarray, int | None]] = []
            # The newest training document waits here, so it can still become held-out if none was drawn.
            pending: tuple[np.ndarray, int | None] | None = None
            docs = 0
            stream = documents(source) if documents else tokenised(iter_source(source), tokenizer)
            for ids, nbytes in stream:
                docs += 1
                item = (_with_eos(ids, eos), nbytes)
                if rng.random() < frac:
                    held.append(item)
                else:
                    if pending is not None:
                        packer.add(pending[0])
                    pending = item
            if docs == 0:
                raise DataError(f"data.sources[{source.name}]: no non-empty documents in {source.path!r}")
            if docs >= 2 and not held:
                assert pending is not None
                held.append(pending)
            else:
                if pending is None:
                    # Every document was drawn for held-out (or the only one was): the source must still train.
                    pending = held.pop()
                packer.add(pending[0])
            entries = packer.finish()
            packer = None
            shards.extend(entries)

            held_tokens = sum(len(ids) for ids, _ in held)
            if held:
                if dom.writer is None:
                    attrs = {"fedhpc": {"heldout": source.domain}}
                    dom.writer = _ZarrStream(
                        dirs.heldout(source.domain),
                        dtype,
                        min(CHUNK_TOKENS, data.shard_tokens),
                        attrs,
                        sealing("heldout", source.site) if sealing else None,
                    )
                for ids, nbytes in held:
                    dom.writer.append(ids)
                    dom.text_bytes += nbytes or 0
            train_tokens = sum(e["tokens"] for e in entries)
            print(
                f"shards: {source.name}: {docs} docs, {train_tokens} train + {held_tokens} held-out tokens "
                f"({len(held)} docs), {len(entries)} shards",
                file=sys.stderr,
                flush=True,
            )
            del held

        heldout: list[dict[str, Any]] = []
        for name in sorted(domains):
            dom = domains[name]
            if dom.writer is None:
                print(
                    f"shards: domain {name}: no held-out documents (every source has a single document)",
                    file=sys.stderr,
                )
                continue
            tokens, sealed_for = dom.writer.tokens, dom.writer.sealed_for
            sha = dom.writer.commit()
            writer, dom.writer = dom.writer, None
            bpt = None if dom.pretokenised else dom.text_bytes / tokens
            entropy = domain_entropy.get(name)
            floor = entropy * bpt if entropy is not None and bpt is not None else None
            residency = next(iter(dom.sites)) if len(dom.sites) == 1 else None
            heldout.append(
                {
                    "domain": name,
                    "path": dirs.rel(writer.final),
                    "tokens": tokens,
                    "sha256": sha,
                    "dtype": str(dtype),
                    "bytes_per_token": bpt,
                    "entropy_floor_nats_per_token": floor,
                    "residency": residency,
                    **({"sealed_for": sealed_for} if sealed_for else {}),
                }
            )
    except BaseException:
        if packer is not None:
            packer.abort()
        for dom in domains.values():
            if dom.writer is not None:
                dom.writer.abort()
        raise

    keep = {dirs.root / e["path"] for e in shards} | {dirs.root / e["path"] for e in heldout}
    _clean_data_dirs(dirs, keep)
    return shards, heldout


def load_manifest(layout: RunLayout, trust: TrustStore) -> dict[str, Any]:
    """The manifest, after checking the coordinator's signature over its exact bytes."""
    body = layout.manifest.read_bytes()
    if not layout.manifest_sig.is_file():
        raise SignatureError(f"{layout.manifest}: unsigned (no {layout.manifest_sig})")
    sig = layout.manifest_sig.read_text().strip()
    verify_bytes(trust.public_key(COORDINATOR), body, sig, str(layout.manifest))
    manifest = check_document("manifest", parse_json(body, str(layout.manifest)), str(layout.manifest))
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(
            f"{layout.manifest}: manifest version {manifest.get('version')!r}, expected {MANIFEST_VERSION}"
        )
    return manifest


def load_run_tokenizer(layout: RunLayout, manifest: dict[str, Any]) -> Tokenizer:
    """The run's tokenizer, refusing a file whose hash differs from the one the manifest signed."""
    actual = sha256_file(layout.tokenizer)
    if actual != manifest["tokenizer"]["sha256"]:
        raise ShardIntegrityError(f"tokenizer {layout.tokenizer}: sha256 {actual} does not match the manifest")
    return load_tokenizer(layout.tokenizer)


def _read_array(
    layout: RunLayout, entry: dict[str, Any], what: str, verify: bool, trust: TrustStore | None
) -> np.ndarray:
    rel = PurePosixPath(entry["path"])
    if rel.is_absolute() or ".." in rel.parts:
        raise ShardIntegrityError(f"{what}: path {entry['path']!r} leaves the run directory")
    path = layout.root / rel
    if verify:
        if not path.is_dir():
            raise ShardIntegrityError(f"{what}: {path} is missing")
        actual = sha256_tree(path)
        if actual != entry["sha256"]:
            raise ShardIntegrityError(f"{what}: {path} has sha256 {actual}, manifest says {entry['sha256']}")
    store: Any = str(path)
    if is_sealed(path):
        readers = entry.get("sealed_for") or []
        if trust is None:
            raise EnvelopeError(f"{what}: {path} is sealed; reading it needs a data key")
        store = opened_store(path, sealed_context(path), trust.data_keys(readers), f"{what} ({path})")
    try:
        tokens = np.asarray(zarr.open_array(store=store, mode="r")[:])
    except EnvelopeError:
        raise
    except Exception as exc:  # zarr, codecs and the filesystem raise many unrelated types
        raise ShardIntegrityError(f"{what}: {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if tokens.ndim != 1 or len(tokens) != entry["tokens"] or str(tokens.dtype) != entry.get("dtype", str(tokens.dtype)):
        raise ShardIntegrityError(
            f"{what}: {path} holds {tokens.shape} {tokens.dtype}, manifest says ({entry['tokens']},) {entry.get('dtype')}"
        )
    return tokens


def read_shard(
    layout: RunLayout, entry: dict[str, Any], verify: bool = True, trust: TrustStore | None = None
) -> np.ndarray:
    """Tokens of a manifest shard entry; with `verify`, only after its tree hash matches the manifest.
    A sealed shard is opened with a data key of one of its readers that `trust` can load here."""
    return _read_array(layout, entry, f"shard {entry['id']}", verify, trust)


def read_heldout(
    layout: RunLayout, entry: dict[str, Any], verify: bool = True, trust: TrustStore | None = None
) -> np.ndarray:
    """Tokens of a manifest held-out entry; with `verify`, only after its tree hash matches the manifest."""
    return _read_array(layout, entry, f"held-out split {entry['domain']}", verify, trust)
