"""The example user task (examples/regression) runs a whole federation through the workflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fedhpc.core.tensorfile import read_specs
from fedhpc.trust.audit import verify_ledger
from tests.workflow_util import REPO, events, run_workflow, summary

pytestmark = pytest.mark.e2e


def test_user_task_federation_end_to_end(tmp_path):
    cfg = yaml.safe_load((REPO / "examples" / "regression" / "config.yaml").read_text())
    cfg["task"]["name"] = str(REPO / "examples" / "regression" / "task.py") + ":RegressionTask"
    cfg["output_dir"] = str(tmp_path / "results")
    cfg["rounds"]["count"] = 2
    cfg["tracking"]["mlflow"] = False
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run_workflow(tmp_path)

    s = summary(tmp_path, cfg)
    run = Path(cfg["output_dir"]) / cfg["run"]
    assert s["rounds_completed"] == 2 and s["excluded_updates"] == []
    # The MLP learns the generated function: held-out MSE falls well below the initial one.
    assert s["final_eval_loss"] < 0.3 * s["initial_eval_loss"]
    assert set(s["final_eval_by_domain"]) == {"north", "south", "east"}

    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["task"] == cfg["task"]["name"] and manifest["tokenizer"] is None
    owner = {sh["id"]: sh["residency"] for sh in manifest["shards"]}
    assert owner["north-000"] == "lumi" and all(sh["path"].endswith(".jsonl") for sh in manifest["shards"])
    expected_names = {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    for r in ("r0000", "r0001"):
        plan = json.loads((run / "rounds" / r / "plan.json").read_text())
        for site, entry in plan["sites"].items():
            assert all(owner[sid] == site for sid in entry["shards"])  # each domain stays at its site
            receipt = json.loads((run / "rounds" / r / "sites" / site / "receipt.json").read_text())
            # The task's file path is scrubbed from what leaves the site (trust.scrub); its class is not.
            assert receipt["task"] == "[path]:RegressionTask" and receipt["batch_size"] == 32
            assert receipt["loss_after"] < receipt["loss_before"]
            specs = read_specs(run / "rounds" / r / "sites" / site / "update.safetensors")
            assert set(specs) == expected_names
        agg = json.loads((run / "rounds" / r / "aggregate.json").read_text())
        assert set(agg["weights"]) == {"lumi", "a100", "laptop"}
    assert verify_ledger(run / "audit.jsonl").ok
    kinds = [e["event"] for e in events(run)]
    assert kinds.count("update.published") == 6 and kinds.count("round.aggregated") == 2
