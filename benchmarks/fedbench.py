"""Shared machinery of the benchmarks that run whole federations: one `fedhpc run` per config, its summary, the gaps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_federation(
    make_config: Callable[[Path], dict],
    prefix: str,
    cores: int,
    timeout: float,
    keep: bool,
    keep_root: Path | None = None,
) -> dict:
    """Run one federation through the real workflow (`fedhpc run --profile profiles/local`) in a
    fresh directory; `make_config(directory)` gives its config. Returns the wall time and the
    summary's figures, or `error` (the directory is then kept for diagnosis)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=keep_root))
    cfg = make_config(tmp)
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    cmd = [
        str(BIN / "fedhpc"), "run", "--profile", str(REPO / "profiles" / "local"),
        "--directory", str(tmp), "--configfile", str(tmp / "config.yaml"),
    ]  # fmt: skip
    if cores:
        cmd += ["--cores", str(cores)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    t0 = time.perf_counter()
    # Own session: on timeout the whole Snakemake tree is stopped, and nothing else.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
        rc, err = proc.returncode, stderr[-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate()
        rc, err = "timeout", f"no result after {timeout} s; logs in {tmp}"
    wall = time.perf_counter() - t0
    summary_path = Path(cfg["output_dir"]) / cfg["run"] / "summary.json"
    res = {"wall_seconds": wall, "dir": str(tmp) if keep else None}
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        res.update(
            final_eval_loss=s["final_eval_loss"],
            initial_eval_loss=s["initial_eval_loss"],
            entropy_floor=s["entropy_floor"],
            final_eval_by_domain=s["final_eval_by_domain"],
            rounds_completed=s["rounds_completed"],
            rollbacks=s["rollbacks"],
            excluded_updates=len(s["excluded_updates"]),
            eval_history=[h["eval_loss"] for h in s["history"]],
        )
    else:
        res.update(final_eval_loss=None, error=f"rc={rc}: {err}")
        if not keep:
            kept = Path(tempfile.mkdtemp(prefix=f"{prefix}-failed-"))
            shutil.copytree(tmp, kept, dirs_exist_ok=True)
            res["dir"] = str(kept)  # kept for diagnosis
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def outcome(res: dict) -> str:
    """How a run ended, for its progress line."""
    if "error" in res:
        return "FAILED " + (res["error"].strip().splitlines() or ["?"])[-1]
    return f"rollbacks {res['rollbacks']} excluded {res['excluded_updates']}"


def gap(fed: float | None, central: float | None) -> float | None:
    """(federated - centralized) / centralized, in %."""
    if fed is None or central is None:
        return None
    return 100.0 * (fed - central) / central


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def key_values(items: list[str], flag: str, cast, keys: list[str] | None = None) -> dict:
    """The KEY=VALUE arguments of `--flag` as a dict; with `keys`, KEY must be one of them."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not key or not value or (keys is not None and key not in keys):
            allowed = f" with KEY one of {sorted(keys)}" if keys is not None else ""
            raise SystemExit(f"--{flag} takes KEY=VALUE{allowed}; got {item!r}")
        out[key] = cast(value)
    return out
