"""What Snakemake pays to plan a federation's DAG, by rounds x sites, against a one-round DAG in the same run.

Usage: python benchmarks/plan_cost.py [--grid 1x3,100x3,400x3,1000x3,100x16,1000x16] [--tmp DIR]

Each point is a dry run (`snakemake -n`) of the tiny federation of the tests with that many
rounds and sites (CPU sites, shared demo data) on the local profile: wall time and peak RSS
(GNU time). The first point is the baseline: what any dry run costs (imports, config checks,
the executor plugins' start-up). The table then gives, per point, time and memory above that
baseline per round x site; a DAG whose cost grows linearly keeps those constant.
Prints one line per point, then a JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.workflow_util import BIN, tiny_config  # noqa: E402


def dry_run(tmp: Path, rounds: int, sites: int) -> tuple[float, float]:
    """(seconds, peak MiB) of planning `rounds` x `sites`."""
    d = tmp / f"r{rounds}s{sites}"
    d.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(d)
    cfg["rounds"]["count"] = rounds
    cpu = cfg["sites"]["laptop"]
    cfg["sites"] = {f"s{i:02d}": dict(cpu) for i in range(sites)}
    for domain in cfg["data"]["synth"]["domains"]:
        domain.pop("site", None)  # every domain shared: any number of sites plans the same data
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = ["/usr/bin/time", "-f", "%e %M", str(BIN / "snakemake"), "--snakefile", str(REPO / "workflow" / "Snakefile")]
    cmd += [
        "--profile",
        str(REPO / "profiles" / "local"),
        "--directory",
        str(d),
        "--configfile",
        str(d / "config.yaml"),
    ]
    cmd += ["-n", "-q"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"dry run of {rounds} x {sites} failed:\n{proc.stderr[-3000:]}")
    seconds, kib = proc.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kib) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--grid", default="1x3,100x3,400x3,1000x3,100x16,1000x16", help="rounds x sites, the first the baseline"
    )
    ap.add_argument("--tmp", default=None)
    a = ap.parse_args()
    grid = [tuple(int(x) for x in point.split("x")) for point in a.grid.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        base_s, base_mib = dry_run(Path(tmp), *grid[0])
        print(f"baseline {grid[0][0]} x {grid[0][1]}: {base_s:.1f} s, {base_mib:.0f} MiB", flush=True)
        for rounds, sites in grid[1:]:
            s, mib = dry_run(Path(tmp), rounds, sites)
            n = rounds * sites
            row = {"rounds": rounds, "sites": sites, "seconds": s, "peak_mib": mib}
            row["ms_per_round_site"] = 1000 * (s - base_s) / n
            row["mib_per_round_site"] = (mib - base_mib) / n
            rows.append(row)
            print(
                f"{rounds} x {sites}: {s:.1f} s, {mib:.0f} MiB; above the baseline "
                f"{row['ms_per_round_site']:.2f} ms and {row['mib_per_round_site']:.3f} MiB per round x site",
                flush=True,
            )
    print(json.dumps({"baseline": {"grid": grid[0], "seconds": base_s, "peak_mib": base_mib}, "points": rows}))


if __name__ == "__main__":
    main()
