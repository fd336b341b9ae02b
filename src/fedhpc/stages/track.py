"""MLflow tracking, done by the coordinator from the round directory.

Sites do not talk to MLflow themselves: they only publish files (sites open no inbound
port, and compute nodes often cannot reach a tracking server). The coordinator replays
each site's metrics.jsonl into a child run per site and round, logs round-level results
on the federation's parent run, and registers every global checkpoint as a model version.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

from fedhpc.config.federation import Config
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.stages.context import Ctx
from fedhpc.tasks.evaluators import flat_metrics


def tracking_uri(cfg: Config, layout: RunLayout) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    layout.mlflow_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(layout.mlflow_dir / 'mlflow.db').resolve()}"


def _client(cfg: Config, layout: RunLayout):
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg, layout))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        artifacts = (layout.mlflow_dir / "artifacts").resolve().as_uri() if not cfg.tracking.uri else None
        exp_id = client.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    return client, exp_id


def _parent_run(client, exp_id: str, cfg: Config, layout: RunLayout) -> str:
    record = layout.mlflow_dir / "parent.json"
    if record.exists():
        return read_json(record)["run_id"]
    run = client.create_run(exp_id, run_name=cfg.run, tags={"fedhpc.run": cfg.run, "fedhpc.kind": "federation"})
    client.log_param(run.info.run_id, "sites", ",".join(sorted(cfg.sites)))
    client.log_param(run.info.run_id, "rounds", cfg.rounds.count)
    client.log_param(run.info.run_id, "strategy", cfg.strategy.name)
    write_json(record, {"run_id": run.info.run_id})
    return run.info.run_id


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and abs(x) < 1e300


def site_metrics(path):
    """MLflow metrics of a site's metrics.jsonl; records that are not well-formed are skipped."""
    from mlflow.entities import Metric

    if not path.exists() or path.stat().st_size > 64 << 20:
        return
    for line in path.read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(rec, dict) or not _finite(rec.get("time")) or not _finite(rec.get("step")):
            continue
        ts, step = int(rec["time"] * 1000), int(rec["step"])
        for k, v in rec.items():
            if k not in ("round", "site", "time", "step", "steps") and _finite(v):
                yield Metric(str(k)[:200], float(v), ts, step)


def track_round(cfg: Config, layout: RunLayout, r: int) -> dict:
    """Log round r; idempotent, so a coordinator killed half-way can simply run it again."""
    from mlflow.entities import Metric, Param

    client, exp_id = _client(cfg, layout)
    parent = _parent_run(client, exp_id, cfg, layout)
    old = client.search_runs(
        [exp_id], filter_string=f"tags.`fedhpc.parent` = '{parent}' and tags.`fedhpc.round` = '{r}'"
    )
    for run in old:  # a previous, interrupted attempt at this round
        client.delete_run(run.info.run_id)
    children = {}
    arrivals = read_json(layout.arrivals(r))
    for site in arrivals["arrived"]:
        # Replayed for every arrival, rejected ones too: read as hostile input, never trusted to be well-formed.
        receipt = read_json(layout.receipt(r, site), max_bytes=1 << 20)
        receipt = receipt if isinstance(receipt, dict) else {}
        child = client.create_run(
            exp_id,
            run_name=f"r{r:04d}/{site}",
            tags={"mlflow.parentRunId": parent, "fedhpc.parent": parent, "fedhpc.round": str(r), "fedhpc.site": site},
        )
        rid = child.info.run_id
        # Common receipt fields and those of the task (a batch shape, a loss name…) that it reported.
        keys = ("task", "micro_batch", "grad_accum", "ranks", "engine", "batch_tokens", "batch_size", "mini_batch_size")
        params = {
            k: str(receipt.get(k))[:200]
            for k in (*keys, "loss_function", "steps", "tokens", "device")
            if receipt.get(k) is not None
        }
        metrics = list(site_metrics(layout.metrics(r, site)))
        finished = receipt.get("finished_at")
        for k in ("loss_before", "loss_after", "tokens_per_second", "update_bytes"):
            if _finite(receipt.get(k)) and _finite(finished):
                metrics.append(Metric(k, float(receipt[k]), int(finished * 1000), 0))
        for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 entries
            client.log_batch(
                rid,
                metrics=metrics[i : i + 900],
                params=[Param(k, str(v)) for k, v in params.items()] if i == 0 else [],
            )
        client.set_terminated(rid)
        children[site] = rid
    ev = read_json(layout.global_eval(r + 1))
    ts = int(read_json(layout.arrivals(r))["closed_at"] * 1000)
    round_metrics = [Metric("eval_loss", float(ev["loss"]), ts, r + 1)] if ev["loss"] is not None else []
    for dom, d in ev["domains"].items():
        if d["loss"] is not None:
            round_metrics.append(Metric(f"eval_loss.{dom}", float(d["loss"]), ts, r + 1))
    # The task's further metrics (MRR@10, …), the evaluators' results and the guards.
    round_metrics += [Metric(f"eval.{_metric_name(k)}", v, ts, r + 1) for k, v in flat_metrics(ev).items()]
    agg = read_json(layout.aggregate_record(r))
    round_metrics += [Metric(f"weight.{s}", float(w), ts, r) for s, w in agg["weights"].items()]
    round_metrics.append(Metric("excluded_updates", float(len(agg["excluded"])), ts, r))
    round_metrics += [Metric(f"update_bytes.{s}", float(b), ts, r) for s, b in agg.get("update_bytes", {}).items()]
    if agg.get("privacy"):
        round_metrics.append(Metric("dp_epsilon", float(agg["privacy"]["epsilon"]), ts, r))
    client.log_batch(parent, metrics=round_metrics)
    name = f"fedhpc-{cfg.run}"
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=f"Global checkpoints of federation {cfg.run}")
    # Round 0's track also registers the initial model, so every global has a version.
    for g in ([0] if r == 0 else []) + [r + 1]:
        version = _register(client, name, parent, layout, g)
    record = {
        "round": r,
        "parent_run": parent,
        "site_runs": children,
        "model": name,
        "model_version": version.version,
        "tracking_uri": tracking_uri(cfg, layout),
    }
    write_json(layout.tracked(r), record)
    return record


def _metric_name(key: str) -> str:
    """MLflow allows letters, digits and `_-. :/` in metric names (so `mrr@10` becomes `mrr_10`)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


def _register(client, name: str, parent: str, layout: RunLayout, g: int):
    meta = read_json(layout.global_meta(g))
    for mv in client.search_model_versions(f"name = '{name}' and tag.`fedhpc.round` = '{g}'"):
        client.delete_model_version(name, mv.version)  # left by an interrupted attempt
    return client.create_model_version(
        name,
        source=Path(os.path.abspath(layout.global_model(g))).as_uri(),  # the global's name, not its link target
        run_id=parent,
        tags={"fedhpc.round": str(g), "sha256": meta["sha256"], "source": meta["source"]},
    )


def finish(cfg: Config, layout: RunLayout, summary: dict, report: Path) -> None:
    client, exp_id = _client(cfg, layout)
    parent = _parent_run(client, exp_id, cfg, layout)
    for k in ("initial_eval_loss", "final_eval_loss", "entropy_floor", "wall_seconds"):
        if summary.get(k) is not None:
            client.log_metric(parent, k, float(summary[k]))
    client.log_artifact(parent, str(report))
    client.set_terminated(parent)


def run(ctx: Ctx, r: int) -> dict:
    """The track stage: round r into MLflow (site metrics, round results, the model version)."""
    return track_round(ctx.cfg, ctx.layout, r)
