"""Encryption at rest: AES-256-GCM envelopes (per-shard data keys wrapped by each reader's data key).

The API is small, and the coordinator (shared data) and the sites (their pinned data) seal
with the same functions: `load_data_key` (a party's key-encryption key from an environment
variable or a mode-600 file), `new_envelope`/`open_envelope` (wrap and unwrap a shard's data
key for its readers), and `SealedStore` (a directory in which every file is sealed, which zarr
reads and writes through `zarr.storage.MemoryStore`, so no plaintext byte reaches the disk).
Every ciphertext is bound to its shard and file name (GCM associated data): a chunk moved
to another place, or a key wrapped for another reader, does not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, write_bytes, write_json
from fedhpc.trust.keyfiles import check_private_file, private_dir, write_secret

KEY_BYTES = 32
NONCE_BYTES = 12
ENVELOPE = "envelope.json"
ALG = "AES-256-GCM"


class EnvelopeError(FedhpcError, ValueError):
    """A sealed file cannot be opened (wrong or missing key, tampered ciphertext); names the file and key source."""


class MissingDataKey(EnvelopeError):
    """This machine holds no data key for a party (neither its environment variable nor its file)."""


@dataclass(frozen=True)
class DataKey:
    """A party's key-encryption key and where it came from (for messages, never the key itself)."""

    name: str
    key: bytes
    source: str

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(b"fedhpc/data-key/v1\0" + self.key).hexdigest()[:16]


def env_name(template: str, name: str) -> str:
    return template.format(name=name, NAME=re.sub(r"[^A-Za-z0-9]", "_", name).upper())


def key_path(key_file: str | None, keys_dir: str | os.PathLike, name: str) -> Path:
    return Path(key_file.format(name=name, NAME=name.upper())) if key_file else Path(keys_dir) / f"{name}.datakey"


