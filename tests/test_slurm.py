"""A federation through a real Slurm cluster: every training and aggregation job is a Slurm job."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.workflow_util import REPO, run_workflow, summary, tiny_config, write_config

pytestmark = pytest.mark.e2e


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return next(f.split("=", 1)[1] for f in out.split() if f.startswith("JobState="))


def test_federation_runs_through_slurm_with_ddp_and_deepspeed_sites(slurm, tmp_path):
    cfg = tiny_config(tmp_path, run="slurm", rounds=2)
    cfg["sites"]["a100"].update(ranks_per_node=2, engine="ddp")
    # The DeepSpeed site is resident: one Slurm job trains its rounds in turn. Its margin is its whole
    # 5-minute limit, so its first job has no room for round 1, however fast a round is, and ends well
    # before Slurm would stop it; the workflow submits the next.
    cfg["sites"]["laptop"].update(engine="deepspeed", zero_stage=1, resident=True, resident_margin_minutes=5)
    # The FSDP site of two ranks is resident too, with no margin: one job (srun starts both ranks)
    # keeps its process group from round to round and scores each candidate on lumi's held-out data.
    cfg["sites"]["lumi"].update(ranks_per_node=2, engine="fsdp", resident=True, resident_margin_minutes=0)
    write_config(tmp_path, cfg)
    run_workflow(tmp_path, "--profile", str(REPO / "profiles" / "ci-slurm"), "--set-resources", "resident:runtime=5")
    run = Path(cfg["output_dir"]) / "slurm"

    s = summary(tmp_path, cfg)
    assert s["rounds_completed"] == 2 and s["final_eval_loss"] < s["initial_eval_loss"]
    jobs = []
    for r in ("r0000", "r0001"):
        receipts = {
            site: json.loads((run / "rounds" / r / "sites" / site / "receipt.json").read_text())
            for site in cfg["sites"]
        }
        for site, rec in receipts.items():
            assert rec["slurm_job_id"], f"{r}/{site} did not run as a Slurm job"
            if site == "a100":
                jobs.append(rec["slurm_job_id"])
        # Two ranks started by srun inside the site's job, synchronised by DDP over gloo.
        assert (receipts["a100"]["ranks"], receipts["a100"]["launcher"], receipts["a100"]["engine"]) == (
            2,
            "slurm",
            "ddp",
        )
        assert (receipts["lumi"]["ranks"], receipts["lumi"]["launcher"], receipts["lumi"]["engine"]) == (
            2,
            "slurm",
            "fsdp",
        )
        assert receipts["laptop"]["engine"] == "deepspeed" and receipts["laptop"]["zero_stage"] == 1
        agg = json.loads((run / "rounds" / r / "aggregate.json").read_text())
        assert agg["slurm_job_id"] and set(agg["weights"]) == set(cfg["sites"])
        jobs.append(agg["slurm_job_id"])
    # The resident site's jobs each ended on their own before the limit (COMPLETED, not TIMEOUT),
    # each starting where the one before stopped, and trained each round once.
    first = json.loads((run / "rounds" / "r0000" / "sites" / "laptop" / "resident.json").read_text())
    second = json.loads((run / "rounds" / "r0001" / "sites" / "laptop" / "resident.json").read_text())
    assert (first["reason"], first["next_round"], second["reason"], second["next_round"]) == ("time", 1, "done", 2)
    resident_jobs = [first["slurm_job_id"], second["slurm_job_id"]]
    trained_in = [
        json.loads((run / "rounds" / r / "sites" / "laptop" / "receipt.json").read_text())["slurm_job_id"]
        for r in ("r0000", "r0001")
    ]
    assert trained_in == resident_jobs and len(set(resident_jobs)) == 2
    jobs += resident_jobs
    # lumi's one job trained both rounds with its two ranks and scored both candidates.
    lumi = json.loads((run / "rounds" / "r0000" / "sites" / "lumi" / "resident.json").read_text())
    assert (lumi["reason"], lumi["next_round"], lumi["rounds"]) == ("done", 2, [0, 1])
    assert [(w["round"], w["work"]) for w in lumi["work"] if w["work"] == "score candidate"] == [
        (0, "score candidate"),
        (1, "score candidate"),
    ]
    lumi_trained_in = {
        json.loads((run / "rounds" / r / "sites" / "lumi" / "receipt.json").read_text())["slurm_job_id"]
        for r in ("r0000", "r0001")
    }
    assert lumi_trained_in == {lumi["slurm_job_id"]}
    jobs.append(lumi["slurm_job_id"])
    assert len(set(jobs)) == len(jobs), "every other site-round and aggregation is its own job"
    assert {job_state(j) for j in jobs} == {"COMPLETED"}
    # The DeepSpeed config was written from our settings, at the site.
    ds = json.loads((run / "site-state" / "laptop" / "deepspeed-r0001.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == cfg["training"].get("grad_clip", 1.0)
