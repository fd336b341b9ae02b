"""The init stage: round 0's global model, made by the task and signed by the coordinator."""

from __future__ import annotations

from fedhpc.config.federation import Config
from fedhpc.core.layout import RunLayout
from fedhpc.data.shards import load_manifest
from fedhpc.stages.context import Ctx
from fedhpc.tasks import load_task
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.checkpoints import publish_global
from fedhpc.trust.signing import TrustStore


def init_global(cfg: Config, layout: RunLayout, trust: TrustStore, manifest: dict) -> dict:
    """Round 0's global model: the task's initial exchanged tensors (random init, a pretrained
    checkpoint, fresh adapters…), coordinator-signed like every later one."""
    from fedhpc.core.tensorfile import save_state  # torch: only where a model is made

    task = load_task(cfg)
    state, described = task.init_model(manifest)
    save_state(layout.global_model(0), state, {"run": cfg.run, "round": "0"})
    meta = publish_global(
        layout,
        trust,
        0,
        layout.global_model(0),
        {"run": cfg.run, "source": "init", "parent_sha256": None, "task": cfg.task.name, **described},
    )
    AuditLog(layout.audit).append("global.published", round=0, sha256=meta["sha256"], source="init")
    return meta


def run(ctx: Ctx) -> dict:
    """The init stage: round 0's global model from the signed manifest; returns its model.json."""
    return init_global(ctx.cfg, ctx.layout, ctx.trust, load_manifest(ctx.layout, ctx.trust))
