"""End to end: a tiny federation with encryption at rest and secure aggregation on trains, keeps
no plaintext token on disk, leaks no identifiers, and aggregates exactly what plain FedAvg would."""

from __future__ import annotations

import getpass
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhpc.aggregation import masking as secagg
from fedhpc.aggregation.secure import pair_seeds
from fedhpc.aggregation.streaming import SiteInput, aggregate
from fedhpc.cli.main import main
from fedhpc.core.files import read_json
from fedhpc.core.layout import RunLayout
from fedhpc.core.tensorfile import load_state, save_state
from fedhpc.data.shards import load_manifest, read_shard
from fedhpc.tasks.validation import load
from fedhpc.trust.signing import TrustStore
from tests.workflow_util import run_workflow, summary, tiny_config, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secure")
    cfg = tiny_config(tmp, run="secure", rounds=1)  # one round already shows learning (5.5 -> 2.9 nats)
    cfg["rounds"]["late_updates"] = "drop"
    cfg["strategy"] = {"secure_aggregation": {"enabled": True}}
    cfg["trust"] = {"encryption": {"shards": True}}
    write_config(tmp, cfg)
    run_workflow(tmp)
    run = Path(cfg["output_dir"]) / cfg["run"]
    c = load(run / "config.json")
    return tmp, cfg, c, RunLayout.of(run), TrustStore(run / "keys", encryption=c.trust.encryption)


def test_it_trains(secure_run):
    tmp, cfg, *_ = secure_run
    s = summary(tmp, cfg)
    assert s["rounds_completed"] == 1 and s["excluded_updates"] == []
    assert s["final_eval_loss"] < 0.8 * s["initial_eval_loss"]


def test_no_plaintext_token_is_on_disk(secure_run):
    *_, layout, trust = secure_run
    manifest = load_manifest(layout, trust)
    files = [p for d in ("shards", "heldout") for p in (layout.data / d).rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in files)
    assert all((layout.root / e["path"] / "envelope.json").is_file() for e in manifest["shards"] + manifest["heldout"])
    for e in manifest["shards"]:
        raw = read_shard(layout, e, trust=trust).astype("<u2").tobytes()
        assert not any(raw[a : a + 16] in blob for a in range(0, len(raw) - 16, 61))


def unmasked(cfg, layout, trust, r: int, site: str, specs) -> dict[str, torch.Tensor]:
    """Remove *all* of a site's pairwise masks (the test holds every key; the coordinator does not)."""
    plan = read_json(layout.plan(r))
    rec = read_json(layout.receipt(r, site))["secure_aggregation"]
    seeds = pair_seeds(cfg, trust, r, site, sorted(plan["participants"]))
    corrections = [(seed, secagg.pair_sign(site, peer)) for peer, seed in seeds.items()]
    offsets = secagg.element_offsets({n: t.shape for n, t in specs.items()})
    out = {}
    for name, t in load_state(layout.update(r, site)).items():
        plain = secagg.remove_masks(t.numpy().reshape(-1).view(np.uint64), corrections, offsets[name])
        out[name] = torch.from_numpy(secagg.decode(plain, rec["fraction_bits"], rec["weight"]).astype(np.float32))
        out[name] = out[name].reshape(t.shape)
    return out


def test_the_aggregate_equals_plain_fedavg_of_the_unmasked_updates(secure_run, tmp_path):
    _, _, cfg, layout, trust = secure_run
    r = 0
    record = read_json(layout.aggregate_record(r))
    base = load_state(layout.global_model(r))
    inputs = []
    for site, w in sorted(record["weights"].items()):
        plain = unmasked(cfg, layout, trust, r, site, base)
        held = load_state(layout.update(r, site))
        for name in plain:  # what the coordinator holds is noise next to the update
            seen = held[name].numpy().astype(np.float64) / 2.0**32
            assert np.abs(seen).mean() > 1e3 * float(plain[name].abs().mean())
        save_state(tmp_path / f"{site}.safetensors", plain)
        inputs.append(SiteInput(site, tmp_path / f"{site}.safetensors", w, w))
    aggregate(layout.global_model(r), inputs, tmp_path / "plain.safetensors")
    got, want = load_state(layout.candidate(r)), load_state(tmp_path / "plain.safetensors")
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-6, rtol=0), name
    assert record["secure_aggregation"] == {"survivors": sorted(record["weights"]), "pairs_unmasked": 0}


def test_nothing_that_left_a_site_names_its_user_host_or_paths(secure_run):
    tmp, _, cfg, layout, _ = secure_run
    secrets = [s for s in (getpass.getuser(), socket.gethostname(), str(tmp)) if s and s != "localhost"]
    for site in cfg.sites:
        for name in ("receipt.json", "metrics.jsonl"):
            text = (layout.site_dir(0, site) / name).read_text()
            words = set(json.dumps(text).replace("\\n", " ").replace('"', " ").split())
            assert not any(s in text for s in secrets[2:]) and not any(s in words for s in secrets[:2]), name
        assert read_json(layout.receipt(0, site))["host"] == "[host]"


def test_the_ledger_and_its_signed_heads_verify(secure_run, capsys):
    *_, layout, _ = secure_run
    assert main(["audit", "verify", str(layout.root)]) == 0
    assert "1 signed heads" in capsys.readouterr().out


def test_the_model_card_records_the_protections(secure_run, capsys):
    *_, layout, _ = secure_run
    assert main(["provenance", str(layout.global_model(1))]) == 0
    card = (layout.global_model(1).parent / "MODEL_CARD.md").read_text()
    assert "| secure aggregation | on: the coordinator saw only sums of updates |" in card
    assert "| encryption at rest | shards and held-out splits sealed (AES-256-GCM) |" in card
    assert "| 0 | fedavg/mean | a100 (" in card  # round 0 summed a100 (and the others)
