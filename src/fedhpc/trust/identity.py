"""A party's identity on disk: its Ed25519 key pair and its certified X25519 agreement key."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedhpc.core.files import atomic_path
from fedhpc.trust.agreement import write_certificate
from fedhpc.trust.keyfiles import private_dir, write_secret
from fedhpc.trust.signing import public_b64


def create_keypair(keys_dir: str | os.PathLike, name: str, overwrite: bool = False) -> Path:
    """Write `<name>.key` (mode 0600), `<name>.pub` and the agreement-key certificate
    `<name>.x25519.json` into `keys_dir` (mode 0700 when created); return the key path."""
    keys_dir = private_dir(keys_dir)
    key_path, pub_path = keys_dir / f"{name}.key", keys_dir / f"{name}.pub"
    if key_path.exists() and not overwrite:
        raise FileExistsError(f"{key_path} already exists; refusing to replace an identity")
    key = Ed25519PrivateKey.generate()
    write_secret(key_path, base64.b64encode(key.private_bytes_raw()).decode() + "\n")
    with atomic_path(pub_path) as tmp:
        tmp.write_text(public_b64(key.public_key()) + "\n")
    write_certificate(keys_dir, name, key)
    return key_path
