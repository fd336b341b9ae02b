"""A site added to the config between rounds takes part from the next round on."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhpc.core.files import read_json
from fedhpc.core.layout import RunLayout
from fedhpc.trust.audit import AuditLog

from .workflow_util import run_workflow, tiny_config, write_config

pytestmark = pytest.mark.e2e


def test_a_site_added_between_rounds_is_planned_trains_and_is_aggregated(tmp_path):
    cfg = tiny_config(tmp_path, rounds=1)
    laptop = cfg["sites"].pop("laptop")
    write_config(tmp_path, cfg)
    run_workflow(tmp_path)
    layout = RunLayout(Path(cfg["output_dir"]) / cfg["run"])
    assert read_json(layout.plan(0))["participants"] == ["a100", "lumi"]

    cfg["sites"]["laptop"] = laptop
    cfg["rounds"]["count"] = 2
    write_config(tmp_path, cfg)
    run_workflow(tmp_path)
    plan = read_json(layout.plan(1))
    assert plan["participants"] == ["a100", "laptop", "lumi"]
    assert any("'laptop' joined in round 1" in n for n in plan["notes"])
    arrivals = read_json(layout.arrivals(1))
    # It arrived like the others: nobody waited for the deadline (5 minutes in the tiny config).
    assert arrivals["missing"] == [] and arrivals["closed_at"] < arrivals["deadline"]
    assert "laptop" in read_json(layout.aggregate_record(1))["weights"]
    # Round 0 is not redone for it, and the federation's history is intact.
    assert read_json(layout.round_dir(0) / "sites" / "laptop" / "status.json")["state"] == "round-closed"
    assert [e["round"] for e in AuditLog(layout.audit).events() if e["event"] == "round.planned"] == [0, 1]
    assert read_json(layout.summary)["rounds_completed"] == 2
