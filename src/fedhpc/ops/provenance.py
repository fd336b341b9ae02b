"""Provenance of a global model: the rounds, sites, shards and verdicts it was made from, each checked.

Walks back from a global model through the coordinator-signed metadata of every global
before it (aggregate → the round that made it, rollback → the model it kept, init → the
start). For each contributing round it takes the aggregation record, the signed verdicts and
the site-signed receipts of the updates that were summed, and from the receipts' shards the
manifest's data entries (source, licence, domain, language). Every signature and every hash
link is checked on the way; anything that does not check out is a ProvenanceError naming the
file, because a provenance record one cannot trust is worse than none.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from fedhpc.core.documents import check_document
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, sha256_file, write_bytes, write_json
from fedhpc.core.layout import RunLayout, round_index
from fedhpc.data.catalogue import catalogue_sites, load_data
from fedhpc.trust.checkpoints import load_global_meta
from fedhpc.trust.ledger import verify_run
from fedhpc.trust.modelcard import model_card
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore, sign_document, verify_document

_LATE = re.compile(r"^(?P<site>.+)@r(?P<round>\d{4})$")


class ProvenanceError(FedhpcError, ValueError):
    """A link of a model's provenance is missing, unsigned or does not match; names the file."""


def locate(path: str | Path) -> tuple[Path, int]:
    """(run directory, round) of a global model file, its `global/` directory or its round directory."""
    # Not resolve(): a promoted global is a symlink to its candidate, whose path names no global.
    p = Path(os.path.abspath(path))
    parts = p.parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] == "rounds" and re.fullmatch(r"r\d{4}", parts[i]):
            rest = parts[i + 1 :]
            if rest not in ((), ("global",), ("global", "model.safetensors")):
                break
            return Path(*parts[: i - 1]), round_index(parts[i])
    raise ProvenanceError(
        f"{path}: not a global model of a run (expected <run>/rounds/rNNNN[/global[/model.safetensors]])"
    )


def _signed(path: Path, trust: TrustStore, signer: str) -> dict:
    try:
        doc = read_json(path, max_bytes=16 << 20)
        verify_document(doc, trust, signer, str(path))
    except FileNotFoundError:
        raise ProvenanceError(f"{path}: missing") from None
    except (ValueError, SignatureError) as exc:
        raise ProvenanceError(str(exc)) from None
    return doc


class Pruned(NamedTuple):
    """A file retention deleted: the sha256 its signed record gave, and that record."""

    sha256: str | None
    record: Path


def pruned_files(layout: RunLayout, trust: TrustStore) -> dict[str, Pruned]:
    """Every file retention deleted (path in the run → its hash and record), from the coordinator-signed
    retention records of the rounds."""
    out: dict[str, Pruned] = {}
    for r in layout.rounds_present():
        if layout.retention(r).exists():
            record = _signed(layout.retention(r), trust, COORDINATOR)
            check_document("retention", record, str(layout.retention(r)))
            out.update({path: Pruned(item["sha256"], layout.retention(r)) for path, item in record["pruned"].items()})
    return out


def _stored_as(layout: RunLayout, pruned: dict, path: Path, sha: str) -> bool | None:
    """True if `path` holds the file with `sha`, None if retention deleted that file (its signed record
    says so, with that hash), False otherwise (missing without a record, or other bytes)."""
    if path.exists():
        return True if sha256_file(path) == sha else False
    item = pruned.get(str(path.relative_to(layout.root)))
    return None if item is not None and item.sha256 == sha else False


def _global(layout: RunLayout, trust: TrustStore, pruned: dict, g: int) -> tuple[dict, bool]:
    """Global g's signed metadata, its model's hash checked when the model is still on disk; and whether it is."""
    model = layout.global_model(g)
    try:
        meta = load_global_meta(layout, trust, g, check_hash=model.exists())
    except (FedhpcError, ValueError, FileNotFoundError) as exc:
        raise ProvenanceError(str(exc)) from None
    if not model.exists() and _stored_as(layout, pruned, model, meta["sha256"]) is False:
        raise ProvenanceError(f"{model}: missing, and no retention record says it was deleted")
    return meta, model.exists()


