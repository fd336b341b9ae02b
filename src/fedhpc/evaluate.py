"""Held-out evaluation where the held-out data is: each holder scores a model on its own splits.

The coordinator evaluates the shared domains' splits (its manifest), every site the splits of
its own pinned data (its catalogue), and only the signed scores travel. `merge` combines the
parts into one evaluation: loss and perplexity per domain and overall, and the entropy floor.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .catalogue import load_catalogue
from .checkpoints import build_model
from .config import Config
from .errors import FedhpcError
from .files import finite_or_none, read_json, sha256_file, write_json
from .layout import RunLayout
from .loop import mean_loss, to_windows
from .model import load_exported_state
from .shards import load_manifest, read_heldout
from .signing import COORDINATOR, SignatureError, TrustStore, sign_document, verify_document
from .tensorfile import load_state


class EvaluationError(FedhpcError, ValueError):
    """An evaluation part is unsigned, for another model, or malformed."""


def heldout_of(layout: RunLayout, trust: TrustStore, holder: str) -> list[dict]:
    """The held-out splits `holder` keeps: the manifest's for the coordinator, a site's catalogue's."""
    manifest = load_manifest(layout, trust)
    if holder == COORDINATOR:
        return list(manifest["heldout"])
    doc = load_catalogue(layout, trust, holder, manifest["tokenizer"]["sha256"])
    return list(doc["heldout"]) if doc else []


def domain_losses(cfg: Config, layout: RunLayout, model_file: Path, vocab: int, entries: list[dict]) -> dict:
    """Loss, perplexity and entropy floor per domain of `entries` (hash-checked held-out splits)."""
    model = build_model(cfg, vocab)
    load_exported_state(model, load_state(model_file))
    model.eval()
    domains = {}
    for entry in sorted(entries, key=lambda e: e["domain"]):
        tokens = torch.from_numpy(read_heldout(layout, entry).astype("int64"))
        # Windows cover the first tokens_per_domain tokens: the same slice for every model.
        windows = to_windows(tokens[: cfg.evaluation.tokens_per_domain + 1], cfg.model.seq_len)
        if len(windows) == 0:
            continue
        loss = mean_loss(lambda x, y: model(x, y)[1], windows, cfg.evaluation.batch_size, torch.device("cpu"), "fp32")
        domains[entry["domain"]] = {
            "loss": finite_or_none(loss),
            "tokens": int(windows[:, 1:].numel()),
            "entropy_floor": entry.get("entropy_floor_nats_per_token"),
        }
    return domains


def evaluate_part(
    cfg: Config, layout: RunLayout, trust: TrustStore, model_file: Path, vocab: int, holder: str, out: Path, threads=1
) -> dict:
    """`holder`'s signed scores of `model_file` on the held-out splits it keeps."""
    torch.set_num_threads(threads)
    entries = heldout_of(layout, trust, holder)
    doc = {
        "holder": holder,
        "model_sha256": sha256_file(model_file),
        "domains": domain_losses(cfg, layout, model_file, vocab, entries) if entries else {},
        "created": time.time(),
    }
    doc = sign_document(doc, holder, trust.private_key(holder))
    write_json(out, doc)
    return doc


def check_part(doc: dict, trust: TrustStore, holder: str, model_sha256: str, what: str) -> dict:
    """A part after checking its signer, that it scores this model, and its numbers."""
    verify_document(doc, trust, holder, what)
    if doc.get("model_sha256") != model_sha256:
        raise EvaluationError(f"{what}: scores model {doc.get('model_sha256')!r}, not {model_sha256}")
    domains = doc.get("domains")
    if not isinstance(domains, dict):
        raise EvaluationError(f"{what}: no domain scores")
    for name, d in domains.items():
        loss, tokens = d.get("loss") if isinstance(d, dict) else None, d.get("tokens") if isinstance(d, dict) else None
        if not isinstance(tokens, int) or tokens <= 0 or (loss is not None and not (0 <= loss < 1e4)):
            raise EvaluationError(f"{what}: domain {name!r} has implausible scores {d!r}")
    return doc


