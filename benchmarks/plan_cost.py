"""What Snakemake pays to plan a federation's DAG, by rounds x sites, against a one-round DAG in the same run.

Usage: python benchmarks/plan_cost.py [--grid 1x3,100x3,400x3,1000x3,100x16,1000x16] [--repeat 3] [--tmp DIR]

Each point is a dry run (`snakemake -n`) of the tiny federation of the tests with that many
rounds and sites (CPU sites, shared demo data) on the local profile: wall time, CPU time (user +
system) and peak RSS (GNU time), the median of --repeat runs (the grid is run --repeat times
over, so a burst of load on the machine hits one run of several points, not every run of one).
The first point is the baseline: what any dry run costs (imports, config checks, the executor
plugins' start-up; on a VM with a slurm.conf but no controller also the Slurm plugin's 10 s
`scontrol` timeout). The table then gives, per point, time and memory above that baseline per
round x site; a DAG whose cost grows linearly keeps those constant. The verdict compares them,
for each number of sites measured at several round counts, at the most rounds against the
fewest, on CPU time and memory: wall time on a shared machine also counts waiting for the cores
and for `scontrol`.
Prints one line per point and the verdict, then a JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.workflow_util import BIN, tiny_config  # noqa: E402


def dry_run(tmp: Path, rounds: int, sites: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak MiB) of planning `rounds` x `sites`."""
    d = Path(tempfile.mkdtemp(prefix=f"r{rounds}s{sites}-", dir=tmp))  # a fresh .snakemake each run
    cfg = tiny_config(d)
    cfg["rounds"]["count"] = rounds
    cpu = cfg["sites"]["laptop"]
    cfg["sites"] = {f"s{i:02d}": dict(cpu) for i in range(sites)}
    for domain in cfg["data"]["synth"]["domains"]:
        domain.pop("site", None)  # every domain shared: any number of sites plans the same data
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        "/usr/bin/time",
        "-f",
        "%e %U %S %M",
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
    ]
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
    wall, user, system, kib = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), float(user) + float(system), int(kib) / 1024


# Per-unit cost may grow this much from the fewest rounds to the most and still count as linear:
# run-to-run noise on the shared 2-core VM, and Python's full garbage collections (they walk the
# whole heap each time it grows by a quarter, linear in total but lumpy).
LINEAR = 1.25


def verdict(rows: list[dict]) -> list[dict]:
    """For each number of sites measured at several round counts: per round x site cost at the
    most rounds over that at the fewest, for CPU time and memory."""
    out = []
    for sites in sorted({r["sites"] for r in rows}):
        same = sorted((r for r in rows if r["sites"] == sites), key=lambda r: r["rounds"])
        if len(same) < 2:
            continue
        lo, hi = same[0], same[-1]
        v = {"sites": sites, "rounds": [lo["rounds"], hi["rounds"]]}
        v["cpu_ratio"] = hi["cpu_ms_per_round_site"] / lo["cpu_ms_per_round_site"]
        v["wall_ratio"] = hi["ms_per_round_site"] / lo["ms_per_round_site"]
        v["memory_ratio"] = hi["mib_per_round_site"] / lo["mib_per_round_site"]
        v["linear"] = max(v["cpu_ratio"], v["memory_ratio"]) <= LINEAR
        out.append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--grid", default="1x3,100x3,400x3,1000x3,100x16,1000x16", help="rounds x sites, the first the baseline"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each point; the table gives medians")
    ap.add_argument("--tmp", default=None)
    a = ap.parse_args()
    grid = [tuple(int(x) for x in point.split("x")) for point in a.grid.split(",")]
    runs: dict[tuple[int, int], list[tuple[float, float, float]]] = {point: [] for point in grid}
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        for i in range(a.repeat):
            for point in grid:
                runs[point].append(dry_run(Path(tmp), *point))
                wall, cpu, mib = runs[point][-1]
                print(f"run {i + 1}/{a.repeat} {point[0]} x {point[1]}: {wall:.1f} s, CPU {cpu:.1f} s, {mib:.0f} MiB")

    def medians(point):
        return tuple(statistics.median(run[k] for run in runs[point]) for k in range(3))

    base_s, base_cpu, base_mib = medians(grid[0])
    print(f"baseline {grid[0][0]} x {grid[0][1]}: {base_s:.1f} s, CPU {base_cpu:.1f} s, {base_mib:.0f} MiB")
    rows = []
    for rounds, sites in grid[1:]:
        s, cpu, mib = medians((rounds, sites))
        n = rounds * sites
        row = {"rounds": rounds, "sites": sites, "seconds": s, "cpu_seconds": cpu, "peak_mib": mib}
        row["ms_per_round_site"] = 1000 * (s - base_s) / n
        row["cpu_ms_per_round_site"] = 1000 * (cpu - base_cpu) / n
        row["mib_per_round_site"] = (mib - base_mib) / n
        rows.append(row)
        # Marginal: from the point with the same sites and the next fewer rounds to this one.
        # A DAG's memory shows in peak RSS only where it rises above the start-up's own peak,
        # so the figure above the baseline understates small DAGs; the marginal one does not.
        before = [r for r in rows[:-1] if r["sites"] == sites and r["rounds"] < rounds]
        if before:
            prev = max(before, key=lambda r: r["rounds"])
            dn = n - prev["rounds"] * sites
            row["marginal_cpu_ms_per_round_site"] = 1000 * (cpu - prev["cpu_seconds"]) / dn
            row["marginal_mib_per_round_site"] = (mib - prev["peak_mib"]) / dn
        print(
            f"{rounds} x {sites}: {s:.1f} s, CPU {cpu:.1f} s, {mib:.0f} MiB; above the baseline, per round x site: "
            f"{row['ms_per_round_site']:.2f} ms, CPU {row['cpu_ms_per_round_site']:.2f} ms, "
            f"{row['mib_per_round_site']:.3f} MiB"
            + (
                f"; from {prev['rounds']} rounds CPU {row['marginal_cpu_ms_per_round_site']:.2f} ms, "
                f"{row['marginal_mib_per_round_site']:.3f} MiB"
                if before
                else ""
            )
        )
    verdicts = verdict(rows)
    for v in verdicts:
        lo, hi = v["rounds"]
        print(
            f"{v['sites']} sites, {lo} -> {hi} rounds: per round x site x{v['cpu_ratio']:.2f} CPU time "
            f"(x{v['wall_ratio']:.2f} wall), x{v['memory_ratio']:.2f} memory: "
            + ("linear" if v["linear"] else f"grows faster than linearly (more than x{LINEAR})")
        )
    baseline = {"grid": grid[0], "seconds": base_s, "cpu_seconds": base_cpu, "peak_mib": base_mib}
    print(json.dumps({"repeat": a.repeat, "baseline": baseline, "points": rows, "verdict": verdicts}))


if __name__ == "__main__":
    main()
