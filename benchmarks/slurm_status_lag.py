"""How late the head sees a finished Slurm job, with the status-check cap and with the plugin's back-off, in one run.

Usage: python benchmarks/slurm_status_lag.py [--repeats 3] [--interval 1] [--step-seconds 0] [--tmp DIR]

Runs the tests' two-site, one-round federation under profiles/lumi against the recording
stand-ins for sbatch and sacct (tests/fake_slurm.py: the executor plugin submits for real, the
jobs run on this host) with `--seconds-between-status-checks INTERVAL`, alternately capped (the
default, fedhpc.ops.slurm_polling) and with FEDHPC_SLURM_BACKOFF=plugin (the plugin's own +10 s
per quiet check). `--step-seconds S` makes every optimizer step of the training jobs take at
least S (tests/multisite_util.slow_steps): the plugin's wait grows with a job's length. For each job: the lag from its end to the head's next status query. Prints
per run the federation's wall time and the median and largest lag, then the medians over runs
and their ratios, and a JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedhpc.ops.slurm_polling import BACKOFF_ENV  # noqa: E402
from tests.fake_slurm import FakeSlurm  # noqa: E402
from tests.multisite_util import slow_steps  # noqa: E402
from tests.test_slurm_submission import two_site_config  # noqa: E402
from tests.workflow_util import BIN  # noqa: E402


def one_run(tmp: Path, interval: int, capped: bool, step_seconds: float) -> dict:
    cfg = two_site_config(tmp, "lumi", "lumi", 8)
    fake = FakeSlurm(tmp / "fake-slurm").install()
    env = fake.env()
    env["PATH"] = f"{fake.bin}{os.pathsep}{BIN}{os.pathsep}{env['PATH']}"
    if step_seconds > 0:
        env["PATH"] = f"{slow_steps(tmp / 'shim', step_seconds)}{os.pathsep}{env['PATH']}"
    if not capped:
        env[BACKOFF_ENV] = "plugin"
    poll = [
        "--slurm-init-seconds-before-status-checks",
        str(interval),
        "--seconds-between-status-checks",
        str(interval),
    ]
    t0 = time.perf_counter()
    out = subprocess.run(
        [str(BIN / "fedhpc"), "run", "--profile", str(REPO / "profiles" / "lumi"), "--directory", str(tmp)]
        + ["--configfile", str(tmp / "config.yaml"), "--", *poll],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"the federation failed:\n{(out.stdout + out.stderr)[-3000:]}")
    summary = json.loads((Path(cfg["output_dir"]) / "lumi" / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    queries = fake.status_queries()
    lags = []
    for job in fake.jobs():
        seen = [q for q in queries if q >= job.ended]
        lags.append(seen[0] - job.ended)
    return {"wall_s": wall, "jobs": len(lags), "median_lag_s": statistics.median(lags), "max_lag_s": max(lags)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--interval", type=int, default=1, help="seconds-between-status-checks (the tests' 1 s)")
    ap.add_argument("--step-seconds", type=float, default=0.0, help="at least this long an optimizer step")
    ap.add_argument("--tmp", default=None, help="directory for the runs (default: the system's)")
    a = ap.parse_args()
    runs: dict[str, list[dict]] = {"capped": [], "plugin": []}
    for i in range(a.repeats):
        for name in runs:
            with tempfile.TemporaryDirectory(dir=a.tmp) as d:
                r = one_run(Path(d), a.interval, name == "capped", a.step_seconds)
            runs[name].append(r)
            print(
                f"run {i + 1} {name:6s}: {r['wall_s']:6.1f} s, {r['jobs']} Slurm jobs, "
                f"lag median {r['median_lag_s']:.1f} s, max {r['max_lag_s']:.1f} s",
                flush=True,
            )
    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "median_lag_s", "max_lag_s")}
        for n, rs in runs.items()
    }
    for n, m in med.items():
        print(
            f"median {n:6s}: federation {m['wall_s']:.1f} s, job-end lag median {m['median_lag_s']:.1f} s, max {m['max_lag_s']:.1f} s"
        )
    ratio = {
        "wall": med["plugin"]["wall_s"] / med["capped"]["wall_s"],
        "max_lag": med["plugin"]["max_lag_s"] / med["capped"]["max_lag_s"],
    }
    print(f"plugin back-off / capped: federation {ratio['wall']:.2f}x, largest lag {ratio['max_lag']:.2f}x")
    print(
        json.dumps(
            {
                "interval_s": a.interval,
                "step_s": a.step_seconds,
                "repeats": a.repeats,
                "median": med,
                "ratio": ratio,
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    main()
