"""The head process as its own Slurm job: `fedhpc submit` (submitit) and the sbatch wrappers."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_slurm import job_state
from tests.workflow_util import BIN, REPO, env, tiny_config, write_config

pytestmark = pytest.mark.e2e


def test_fedhpc_submit_runs_the_whole_federation_from_a_head_job(slurm, tmp_path):
    cfg = tiny_config(tmp_path, run="headjob", rounds=1)
    write_config(tmp_path, cfg)
    out = subprocess.run(
        [
            str(BIN / "fedhpc"),
            "submit",
            "--profile",
            str(REPO / "profiles" / "ci-slurm"),
            "--configfile",
            str(tmp_path / "config.yaml"),
            "--directory",
            str(tmp_path),
            "--logs",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    head = re.search(r"Slurm job (\d+)", out.stdout).group(1)
    stdout = Path(re.search(r"stdout: (\S+)", out.stdout).group(1))
    assert str(stdout).startswith(str(tmp_path / "logs"))
    deadline = time.time() + 600
    while job_state(head) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        assert time.time() < deadline, "the head job did not finish in 10 minutes"
        time.sleep(3)
    assert job_state(head) == "COMPLETED", stdout.read_text()[-3000:] if stdout.exists() else "no log"
    run = Path(cfg["output_dir"]) / "headjob"
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 1
    for site in cfg["sites"]:
        job = json.loads((run / "rounds" / "r0000" / "sites" / site / "receipt.json").read_text())["slurm_job_id"]
        assert job and job != head  # training ran in jobs the head job submitted
    assert "r0000" in stdout.read_text()  # fedhpc run's closing status table


@pytest.mark.parametrize("script", ["head.sh", "lumi-head.sh", "a100-head.sh"])
def test_sbatch_wrappers_are_valid_batch_scripts(slurm, script):
    # --test-only validates the script and its #SBATCH directives without running it; the
    # centre-specific partition is swapped for the test cluster's.
    out = subprocess.run(
        ["sbatch", "--test-only", "-p", "debug", str(REPO / "scripts" / "sbatch" / script)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert out.returncode == 0 and "to start at" in out.stderr, out.stderr
