"""Held-out evaluation where the held-out data is: each holder scores a model on its own splits.

The coordinator scores the shared domains' splits (its manifest), every site the splits of its
own pinned data (its catalogue): the task's metrics, then every configured evaluator. Only the
signed scores travel; `merge` combines the parts per domain and overall for the gate.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedhpc.config.federation import Config
from fedhpc.core.documents import check_document
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.core.scores import summary_of
from fedhpc.data.catalogue import load_catalogue, load_data, tokenizer_sha256
from fedhpc.data.shards import load_manifest, read_heldout
from fedhpc.data.taskdata import verified_file
from fedhpc.exchange.hub import eval_fetcher
from fedhpc.stages.context import Ctx, blackboard_poll
from fedhpc.tasks import EvalContext, load_task
from fedhpc.tasks.evaluators import run_evaluators
from fedhpc.trust.checkpoints import load_global_meta
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore, sign_document, verify_document

# Fields of a part that are about the part, or recomputed from its domains when parts merge.
_OWN = {"holder", "model_sha256", "created", "signature", "domains", "guards", "evaluators"}
_SUMMARY = {"loss", "perplexity", "tokens", "entropy_floor", "gap_to_floor"}


class EvaluationError(FedhpcError, ValueError):
    """An evaluation part is unsigned, for another model, or malformed."""


def heldout_of(layout: RunLayout, trust: TrustStore, holder: str) -> list[dict]:
    """The held-out splits `holder` keeps: the manifest's for the coordinator, a site's catalogue's."""
    manifest = load_manifest(layout, trust)
    if holder == COORDINATOR:
        return list(manifest["heldout"])
    doc = load_catalogue(layout, trust, holder, tokenizer_sha256(manifest))
    return list(doc["heldout"]) if doc else []


def score(cfg: Config, layout: RunLayout, trust: TrustStore, model_file: Path, meta: dict, holder: str, threads=1):
    """The task's metrics and every evaluator's on the held-out splits `holder` keeps ({} if none)."""
    entries = heldout_of(layout, trust, holder)
    if not entries:
        return {"domains": {}}
    task = load_task(cfg)
    view = load_data(layout, trust, [] if holder == COORDINATOR else [holder])
    view["heldout"] = entries

    def heldout(entry: dict):
        if task.uses_tokens:
            return read_heldout(layout, entry, trust=trust)
        return verified_file(layout, entry, f"held-out split {entry['domain']}")

    ec = EvalContext(cfg, layout, view, Path(model_file), meta, threads, heldout)
    result = dict(task.evaluate(ec))
    result.setdefault("domains", {})
    guards = dict(result.get("guards") or {})
    evaluated, gated = run_evaluators(cfg, task, ec, result)
    if evaluated:
        result["evaluators"] = evaluated
    guards.update(gated)
    result["guards"] = guards
    return result


def evaluate_part(
    cfg: Config, layout: RunLayout, trust: TrustStore, model_file: Path, meta: dict, holder: str, out: Path, threads=1
) -> dict:
    """`holder`'s signed scores of `model_file` on the held-out splits it keeps."""
    result = score(cfg, layout, trust, model_file, meta, holder, threads)
    doc = {**result, "holder": holder, "model_sha256": sha256_file(model_file), "created": time.time()}
    doc = sign_document(doc, holder, trust.private_key(holder))
    write_json(out, doc)
    return doc


def evaluate_model(
    cfg: Config, layout: RunLayout, trust: TrustStore, model_file: Path, meta: dict, threads: int = 1
) -> dict:
    """Every holder's scores computed here and merged: for a run directory that holds all the data."""
    sha = sha256_file(model_file)
    parts = {
        h: {**score(cfg, layout, trust, model_file, meta, h, threads), "holder": h}
        for h in expected_holders(layout, trust, cfg.sites)
    }
    return merge(parts, sha, [])


def check_part(doc: dict, trust: TrustStore, holder: str, model_sha256: str, what: str) -> dict:
    """A part after checking its signer, that it scores this model, and its numbers."""
    verify_document(doc, trust, holder, what)
    check_document("eval_part", doc, what)
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


def _weighted(ds: list[dict]) -> dict:
    """One domain scored by several holders: its numbers token-weighted, loss and floor recomputed."""
    if len(ds) == 1:
        return dict(ds[0])
    common = set.intersection(*(set(d) for d in ds))
    out = {
        k: sum(d[k] * d["tokens"] for d in ds) / sum(d["tokens"] for d in ds)
        for k in sorted(common - _SUMMARY)
        if all(isinstance(d[k], (int, float)) and not isinstance(d[k], bool) for d in ds)
    }
    return {**out, **summary_of({str(i): d for i, d in enumerate(ds)})}


def _merge_evaluator(results: dict[str, dict]) -> dict:
    """An evaluator's results from several holders ({holder: result}): per-group numbers pooled
    by tokens, `ok` only if every holder's is; other values kept where the holders agree, and
    per holder (`by_holder`) where they differ."""
    if len(results) == 1:
        return next(iter(results.values()))
    groups: dict[str, list[dict]] = {}
    for res in results.values():
        for g, v in (res.get("groups") or {}).items():
            groups.setdefault(g, []).append(v)
    merged: dict[str, Any] = {}
    if groups:
        merged["groups"] = {}
        for g, vs in sorted(groups.items()):
            pooled = _weighted([{**v, "entropy_floor": None} for v in vs])
            merged["groups"][g] = {k: v for k, v in pooled.items() if k not in ("entropy_floor", "gap_to_floor")}
    if any("ok" in r for r in results.values()):
        merged["ok"] = all(r.get("ok", True) for r in results.values())
        reasons = {h: r["reason"] for h, r in results.items() if r.get("reason")}
        if len(set(reasons.values())) <= 1:
            merged["reason"] = next(iter(reasons.values()), "")
        else:
            merged["reason"] = "; ".join(f"{h}: {why}" for h, why in reasons.items())
    for key in sorted({k for r in results.values() for k in r} - {"groups", "ok", "reason"}):
        values = {h: r[key] for h, r in results.items() if key in r}
        if len({repr(v) for v in values.values()}) == 1:
            merged[key] = next(iter(values.values()))
        else:
            merged.setdefault("by_holder", {})[key] = values
    return merged