def summary_of(domains: dict[str, dict]) -> dict:
    """Token-weighted loss over `domains`, with perplexity and the floor where every domain has one."""
    total = sum(d["tokens"] for d in domains.values())
    if any(d["loss"] is None for d in domains.values()):
        loss = float("nan")
    else:
        loss = sum(d["loss"] * d["tokens"] for d in domains.values()) / max(total, 1)
    floors = [d["entropy_floor"] for d in domains.values()]
    floor = (
        None
        if (not floors or None in floors)
        else sum(d["entropy_floor"] * d["tokens"] for d in domains.values()) / total
    )
    return {
        "loss": finite_or_none(loss),
        "perplexity": finite_or_none(math.exp(min(loss, 700))),
        "tokens": total,
        "entropy_floor": floor,
        "gap_to_floor": None if floor is None else finite_or_none(loss - floor),
    }


def merge(parts: dict[str, dict], model_sha256: str, missing: list[str]) -> dict:
    """One evaluation from the holders' parts. A domain split across holders (data of one
    domain at two sites) is combined token-weighted."""
    by_domain: dict[str, list[dict]] = {}
    for holder in sorted(parts):
        for name, d in parts[holder]["domains"].items():
            by_domain.setdefault(name, []).append({**d, "holder": holder})
    domains = {}
    for name in sorted(by_domain):
        ds = by_domain[name]
        s = summary_of({str(i): d for i, d in enumerate(ds)})
        domains[name] = {**s, "holders": [d["holder"] for d in ds]}
    return {
        "model_sha256": model_sha256,
        **summary_of(domains),
        "domains": domains,
        "evaluated_by": {h: sorted(p["domains"]) for h, p in sorted(parts.items())},
        "missing": missing,
    }


def comparable(a: dict, b: dict) -> tuple[float | None, float | None, list[str]]:
    """The losses of evaluations a and b over the domains both scored (so a site that could
    not evaluate one model does not make the other look better or worse)."""
    common = sorted(set(a.get("domains", {})) & set(b.get("domains", {})))
    if not common:
        return a.get("loss"), b.get("loss"), []
    la = summary_of({d: a["domains"][d] for d in common})["loss"]
    lb = summary_of({d: b["domains"][d] for d in common})["loss"]
    return la, lb, common


def expected_holders(layout: RunLayout, trust: TrustStore, sites) -> list[str]:
    """Who keeps held-out data: the coordinator (shared domains) and every catalogued site with splits."""
    manifest = load_manifest(layout, trust)
    holders = [COORDINATOR] if manifest["heldout"] else []
    for site in sorted(sites):
        doc = load_catalogue(layout, trust, site, manifest["tokenizer"]["sha256"])
        if doc and doc["heldout"]:
            holders.append(site)
    return holders


def gather_parts(
    cfg: Config,
    layout: RunLayout,
    trust: TrustStore,
    r: int,
    which: str,
    model_file: Path,
    fetch=None,
    poll_seconds: float = 1.0,
) -> dict:
    """Wait until every holder scored round r's `which` model, or `evaluation.deadline_minutes`
    after the model was written; merge what came. `fetch(holder)` pulls a part from a remote hub."""
    sha = sha256_file(model_file)
    holders = expected_holders(layout, trust, cfg.sites)
    deadline = model_file.stat().st_mtime + cfg.evaluation.deadline_minutes * 60
    parts: dict[str, dict] = {}
    refused: dict[str, str] = {}
    last_report = time.time()
    while True:
        for h in holders:
            if h in parts or h in refused:
                continue
            if fetch is not None and h != COORDINATOR:
                fetch(h)
            path = layout.eval_part(r, which, h)
            try:
                parts[h] = check_part(read_json(path), trust, h, sha, str(path))
            except FileNotFoundError:
                continue
            except (ValueError, SignatureError) as exc:
                refused[h] = str(exc)
        waiting = [h for h in holders if h not in parts and h not in refused]
        if not waiting or time.time() >= deadline:
            break
        if time.time() - last_report >= 60:
            print(f"round {r} {which}: waiting for the held-out scores of {', '.join(waiting)}", flush=True)
            last_report = time.time()
        time.sleep(poll_seconds)
    result = merge(parts, sha, [h for h in holders if h not in parts])
    result["refused"] = refused
    return result
