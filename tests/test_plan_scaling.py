"""Planning a federation grows linearly in rounds (issue 21): without timing anything, the walk
Snakemake makes to build the DAG must not get deeper as rounds are added.

Snakemake builds the DAG depth first from `rule all`'s inputs, in order, and copies the set of
jobs on the current path at every step (`DAG.update` hands `set(visited)` to `DAG.update_`), so
a walk D jobs deep costs O(D^2) time and keeps O(D^2) memory alive. When a target of the last
round came first (the summary), the walk ran through every round in one chain, about 7 jobs a
round: 1000 rounds x 16 sites planned in 39 s and 1.5 GB. benchmarks/plan_cost.py measures it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.workflow_util import REPO, env, tiny_config, write_config

pytestmark = pytest.mark.e2e

# Runs Snakemake's CLI with DAG.update_ wrapped to record the longest path it is handed
# (`visited`: the jobs between the target and this one), and the number of jobs planned.
PROBE = """
import atexit, json, sys
from snakemake.cli import main
from snakemake.dag import DAG

seen = {"deepest": 0, "jobs": set()}
update_ = DAG.update_

async def probe(self, job, visited=None, **kwargs):
    seen["deepest"] = max(seen["deepest"], len(visited or ()))
    seen["jobs"].add(job)
    return await update_(self, job, visited=visited, **kwargs)

DAG.update_ = probe
atexit.register(lambda: print("PLAN " + json.dumps({"deepest": seen["deepest"], "jobs": len(seen["jobs"])})))
sys.argv = ["snakemake", *sys.argv[1:]]
main()
"""


def plan_walk(tmp, rounds: int, role: str) -> dict:
    """How deep Snakemake's DAG walk went, and how many jobs it planned, for a dry run."""
    d = tmp / f"{role}-{rounds}"
    d.mkdir()
    cfg = tiny_config(d, rounds=rounds)
    if role == "retention":  # each round's retention hangs off the one before: a chain of its own
        cfg["retention"] = {"keep_rounds": 1, "globals_every": 2}
    elif role != "all":
        cfg["exchange"] = {"kind": "shared", "hub": str(tmp / "hub"), "role": role}
    write_config(d, cfg)
    cmd = [sys.executable, "-c", PROBE, "--snakefile", str(REPO / "workflow" / "Snakefile")]
    cmd += ["--profile", str(REPO / "profiles" / "local"), "--directory", str(d)]
    cmd += ["--configfile", str(d / "config.yaml"), "--dry-run", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PLAN "))
    return json.loads(line.removeprefix("PLAN "))


@pytest.mark.parametrize("role", ["all", "coordinator", "retention"])
def test_the_dag_walk_does_not_deepen_with_rounds(tmp_path, role):
    few, many = plan_walk(tmp_path, 3, role), plan_walk(tmp_path, 12, role)
    # The probe sees the whole plan: four times the rounds, about four times the jobs.
    assert many["jobs"] > 3 * few["jobs"]
    # A round's targets reach back to the round before and no further (with the summary
    # first, the walk went 24 jobs deep at 3 rounds and 87 at 12).
    assert many["deepest"] == few["deepest"] < 15
