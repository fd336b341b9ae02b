"""Recording stand-ins for sbatch, srun and Slurm's query tools: the executor plugin submits for real.

Snakemake's Slurm executor plugin builds every job's sbatch line and calls `sbatch`; these
stand-ins, first on PATH, record that line and the job script it submits, then run the script
on this host as Slurm would (in the job's directory, output to its --output file, SLURM_JOB_ID
set), and answer `sacct`/`squeue` with the job's state. `srun` records its line and runs its
command once (a world of one rank): what is checked is the line a site's job would launch on
LUMI, not a multi-rank run (tests/test_slurm.py runs real srun ranks on the test cluster).

The tools are one script: `tests/fake_slurm.py TOOL ARGS...`; `FakeSlurm.install` writes the
wrappers named after the tools.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("sbatch", "srun", "sacct", "squeue", "scancel", "sinfo", "sacctmgr", "sshare", "scontrol")
# sbatch/srun options whose value is the next word: the plugin writes `-A X`, `-p X`, `-t X`,
# `--mem X`, `--job-name X`, `--output X`, `--comment X`; the others as a hand-written line may.
VALUE_OPTIONS = frozenset(
    "-A -p -t -n -N -c -J -o -e -D -C --job-name --output --comment --mem --mem-per-cpu --account --partition "
    "--time --qos --clusters".split()
)


@dataclass
class Job:
    """One sbatch call: its words, the script it submitted, and what became of it."""

    id: str
    argv: list[str]
    script: str
    state: str
    submitted: float
    ended: float | None

    def option(self, name: str) -> str | None:
        """The value of `-x V`, `--name V` or `--name=V` (None when absent, "" for a bare flag)."""
        for i, word in enumerate(self.argv):
            if word == name:
                takes_value = name in VALUE_OPTIONS and i + 1 < len(self.argv)
                return self.argv[i + 1] if takes_value else ""
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
        return None

    @property
    def rule(self) -> str:
        comment = self.option("--comment") or ""  # rule_<name>_wildcards_<...>
        return comment.removeprefix("rule_").split("_wildcards_")[0]


@dataclass
class FakeSlurm:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def install(self, accounts: tuple[str, ...] = ("project_465000000", "my_project")) -> FakeSlurm:
        self.bin.mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(exist_ok=True)
        (self.root / "accounts").write_text("\n".join(accounts) + "\n")
        for tool in TOOLS:
            path = self.bin / tool
            path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(__file__)} {tool} "$@"\n')
            path.chmod(0o755)
        return self

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        base = dict(os.environ if base is None else base)
        clean = {k: v for k, v in base.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        return {**clean, "PATH": f"{self.bin}{os.pathsep}{clean.get('PATH', '')}", "FAKE_SLURM_DIR": str(self.root)}

    def jobs(self) -> list[Job]:
        out = []
        for path in sorted((self.root / "jobs").glob("*.json"), key=lambda p: int(p.stem)):
            rec = json.loads(path.read_text())
            out.append(
                Job(path.stem, rec["argv"], rec["script"], _state(self.root, path.stem), *_times(self.root, path.stem))
            )
        return out

    def status_queries(self) -> list[float]:
        """When the plugin asked for its jobs' states (sacct or squeue)."""
        log = self.root / "status.log"
        return [float(x) for x in log.read_text().split()] if log.exists() else []

    def srun_calls(self) -> list[dict]:
        log = self.root / "srun.jsonl"
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def _times(root: Path, job: str) -> tuple[float, float | None]:
    rec = json.loads((root / "jobs" / f"{job}.json").read_text())
    end = root / "jobs" / f"{job}.end"
    return rec["submitted"], (json.loads(end.read_text())["ended"] if end.exists() else None)


def _state(root: Path, job: str) -> str:
    end = root / "jobs" / f"{job}.end"
    if end.exists():
        return json.loads(end.read_text())["state"]
    return "RUNNING" if (root / "jobs" / f"{job}.pid").exists() else "PENDING"


