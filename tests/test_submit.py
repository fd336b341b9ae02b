"""The head process as its own Slurm job: `fedhpc submit` (submitit) and the sbatch wrappers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.test_slurm import job_state
from tests.test_slurm_submission import two_site_config
from tests.workflow_util import BIN, REPO, env

pytestmark = pytest.mark.e2e
LUMI_IFNAMES = "hsn0,hsn1,hsn2,hsn3"  # what envs/lumi.sh exports
ACTIVE = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return next(f.split("=", 1)[1] for f in out.split() if f.startswith(f"{name}="))


def wait_for(job: str, timeout: float, log: Path) -> str:
    deadline = time.time() + timeout
    while (state := job_state(job)) in ACTIVE:
        assert time.time() < deadline, f"job {job} still {state} after {timeout:.0f} s: {tail(log)}"
        time.sleep(2)
    return state


def tail(log: Path) -> str:
    return log.read_text()[-3000:] if log.exists() else f"no log at {log}"


def site_env(tmp: Path) -> tuple[Path, Path]:
    """The site environment a head sources: the real envs/lumi.sh, and first on PATH a `fedhpc`
    that notes, for every call, the Slurm job it runs in, what envs/lumi.sh set, and the verb.
    Its `aggregate` waits at a gate (tmp/at-gate while it waits) until tmp/gate exists: the
    head's first start cannot finish the federation before the test has warned it."""
    bindir, calls = tmp / "site-bin", tmp / "fedhpc-calls.log"
    bindir.mkdir()
    note = f'echo "${{SLURM_JOB_ID:-head}} ${{NCCL_SOCKET_IFNAME:-unset}} $1" >> {calls}'
    gate = f'if [ "$1" = aggregate ]; then touch {tmp}/at-gate; while [ ! -e {tmp}/gate ]; do sleep 1; done; fi'
    (bindir / "fedhpc").write_text(f'#!/bin/sh\n{note}\n{gate}\nexec {BIN / "fedhpc"} "$@"\n')
    (bindir / "fedhpc").chmod(0o755)
    script = tmp / "site-env.sh"
    script.write_text(f"source {REPO / 'envs' / 'lumi.sh'}\nexport PATH={bindir}:$PATH\n")
    return script, calls


def renamed_ci_profile(tmp: Path, head: dict | None = None) -> Path:
    """profiles/ci-slurm under another name, with `head` as its head.yaml."""
    prof = tmp / "profile"
    shutil.copytree(REPO / "profiles" / "ci-slurm", prof)
    if head is not None:
        (prof / "head.yaml").write_text(yaml.safe_dump(head))
    return prof


def unfinished_outputs(log_text: str) -> set[str]:
    """Outputs of the jobs a Snakemake log shows started but never finished."""
    outputs: dict[str, list[str]] = {}
    for block in re.finditer(r"^(?:local)?rule \S+:\n((?:    .*\n)+)", log_text, re.M):
        out = re.search(r"^    output: (.*)$", block.group(1), re.M)
        jobid = re.search(r"^    jobid: (\d+)$", block.group(1), re.M)
        if out and jobid:
            outputs[jobid.group(1)] = out.group(1).split(", ")
    finished = set(re.findall(r"^Finished jobid: (\d+)", log_text, re.M))
    return {path for jobid, paths in outputs.items() if jobid not in finished for path in paths}


def first_start(log: Path) -> str | None:
    """Snakemake's output of the head's first start: in its log (sbatch) or the stderr beside it (submitit)."""
    text = "".join(f.read_text() for f in (log, log.with_suffix(".err")) if f.exists())
    parts = re.split(r"^SNAKEMAKE\n=+\n", text, flags=re.M)
    return parts[1] if len(parts) > 1 else None


def training_noted(run: Path, log: Path) -> bool:
    """Whether the head's Snakemake has seen round 0's train jobs finish. Gather reads the
    blackboard, so the round can reach aggregation before the head's next Slurm status check
    notes a finished train job; a head stopped in between rightly trains that site again."""
    text = first_start(log)
    statuses = {str(run / "rounds" / "r0000" / "sites" / site / "status.json") for site in ("lumi", "laptop")}
    return text is not None and all(s in text for s in statuses) and not statuses & unfinished_outputs(text)


def settled(run: Path, log: Path) -> dict[str, float]:
    """Files of the run directory the head's first start finished, with their mtimes, taken once
    that start has exited. Not the outputs of jobs its Snakemake did not see finish (those rerun,
    as they should), nor job logs (such a job rewrites its log), nor the audit log (appended to by
    every start: checked to keep its first lines instead). Taken before the second start and not
    at the warning, since Snakemake touches a job's outputs when it notes the job finished, which
    may be seconds after the job wrote them."""
    redo = unfinished_outputs(first_start(log) or "")
    return {
        str(p): p.stat().st_mtime
        for p in run.rglob("*")
        if p.is_file()
        and str(p) not in redo
        and not {"locks", "logs"} & set(p.relative_to(run).parts)
        and p.name != "audit.jsonl"
    }


