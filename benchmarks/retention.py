"""Disk a federation keeps with `retention:` against the same federation keeping everything, in one run.

Usage: python benchmarks/retention.py [--rounds 30] [--keep 2] [--every 10] [--repeat 3] [--tmp DIR]

Runs the tests' small two-site federation twice, every stage in this process (tests/workflow_util
.run_stages), once with `retention: {keep_rounds, globals_every}` and once without, and prints the
bytes of model and update files each leaves (a symlink counts nothing, a file once), the median
wall time of each (runs alternate), and the ratios. Then the same policy projected onto a 32B-parameter model in
fp32 (128 GB a model or update) trained by 4 sites for 100 rounds, counting the files the policy
keeps (tests check that the code keeps exactly those). Prints a JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedhpc.stages import retain  # noqa: E402
from fedhpc.stages.retain import Policy  # noqa: E402

RETAIN_SECONDS: list[float] = []  # each call of the retain stage, timed where it runs


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            RETAIN_SECONDS.append(time.perf_counter() - t0)

    return wrapper


retain.retain_round = _timed(retain.retain_round)
from tests.workflow_util import run_stages, tiny_config, write_config  # noqa: E402


def kept_bytes(run: Path) -> int:
    return sum(p.stat().st_size for p in run.rglob("*.safetensors") if not p.is_symlink())


def federation(tmp: Path, rounds: int, retention: dict | None) -> tuple[int, float]:
    """(bytes of models and updates left, seconds) of one small federation."""
    tmp.mkdir(parents=True)
    cfg = tiny_config(tmp, rounds=rounds)
    cfg["sites"] = {"laptop": cfg["sites"]["laptop"], "a100": cfg["sites"]["a100"]}
    cfg["data"]["synth"]["domains"] = [d for d in cfg["data"]["synth"]["domains"] if d.get("site") is None]
    cfg["rounds"]["tokens_per_round"] = 8000
    cfg["evaluation"]["tokens_per_domain"] = 128
    if retention:
        cfg["retention"] = retention
    path = write_config(tmp, cfg)
    t0 = time.perf_counter()
    run_stages(path, rounds, sorted(cfg["sites"]), synth=True)
    return kept_bytes(Path(cfg["output_dir"]) / cfg["run"]), time.perf_counter() - t0


def projected_files(policy: Policy | None, rounds: int, sites: int) -> int:
    """Model-sized files on disk after `rounds` rounds, every round accepted: a candidate and one update
    per site a round, a global a round (a link to its candidate, so no bytes of its own), the initial one."""
    if policy is None:
        return 1 + rounds * (1 + sites)
    r = rounds - 1
    live = [j for j in range(rounds) if not policy.round_pruned(j, r)]
    globals_kept = [g for g in range(1, rounds + 1) if g == rounds or not policy.global_pruned(g, r)]
    # A kept global's bytes are its candidate's: count a candidate once, kept by its round or its global.
    candidates = set(live) | {g - 1 for g in globals_kept}
    return 1 + len(candidates) + sites * len(live)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating; medians")
    ap.add_argument("--tmp", default=None)
    a = ap.parse_args()
    retention = {"keep_rounds": a.keep, "globals_every": a.every}
    times: dict[str, list[float]] = {"retention": [], "everything": []}
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        for i in range(a.repeat):
            kept, t = federation(Path(tmp) / f"retention{i}", a.rounds, retention)
            times["retention"].append(t)
            full, t = federation(Path(tmp) / f"everything{i}", a.rounds, None)
            times["everything"].append(t)
    t_kept, t_full = statistics.median(times["retention"]), statistics.median(times["everything"])
    print(
        f"{a.rounds} rounds, 2 sites, tiny model (median of {a.repeat} runs): keep everything {full / 1e6:.2f} MB in {t_full:.1f} s"
    )
    print(f"  retention K={a.keep}, M={a.every}: {kept / 1e6:.2f} MB in {t_kept:.1f} s")
    per_round = statistics.median(RETAIN_SECONDS)
    print(f"  ratio {kept / full:.3f} of the disk, {t_kept / t_full:.2f}x the time (machine load varies it)")
    print(f"  the retain stage itself: median {per_round * 1e3:.2f} ms a round over {len(RETAIN_SECONDS)} calls")
    policy = Policy(a.keep, a.every, 1)
    big, rounds, sites = 128e9, 100, 4
    before, after = projected_files(None, rounds, sites), projected_files(policy, rounds, sites)
    copied = before + rounds  # before globals were links: every promotion copied its candidate
    print(
        f"32B fp32 model (128 GB a file), {sites} sites x {rounds} rounds: {copied * big / 1e12:.1f} TB with promoted "
        f"globals copied, {before * big / 1e12:.1f} TB linked, {after * big / 1e12:.2f} TB ({after} files) with retention"
    )
    out = {
        "rounds": a.rounds,
        "keep_rounds": a.keep,
        "globals_every": a.every,
        "bytes_everything": full,
        "bytes_retention": kept,
        "ratio": kept / full,
        "seconds_everything": t_full,
        "seconds_retention": t_kept,
        "retain_stage_ms_median": per_round * 1e3,
        "projected_tb_copied": copied * big / 1e12,
        "projected_tb_everything": before * big / 1e12,
        "projected_tb_retention": after * big / 1e12,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
