"""What a round costs beyond local training: one job per site and round, resident site jobs, and Flower.

Usage: python benchmarks/round_overhead.py [--rounds 20] [--repeats 1] [--flower-python PATH] [--tmp DIR]

Runs the tests' tiny federation (3 sites, a 1-layer GPT) for `--rounds` rounds with `fedhpc run`
on the local profile, with a train job per site and round and with every site resident
(`sites.<name>.resident`: one job trains all its rounds), each with the jobs forked from the run's
warm process (the default) and cold (`fedhpc run --cold`: every job its own Python), alternating
`--repeats` times. It then
reads each run's own records: a round's wall time is the time from one promotion to the next in
the audit log; its training time, measured in the same run, is the longest of the sites' training
loops that round (`train_seconds` of the signed receipts); the overhead is the difference: job
starts, imports, model loads, waiting and the coordinator's stages. Also prints what each rule's
jobs took (Snakemake's benchmark files, where a rule keeps them). With `--flower-python` (a venv
with torch and flwr[simulation]), runs benchmarks/flower_round_overhead.py there for the same
rounds and sites, a simulation of the same work in one process, measured the same way. Medians
over the rounds after the first (over repeats: the median of the runs' medians). Last, Snakemake's
own floor: what a job costs it with no work at all (a chain of jobs that each touch their output,
on the same profile's executor, less the same run with one job), times the coordinator's jobs in a
resident round. Prints a JSON object on the last line.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.workflow_util import env, events, snakemake_cmd, tiny_config, write_config  # noqa: E402


def promotions(run: Path) -> dict[int, float]:
    """Round r → when its promotion (or rollback) was logged."""
    return {
        e["from_round"]: e["time"]
        for e in events(run)
        if e["event"] in ("global.published", "round.rolled_back") and "from_round" in e
    }


PHASES = (  # (name, the event a phase ends with); each starts where the one before ended
    ("promotion to plan", "round.planned"),
    ("plan to the first site training", "train.started"),
    ("the sites' training", "update.published"),
    ("the last update to gather", "round.gathered"),
    ("verify", "update.verdict"),
    ("aggregate", "round.aggregated"),
    ("scoring, merge and promotion", "global.published"),
)


def phases(run: Path) -> dict[str, float]:
    """Median seconds of each phase of a round (rounds 1 on), by the audit log: a phase ends at its
    event's first instance in the round (the last, for the sites' training and verify)."""
    per: dict[str, list[float]] = defaultdict(list)
    evs = events(run)
    starts = promotions(run)
    for r in sorted(starts):
        if r - 1 not in starts:
            continue
        t = starts[r - 1]  # round r's global model is out
        for name, event in PHASES:
            if event == "global.published":
                at = starts[r]
            else:
                times = [e["time"] for e in evs if e["event"] == event and e.get("round") == r]
                if not times:
                    break
                at = max(times) if event in ("update.published", "update.verdict") else min(times)
            per[name].append(at - t)
            t = at
    return {name: statistics.median(v) for name, v in per.items()}


def training_seconds(run: Path, r: int) -> float:
    receipts = (run / "rounds" / f"r{r:04d}" / "sites").glob("*/receipt.json")
    return max((json.loads(p.read_text()).get("train_seconds", 0.0) for p in receipts), default=0.0)


def rule_seconds(run: Path) -> dict[str, float]:
    """Median wall seconds of a job, per rule that keeps Snakemake benchmark files."""
    per: dict[str, list[float]] = defaultdict(list)
    for tsv in (run / "benchmarks").glob("*/*.tsv"):
        with open(tsv) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        per[tsv.parent.name] += [float(row["s"]) for row in rows]
    return {rule: statistics.median(v) for rule, v in sorted(per.items())}


def federation(tmp: Path, rounds: int, resident: bool, cold: bool) -> dict:
    """One run of the tiny federation; its per-round medians."""
    cfg = tiny_config(tmp, rounds=rounds)
    for site in cfg["sites"].values():
        site["resident"] = resident
    write_config(tmp, cfg)
    t0 = time.perf_counter()
    proc = subprocess.run(snakemake_cmd(tmp, *(["--cold"] if cold else [])), capture_output=True, text=True, env=env())
    total = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    run = Path(cfg["output_dir"]) / cfg["run"]
    done = promotions(run)
    rounds_ = [r for r in range(1, rounds) if r in done and r - 1 in done]
    walls = [done[r] - done[r - 1] for r in rounds_]
    trains = [training_seconds(run, r) for r in rounds_]
    return {
        "seconds_total": total,
        "round_seconds_median": statistics.median(walls),
        "training_seconds_median": statistics.median(trains),
        "overhead_seconds_median": statistics.median(w - t for w, t in zip(walls, trains)),
        "rule_seconds_median": rule_seconds(run),
        "phase_seconds_median": phases(run),
        "sites": len(cfg["sites"]),
    }


# The coordinator's jobs in a round of resident sites, one after another: plan, gather, verify,
# aggregate, evaluate_shared, merge_eval, promote.
COORDINATOR_JOBS = 7

CHAIN = """
rule all:
    input: f"out/{N}.txt"
