"""Ed25519 signatures embedded in JSON documents, the keys that make them and the trust list that checks them."""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import canonical_json
from fedhpc.trust.envelope import MissingDataKey, load_data_key
from fedhpc.trust.keyfiles import check_private_file

COORDINATOR = "coordinator"


class SignatureError(FedhpcError, ValueError):
    """A document is unsigned, signed by the wrong party, or its signature does not verify."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def public_b64(key: Ed25519PublicKey) -> str:
    """A public key as the trust list holds it."""
    return _b64(key.public_bytes_raw())


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    path = Path(path)
    check_private_file(path)
    try:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(path.read_text().strip(), validate=True))
    except ValueError as exc:
        raise ValueError(f"{path}: not an Ed25519 private key ({exc})") from None


def parse_public_key(text: str, where: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except ValueError as exc:
        raise SignatureError(f"{where}: not an Ed25519 public key ({exc})") from None


def load_public_key(path: str | os.PathLike) -> Ed25519PublicKey:
    path = Path(path)
    return parse_public_key(path.read_text(), str(path))


class TrustStore:
    """Public keys of the coordinator and every site.

    With a trust list (`trust.public_keys`: name → base64 Ed25519 key) only the listed
    identities exist and `.pub` files are ignored; without one, `<keys_dir>/<name>.pub`
    files are trusted (the single-machine demo). Private keys always come from
    `<keys_dir>/<name>.key`.
    """

    def __init__(self, keys_dir: str | os.PathLike, public_keys: Mapping[str, str] | None = None, encryption=None):
        self.keys_dir = Path(keys_dir)
        self.listed = dict(public_keys or {})
        self.encryption = encryption  # config.EncryptionConfig: where data keys come from

    def data_key(self, name: str):
        """`name`'s data key (envelope.DataKey) from its environment variable or file."""
        enc = self.encryption
        return load_data_key(
            name, enc.key_file if enc else None, enc.key_env if enc else "FEDHPC_DATA_KEY_{NAME}", self.keys_dir
        )

    def data_keys(self, names) -> list:
        """The data keys of `names` that this machine holds (a site holds its own only)."""
        out = []
        for name in names:
            try:
                out.append(self.data_key(name))
            except MissingDataKey:
                continue  # a key present but malformed or too open is an error, not skipped
        return out

    def knows(self, name: str) -> bool:
        return name in self.listed if self.listed else (self.keys_dir / f"{name}.pub").is_file()

    def public_key(self, name: str) -> Ed25519PublicKey:
        if self.listed:
            if name not in self.listed:
                raise SignatureError(
                    f"unknown signer {name!r}: not in the trust list (trust.public_keys: {', '.join(sorted(self.listed))})"
                )
            return parse_public_key(self.listed[name], f"trust.public_keys.{name}")
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
        key = load_private_key(path)
        if name in self.listed and public_b64(key.public_key()) != self.listed[name].strip():
            raise SignatureError(
                f"{path} is not the identity trust.public_keys.{name} lists (its public key is "
                f"{public_b64(key.public_key())}); signatures made with it would be refused"
            )
        return key


def sign_bytes(key: Ed25519PrivateKey, data: bytes) -> str:
    return _b64(key.sign(data))


def verify_bytes(public: Ed25519PublicKey, data: bytes, signature_b64: str, what: str) -> None:
    try:
        public.verify(base64.b64decode(signature_b64, validate=True), data)
    except (InvalidSignature, ValueError, TypeError):
        raise SignatureError(f"{what}: signature does not verify") from None


def sign_document(doc: dict[str, Any], signer: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of `doc` with a `signature` over its canonical JSON (without the signature)."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return {**body, "signature": {"signer": signer, "alg": "ed25519", "value": sign_bytes(key, canonical_json(body))}}


def verify_document(doc: dict[str, Any], trust: TrustStore, expected_signer: str, what: str) -> None:
    """Raise SignatureError unless `doc` carries a valid signature by `expected_signer`."""
    if not isinstance(doc, dict):
        raise SignatureError(f"{what}: not a JSON object")
    sig = doc.get("signature")
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        raise SignatureError(f"{what}: unsigned")
    signer = sig.get("signer")
    if signer != expected_signer:
        known = isinstance(signer, str) and trust.knows(signer)
        raise SignatureError(
            f"{what}: signed by {signer!r}{'' if known else ' (an unknown signer)'}, expected {expected_signer!r}"
        )
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        data = canonical_json(body)
    except (ValueError, TypeError):
        raise SignatureError(f"{what}: holds values JSON cannot sign (NaN or Infinity)") from None
    verify_bytes(trust.public_key(expected_signer), data, sig["value"], what)
