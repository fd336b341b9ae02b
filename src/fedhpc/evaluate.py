"""Held-out evaluation of a model: loss and perplexity per domain and overall, and the entropy floor."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .checkpoints import build_model
from .config import Config
from .files import finite_or_none, sha256_file, write_json
from .layout import RunLayout
from .loop import mean_loss, to_windows
from .model import load_exported_state
from .shards import load_manifest, read_heldout
from .signing import TrustStore
from .tensorfile import load_state


def evaluate_model(
    cfg: Config, layout: RunLayout, trust: TrustStore, model_file: Path, vocab_size: int, threads: int = 1
) -> dict:
    torch.set_num_threads(threads)
    model = build_model(cfg, vocab_size)
    load_exported_state(model, load_state(model_file))
    model.eval()
    manifest = load_manifest(layout, trust)
    domains = {}
    for entry in sorted(manifest["heldout"], key=lambda e: e["domain"]):
        tokens = torch.from_numpy(read_heldout(layout, entry, trust=trust).astype("int64"))
        # Windows cover the first tokens_per_domain tokens: the same slice for every model.
        windows = to_windows(tokens[: cfg.evaluation.tokens_per_domain + 1], cfg.model.seq_len)
        if len(windows) == 0:
            continue
        loss = mean_loss(lambda x, y: model(x, y)[1], windows, cfg.evaluation.batch_size, torch.device("cpu"), "fp32")
        floor = entry.get("entropy_floor_nats_per_token")
        domains[entry["domain"]] = {
            "loss": finite_or_none(loss),
            "perplexity": finite_or_none(math.exp(min(loss, 700))),
            "tokens": int(windows[:, 1:].numel()),
            "entropy_floor": floor,
            "gap_to_floor": None if floor is None else finite_or_none(loss - floor),
        }
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
        "model_sha256": sha256_file(model_file),
        "loss": finite_or_none(loss),
        "perplexity": finite_or_none(math.exp(min(loss, 700))),
        "tokens": total,
        "entropy_floor": floor,
        "gap_to_floor": None if floor is None else finite_or_none(loss - floor),
        "domains": domains,
    }


def write_eval(
    cfg: Config, layout: RunLayout, trust: TrustStore, model_file: Path, vocab_size: int, out: Path, threads: int = 1
) -> dict:
    result = evaluate_model(cfg, layout, trust, model_file, vocab_size, threads)
    write_json(out, result)
    return result
