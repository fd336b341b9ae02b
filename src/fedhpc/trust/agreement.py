"""X25519 key agreement between sites: each site's agreement key, certified by its Ed25519 identity.

A site's X25519 private key is derived from its Ed25519 private key (HKDF), so a site keeps
one secret file. The public half travels as `<name>.x25519.json`, a document the site signs
with its identity key: whoever trusts the identity can trust the agreement key, and nothing
new has to go into the trust list. Pairwise seeds are HKDF outputs of the X25519 shared
secret bound to the run, the round and the (ordered) pair, so revealing one round's seed
says nothing about another round's or about the shared secret itself.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedhpc.core.files import read_json, write_json
from fedhpc.trust.signing import SignatureError, TrustStore, sign_document, verify_document

_INFO = b"fedhpc/x25519-agreement/v1"


def certificate_path(keys_dir: Path, name: str) -> Path:
    return Path(keys_dir) / f"{name}.x25519.json"


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agreement_key(identity: Ed25519PrivateKey) -> X25519PrivateKey:
    """The site's X25519 private key, derived from its Ed25519 private key."""
    return X25519PrivateKey.from_private_bytes(_hkdf(identity.private_bytes_raw(), _INFO))


def write_certificate(keys_dir: Path, name: str, identity: Ed25519PrivateKey) -> Path:
    public = agreement_key(identity).public_key().public_bytes_raw()
    doc = sign_document({"name": name, "x25519": base64.b64encode(public).decode()}, name, identity)
    path = certificate_path(keys_dir, name)
    write_json(path, doc)
    return path


def peer_public(trust: TrustStore, name: str) -> X25519PublicKey:
    """`name`'s X25519 public key, after checking that `name`'s identity signed it."""
    path = certificate_path(trust.keys_dir, name)
    if not path.is_file():
        raise SignatureError(f"no agreement key for {name!r}: {path} is missing (it comes with `fedhpc keys init`)")
    try:
        doc = read_json(path)
    except ValueError as exc:
        raise SignatureError(str(exc)) from None
    verify_document(doc, trust, name, str(path))
    if doc.get("name") != name or not isinstance(doc.get("x25519"), str):
        raise SignatureError(f"{path}: is not {name!r}'s agreement key")
    try:
        return X25519PublicKey.from_public_bytes(base64.b64decode(doc["x25519"], validate=True))
    except ValueError as exc:
        raise SignatureError(f"{path}: not an X25519 public key ({exc})") from None


def pair_seed(mine: X25519PrivateKey, theirs: X25519PublicKey, run: str, r: int, a: str, b: str) -> bytes:
    """The 32-byte seed sites `a` and `b` share for round `r` of `run` (both compute the same)."""
    lo, hi = sorted((a, b))
    info = b"fedhpc/secagg-seed/v1\0" + "\0".join((run, str(r), lo, hi)).encode()
    return _hkdf(mine.exchange(theirs), info)


def seed_commitment(seed: bytes) -> str:
    """What a site publishes in its receipt before anyone knows who dropped: binds any later reveal."""
    return hashlib.sha256(b"fedhpc/secagg-commit/v1\0" + seed).hexdigest()
