"""Global checkpoints and round plans: publish (coordinator-signed) and load, checking hash and signature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedhpc.core.documents import check_document
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.trust.signing import COORDINATOR, TrustStore, sign_document, verify_document


class CheckpointError(FedhpcError, ValueError):
    """A global checkpoint is missing, unsigned, or does not match its recorded hash."""


def load_plan(layout: RunLayout, trust: TrustStore, r: int) -> dict:
    """Round r's plan, after checking the coordinator's signature and the plan's schema."""
    plan = read_json(layout.plan(r))
    verify_document(plan, trust, COORDINATOR, str(layout.plan(r)))
    return check_document("plan", plan, str(layout.plan(r)))


def publish_global(layout: RunLayout, trust: TrustStore, r: int, model_file: Path, fields: dict[str, Any]) -> dict:
    """Sign and write `rounds/r/global/model.json` for a model file already in place."""
    meta = {"round": r, "sha256": sha256_file(model_file), **fields}
    meta = sign_document(meta, COORDINATOR, trust.private_key(COORDINATOR))
    write_json(layout.global_meta(r), meta)
    return meta


def load_global_meta(layout: RunLayout, trust: TrustStore, r: int, check_hash: bool = True) -> dict:
    return verified_meta(layout.global_meta(r), trust, layout.global_model(r) if check_hash else None, r)


def verified_meta(path: Path, trust: TrustStore, model: Path | None = None, r: int | None = None) -> dict:
    """A global model's coordinator-signed metadata at `path`, checked: signature, form, its round
    (when `r` is given) and the content of `model` (when given) against its sha256."""
    if not path.exists():
        raise CheckpointError(f"{path}: no global model" + (f" for round {r}" if r is not None else ""))
    meta = read_json(path, max_bytes=1 << 20)
    verify_document(meta, trust, COORDINATOR, str(path))
    check_document("global_meta", meta, str(path))
    if r is not None and meta.get("round") != r:
        raise CheckpointError(f"{path}: says round {meta.get('round')}, expected {r}")
    if model is not None and not model.exists():
        raise CheckpointError(f"{model}: not on disk; `retention:` deletes globals once later rounds are promoted")
    if model is not None and sha256_file(model) != meta["sha256"]:
        raise CheckpointError(f"{model}: content does not match the sha256 in {path}")
    return meta
