"""One site's job in one round: pull the global model and plan, train, publish update + receipt."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import numpy as np
import torch

from .allocate import stable_seed
from .audit import AuditLog
from .checkpoints import build_model, load_global_meta
from .config import Config
from .errors import FedhpcError
from .files import append_jsonl, finite_or_none, read_json, sha256_file, write_json
from .layout import RunLayout
from .loop import local_round, make_optimizer, mean_loss, to_windows
from .model import exported_state, load_exported_state
from .shards import load_manifest, read_shard
from .signing import COORDINATOR, SignatureError, TrustStore, sign_document, verify_document
from .sites import batch_shape
from .sysinfo import SystemProbe
from .tensorfile import load_state, save_state


class TrainingError(FedhpcError, ValueError):
    """A site cannot train the round it was given (too little data, no memory, …)."""


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_plan(layout: RunLayout, trust: TrustStore, r: int) -> dict:
    plan = read_json(layout.plan(r))
    verify_document(plan, trust, COORDINATOR, str(layout.plan(r)))
    return plan


def existing_receipt(layout: RunLayout, trust: TrustStore, r: int, site: str, base_sha: str) -> dict | None:
    """A receipt this site already published for this round and base, whose update is intact."""
    path = layout.receipt(r, site)
    if not path.exists():
        return None
    try:
        receipt = read_json(path)
        verify_document(receipt, trust, site, str(path))
    except (ValueError, SignatureError):
        return None
    if receipt.get("base_sha256") != base_sha or not layout.update(r, site).exists():
        return None
    return receipt if sha256_file(layout.update(r, site)) == receipt.get("update_sha256") else None


def _optimizer_state(layout: RunLayout, site: str, before: int) -> tuple[Path | None, int | None]:
    best = None
    for p in layout.site_state(site).glob("optimizer-r*.pt"):
        k = int(p.stem.split("-r")[1])
        if k < before and (best is None or k > best[1]):
            best = (p, k)
    return best if best else (None, None)


def train_site(cfg: Config, layout: RunLayout, trust: TrustStore, r: int, site: str, threads: int) -> dict:
    """Run site `site`'s local round `r`; return the job status written to status.json."""
    audit = AuditLog(layout.audit)
    if layout.arrivals(r).exists():
        return {"state": "round-closed", "detail": "the coordinator closed this round before the job ran"}
    plan = load_plan(layout, trust, r)
    entry = plan["sites"].get(site)
    if not entry or not entry["shards"]:
        return {"state": "not-planned"}
    base = load_global_meta(layout, trust, r)
    if (done := existing_receipt(layout, trust, r, site, base["sha256"])) is not None:
        return {"state": "published", "reused": True, "update_sha256": done["update_sha256"]}

    torch.set_num_threads(threads)
    torch.manual_seed(stable_seed(cfg.seed, "train", r, site))
    device = pick_device(cfg.training.device)
    audit.append(
        "train.started", round=r, site=site, shards=entry["shards"], slurm_job_id=os.environ.get("SLURM_JOB_ID")
    )

    manifest = load_manifest(layout, trust)
    shards = {s["id"]: s for s in manifest["shards"]}
    tokens = torch.from_numpy(
        np.concatenate([read_shard(layout, shards[sid]).astype("int64") for sid in entry["shards"]])
    )
    windows = to_windows(tokens, cfg.model.seq_len)
    n_eval = max(1, int(len(windows) * cfg.training.local_eval_fraction))
    # The held-back tail is the site's own held-out slice for loss before/after.
    train_w, eval_w = windows[:-n_eval], windows[-n_eval:]

    vocab = base["vocab_size"]
    model = build_model(cfg, vocab).to(device)
    global_state = load_state(layout.global_model(r))
    load_exported_state(model, global_state)
    shape = batch_shape(
        site, cfg.sites[site], cfg.model, vocab, cfg.training.batch_tokens, cfg.training.max_micro_batch, devices=1
    )
    if len(train_w) < shape.micro_batch * shape.grad_accum:
        raise TrainingError(
            f"site {site!r}, round {r}: {len(train_w)} training sequences cannot fill one optimizer step "
            f"of {shape.micro_batch * shape.grad_accum}; raise rounds.tokens_per_round or lower training.batch_tokens"
        )
    optimizer = make_optimizer(model, cfg.training)
    state_path, state_round = _optimizer_state(layout, site, r) if cfg.training.keep_optimizer_state else (None, None)
    if state_path is not None:
        optimizer.load_state_dict(torch.load(state_path, map_location=device, weights_only=True))

    loss_before = mean_loss(model, eval_w, cfg.evaluation.batch_size, device, cfg.training.precision)
    probe = SystemProbe()
    metrics_path = layout.metrics(r, site)
    metrics_path.unlink(missing_ok=True)  # a killed earlier attempt leaves a partial log

    def log(rec: dict) -> None:
        append_jsonl(metrics_path, {"round": r, "site": site, "time": time.time(), **rec, **probe.sample()})

    gen = torch.Generator().manual_seed(stable_seed(cfg.seed, "order", r, site))
    rounds = cfg.rounds.count
    started = time.time()
    result = local_round(model, optimizer, train_w, shape, cfg.training, device, lambda f: (r + f) / rounds, gen, log)
    loss_after = mean_loss(model, eval_w, cfg.evaluation.batch_size, device, cfg.training.precision)

    local = exported_state(model.cpu())
    update = {k: local[k] - global_state[k].float() for k in local}
    save_state(
        layout.update(r, site), update, {"run": cfg.run, "round": str(r), "site": site, "base_sha256": base["sha256"]}
    )
    receipt = {
        "run": cfg.run,
        "round": r,
        "site": site,
        "base_round": r,
        "base_sha256": base["sha256"],
        "update_sha256": sha256_file(layout.update(r, site)),
        "update_bytes": layout.update(r, site).stat().st_size,
        "shards": entry["shards"],
        "tokens": result.tokens,
        "sequences": result.tokens // shape.seq_len,
        "steps": result.steps,
        "micro_batch": shape.micro_batch,
        "grad_accum": shape.grad_accum,
        "devices": shape.devices,
        "batch_tokens": shape.tokens_per_step,
        "lr_first": result.lr_first,
        "lr_last": result.lr_last,
        "loss_before": finite_or_none(loss_before),
        "loss_after": finite_or_none(loss_after),
        "train_loss_last": finite_or_none(result.last_loss),
        "eval_tokens": int(eval_w[:, 1:].numel()),
        "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
        "train_seconds": result.seconds,
        "started_at": started,
        "finished_at": time.time(),
        "device": str(device),
        "threads": threads,
        "accelerator_declared": cfg.sites[site].accelerator,
        "optimizer_state_from_round": state_round,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
    }
    receipt = sign_document(receipt, site, trust.private_key(site))
    if cfg.training.keep_optimizer_state:
        # Saved before the receipt: a job killed in between retrains from the older state,
        # exactly as an uninterrupted run would have.
        state_dir = layout.site_state(site)
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / f".optimizer-r{r:04d}.pt.part"
        torch.save(optimizer.state_dict(), tmp)
        tmp.replace(state_dir / f"optimizer-r{r:04d}.pt")
    write_json(layout.receipt(r, site), receipt)  # last: its presence means "update published"
    for old in layout.site_state(site).glob("optimizer-r*.pt"):
        if int(old.stem.split("-r")[1]) < r:
            old.unlink()
    audit.append(
        "update.published",
        round=r,
        site=site,
        update_sha256=receipt["update_sha256"],
        tokens=result.tokens,
        steps=result.steps,
        loss_before=receipt["loss_before"],
        loss_after=receipt["loss_after"],
    )
    return {"state": "published", "reused": False, "update_sha256": receipt["update_sha256"]}


def run_train_job(
    cfg: Config, layout: RunLayout, trust: TrustStore, r: int, site: str, threads: int, status_path: Path
) -> dict:
    t0 = time.time()
    status = train_site(cfg, layout, trust, r, site, threads)
    status.update(round=r, site=site, seconds=time.time() - t0, slurm_job_id=os.environ.get("SLURM_JOB_ID"))
    write_json(status_path, status)
    return status