def merge(parts: dict[str, dict], model_sha256: str, missing: list[str]) -> dict:
    """One evaluation from the holders' parts. A domain split across holders (data of one
    domain at two sites) is combined token-weighted; the task's other metrics, guards and
    evaluators come from the holders that computed them (the coordinator's first)."""
    order = sorted(parts, key=lambda h: (h != COORDINATOR, h))
    by_domain: dict[str, list[dict]] = {}
    for holder in order:
        for name, d in parts[holder]["domains"].items():
            by_domain.setdefault(name, []).append({**d, "holder": holder})
    domains = {}
    for name in sorted(by_domain):
        ds = by_domain[name]
        domains[name] = {**_weighted([{k: v for k, v in d.items() if k != "holder"} for d in ds])}
        domains[name]["holders"] = [d["holder"] for d in ds]
    extras: dict[str, Any] = {}
    guards: dict[str, Any] = {}
    evaluators: dict[str, dict[str, dict]] = {}
    for holder in order:
        p = parts[holder]
        for k, v in p.items():
            if k not in _OWN and k not in _SUMMARY:
                extras.setdefault(k, v)
        for name, g in (p.get("guards") or {}).items():
            if g.get("evaluator"):
                guards.setdefault(name, g)  # one per evaluator: its verdict follows the merged result
            else:
                guards[name if name not in guards else f"{name}@{holder}"] = g
        for label, res in (p.get("evaluators") or {}).items():
            evaluators.setdefault(label, {})[holder] = res
    merged_evaluators = {label: _merge_evaluator(rs) for label, rs in evaluators.items()}
    for label, res in merged_evaluators.items():  # an evaluator's gate follows its merged verdict
        if label in guards and guards[label].get("evaluator"):
            guards[label] = {**guards[label], "ok": res.get("ok", True), "reason": res.get("reason", "")}
    result = {
        "model_sha256": model_sha256,
        **extras,
        **summary_of(domains),
        "domains": domains,
        "guards": guards,
        "evaluated_by": {h: sorted(parts[h]["domains"]) for h in order},
        "missing": missing,
    }
    if merged_evaluators:
        result["evaluators"] = merged_evaluators
    return result


def comparable(a: dict, b: dict) -> tuple[float | None, float | None, list[str]]:
    """The losses of evaluations a and b over the domains both scored (so a site that could
    not evaluate one model does not make the other look better or worse)."""
    common = sorted(set(a.get("domains", {})) & set(b.get("domains", {})))
    if not common or set(common) == set(a.get("domains", {})) == set(b.get("domains", {})):
        return a.get("loss"), b.get("loss"), []
    la = summary_of({d: a["domains"][d] for d in common})["loss"]
    lb = summary_of({d: b["domains"][d] for d in common})["loss"]
    return la, lb, common


def expected_holders(layout: RunLayout, trust: TrustStore, sites) -> list[str]:
    """Who keeps held-out data: the coordinator (shared domains) and every catalogued site with splits."""
    manifest = load_manifest(layout, trust)
    holders = [COORDINATOR] if manifest["heldout"] else []
    for site in sorted(sites):
        doc = load_catalogue(layout, trust, site, tokenizer_sha256(manifest))
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
    # The sites that hold held-out data are those whose catalogues round r was planned from.
    planned = read_json(layout.plan(r)).get("catalogues", {}) if layout.plan(r).exists() else cfg.sites
    holders = expected_holders(layout, trust, planned)
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


def model_of(layout: RunLayout, r: int, which: str) -> Path:
    """Round r's global model or its candidate."""
    return layout.global_model(r) if which == "global" else layout.candidate(r)


def run(ctx: Ctx, r: int, which: str, site: str | None = None, threads: int = 1) -> dict:
    """The evaluate stage: the signed scores of round r's `which` model on the held-out data this
    party keeps (`site`, or the coordinator's shared splits); returns the part."""
    holder = site or COORDINATOR
    meta = load_global_meta(ctx.layout, ctx.trust, r)
    out = ctx.layout.eval_part(r, which, holder)
    return evaluate_part(ctx.cfg, ctx.layout, ctx.trust, model_of(ctx.layout, r, which), meta, holder, out, threads)


def run_merge(ctx: Ctx, r: int, which: str) -> dict:
    """The evaluate stage's merge: every holder's part of round r's `which` model (or what came by
    the deadline), merged per domain into its eval.json; returns it."""
    layout = ctx.layout
    out = layout.global_eval(r) if which == "global" else layout.candidate_eval(r)
    fetch = eval_fetcher(ctx.cfg.exchange, layout, ctx.trust, r, which)
    res = gather_parts(
        ctx.cfg, layout, ctx.trust, r, which, model_of(layout, r, which), fetch, blackboard_poll(ctx.cfg)
    )
    write_json(out, res)
    return res
