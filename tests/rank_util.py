"""Run a snippet of Python as the ranks of one site, started as torchrun or srun starts them, and
collect each rank's answer (the JSON on its last line of output)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, size: int, launcher: str, port: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_PORT=str(port))
    if launcher == "torchrun":
        env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
        env["MASTER_ADDR"] = "127.0.0.1"
    else:  # one srun task: the master address is for the rank to find in the step's node list
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(size), SLURM_LOCALID=str(rank))
        env.update(SLURM_STEP_ID="0", SLURM_JOB_ID="4242")
    return {**env, **extra}


def run_ranks(code: str, size: int = 2, launcher: str = "torchrun", timeout: float = 180, **extra: str) -> list:
    """Every rank's answer, in rank order; a rank that fails fails the caller with its stderr."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=rank_env(rank, size, launcher, port, extra),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(size)
    ]
    answers, failures = [], []
    for rank, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
            failures.append(f"rank {rank} timed out after {timeout} s:\n{err[-3000:]}")
            continue
        if proc.returncode != 0:
            failures.append(f"rank {rank} exited {proc.returncode}:\n{err[-3000:]}")
        else:
            answers.append(json.loads(out.strip().splitlines()[-1]))
    assert not failures, "\n".join(failures)
    return answers
