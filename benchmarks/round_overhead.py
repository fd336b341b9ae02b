"""What a round costs beyond local training, with one Snakemake job per site and round (issue 21, item 3's baseline).

Usage: python benchmarks/round_overhead.py [--rounds 20] [--tmp DIR]

Runs the tests' tiny federation (3 sites, a 1-layer GPT) for `--rounds` rounds with `fedhpc run`
on the local profile, then reads the run's own records: a round's wall time is the time from one
promotion to the next in the audit log; its training time, measured in the same run, is the
longest of the sites' training loops that round (`train_seconds` of the signed receipts); the
overhead is the difference: job starts, imports, model loads and the coordinator's stages. Also
prints what each rule's jobs took (Snakemake's benchmark files, where a rule keeps them).
Medians over the rounds after the first. Prints a JSON object on the last line.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tmp", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        d = Path(tmp)
        cfg = tiny_config(d, rounds=a.rounds)
        write_config(d, cfg)
        t0 = time.perf_counter()
        proc = subprocess.run(snakemake_cmd(d), capture_output=True, text=True, env=env())
        total = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        run = Path(cfg["output_dir"]) / cfg["run"]
        done = promotions(run)
        rounds = [r for r in range(1, a.rounds) if r in done and r - 1 in done]
        walls = [done[r] - done[r - 1] for r in rounds]
        trains = [training_seconds(run, r) for r in rounds]
        overheads = [w - t for w, t in zip(walls, trains)]
        rules = rule_seconds(run)
    wall, train, over = (statistics.median(x) for x in (walls, trains, overheads))
    print(f"{a.rounds} rounds x {len(cfg['sites'])} sites, local profile: {total:.1f} s in all")
    print(f"  a round (median of rounds 1-{a.rounds - 1}): {wall:.2f} s, of which training {train:.2f} s")
    print(f"  overhead per round: {over:.2f} s, {over / max(train, 1e-9):.1f}x the training it serves")
    print("  job wall time by rule (median): " + ", ".join(f"{k} {v:.2f} s" for k, v in rules.items()))
    print(
        json.dumps(
            {
                "rounds": a.rounds,
                "sites": len(cfg["sites"]),
                "seconds_total": total,
                "round_seconds_median": wall,
                "training_seconds_median": train,
                "overhead_seconds_median": over,
                "rule_seconds_median": rules,
            }
        )
    )


if __name__ == "__main__":
    main()
