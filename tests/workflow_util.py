"""Helpers for tests that run the Snakemake workflow on a tiny federation in a temp dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tiny_config(out: Path, run: str = "tiny", rounds: int = 2, mlflow: bool = False) -> dict:
    return {
        "run": run,
        "seed": 7,
        "output_dir": str(out / "results"),
        "sites": {
            "lumi": {"accelerator": "rocm", "gpus": 8, "gpu_memory_gb": 64, "throughput": 2.0},
            "a100": {"accelerator": "cuda", "gpus": 4, "gpu_memory_gb": 40, "throughput": 1.0},
            "laptop": {"accelerator": "cpu", "memory_gb": 8, "throughput": 1.0},
        },
        "data": {
            "synth": {
                "bytes_per_domain": 24000,
                "doc_bytes": 400,
                "domains": [
                    {"name": "law", "generator": "words", "words": 60, "site": "lumi"},
                    {"name": "clinical", "generator": "markov", "alphabet": 10, "site": "a100"},
                    {"name": "web", "generator": "zipf", "alphabet": 12},
                ],
            },
            "shard_tokens": 4000,
            "heldout_fraction": 0.1,
        },
        "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32},
        # The rocm and cuda sites are simulated on this machine's CPU, by choice (never a fall-back).
        "training": {"batch_tokens": 512, "max_micro_batch": 8, "lr": 0.01, "log_every": 2, "device": "cpu"},
        "rounds": {"count": rounds, "tokens_per_round": 24000, "deadline_minutes": 5, "quorum": 0.5},
        "evaluation": {"tokens_per_domain": 1024},
        "tracking": {"mlflow": mlflow},
    }


def write_config(tmp: Path, cfg: dict) -> Path:
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake_cmd(tmp: Path, *extra: str) -> list[str]:
    """The documented way to run (and, after any crash, resume) a federation."""
    return [
        str(BIN / "fedhpc"),
        "run",
        "--profile",
        str(REPO / "profiles" / "local"),
        "--directory",
        str(tmp),
        "--configfile",
        str(tmp / "config.yaml"),
        *extra,
    ]


def env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def kill_when(tmp: Path, reached: Path, *extra: str, timeout: float = 300) -> None:
    """Run the federation and SIGKILL it, Snakemake and every job, as soon as `reached` exists."""
    proc = subprocess.Popen(
        snakemake_cmd(tmp, *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while not reached.exists():
            assert proc.poll() is None, f"the run finished before {reached} appeared"
            assert time.time() < deadline, f"kill point {reached} never reached"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_workflow(tmp: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(snakemake_cmd(tmp, *extra), capture_output=True, text=True, env=env(), timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def summary(tmp: Path, cfg: dict) -> dict:
    return json.loads((Path(cfg["output_dir"]) / cfg["run"] / "summary.json").read_text())


def events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "audit.jsonl").read_text().splitlines()]


def run_stages(config: Path, rounds: int, sites: list[str], synth: bool = False, track: bool = False) -> None:
    """Every stage of a federation, in the order the workflow runs them, as `fedhpc <verb>` calls in
    this process (the rules are exactly these calls): for tasks whose imports would dominate a
    workflow run (transformers, sentence-transformers) if every job paid for them again."""
    from fedhpc.cli.main import main

    def stage(*args: str) -> None:
        assert main([*args, "--config", str(config)]) == 0, args

    from fedhpc.tasks.validation import load

    cfg = load(config)
    stage("keys", "ensure")
    if synth:
        for site in sorted({d.site for d in cfg.data.synth.domains}, key=str):
            stage("synth", *(["--site", site] if site else []))
    stage("shard")
    for site in sites:  # every site packs its own data (tasks with their own format: nothing)
        stage("shard", "--site", site)
    stage("init")

    def evaluate(r: int, which: str) -> None:
        stage("evaluate", "--round", str(r), "--which", which, "--threads", "2")
        for site in sites:
            stage("evaluate", "--round", str(r), "--which", which, "--site", site, "--threads", "2")
        stage("merge-eval", "--round", str(r), "--which", which)

    evaluate(0, "global")
    status = config.parent / "status"
    for r in range(rounds):
        stage("plan", "--round", str(r))
        for site in sites:
            stage("train", "--round", str(r), "--site", site, "--threads", "2", "--status", f"{status}/{r}-{site}.json")
        for verb in ("gather", "verify", "aggregate"):
            stage(verb, "--round", str(r))
        evaluate(r, "candidate")
        stage("promote", "--round", str(r))
        if cfg.retention.enabled:
            stage("retain", "--round", str(r))
        if track:
            stage("track", "--round", str(r))
    stage("report")
