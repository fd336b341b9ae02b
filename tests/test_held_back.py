"""A site's held-back slice (its loss before/after) takes every source of its round in proportion."""

from __future__ import annotations

import numpy as np
import torch

import fedhpc.training.loop
from fedhpc.cli.main import main
from fedhpc.core.files import read_json
from fedhpc.data.shards import load_manifest, read_shard
from fedhpc.trust.signing import TrustStore
from tests.test_uneven import prepared
from tests.uneven_util import uneven_config


def test_a_site_with_several_sources_trains_each_in_proportion_and_scores_all(tmp_path, monkeypatch):
    # One site holding English (ASCII) and Swedish (ä, å, ö: bytes >= 128) text, unpinned, a
    # round of all of it. Its shared shards come in plan order (by size, then id: Swedish last),
    # so a held-back slice taken from the end was almost all Swedish (35 of its 40 windows): the
    # round trained 48 % of the Swedish windows instead of 80 %, and scored its loss on Swedish.
    cfg = uneven_config(tmp_path, {"en": 6000, "sv": 2000}, rounds=1)
    cfg["sites"] = {"solo": {"accelerator": "cpu", "memory_gb": 4, "throughput": 1.0}}
    for src in cfg["data"]["sources"]:
        src["site"] = None
    cfg["data"]["shard_tokens"] = 400
    cfg["rounds"]["tokens_per_round"] = 20000
    cfg["training"]["local_eval_fraction"] = 0.2
    config, layout = prepared(tmp_path, cfg)
    assert main(["plan", "--round", "0", "--config", str(config)]) == 0
    entry = read_json(layout.plan(0))["sites"]["solo"]

    trained: list[torch.Tensor] = []
    local_round = fedhpc.training.loop.local_round
    monkeypatch.setattr(
        fedhpc.training.loop,
        "local_round",
        lambda engine, windows, *a: trained.append(windows) or local_round(engine, windows, *a),
    )
    status = tmp_path / "status.json"
    argv = [
        "train",
        "--config",
        str(config),
        "--round",
        "0",
        "--site",
        "solo",
        "--threads",
        "1",
        "--status",
        str(status),
    ]
    assert main(argv) == 0 and read_json(status)["state"] == "published"

    shards = {s["id"]: s for s in load_manifest(layout, TrustStore(layout.keys_dir))["shards"]}
    tokens = np.concatenate([read_shard(layout, shards[sid]) for sid in entry["shards"]]).astype(np.int64)
    windows = fedhpc.training.loop.to_windows(torch.from_numpy(tokens), 32)
    swedish = lambda w: int((w[:, :-1] >= 128).any(dim=1).sum())  # noqa: E731
    (train,) = trained
    held = len(windows) - len(train)
    assert len(train) * 32 == entry["train_tokens"] and held * 32 == entry["held_back_tokens"]
    # Each language is trained in proportion, and the held-back windows take their share of both.
    assert abs(swedish(train) / swedish(windows) - len(train) / len(windows)) < 0.05
    assert abs((swedish(windows) - swedish(train)) / held - swedish(windows) / len(windows)) < 0.1
