"""Schemas of the JSON documents parties exchange (receipts, plans, manifests, indexes, …), checked as hostile input.

Signatures say who wrote a document, not that it is well-formed: a site's own key can sign a
receipt whose token count is a string or 1e300. Every document read from another party is
therefore checked here first, against its schema and against size limits, and a violation is
a `DocumentError` naming the file and the field, never an exception deep inside a stage.
"""

from __future__ import annotations

import math
from typing import Any

import jsonschema

from fedhpc.core.errors import FedhpcError

MAX_DEPTH = 32
MAX_STRING = 1 << 16
MAX_ITEMS = 1 << 20

NAME = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"}
LABEL = {"type": "string", "minLength": 1, "maxLength": 512}
SHARD_ID = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"}
SHA = {"type": "string", "pattern": r"^[0-9a-f]{64}$"}
COUNT = {"type": "integer", "minimum": 0, "maximum": 2**62}
ROUND = {"type": "integer", "minimum": 0, "maximum": 9999}
NUM = {"type": "number", "minimum": -1e300, "maximum": 1e300}
NONNEG = {"type": "number", "minimum": 0, "maximum": 1e300}
REL_PATH = {"type": "string", "pattern": r"^(?!/)(?!.*(^|/)\.\.(/|$))[^\x00]{1,1024}$"}


def _nullable(s: dict) -> dict:
    return {"anyOf": [s, {"type": "null"}]}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None, extra: bool = True) -> dict:
    return {
        "type": "object",
        "required": sorted(required),
        "properties": {**required, **(optional or {})},
        "additionalProperties": extra,
    }


DTYPE = {"enum": ["uint16", "uint32", None]}  # None: a task's own file format
SHARD_ENTRY = _obj(
    {
        "id": SHARD_ID,
        "path": REL_PATH,
        "tokens": COUNT,
        "domain": LABEL,
        "sha256": SHA,
        "dtype": DTYPE,
        "residency": _nullable(NAME),
    },
    {
        "language": LABEL,
        "source": {"type": "string"},
        "licence": LABEL,
        "sealed_for": {"type": "array", "items": NAME},
    },
)
HELDOUT_ENTRY = _obj(
    {"domain": LABEL, "path": REL_PATH, "tokens": COUNT, "sha256": SHA},
    {"dtype": DTYPE, "residency": _nullable(NAME), "kind": LABEL, "sealed_for": {"type": "array", "items": NAME}},
)

