"""Ed25519 identities: key files, and signatures embedded in JSON documents."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import FedhpcError
from .files import atomic_path, canonical_json

COORDINATOR = "coordinator"


class SignatureError(FedhpcError, ValueError):
    """A document is unsigned, signed by the wrong party, or its signature does not verify."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def create_keypair(keys_dir: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Write `<name>.key` (mode 0600) and `<name>.pub` into `keys_dir`; return the key path."""
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = keys_dir / f"{name}.key", keys_dir / f"{name}.pub"
    if key_path.exists() and not overwrite:
        raise FileExistsError(f"{key_path} already exists; refusing to replace an identity")
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    with atomic_path(key_path) as tmp:
        os.chmod(tmp, 0o600)
        tmp.write_text(_b64(raw) + "\n")
    with atomic_path(pub_path) as tmp:
        tmp.write_text(_b64(key.public_key().public_bytes_raw()) + "\n")
    return key_path


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    path = Path(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(
            f"{path}: private key is readable by others (mode {oct(mode & 0o777)}); run chmod 600 {path}"
        )
    try:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(path.read_text().strip(), validate=True))
    except ValueError as exc:
        raise ValueError(f"{path}: not an Ed25519 private key ({exc})") from None


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    path = Path(path)
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(path.read_text().strip(), validate=True))
    except ValueError as exc:
        raise ValueError(f"{path}: not an Ed25519 public key ({exc})") from None


class TrustStore:
    """Public keys of the coordinator and every site, read from `<name>.pub` files in one directory."""

    def __init__(self, keys_dir: str | os.PathLike):
        self.keys_dir = Path(keys_dir)

    def public_key(self, name: str) -> Ed25519PublicKey:
        path = self.keys_dir / f"{name}.pub"
        if not path.is_file():
            raise SignatureError(f"unknown signer {name!r}: no public key {path}")
        return load_public_key(path)

    def private_key(self, name: str) -> Ed25519PrivateKey:
        path = self.keys_dir / f"{name}.key"
        if not path.is_file():
            raise FileNotFoundError(
                f"no private key for {name!r} at {path}; create it with `fedhpc keys init --site {name}`"
            )
        return load_private_key(path)


def sign_bytes(key: Ed25519PrivateKey, data: bytes) -> str:
    return _b64(key.sign(data))


def verify_bytes(public: Ed25519PublicKey, data: bytes, signature_b64: str, what: str) -> None:
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError):
        raise SignatureError(f"{what}: signature does not verify") from None


def sign_document(doc: dict[str, Any], signer: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of `doc` with a `signature` over its canonical JSON (without the signature)."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return {**body, "signature": {"signer": signer, "alg": "ed25519", "value": sign_bytes(key, canonical_json(body))}}


def verify_document(doc: dict[str, Any], trust: TrustStore, expected_signer: str, what: str) -> None:
    """Raise SignatureError unless `doc` carries a valid signature by `expected_signer`."""
    sig = doc.get("signature")
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        raise SignatureError(f"{what}: unsigned")
    if sig.get("signer") != expected_signer:
        raise SignatureError(f"{what}: signed by {sig.get('signer')!r}, expected {expected_signer!r}")
    body = {k: v for k, v in doc.items() if k != "signature"}
    verify_bytes(trust.public_key(expected_signer), canonical_json(body), sig["value"], what)