def _next_id(root: Path) -> str:
    with open(root / "counter", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        n = int(fh.read() or 1000) + 1
        fh.seek(0)
        fh.truncate()
        fh.write(str(n))
    return str(n)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def sbatch(root: Path, argv: list[str]) -> int:
    job = Job("0", argv, "", "PENDING", time.time(), None)
    wrap = job.option("--wrap")
    if wrap is not None:
        script = wrap
    else:
        words = [
            a for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in VALUE_OPTIONS)
        ]
        if not words:
            print("sbatch: error: no script given", file=sys.stderr)
            return 1
        script = sys.stdin.read() if words[0] == "/dev/stdin" else Path(words[0]).read_text()
    jid = _next_id(root)
    _write(root / "jobs" / f"{jid}.json", {"argv": argv, "script": script, "submitted": time.time()})
    (root / "jobs" / f"{jid}.sh").write_text(script if wrap is None else f"#!/bin/sh\n{script}\n")
    subprocess.Popen(
        [sys.executable, __file__, "run-job", jid],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print(jid if "--parsable" in argv else f"Submitted batch job {jid}")
    return 0


def run_job(root: Path, jid: str) -> int:
    """The job itself: its script, in its directory, with the environment Slurm would give it."""
    rec = json.loads((root / "jobs" / f"{jid}.json").read_text())
    job = Job(jid, rec["argv"], rec["script"], "RUNNING", rec["submitted"], None)
    workdir = job.option("-D") or job.option("--chdir") or os.getcwd()
    output = (job.option("--output") or job.option("-o") or f"slurm-{jid}.out").replace("%j", jid)
    env = {**os.environ, "SLURM_JOB_ID": jid, "SLURM_JOBID": jid, "SLURM_JOB_NODELIST": "localhost"}
    env.update(SLURM_SUBMIT_DIR=workdir, SLURM_CLUSTER_NAME="fake")
    for opt, var in (("--cpus-per-task", "SLURM_CPUS_PER_TASK"), ("--ntasks", "SLURM_NTASKS")):
        if job.option(opt):
            env[var] = job.option(opt)
    out_path = Path(workdir) / output
    out_path.parent.mkdir(parents=True, exist_ok=True)  # the real sbatch does not; see tests/test_submit.py
    with open(out_path, "ab") as log:
        proc = subprocess.Popen(
            ["/bin/sh", str(root / "jobs" / f"{jid}.sh")], cwd=workdir, env=env, stdout=log, stderr=log
        )
        (root / "jobs" / f"{jid}.pid").write_text(str(os.getpid()))  # the job's process group
        code = proc.wait()
    state = "COMPLETED" if code == 0 else ("CANCELLED" if code < 0 else "FAILED")
    _write(root / "jobs" / f"{jid}.end", {"state": state, "ended": time.time(), "code": code})
    return 0


def srun(root: Path, argv: list[str]) -> int:
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in VALUE_OPTIONS else 1
    with open(root / "srun.jsonl", "a") as fh:
        fh.write(json.dumps({"argv": argv, "job": os.environ.get("SLURM_JOB_ID")}) + "\n")
    if i >= len(argv):
        print("srun: fatal: no command given", file=sys.stderr)
        return 1
    os.execvp(argv[i], argv[i:])
    return 1  # unreachable


def status(root: Path) -> int:
    with open(root / "status.log", "a") as fh:
        fh.write(f"{time.time()}\n")
    for path in sorted((root / "jobs").glob("*.json"), key=lambda p: int(p.stem)):
        print(f"{path.stem}|{_state(root, path.stem)}")
    return 0


def scancel(root: Path, argv: list[str]) -> int:
    for jid in (a for a in argv if a.isdigit()):
        pid_file = root / "jobs" / f"{jid}.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
    return 0


def main(argv: list[str]) -> int:
    root = Path(os.environ["FAKE_SLURM_DIR"])
    tool, args = argv[0], argv[1:]
    if tool == "sbatch":
        return sbatch(root, args)
    if tool == "run-job":
        return run_job(root, args[0])
    if tool == "srun":
        return srun(root, args)
    if tool in ("sacct", "squeue"):
        # The plugin's status queries; `sacct -o Account` (guessing an account) gets no answer.
        return 0 if "Account%256" in " ".join(args) else status(root)
    if tool == "scancel":
        return scancel(root, args)
    if tool in ("sacctmgr", "sshare"):
        print((root / "accounts").read_text(), end="")
        return 0
    if tool == "scontrol":
        print("MinJobAge               = 300 sec")
        return 0
    return 0  # sinfo: its presence is what the plugin checks


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