rule first:
    output: "out/0.txt"
    shell: "touch {output}"
rule step:
    input: lambda w: f"out/{int(w.i) - 1}.txt"
    output: "out/{i}.txt"
    wildcard_constraints: i="[1-9][0-9]*"
    shell: "touch {output}"
"""


def snakemake_floor(tmp: Path, jobs: int = 41, repeats: int = 3) -> float:
    """Seconds Snakemake spends on a job that does nothing (median of `repeats` chains of `jobs`)."""
    snakemake = Path(sys.executable).parent / "snakemake"

    def chain(n: int) -> float:
        d = tmp / f"chain-{n}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "Snakefile").write_text(f"N = {n - 1}\n" + CHAIN)
        t0 = time.perf_counter()
        subprocess.run(
            [str(snakemake), "-c1", "-q", "--executor", "local", "-d", str(d), "-s", str(d / "Snakefile")],
            check=True,
            capture_output=True,
            env=env(),
        )
        took = time.perf_counter() - t0
        subprocess.run(["rm", "-rf", str(d)], check=True)
        return took

    per_job = [(chain(jobs) - chain(1)) / (jobs - 1) for _ in range(repeats)]
    return statistics.median(per_job)


def flower(python: str, rounds: int, clients: int) -> dict:
    script = REPO / "benchmarks" / "flower_round_overhead.py"
    cmd = [python, str(script), "--rounds", str(rounds), "--clients", str(clients)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    keys = ("seconds_total", "round_seconds_median", "training_seconds_median", "overhead_seconds_median")
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def line(name: str, m: dict) -> str:
    return (
        f"  {name:<22} round {m['round_seconds_median']:.2f} s, training {m['training_seconds_median']:.2f} s, "
        f"overhead {m['overhead_seconds_median']:.2f} s ({m['seconds_total']:.0f} s in all)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--flower-python", help="python of a venv with torch and flwr[simulation]")
    ap.add_argument("--tmp", default=None)
    a = ap.parse_args()
    modes = {  # name: (resident, cold); cold: every job its own Python (`fedhpc run --cold`)
        "per-round jobs, cold": (False, True),
        "per-round jobs": (False, False),
        "resident, cold": (True, True),
        "resident": (True, False),
    }
    runs: dict[str, list[dict]] = {name: [] for name in [*modes, "flower"]}
    for _ in range(a.repeats):  # alternating, so that a busier minute of the machine hits all alike
        for name, (resident, cold) in modes.items():
            with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
                runs[name].append(federation(Path(tmp), a.rounds, resident, cold))
        if a.flower_python:
            runs["flower"].append(flower(a.flower_python, a.rounds, runs["resident"][-1]["sites"]))
    result = {name: median_of(r) for name, r in runs.items() if r}
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        floor = snakemake_floor(Path(tmp))
    sites = runs["resident"][-1]["sites"]
    print(
        f"{a.rounds} rounds x {sites} sites, local profile, medians of rounds 1-{a.rounds - 1}, {a.repeats} run(s) each:"
    )
    for name, m in result.items():
        print(line(name, m))
    per, res = result["per-round jobs"], result["resident"]

    def ratio(a: str, b: str) -> float:
        return result[a]["overhead_seconds_median"] / result[b]["overhead_seconds_median"]

    print(
        f"  overhead, warm / cold: per-round jobs {ratio('per-round jobs', 'per-round jobs, cold'):.2f}, "
        f"resident {ratio('resident', 'resident, cold'):.2f}"
    )
    print(
        f"  resident overhead / per-round overhead: {res['overhead_seconds_median'] / per['overhead_seconds_median']:.2f}"
    )
    if "flower" in result:
        fl = result["flower"]
        print(f"  resident overhead / Flower's: {res['overhead_seconds_median'] / fl['overhead_seconds_median']:.1f}")
    coordinator = COORDINATOR_JOBS * floor
    print(
        f"  Snakemake's floor: {floor:.3f} s a job that does nothing; x {COORDINATOR_JOBS} coordinator jobs a resident"
        f" round = {coordinator:.2f} s"
        + (
            f" = {coordinator / result['flower']['overhead_seconds_median']:.1f}x Flower's overhead"
            if "flower" in result
            else ""
        )
    )
    where = runs["resident"][-1]["phase_seconds_median"]
    print(
        "  a resident round, warm, by the audit log (median): " + ", ".join(f"{k} {v:.2f} s" for k, v in where.items())
    )
    for name in modes:
        rules = runs[name][-1]["rule_seconds_median"]
        print(f"  job wall time by rule, {name} (median): " + ", ".join(f"{k} {v:.2f} s" for k, v in rules.items()))
    print(
        json.dumps(
            {"rounds": a.rounds, "sites": sites, "repeats": a.repeats, **result, "snakemake_seconds_per_job": floor}
        )
    )


if __name__ == "__main__":
    main()
