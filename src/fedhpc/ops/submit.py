"""`fedhpc submit`: run the Snakemake head process as its own small Slurm job, through submitit.

Login nodes (LUMI's included) do not allow long-running processes, and a federation runs
for days. The head job only plans, polls and submits; the heavy work runs in the jobs it
submits. Its sbatch parameters live in `profiles/<name>/head.yaml`, with `site_env`: the
site's environment script (envs/lumi.sh), sourced before the head starts so that every job it
submits (sbatch --export=ALL) inherits it, as scripts/sbatch/*-head.sh do.

A federation outlives any one job's time limit: `signal_delay_s` before the limit Slurm warns
the head, which stops Snakemake and requeues itself (submitit's checkpointing), and resumes
the federation where it stopped when it runs again, up to `max_requeues` times.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fedhpc.core.errors import FedhpcError

SBATCH_KEYS = {"partition", "account", "time", "cpus_per_task", "mem", "qos", "constraint", "setup", "signal_delay_s"}
HEAD_KEYS = SBATCH_KEYS | {"site_env", "max_requeues"}
# Warned 5 minutes before its time limit, the head gives Snakemake up to 2 of them to stop.
SIGNAL_DELAY_S = 300
# 30 requeues of a 3-day head: three months of federation.
MAX_REQUEUES = 30


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
    if params.get("site_env"):
        env = (profile / params["site_env"]).resolve()
        if not env.is_file():
            raise SubmitError(
                f"{path}: site_env {params['site_env']!r} is not a file ({env}); give the site's "
                "environment script relative to the profile directory, e.g. ../../envs/lumi.sh"
            )
        params["site_env"] = str(env)
    return params


class HeadJob:
    """The head job's body: `fedhpc run` with the head's own Slurm context removed (the jobs it
    submits must not inherit the head job's allocation settings), after the site's environment.

    submitit calls `checkpoint` when Slurm warns of the time limit: Snakemake gets SIGTERM, on
    which it submits nothing more, and up to `grace_s` to exit; then submitit requeues the job.
    The warning reaches every process of the head's job step, so `fedhpc run` and what it starts
    ignore it: only this process acts on it.
    Jobs already submitted are not cancelled: their work is not lost, and the next run of the
    head picks up what they wrote (Snakemake reruns what it saw unfinished; a site-round already
    published is not trained again, a duplicate training's update is dropped).
    """

    def __init__(self, profile: str, configfile: str | None, workdir: str, site_env: str | None, grace_s: float):
        self.profile, self.configfile, self.workdir = profile, configfile, workdir
        self.site_env, self.grace_s = site_env, grace_s
        self._child: subprocess.Popen | None = None

    def __call__(self) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        argv = [sys.executable, "-m", "fedhpc", "run", "--profile", self.profile, "--directory", self.workdir]
        if self.configfile:
            argv += ["--configfile", self.configfile]
        if self.site_env:
            argv = ["bash", "-c", 'source "$0" && exec "$@"', self.site_env, *argv]
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"fedhpc head: job {os.environ.get('SLURM_JOB_ID', '?')}, start {int(restarts) + 1}", flush=True)
        warning = time_limit_warning()
        # In a process group of its own, which `checkpoint` can stop as a whole.
        child = self._child = subprocess.Popen(
            argv, env=env, start_new_session=True, preexec_fn=lambda: signal.signal(warning, signal.SIG_IGN)
        )
        # Polled rather than waited on: `checkpoint` runs in a signal handler and waits for the
        # child itself, which Popen.wait would block.
        while (code := child.poll()) is None:
            time.sleep(1)
        if code != 0:
            raise SubmitError(f"fedhpc run exited with {code} (its output is above); submit the head again to resume")
        return code

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        child = self._child
        if child is not None and child.poll() is None:
            print("fedhpc head: time limit near; stopping Snakemake, then requeueing", flush=True)
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                print(f"fedhpc head: Snakemake still busy after {self.grace_s:.0f} s; requeueing", flush=True)
            # Snakemake waits for its running jobs before it exits; those run on without it.
            # Nothing of this head may outlive it: the requeued head takes the run directory's lock.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        return DelayedSubmission(self)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_child": None}  # a process does not pickle; the next run starts its own


def time_limit_warning() -> signal.Signals:
    """The signal submitit has Slurm send before the time limit (USR2 unless configured)."""
    from submitit.slurm.slurm import SlurmJobEnvironment

    return getattr(signal, f"SIG{SlurmJobEnvironment.USR_SIG}")


def submit(profile: str, configfile: str | None, workdir: str, log_dir: str):
    import submitit

    prof = Path(profile).resolve()
    params = head_parameters(prof)
    site_env = params.pop("site_env", None)
    max_requeues = int(params.pop("max_requeues", MAX_REQUEUES))
    params.setdefault("signal_delay_s", SIGNAL_DELAY_S)
    executor = submitit.SlurmExecutor(folder=Path(log_dir).resolve() / "%j", max_num_timeout=max_requeues)
    # In a job step (srun): Slurm's warning before the time limit reaches a job's steps, never
    # a batch script's own processes.
    executor.update_parameters(job_name="fedhpc-head", ntasks_per_node=1, use_srun=True, **params)
    head = HeadJob(
        str(prof),
        str(Path(configfile).resolve()) if configfile else None,
        str(Path(workdir).resolve()),
        site_env,
        grace_s=params["signal_delay_s"] * 0.4,
    )
    return executor.submit(head)
