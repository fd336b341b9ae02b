"""`fedhpc submit`: run the Snakemake head process as its own small Slurm job, through submitit.

Login nodes (LUMI's included) do not allow long-running processes, and a federation runs
for days. The head job only plans, polls and submits; the heavy work runs in the jobs it
submits. Its sbatch parameters live in `profiles/<name>/head.yaml`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from .errors import FedhpcError

HEAD_KEYS = {"partition", "account", "time", "cpus_per_task", "mem", "qos", "constraint", "setup"}


class SubmitError(FedhpcError, RuntimeError):
    """The head job cannot be submitted as configured."""


def head_parameters(profile: Path) -> dict:
    path = profile / "head.yaml"
    if not path.exists():
        raise SubmitError(f"{path} is missing: it holds the head job's partition, account and time limit")
    params = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(params) - HEAD_KEYS)
    if unknown:
        raise SubmitError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(HEAD_KEYS))}")
    return params


def run_head(profile: str, configfile: str | None, workdir: str) -> int:
    """The head job's body: `fedhpc run` with the head's own Slurm context removed, so the
    jobs it submits do not inherit the head job's allocation settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    argv = [sys.executable, "-m", "fedhpc", "run", "--profile", profile, "--directory", workdir]
    if configfile:
        argv += ["--configfile", configfile]
    return subprocess.run(argv, env=env, check=False).returncode


def submit(profile: str, configfile: str | None, workdir: str, log_dir: str):
    import submitit

    prof = Path(profile).resolve()
    params = head_parameters(prof)
    executor = submitit.SlurmExecutor(folder=Path(log_dir).resolve() / "%j", max_num_timeout=0)
    executor.update_parameters(job_name="fedhpc-head", ntasks_per_node=1, use_srun=False, signal_delay_s=120, **params)
    job = executor.submit(
        run_head, str(prof), str(Path(configfile).resolve()) if configfile else None, str(Path(workdir).resolve())
    )
    return job