def _contributions(layout: RunLayout, trust: TrustStore, k: int, shards: dict, pruned: dict) -> dict:
    """What round k's aggregate was made of, every document checked."""
    record = read_json(layout.aggregate_record(k))
    verdicts = read_json(layout.verdicts(k))
    if _stored_as(layout, pruned, layout.candidate(k), record["output_sha256"]) is False:
        raise ProvenanceError(f"{layout.candidate(k)}: not the model {layout.aggregate_record(k)} records")
    sites = {}
    for label, weight in sorted(record["weights"].items()):
        m = _LATE.match(label)
        site, r = (m["site"], int(m["round"])) if m else (label, k)
        verdict_path = layout.late_verdict(k, site, r) if m else layout.verdict(k, site)
        verdict = _signed(verdict_path, trust, COORDINATOR)
        if not verdict.get("accepted"):
            raise ProvenanceError(f"{verdict_path}: {label} was summed in round {k} but its verdict rejects it")
        receipt = _signed(layout.receipt(r, site), trust, site)
        stored = _stored_as(layout, pruned, layout.update(r, site), receipt["update_sha256"])
        if stored is False or (verdict.get("update_sha256") not in (None, receipt["update_sha256"])):
            raise ProvenanceError(f"{layout.update(r, site)}: not the update its receipt and verdict name")
        entries = [shards.get(sid) for sid in receipt["shards"]]
        if None in entries:
            raise ProvenanceError(
                f"{layout.receipt(r, site)}: names shards neither the manifest nor a site's catalogue lists"
            )
        sites[label] = {
            "site": site,
            "trained_in_round": r,
            "weight": weight,
            "tokens": receipt["tokens"],
            "steps": receipt["steps"],
            "shards": receipt["shards"],
            "update_sha256": receipt["update_sha256"],
            "update_stored": stored is True,
            "loss_before": receipt.get("loss_before"),
            "loss_after": receipt.get("loss_after"),
            "flags": verdict.get("flags", []),
        }
    return {
        "round": k,
        "strategy": record["strategy"],
        "rule": record["rule"],
        "weighting": record.get("weighting"),
        "contributors": sites,
        "rejected": verdicts.get("rejected", {}) | verdicts.get("late_rejected", {}),
        "missing": record.get("missing", []),
        "secure_aggregation": record.get("secure_aggregation"),
        "dp_epsilon": (record.get("privacy") or {}).get("epsilon"),
        "base_sha256": record["base_sha256"],
        "output_sha256": record["output_sha256"],
    }


def trace(root: str | Path, g: int, trust: TrustStore) -> dict:
    """The provenance record of global model g of the run in `root`."""
    layout = RunLayout.of(root)
    pruned = pruned_files(layout, trust)
    meta, stored = _global(layout, trust, pruned, g)
    try:
        # The shared shards of the manifest and each site's own, from its signed catalogue.
        manifest = load_data(layout, trust, catalogue_sites(layout))
    except (FedhpcError, ValueError, FileNotFoundError) as exc:
        raise ProvenanceError(str(exc)) from None
    shards = {s["id"]: s for s in manifest["shards"]}
    lineage, rounds, k, cur = [], [], g, meta
    while True:
        lineage.append(
            {
                "global": k,
                "sha256": cur["sha256"],
                "source": cur.get("source"),
                "reason": cur.get("reason"),
                "stored": stored,
            }
        )
        if cur.get("source") == "init" or k == 0:
            break
        prev, stored = _global(layout, trust, pruned, k - 1)
        if cur.get("parent_sha256") != prev["sha256"]:
            raise ProvenanceError(
                f"{layout.global_meta(k)}: its parent is not global {k - 1} ({layout.global_meta(k - 1)})"
            )
        if cur.get("source") == "aggregate":
            c = _contributions(layout, trust, k - 1, shards, pruned)
            if c["output_sha256"] != cur["sha256"] or c["base_sha256"] != prev["sha256"]:
                raise ProvenanceError(f"{layout.aggregate_record(k - 1)}: does not link global {k - 1} to global {k}")
            rounds.append(c)
        elif cur.get("source") == "rollback":
            if cur["sha256"] != prev["sha256"]:
                raise ProvenanceError(f"{layout.global_meta(k)}: a rollback whose model is not global {k - 1}'s")
        k, cur = k - 1, prev
    rounds.reverse()
    ledger = verify_run(layout.root, trust, meta.get("run"))
    return {
        "run": meta.get("run"),
        "global_round": g,
        "model_sha256": meta["sha256"],
        "model": meta.get("model"),
        "parameters": meta.get("parameters"),
        "vocab_size": meta.get("vocab_size"),
        "tokenizer": manifest["tokenizer"],
        "lineage": lineage,
        "rounds": rounds,
        "data": data_summary(rounds, shards),
        "evaluation": read_json(layout.global_eval(g)) if layout.global_eval(g).exists() else None,
        "ledger": {"intact": ledger.ok, "events": ledger.lines, "signed_heads": ledger.heads, "problem": ledger.reason},
        "generated_at": time.time(),
    }


