"""Ask Slurm, from the coordinator, whether a site's training job is still alive.

A job killed together with its shell (time limit, `scancel`, a node failure) leaves no failure
record; its Slurm state is the only witness. Queries are throttled: sites poll nothing and the
coordinator asks slurmctld about one job at most every `every` seconds, as centres ask of users.
"""

from __future__ import annotations

import functools
import re
import subprocess
import time

# States in which a job may still run or run again (a requeue keeps the job id).
ALIVE = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
    }
)
# squeue's word for a job slurmctld no longer holds (it ended more than MinJobAge ago).
GONE = "GONE"


@functools.lru_cache(maxsize=1)
def local_cluster() -> str | None:
    """The name of the cluster this host's Slurm commands talk to, or None without Slurm."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^ClusterName\s*=\s*(\S+)", out.stdout, re.M)
    return m.group(1) if out.returncode == 0 and m else None


def job_state(job_id: str) -> str | None:
    """The job's state (RUNNING, CANCELLED, TIMEOUT, ..., or GONE), or None when Slurm cannot say."""
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--states=all", "--jobs", str(job_id), "--format=%T"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode == 0:
        states = out.stdout.split()
        return states[0] if states else GONE
    return GONE if "invalid job id" in out.stderr.lower() else None


class JobWatch:
    """Throttled answers to "has this job ended?" for jobs of the local cluster."""

    def __init__(self, every: float = 15.0):
        self.every = every
        self._seen: dict[str, tuple[float, str | None]] = {}

    def ended(self, job_id: str, cluster: str | None) -> str | None:
        """The state a job ended in, or None while it may still run (or Slurm cannot tell, or it
        ran on another cluster, whose job ids mean nothing here)."""
        if cluster is None or cluster != local_cluster():
            return None
        at, state = self._seen.get(job_id, (0.0, None))
        if time.monotonic() - at >= self.every:
            state = job_state(job_id)
            self._seen[job_id] = (time.monotonic(), state)
        return None if state is None or state in ALIVE else state
