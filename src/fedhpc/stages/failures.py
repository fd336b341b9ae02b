"""Failure records of site training jobs: what a failed attempt leaves in its round directory, and when it is final.

A training job that fails writes `rounds/rNNNN/sites/<site>/failure.json`; the train rule's shell
writes it for the attempt when the process died without a word (killed, crashed). A job killed
together with its shell (time limit, scancel, node failure) writes nothing: every attempt notes
its start in `attempt.json`, and the coordinator writes that attempt's record once Slurm says its
job ended (`record_vanished`). `gather` reads the records to stop waiting for a site that failed
for good instead of waiting for the deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from pathlib import Path

from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.trust.audit import AuditLog

# Set by the workflow's head process (rules/common.smk) and inherited by every job it starts,
# locally or through Slurm (sbatch --export=ALL): records of an earlier invocation are history.
INVOCATION_ENV = "FEDHPC_INVOCATION"


def failure_path(layout: RunLayout, r: int, site: str) -> Path:
    return layout.site_dir(r, site) / "failure.json"


def attempt_path(layout: RunLayout, r: int, site: str) -> Path:
    return layout.site_dir(r, site) / "attempt.json"


def status_path(layout: RunLayout, r: int, site: str) -> Path:
    """The train rule's declared output: the job's final state."""
    return layout.site_dir(r, site) / "status.json"


ATTEMPTS_ENV = "FEDHPC_TRAIN_ATTEMPTS"


def invocation() -> str | None:
    return os.environ.get(INVOCATION_ENV) or None


def new_invocation() -> str:
    """Name this invocation of the workflow (in its head process; its jobs inherit the name)."""
    os.environ[INVOCATION_ENV] = uuid.uuid4().hex
    return os.environ[INVOCATION_ENV]


def export_attempts(attempts: int) -> int:
    """The head's word on how many attempts a job has, for the Snakemake a Slurm job runs
    (which is started with --retries 0, so it cannot tell)."""
    os.environ[ATTEMPTS_ENV] = str(attempts)
    return attempts


def exported_attempts() -> int:
    return int(os.environ.get(ATTEMPTS_ENV, "1"))


def is_deterministic(exc: BaseException) -> bool:
    """Whether another attempt would fail the same way. Errors of input and configuration (bad
    or tampered data, a config or plan the site cannot train, signatures: fedhpc's ValueErrors)
    do; the environment's (I/O, network, devices, a killed process) may not."""
    return isinstance(exc, FedhpcError) and isinstance(exc, ValueError)


def _attempt_id(attempt: int) -> str:
    # A Slurm requeue runs the same attempt again under the same job id: its restart count tells them apart.
    env = os.environ
    return f"{invocation()}/{attempt}/{env.get('SLURM_JOB_ID', '')}/{env.get('SLURM_RESTART_COUNT', '0')}"


def record_start(layout: RunLayout, r: int, site: str, attempt: int, attempts: int) -> dict:
    """Note that this attempt started, and in which Slurm job: the witness for a job that dies with its shell."""
    rec = {
        "round": r,
        "site": site,
        "attempt": attempt,
        "attempts": attempts,
        "invocation": invocation(),
        "attempt_id": _attempt_id(attempt),
        "time": time.time(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME"),
    }
    write_json(attempt_path(layout, r, site), rec)
    return rec


def record_vanished(layout: RunLayout, r: int, site: str, ended) -> dict | None:
    """If the site's last attempt of this invocation ran as a Slurm job that has ended without a
    record or a status (killed with its shell), write its failure record and return it.
    `ended(job_id, cluster)` is the job's final Slurm state, or None while it may still run."""
    try:
        start = read_json(attempt_path(layout, r, site))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(start, dict) or start.get("invocation") != invocation() or not start.get("slurm_job_id"):
        return None

    def spoke() -> bool:
        """The attempt left its status, its receipt or its own failure record."""
        rec = read_failure(layout, r, site)
        own = rec is not None and rec.get("attempt_id") == start["attempt_id"]
        return own or status_path(layout, r, site).exists() or layout.receipt(r, site).exists()

    if spoke():
        return None
    state = ended(start["slurm_job_id"], start.get("slurm_cluster"))
    # Asked again after Slurm's answer: a job that ended has written all it ever will.
    if state is None or spoke():
        return None
    error = (
        f"Slurm job {start['slurm_job_id']} ended {state} without a word from the training or its shell "
        "(killed with it: time limit, scancel, node failure or out of memory)"
    )
    rec = {
        **{k: start[k] for k in ("round", "site", "attempt", "attempts", "invocation", "attempt_id", "host")},
        "error": error,
        "deterministic": False,
        "final": start["attempt"] >= start["attempts"],
        "exit_code": None,
        "slurm_state": state,
        "time": time.time(),
        "slurm_job_id": start["slurm_job_id"],
    }
    return _write_failure(layout, rec)


def record_failure(
    layout: RunLayout,
    r: int,
    site: str,
    error: str,
    deterministic: bool,
    attempt: int,
    attempts: int,
    exit_code: int | None = None,
) -> dict:
    """Write the site's failure record for this attempt and audit it (`train.failed`)."""
    rec = {
        "round": r,
        "site": site,
        "error": error,
        "deterministic": deterministic,
        "attempt": attempt,
        "attempts": attempts,
        "final": deterministic or attempt >= attempts,
        "exit_code": exit_code,
        "invocation": invocation(),
        "attempt_id": _attempt_id(attempt),
        "time": time.time(),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    return _write_failure(layout, rec)


def _write_failure(layout: RunLayout, rec: dict) -> dict:
    write_json(failure_path(layout, rec["round"], rec["site"]), rec)
    fields = ("round", "site", "error", "deterministic", "attempt", "attempts", "exit_code")
    AuditLog(layout.audit).append("train.failed", **{k: rec[k] for k in fields})
    return rec


def describe_exit(code: int) -> str:
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = "unknown signal"
        return f"the training process was killed by signal {code - 128} ({name}) before it could report an error"
    return f"the training process exited with code {code}"


def record_exit(layout: RunLayout, r: int, site: str, code: int, attempt: int, attempts: int) -> dict:
    """The shell's record of an attempt that ended with exit `code`: the process's own record of
    this attempt, if it wrote one, completed with the code; otherwise one saying how it ended."""
    rec = read_failure(layout, r, site)
    if rec is not None and rec.get("attempt_id") == _attempt_id(attempt):
        if rec.get("exit_code") is None:
            rec["exit_code"] = code
            write_json(failure_path(layout, r, site), rec)
        return rec
    return record_failure(layout, r, site, describe_exit(code), False, attempt, attempts, code)


def read_failure(layout: RunLayout, r: int, site: str) -> dict | None:
    """The site's failure record, or None when there is none or it is not a well-formed one."""
    try:
        rec = read_json(failure_path(layout, r, site))
    except (FileNotFoundError, ValueError):
        return None
    ok = (
        isinstance(rec, dict)
        and isinstance(rec.get("error"), str)
        and isinstance(rec.get("deterministic"), bool)
        and all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) for k in ("attempt", "attempts"))
    )
    return rec if ok else None


def final_failure(layout: RunLayout, r: int, site: str) -> dict | None:
    """The site's failure record if nothing will run its round again, else None.

    A record of this invocation is final when its error is deterministic (its job then ends
    successfully, so neither Snakemake nor Slurm retries it) or its last allowed attempt failed.
    A record of an earlier invocation (a crashed head, now rerun) is history: the rerun retries
    the site, unless its job ended with status "failed" (a deterministic error), which a rerun
    does not redo.
    """
    rec = read_failure(layout, r, site)
    if rec is None:
        return None
    if rec.get("invocation") == invocation():
        return rec if rec["deterministic"] or rec["attempt"] >= rec["attempts"] else None
    if not rec["deterministic"]:
        return None
    try:
        status = read_json(status_path(layout, r, site))
    except (FileNotFoundError, ValueError):
        return None
    return rec if isinstance(status, dict) and status.get("state") == "failed" else None


def clear_failure(layout: RunLayout, r: int, site: str) -> None:
    """A later attempt published: the failure is history (the audit log keeps it)."""
    failure_path(layout, r, site).unlink(missing_ok=True)