SCHEMAS: dict[str, dict] = {
    "receipt": _obj(
        {
            "run": LABEL,
            "round": ROUND,
            "site": NAME,
            "base_sha256": SHA,
            "update_sha256": SHA,
            "tokens": COUNT,
            "steps": COUNT,
            "shards": {"type": "array", "items": SHARD_ID, "maxItems": 100_000},
        },
        {
            "base_round": ROUND,
            "sequences": COUNT,
            "update_bytes": COUNT,
            "control_sha256": _nullable(SHA),
            "compression": {"enum": ["none", "bf16", "fp16", "int8", "topk"]},
            "loss_before": _nullable(NUM),
            "loss_after": _nullable(NUM),
            "lr_first": NONNEG,
            "lr_last": NONNEG,
            "lr_sum": NONNEG,
            "tokens_per_second": NONNEG,
            "ranks": {"type": "integer", "minimum": 1},
            "secure_aggregation": {"type": "object"},
        },
    ),
    "plan": _obj(
        {
            "round": ROUND,
            "run": LABEL,
            "created": NUM,
            "participants": {"type": "array", "items": NAME},
            "sites": {
                "type": "object",
                "propertyNames": NAME,
                "additionalProperties": _obj(
                    {"shards": {"type": "array", "items": SHARD_ID}}, {"tokens": COUNT, "micro_batch": COUNT}
                ),
            },
        }
    ),
    "manifest": _obj(
        {
            "version": {"type": "integer"},
            # null: a task whose data is its own files, not token shards
            "tokenizer": _nullable(
                _obj({"vocab_size": {"type": "integer", "minimum": 1}, "eos_id": COUNT, "sha256": SHA})
            ),
            "shards": {"type": "array", "items": SHARD_ENTRY},
            "heldout": {"type": "array", "items": HELDOUT_ENTRY},
        }
    ),
    "catalogue": _obj(
        {
            "version": {"type": "integer"},
            "site": NAME,
            "tokenizer_sha256": _nullable(SHA),
            "shards": {"type": "array", "items": SHARD_ENTRY},
            "heldout": {"type": "array", "items": HELDOUT_ENTRY},
        },
        {"created": NUM},
    ),
    "eval_part": _obj(
        {
            "holder": NAME,
            "model_sha256": SHA,
            "domains": {
                "type": "object",
                "maxProperties": 10_000,
                "additionalProperties": _obj({"tokens": {"type": "integer", "minimum": 1}, "loss": _nullable(NONNEG)}),
            },
        },
        {"created": NUM, "guards": {"type": "object"}, "evaluators": {"type": "object"}},
    ),
    "bundle_index": _obj(
        {
            "files": {
                "type": "object",
                "maxProperties": 10_000,
                "additionalProperties": _obj({"sha256": SHA, "bytes": COUNT}),
            }
        },
        {"created": NUM},
    ),
    "global_meta": _obj(
        {"round": ROUND, "sha256": SHA},
        {"parent_sha256": _nullable(SHA), "vocab_size": {"type": "integer", "minimum": 1}, "from_round": ROUND},
    ),
    "retention": _obj(
        {
            "run": LABEL,
            "round": ROUND,
            "pruned": {
                "type": "object",
                "propertyNames": REL_PATH,
                "additionalProperties": _obj({"sha256": _nullable(SHA)}),
            },
        }
    ),
    "ledger_head": _obj({"run": LABEL, "round": ROUND, "lines": COUNT, "hash": SHA, "time": NUM}),
}

_VALIDATORS = {k: jsonschema.Draft202012Validator(v) for k, v in SCHEMAS.items()}


class DocumentError(FedhpcError, ValueError):
    """A document from another party is malformed; the message names the file and the field."""


def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(top level)"


def sane(value: Any, what: str) -> None:
    """Limits every document shares: depth, string and array sizes, finite numbers."""
    stack = [(value, 0, ())]
    while stack:
        v, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise DocumentError(f"{what}: nested deeper than {MAX_DEPTH} levels at {_where(path)}")
        if isinstance(v, str) and len(v) > MAX_STRING:
            raise DocumentError(f"{what}: string of {len(v)} characters at {_where(path)}")
        elif isinstance(v, float) and not math.isfinite(v):
            raise DocumentError(f"{what}: {v} at {_where(path)} is not a finite number")
        elif isinstance(v, dict):
            if len(v) > MAX_ITEMS:
                raise DocumentError(f"{what}: object of {len(v)} keys at {_where(path)}")
            stack.extend((x, depth + 1, (*path, k)) for k, x in v.items())
        elif isinstance(v, list):
            if len(v) > MAX_ITEMS:
                raise DocumentError(f"{what}: array of {len(v)} items at {_where(path)}")
            stack.extend((x, depth + 1, (*path, i)) for i, x in enumerate(v))


def check_document(kind: str, doc: Any, what: str) -> dict:
    """`doc` if it is a well-formed document of `kind`, else a DocumentError naming `what` and the field."""
    sane(doc, what)
    errors = sorted(_VALIDATORS[kind].iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        e = errors[0]
        msg = e.message if len(e.message) <= 200 else e.message[:200] + "…"
        raise DocumentError(f"{what}: not a valid {kind.replace('_', ' ')}: {_where(e.absolute_path)}: {msg}")
    return doc
