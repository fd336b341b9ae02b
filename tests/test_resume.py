"""Resume: SIGKILL the whole run at chosen moments, rerun the same command, lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from fedhpc.trust.audit import verify_ledger
from tests.workflow_util import env, events, run_workflow, snakemake_cmd, summary, tiny_config, write_config

pytestmark = pytest.mark.e2e


def _train_started(run: Path, r: int) -> bool:
    try:
        return any(e["event"] == "train.started" and e["round"] == r for e in events(run))
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-append
        return False


KILL_POINTS = {
    "mid-training": lambda run: _train_started(run, 1),
    "after-aggregation": lambda run: (run / "rounds" / "r0000" / "candidate" / "model.safetensors").exists(),
}


def _kill_when(tmp: Path, run: Path, moment, timeout: float = 300) -> None:
    proc = subprocess.Popen(
        snakemake_cmd(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), start_new_session=True
    )
    deadline = time.time() + timeout
    try:
        while not moment(run):
            if proc.poll() is not None:
                pytest.fail("the run finished before the kill point was reached")
            assert time.time() < deadline, "kill point never reached"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # snakemake and every job it started
        proc.wait()


@pytest.mark.parametrize("moment", sorted(KILL_POINTS))
def test_sigkill_then_rerun_matches_an_uninterrupted_run(moment, finished, tmp_path):
    ref_tmp, ref_cfg, _ = finished
    cfg = tiny_config(tmp_path, rounds=2, mlflow=False)
    write_config(tmp_path, cfg)
    run = Path(cfg["output_dir"]) / cfg["run"]

    _kill_when(tmp_path, run, KILL_POINTS[moment])
    assert not (run / "summary.json").exists()
    run_workflow(tmp_path)

    assert summary(tmp_path, cfg)["global_model_sha256"] == summary(ref_tmp, ref_cfg)["global_model_sha256"]
    published = Counter((e["round"], e["site"]) for e in events(run) if e["event"] == "update.published")
    assert set(published.values()) == {1}, f"a finished site-round was trained again: {published}"
    assert len(published) == 2 * len(cfg["sites"])
    assert verify_ledger(run / "audit.jsonl").ok
    # Nothing half-written is left behind that a later stage could mistake for a result.
    leftovers = [p for p in run.rglob("*.part")]
    assert leftovers == []
    for r in ("r0000", "r0001"):
        assert json.loads((run / "rounds" / r / "verdicts.json").read_text())["rejected"] == {}