def check_continued_to_the_end(
    head: str, log: Path, calls: Path, run: Path, before: dict[str, float], audit: str
) -> None:
    """Signalled once, requeued, and the second start finished the federation without redoing
    what the first had finished or rewriting its audit trail; every job it submitted saw the
    site environment."""
    text = log.read_text()
    assert "start 1" in text and "time limit near" in text and "start 2" in text, tail(log)
    assert int(job_field(head, "Restarts")) >= 1
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 1, tail(log)
    assert re.search(r"^r0000 .* done", text, re.M), tail(log)  # fedhpc run's closing status table
    trained = {str(run / "rounds" / "r0000" / "sites" / site / "status.json") for site in ("lumi", "laptop")}
    assert trained <= before.keys(), "the first start finished no training before its time limit"
    changed = [p for p, mtime in before.items() if Path(p).stat().st_mtime != mtime]
    assert not changed, f"the second start redid the first's work: {changed[:5]}"
    assert audit and (run / "audit.jsonl").read_text().startswith(audit), "the audit log was rewritten, not appended to"
    assert calls.exists(), "no job ran the site environment's `fedhpc`: the environment did not reach them"
    jobs = [line.split() for line in calls.read_text().splitlines() if not line.startswith(("head ", f"{head} "))]
    assert {verb for *_, verb in jobs} >= {"shard", "train", "aggregate", "evaluate"}, jobs
    assert {ifname for _, ifname, _ in jobs} == {LUMI_IFNAMES}, jobs
    for site in ("lumi", "laptop"):
        status = json.loads((run / "rounds" / "r0000" / "sites" / site / "status.json").read_text())
        assert status["slurm_job_id"] not in (None, head)  # training ran in jobs the head submitted


