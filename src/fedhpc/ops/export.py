"""Hand-over: a global model as a Hugging Face directory (config, safetensors, tokenizer, model card).

Each task writes its own model through `Task.export` (the GPT one in `fedhpc.tasks.gpt_export`);
this module checks the model's signature and the run's signed manifest, and writes the model card.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedhpc.config.federation import Config
from fedhpc.core.files import read_json, write_bytes
from fedhpc.core.layout import RunLayout
from fedhpc.core.tensorfile import load_state
from fedhpc.data.shards import load_manifest
from fedhpc.ops.provenance import pruned_files
from fedhpc.tasks import load_task
from fedhpc.tasks.evaluators import flat_metrics
from fedhpc.tasks.gpt_export import ExportError
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.checkpoints import verified_meta
from fedhpc.trust.signing import TrustStore


def export_model(cfg: Config, layout: RunLayout, trust: TrustStore, model_file: Path, out: Path) -> dict:
    """Export the global model `model_file` (its coordinator-signed model.json beside it) to `out`."""

    model_file = Path(model_file)
    meta_path = model_file.with_name("model.json")
    if not meta_path.is_file():
        raise ExportError(f"{model_file}: no model.json beside it; export a global model (rounds/rNNNN/global/)")
    if not model_file.exists():
        verified_meta(meta_path, trust)
        rel = str(Path(os.path.abspath(model_file)).relative_to(os.path.abspath(layout.root)))
        by = pruned_files(layout, trust).get(rel)
        why = f"deleted by `retention:` ({by.record})" if by else "missing"
        raise ExportError(f"{model_file}: {why}; globals kept: every retention.globals_every-th and the last")
    meta = verified_meta(meta_path, trust, model_file)
    load_manifest(layout, trust)  # the tokenizer an export ships must be the run's signed one
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = load_task(cfg).export(load_state(model_file), meta, out, layout)
    evaluation = meta_path.with_name("eval.json")
    card = model_card(cfg, meta, read_json(evaluation) if evaluation.is_file() else None, written)
    write_bytes(out / "README.md", card.encode())
    AuditLog(layout.audit).append(
        "model.exported", round=meta["round"], sha256=meta["sha256"], out=str(out.resolve()), **written
    )
    return {"out": str(out), "round": meta["round"], "sha256": meta["sha256"], **written}


def model_card(cfg: Config, meta: dict, evaluation: dict | None, written: dict) -> str:
    """README.md of an export: provenance, training set-up and the evaluation of this checkpoint."""

    lines = [
        "---",
        "library_name: transformers",
        "tags: [fedhpc, federated-learning]",
        "---",
        f"# {cfg.run}: global model of round {meta['round']}",
        "",
        f"Trained with fedhpc by federation `{cfg.run}`: task `{cfg.task.name}`,",
        f"strategy `{cfg.strategy.name}` (rule `{cfg.strategy.rule}`), sites {', '.join(sorted(cfg.sites))}.",
        f"Only model updates left the sites. Checkpoint sha256 `{meta['sha256']}` (coordinator-signed,",
        f"parent `{meta.get('parent_sha256')}`); exported as `{written.get('architecture', '?')}`.",
        "",
        "## Evaluation",
        "",
    ]
    if evaluation is None:
        lines.append("No evaluation recorded for this checkpoint.")
    else:
        lines += ["| metric | value |", "|---|---|", f"| held-out loss | {evaluation.get('loss')} |"]
        for d, v in sorted(evaluation.get("domains", {}).items()):
            lines.append(f"| loss · {d} | {v.get('loss')} |")
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(flat_metrics(evaluation).items())]
        for name, g in sorted((evaluation.get("guards") or {}).items()):
            lines.append(f"| guard {name} | {'ok' if g.get('ok', True) else 'FAILED'} {g.get('reason') or ''} |")
    return "\n".join(lines) + "\n"
