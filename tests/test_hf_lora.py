"""A pretrained Hugging Face causal LM from a local directory, federated with LoRA adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fedhpc.core.tensorfile import read_specs
from tests.hf_util import tiny_causal_lm
from tests.workflow_util import run_stages, tiny_config

pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["c_attn"]}
# GPT-2's c_attn is a Conv1D of weight [in, out] = [32, 96]: lora_A is [r, 32], lora_B [96, r].
ADAPTERS = {
    f"lm.base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.default.weight": shape
    for i in (0, 1)
    for ab, shape in (("A", (4, 32)), ("B", (96, 4)))
}


def words(n: int) -> list[str]:
    import random

    rng = random.Random(1)
    vocab = ["trial", "dose", "patient", "kinase", "court", "ruling", "pump", "valve", "the", "of", "a"]
    return [" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(n)]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    model = tiny_causal_lm(tmp / "base", words(400))
    cfg = tiny_config(tmp, run="lora", rounds=2)
    cfg["sites"] = {"lumi": cfg["sites"]["lumi"], "laptop": cfg["sites"]["laptop"]}
    cfg["data"]["synth"]["domains"] = [
        {"name": "law", "generator": "words", "words": 60, "site": "lumi"},
        {"name": "web", "generator": "zipf", "alphabet": 12},
    ]
    cfg["data"]["tokenizer"] = {"kind": "pretrained", "path": str(model)}
    cfg["task"] = {"name": "hf_causal_lm", "options": {"path": str(model), "seq_len": 32, "lora": LORA}}
    cfg["training"]["lr"] = 0.05
    cfg["rounds"]["tokens_per_round"] = 12000
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_stages(tmp / "config.yaml", rounds=2, sites=["laptop", "lumi"], synth=True)
    return tmp, cfg, Path(cfg["output_dir"]) / "lora", model


def test_only_adapter_tensors_travel_and_are_aggregated(lora_run):
    _, _, run, _ = lora_run
    payload = sum(4 * math.prod(s) for s in ADAPTERS.values())
    for r in ("r0000", "r0001"):
        for site in ("laptop", "lumi"):
            update = run / "rounds" / r / "sites" / site / "update.safetensors"
            specs = read_specs(update)
            assert {k: v.shape for k, v in specs.items()} == ADAPTERS and {v.dtype for v in specs.values()} == {"F32"}
            receipt = json.loads(update.with_name("receipt.json").read_text())
            # Only the fp32 adapter payload and the safetensors header: no base-model weight travels.
            assert payload <= receipt["update_bytes"] == update.stat().st_size < payload + 4096
        agg = json.loads((run / "rounds" / r / "aggregate.json").read_text())
        assert agg["update_bytes"] == {
            s: (run / "rounds" / r / "sites" / s / "update.safetensors").stat().st_size for s in ("laptop", "lumi")
        }
        assert set(read_specs(run / "rounds" / r / "candidate" / "model.safetensors")) == set(ADAPTERS)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bytes_per_round"] == [sum(h["update_bytes"].values()) for h in summary["history"]]
    assert all(payload * 2 <= b < (payload + 4096) * 2 for b in summary["bytes_per_round"])


def test_lora_federation_learns_and_records_its_base(lora_run):
    _, _, run, model = lora_run
    summary = json.loads((run / "summary.json").read_text())
    # Adapters on the attention of a random base move the loss little, but it must move down.
    assert summary["excluded_updates"] == [] and summary["final_eval_loss"] < 0.99 * summary["initial_eval_loss"]
    meta = json.loads((run / "rounds" / "r0002" / "global" / "model.json").read_text())
    from fedhpc.tasks.hf_lm import base_sha256

    assert meta["base_sha256"] == base_sha256(model) and meta["lora"]["r"] == 4
    assert meta["parameters"] == sum(math.prod(s) for s in ADAPTERS.values()) < meta["total_parameters"] / 10


def test_a_site_with_another_base_model_refuses_to_train(lora_run, tmp_path):
    from fedhpc.stages.context import context
    from fedhpc.stages.train import TrainingError, train_site

    tmp, cfg, run, model = lora_run
    other = tiny_causal_lm(tmp_path / "other", words(400), seed=5)
    cfg = json.loads(json.dumps(cfg))
    cfg["task"]["options"]["path"] = str(other)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    ctx = context(str(tmp_path / "config.yaml"))
    (run / "rounds" / "r0001" / "arrivals.json").rename(tmp_path / "arrivals.json")  # reopen round 1
    (run / "rounds" / "r0001" / "sites" / "lumi" / "receipt.json").rename(tmp_path / "receipt.json")
    try:
        with pytest.raises(TrainingError, match="is not the one the federation started from"):
            train_site(ctx.cfg, ctx.layout, ctx.trust, 1, "lumi", 1)
    finally:
        (tmp_path / "arrivals.json").rename(run / "rounds" / "r0001" / "arrivals.json")
        (tmp_path / "receipt.json").rename(run / "rounds" / "r0001" / "sites" / "lumi" / "receipt.json")


def test_exported_lora_model_is_the_base_with_adapters_merged(lora_run, tmp_path):
    import torch
    import transformers

    from fedhpc.cli.main import main
    from fedhpc.core.tensorfile import load_state
    from fedhpc.stages.context import context
    from fedhpc.tasks import load_task

    tmp, _, run, _ = lora_run
    final = run / "rounds" / "r0002" / "global" / "model.safetensors"
    assert main(["export", "--config", str(tmp / "config.yaml"), str(final), str(tmp_path / "hf")]) == 0
    written = set(read_specs(tmp_path / "hf" / "model.safetensors"))
    assert not any("lora" in k for k in written) and "transformer.h.0.attn.c_attn.weight" in written
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ctx = context(str(tmp / "config.yaml"))
    ours = load_task(ctx.cfg).load(load_state(final), json.loads(final.with_name("model.json").read_text())).eval()
    idx = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(input_ids=idx).logits, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    out = hf.generate(**tok("trial dose", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert out.shape[1] >= 3


def test_full_fine_tuning_exchanges_every_weight_and_config_errors_name_their_key(lora_run, tmp_path):
    import transformers

    from fedhpc.config.schema import ConfigError
    from fedhpc.tasks import load_task
    from fedhpc.tasks.validation import validate

    tmp, cfg, run, model = lora_run
    raw = json.loads(json.dumps(cfg))
    raw["task"]["options"].pop("lora")
    task = load_task(validate(raw))
    state, described = task.init_model(json.loads((run / "data" / "manifest.json").read_text()))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    # Every weight travels, the tied output projection once (named_parameters skips the alias).
    assert set(state) == {f"lm.{n}" for n, _ in hf.named_parameters()} and "lm.lm_head.weight" not in state
    assert described["parameters"] == described["total_parameters"] == sum(p.numel() for p in hf.parameters())
    raw["data"]["tokenizer"] = {"kind": "byte"}
    raw["task"]["options"]["seq_len"] = 65
    with pytest.raises(ConfigError) as info:
        validate(raw)
    assert "data.tokenizer.kind: a pretrained model brings its tokenizer" in str(info.value)
    assert "task.options.seq_len: 65 exceeds the model's 64 positions" in str(info.value)
    raw["task"]["options"]["path"] = str(tmp_path)
    with pytest.raises(ConfigError, match="task.options.path: .* is not a model directory"):
        validate(raw)