def run_seconds(job: str) -> int:
    """How long the job has run, from `scontrol show job`'s RunTime ([D-]HH:MM:SS)."""
    days, _, hms = job_field(job, "RunTime").rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def bring_time_limit_near(job: str) -> None:
    """Shorten a running head's limit so that it ends 45-105 s from now.

    slurmctld sends --signal's warning from its periodic check (every 30 s) once the end is
    within the delay plus 30 s, so a 1-minute job with @30 could be warned at once, before it
    had finished anything: the test gives each head a long limit and shortens it only once its
    first start has finished real work. The 45 s or more leave the head its grace to requeue itself.
    """
    minutes = -(-(run_seconds(job) + 45) // 60)
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"], check=True, env=env())


def watch_requeues(heads: dict[str, tuple[Path, Path, Path]]) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Once each head's first start has trained (its Snakemake saw it) and waits at the aggregation
    gate, bring its time limit near; wait until every head was warned (then open its gate) and requeued itself; give
    each second start time to finish. Returns, per head, the files its first start had finished
    (taken once it exited, before the second start) and its audit log when warned."""
    before: dict[str, dict[str, float]] = {}
    audit: dict[str, str] = {}
    near: set[str] = set()
    requeued: set[str] = set()
    deadline = time.time() + 480
    while len(requeued) < len(heads):
        for job, (log, calls, run) in heads.items():
            gate = calls.parent
            if job not in audit:
                assert job_state(job) in ACTIVE, f"head {job} ended, never warned of its time limit: {tail(log)}"
                if job not in near and (gate / "at-gate").exists() and training_noted(run, log):
                    bring_time_limit_near(job)
                    near.add(job)
                elif "time limit near" in (log.read_text() if log.exists() else ""):
                    assert job in near, f"head {job} warned before its limit was brought near: {tail(log)}"
                    audit[job] = (run / "audit.jsonl").read_text()
                    (gate / "gate").touch()
                    # The second start gets the time to finish (root may lengthen a job's limit).
                    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True, env=env())
            elif job not in requeued and int(job_field(job, "Restarts")) >= 1:
                before[job] = settled(run, log)
                if job_state(job) == "PENDING":
                    # Slurm holds a requeued job back for a while; the test need not wait for that.
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=env())
                requeued.add(job)
        assert time.time() < deadline, {job: tail(log) for job, (log, _, _) in heads.items() if job not in requeued}
        time.sleep(1)
    return before, audit


def test_heads_requeue_at_their_time_limit_and_finish_the_federation(slurm, tmp_path):
    """Both heads, each on its own federation, side by side: the sbatch wrapper (submitted from a
    directory without logs/) and `fedhpc submit`, each warned 30 s before its limit, which the
    test brings near once training is done. Each must stop, requeue itself and, given time,
    finish the federation."""
    sb, sm = tmp_path / "sbatch", tmp_path / "submitit"
    sb.mkdir()
    sm.mkdir()
    # The wrapper runs in its submit directory: the repo's scripts, the profile it names
    # (profiles/ci-slurm standing in for profiles/lumi) and envs/lumi.sh (the site env).
    (sb / "scripts").symlink_to(REPO / "scripts")
    (sb / "profiles").mkdir()
    renamed_ci_profile(sb).rename(sb / "profiles" / "lumi")
    sb_env, sb_calls = site_env(sb)
    (sb / "envs").mkdir()
    sb_env.rename(sb / "envs" / "lumi.sh")
    sb_cfg = two_site_config(sb, "viasbatch")
    sm_env, sm_calls = site_env(sm)
    head = {"partition": "debug", "time": 10, "cpus_per_task": 1, "signal_delay_s": 30, "site_env": "../site-env.sh"}
    prof = renamed_ci_profile(sm, head)
    sm_cfg = two_site_config(sm, "viasubmitit")

    grace = {"FEDHPC_HEAD_GRACE": "10", "FEDHPC": str(BIN / "fedhpc")}
    out = subprocess.run(
        ["sbatch", "--parsable", "-A", "fedhpc-test", "-p", "debug", "--time=10", "--signal=B:USR1@30"]
        + ["--cpus-per-task=1", "--mem=1G", "scripts/sbatch/lumi-head.sh", "config.yaml"],
        cwd=sb,
        capture_output=True,
        text=True,
        env={**env(), **grace},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    sb_job, sb_log = out.stdout.strip(), sb / f"fedhpc-head-{out.stdout.strip()}.out"
    assert not (sb / "logs").exists()
    out = subprocess.run(
        [str(BIN / "fedhpc"), "submit", "--profile", str(prof), "--configfile", str(sm / "config.yaml")]
        + ["--directory", str(sm), "--logs", str(sm / "logs")],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    sm_job = re.search(r"Slurm job (\d+)", out.stdout).group(1)
    sm_log = Path(re.search(r"stdout: (\S+)", out.stdout).group(1))

    heads = {
        sb_job: (sb_log, sb_calls, Path(sb_cfg["output_dir"]) / "viasbatch"),
        sm_job: (sm_log, sm_calls, Path(sm_cfg["output_dir"]) / "viasubmitit"),
    }
    try:
        before, audit = watch_requeues(heads)
        for job, (log, calls, run) in heads.items():
            assert wait_for(job, 420, log) == "COMPLETED", tail(log)
            check_continued_to_the_end(job, log, calls, run, before[job], audit[job])
    finally:
        subprocess.run(["scancel", *heads], capture_output=True, env=env())  # a failed test leaves no head running


@pytest.mark.parametrize("script", ["head.sh", "lumi-head.sh", "a100-head.sh"])
def test_sbatch_wrappers_write_their_log_where_slurm_can_open_it(slurm, tmp_path, script):
    # Slurm opens a batch job's --output before the script runs: a log in a directory nothing
    # made (logs/head/) failed the job with no log at all. Submitted as a new user would, from
    # the clone's directory with no logs/; `echo` stands in for fedhpc.
    for name in ("scripts", "envs"):
        (tmp_path / name).symlink_to(REPO / name)
    out = subprocess.run(
        ["sbatch", "--parsable", "-A", "fedhpc-test", "-p", "debug", "--mem=1G", f"scripts/sbatch/{script}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env(), "FEDHPC": "echo"},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    log = tmp_path / f"fedhpc-head-{job}.out"
    assert wait_for(job, 60, log) == "COMPLETED", tail(log)
    profile = {"head.sh": "profiles/ci-slurm", "lumi-head.sh": "profiles/lumi", "a100-head.sh": "profiles/a100"}
    assert f"fedhpc head: job {job}, start 1" in log.read_text()
    assert f"run --profile {profile[script]} --configfile config.yaml" in log.read_text()


@pytest.mark.parametrize("script", ["head.sh", "lumi-head.sh", "a100-head.sh"])
def test_sbatch_wrappers_are_valid_batch_scripts(slurm, script):
    # --test-only validates the script and its #SBATCH directives without running it; the
    # centre-specific partition is swapped for the test cluster's.
    out = subprocess.run(
        ["sbatch", "--test-only", "-p", "debug", str(REPO / "scripts" / "sbatch" / script)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert out.returncode == 0 and "to start at" in out.stderr, out.stderr