def _decode(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise EnvelopeError(f"{where}: not a data key (expected base64 of {KEY_BYTES} bytes)")
    return key


def load_data_key(
    name: str, key_file: str | None, key_env: str, keys_dir: str | os.PathLike, environ: dict | None = None
) -> DataKey:
    """`name`'s data key: from the environment variable if set, else from its file (mode 600, own user)."""
    environ = os.environ if environ is None else environ
    var = env_name(key_env, name)
    if environ.get(var):
        return DataKey(name, _decode(environ[var], f"environment variable {var}"), f"environment variable {var}")
    path = key_path(key_file, keys_dir, name)
    if not path.exists():
        raise MissingDataKey(
            f"no data key for {name!r}: set {var} or create {path} (`fedhpc keys init --site {name} --data-key`)"
        )
    check_private_file(path, "data key")
    return DataKey(name, _decode(path.read_text(), str(path)), f"file {path}")


def create_data_key(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to replace a data key (sealed data would be lost)")
    private_dir(path.parent)
    write_secret(path, base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n")
    return path


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise EnvelopeError(f"{what}: does not decrypt (tampered, truncated, or sealed under another key)") from None


def _wrap_aad(context: str, reader: str) -> bytes:
    return f"fedhpc/wrap/v1\0{context}\0{reader}".encode()


def new_envelope(context: str, readers: list[DataKey]) -> tuple[bytes, dict]:
    """A fresh data key for `context` (e.g. a shard id) and the envelope that wraps it for each reader."""
    if not readers:
        raise EnvelopeError(f"{context}: sealing needs at least one reader")
    dek = secrets.token_bytes(KEY_BYTES)
    recipients = [
        {
            "name": k.name,
            "fingerprint": k.fingerprint,
            "wrapped": base64.b64encode(seal(k.key, dek, _wrap_aad(context, k.name))).decode(),
        }
        for k in readers
    ]
    return dek, {"alg": ALG, "context": context, "recipients": recipients}


def open_envelope(envelope: dict, context: str, key: DataKey, what: str) -> bytes:
    """Unwrap the data key of `context` with `key`; a clear error for a wrong or missing key."""
    if not isinstance(envelope, dict) or envelope.get("alg") != ALG or envelope.get("context") != context:
        raise EnvelopeError(f"{what}: envelope is not an {ALG} envelope of {context!r}")
    recipients = envelope.get("recipients") if isinstance(envelope.get("recipients"), list) else []
    entries = [e for e in recipients if isinstance(e, dict) and e.get("name") == key.name]
    if not entries:
        names = [e.get("name") for e in recipients if isinstance(e, dict)]
        raise EnvelopeError(f"{what}: is not sealed for {key.name!r} (readers: {', '.join(map(str, names))})")
    entry = entries[0]
    if entry.get("fingerprint") != key.fingerprint:
        raise EnvelopeError(
            f"{what}: sealed for {key.name!r} under the data key with fingerprint {entry.get('fingerprint')}, but the "
            f"key from {key.source} has fingerprint {key.fingerprint}: wrong key"
        )
    try:
        blob = base64.b64decode(str(entry.get("wrapped")), validate=True)
    except (binascii.Error, ValueError):
        blob = b""
    dek = unseal(key.key, blob, _wrap_aad(context, key.name), f"{what}: data key of {key.name!r} ({key.source})")
    if len(dek) != KEY_BYTES:
        raise EnvelopeError(f"{what}: wrapped data key has {len(dek)} bytes")
    return dek


class SealedStore(MutableMapping):
    """A directory whose files (zarr's keys) are each sealed with one data key; values are zarr Buffers.

    Use it as `zarr.storage.MemoryStore(SealedStore(...))`: zarr's whole I/O then goes
    through `__getitem__`/`__setitem__`, which decrypt and encrypt, and nothing else.
    """

    def __init__(self, root: Path, dek: bytes, context: str):
        self.root, self.dek, self.context = Path(root), dek, context

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if key == ENVELOPE or any(p in ("", ".", "..") for p in parts):
            raise KeyError(key)
        return self.root.joinpath(*parts)

    def _aad(self, key: str) -> bytes:
        return f"fedhpc/sealed/v1\0{self.context}\0{key}".encode()

    def __getitem__(self, key: str):
        from zarr.core.buffer import default_buffer_prototype

        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        plain = unseal(self.dek, path.read_bytes(), self._aad(key), f"{path} (sealed {self.context})")
        return default_buffer_prototype().buffer.from_bytes(plain)

    def __setitem__(self, key: str, value) -> None:
        write_bytes(self._path(key), seal(self.dek, value.to_bytes(), self._aad(key)))

    def __delitem__(self, key: str) -> None:
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        path.unlink()

    def __iter__(self) -> Iterator[str]:
        if not self.root.is_dir():
            return iter(())
        keys = (p.relative_to(self.root).as_posix() for p in sorted(self.root.rglob("*")) if p.is_file())
        return iter([k for k in keys if k != ENVELOPE and not k.split("/")[-1].startswith(".")])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def sealed_store(root: Path, context: str, readers: list[DataKey]):
    """A new sealed directory for `context`, its envelope written first: a zarr store to write into."""
    from zarr.storage import MemoryStore

    dek, envelope = new_envelope(context, readers)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / ENVELOPE, envelope)
    return MemoryStore(SealedStore(root, dek, context))


def is_sealed(root: Path) -> bool:
    return (Path(root) / ENVELOPE).is_file()


def opened_store(root: Path, context: str, keys: list[DataKey], what: str):
    """A read-only zarr store of sealed directory `root`, opened with the first of `keys` it is sealed for."""
    from zarr.storage import MemoryStore

    try:
        envelope = read_json(Path(root) / ENVELOPE)
    except (FileNotFoundError, ValueError) as exc:
        raise EnvelopeError(f"{what}: unreadable envelope ({exc})") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("recipients"), list):
        raise EnvelopeError(f"{what}: {ENVELOPE} is not an envelope")
    readers = {e.get("name") for e in envelope["recipients"] if isinstance(e, dict)}
    usable = [k for k in keys if k.name in readers] or keys[:1]
    if not usable:
        raise EnvelopeError(f"{what}: is sealed for {', '.join(sorted(map(str, readers)))}; no data key of theirs here")
    dek = open_envelope(envelope, context, usable[0], what)
    return MemoryStore(SealedStore(Path(root), dek, context), read_only=True)
