"""Held-out evaluation of a model: the task's own metrics, then every configured evaluator."""

from __future__ import annotations

from pathlib import Path

from .config import Config
from .evaluators import run_evaluators
from .files import sha256_file, write_json
from .layout import RunLayout
from .shards import load_manifest, read_heldout
from .signing import TrustStore
from .taskdata import verified_file
from .tasks import EvalContext, load_task


def evaluate_model(
    cfg: Config, layout: RunLayout, trust: TrustStore, model_file: Path, meta: dict, threads: int = 1
) -> dict:
    """eval.json of `model_file`: `loss` (the gate's number), `domains`, the task's other metrics,
    `evaluators` ({name: result}) and `guards` (what must hold for the model to be promoted)."""
    task = load_task(cfg)
    manifest = load_manifest(layout, trust)

    def heldout(entry: dict):
        if task.uses_tokens:
            return read_heldout(layout, entry)
        return verified_file(layout, entry, f"held-out split {entry['domain']}")

    ec = EvalContext(cfg, layout, manifest, Path(model_file), meta, threads, heldout)
    result = {"model_sha256": sha256_file(model_file), **task.evaluate(ec)}
    result.setdefault("domains", {})
    result.setdefault("entropy_floor", None)
    result.setdefault("gap_to_floor", None)
    guards = dict(result.get("guards") or {})
    evaluated, gated = run_evaluators(cfg, task, ec, result)
    if evaluated:
        result["evaluators"] = evaluated
    guards.update(gated)
    result["guards"] = guards
    return result


def write_eval(
    cfg: Config, layout: RunLayout, trust: TrustStore, model_file: Path, meta: dict, out: Path, threads: int = 1
) -> dict:
    result = evaluate_model(cfg, layout, trust, model_file, meta, threads)
    write_json(out, result)
    return result