def data_summary(rounds: list[dict], shards: dict) -> dict:
    """Tokens trained that reached the model, per source, domain, language, licence and site."""
    by_source: dict = defaultdict(lambda: {"tokens": 0, "shards": set(), "sites": set()})
    per_site: dict = defaultdict(lambda: {"tokens": 0, "rounds": set()})
    for c in rounds:
        for item in c["contributors"].values():
            planned = sum(shards[sid]["tokens"] for sid in item["shards"]) or 1
            for sid in item["shards"]:
                e = shards[sid]
                key = (e.get("source"), e.get("licence"), e["domain"], e.get("language"), e.get("residency"))
                # The site trained `tokens` of its shards' tokens; share them out by shard size.
                by_source[key]["tokens"] += item["tokens"] * e["tokens"] / planned
                by_source[key]["shards"].add(sid)
                by_source[key]["sites"].add(item["site"])
            per_site[item["site"]]["tokens"] += item["tokens"]
            per_site[item["site"]]["rounds"].add(c["round"])
    sources = [
        {
            "source": k[0],
            "licence": k[1],
            "domain": k[2],
            "language": k[3],
            "residency": k[4],
            "tokens_trained": round(v["tokens"]),
            "shards": sorted(v["shards"]),
            "trained_at": sorted(v["sites"]),
        }
        for k, v in sorted(by_source.items(), key=lambda kv: tuple(str(x) for x in kv[0]))
    ]
    moved = [
        f"{s['source']} (held at {s['residency']}, trained at {', '.join(s['trained_at'])})"
        for s in sources
        if s["residency"] and s["trained_at"] != [s["residency"]]
    ]
    return {
        "residency_violations": moved,
        "sources": sources,
        "tokens_trained": sum(s["tokens_trained"] for s in sources),
        "sites": {s: {"tokens": v["tokens"], "rounds": sorted(v["rounds"])} for s, v in sorted(per_site.items())},
        "licences": sorted({str(s["licence"]) for s in sources}),
        "domains": sorted({s["domain"] for s in sources}),
        "languages": sorted({str(s["language"]) for s in sources}),
    }


def write_provenance(root: Path, g: int, trust: TrustStore, cfg, out: Path | None = None) -> tuple[Path, Path]:
    """provenance.json (coordinator-signed when its key is here) and MODEL_CARD.md beside the model."""

    record = trace(root, g, trust)
    out = out or RunLayout.of(root).global_model(g).parent
    if (trust.keys_dir / f"{COORDINATOR}.key").exists():
        record = sign_document(record, COORDINATOR, trust.private_key(COORDINATOR))
    write_json(out / "provenance.json", record)
    card = out / "MODEL_CARD.md"
    card.parent.mkdir(parents=True, exist_ok=True)

    write_bytes(card, model_card(record, cfg).encode())
    return out / "provenance.json", card
