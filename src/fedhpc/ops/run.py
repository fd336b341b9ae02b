"""`fedhpc run`: run the Snakemake head process so that rerunning after any crash just works.

Snakemake leaves its directory lock behind when it is SIGKILLed, and the next run then
refuses to start. We hold a kernel flock for the lifetime of the head process instead: the
kernel drops it when the process dies, however it dies, so if we can take it no head
process is alive in this directory and a leftover Snakemake lock is stale.

While Snakemake runs, a side thread prints one compact progress line (round, the sites'
step/steps and tokens/s, the deadline, the ETA) when a round starts or ends and every so
often in between, read from the blackboard like `fedhpc status`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedhpc.config.schema import ConfigError
from fedhpc.core.files import json_bytes, write_bytes
from fedhpc.core.layout import RunLayout
from fedhpc.stages.context import run_dir
from fedhpc.tasks.validation import load

REPO_SNAKEFILE = Path(__file__).resolve().parents[3] / "workflow" / "Snakefile"


def snakefile_path(directory: Path) -> Path:
    local = directory / "workflow" / "Snakefile"
    return local if local.exists() else REPO_SNAKEFILE


def prepare_head(config_json: str | Path, config: dict) -> None:
    """What the head of a real run sets up before its jobs start (the workflow calls it once it has
    validated the config): the config snapshot every job reads, so `--config` overrides on the
    command line reach the jobs too, rewritten only when it changed; and a PATH on which jobs
    find the `fedhpc` installed beside this Snakemake, its virtual environment activated or not."""
    path, snapshot = Path(config_json), json_bytes(config)
    if not path.exists() or path.read_bytes() != snapshot:
        write_bytes(path, snapshot)
    if shutil.which("fedhpc") is None:
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def acquire_head_lock(directory: Path) -> int:
    """Take the head-process lock or exit naming the live process that holds it."""
    meta = directory / ".snakemake"
    meta.mkdir(parents=True, exist_ok=True)
    path = meta / "fedhpc-head.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        raise SystemExit(
            f"another fedhpc run is active in {directory} (pid {holder}); wait for it or stop it first"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    stale = meta / "locks"
    if stale.is_dir() and any(stale.iterdir()):
        print(f"fedhpc run: removing the Snakemake lock a killed run left in {directory}", file=sys.stderr)
        shutil.rmtree(stale)
    return fd


def role_config(role: str | None, site: str | None) -> list[str]:
    """`--config` arguments that make this Snakemake the coordinator or one site (multi-site mode)."""
    if role is None and site is None:
        return []
    role = role or "site"
    if role == "site" and not site:
        raise SystemExit("fedhpc run --role site needs --site NAME")
    value = {"role": role, **({"site": site} if site else {})}
    return ["--config", "exchange=" + json.dumps(value)]


class ProgressLines(threading.Thread):
    """Prints `compact_line` to `out` when the latest round starts, closes or ends, and every
    `every` seconds in between; looks at the blackboard every `poll` seconds until stopped."""

    def __init__(self, find_layout, every: float, poll: float = 5.0, out=None):
        super().__init__(name="fedhpc-progress", daemon=True)  # never keeps a dying head process alive
        self.find_layout, self.every, self.out = find_layout, every, out or sys.stderr
        # A look is a directory listing and a few small reads: cheap even on Lustre every 5 s.
        self.poll = min(poll, every) if every > 0 else poll
        self.stopped = threading.Event()

    def run(self) -> None:
        from fedhpc.stages.progress import AuditTail, compact_line
        from fedhpc.stages.status import snapshot

        layout, audit, done, last_key, last_time = None, None, {}, None, 0.0
        while not self.stopped.wait(self.poll):
            try:
                if layout is None:
                    if (layout := self.find_layout()) is None:
                        continue
                    audit = AuditTail(layout.audit)
                now = time.time()
                rows, fed = snapshot(layout, now, audit, done)
            except Exception:  # noqa: BLE001 - a half-written file is read again next time; never stop the run
                continue
            if not rows:
                continue
            row = rows[-1]
            key = (row["round"], row["closed"], row["ended"] is not None, fed["failed"])
            if key != last_key or now - last_time >= self.every:
                print(compact_line(rows, fed, now), file=self.out, flush=True)
                last_key, last_time = key, now

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)


def dry_run(extra: list[str]) -> bool:
    """Whether Snakemake's arguments ask for a dry run."""
    return "--dry-run" in extra or "-n" in extra


def run(
    profile: str,
    configfile: str | None,
    directory: str,
    extra: list[str],
    role: str | None = None,
    site: str | None = None,
    progress_every: float = 60.0,
    env: dict[str, str] | None = None,
) -> int:
    """Run Snakemake under the head lock, with progress lines every `progress_every` s (0: none)
    while it runs, `env` added to its environment; afterwards show where the federation stands."""
    workdir = Path(directory).resolve()
    fd = acquire_head_lock(workdir)
    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    argv = [exe, "--snakefile", str(snakefile_path(workdir)), "--directory", str(workdir), "--profile", profile]
    if configfile:
        argv += ["--configfile", str(Path(configfile).resolve())]
    # Snakemake inherits the lock, so it stays held while Snakemake lives even if we die.
    child = subprocess.Popen(argv + role_config(role, site) + extra, pass_fds=(fd,), env={**os.environ, **(env or {})})
    # Ctrl-C reaches Snakemake too (same process group); we wait for its clean shutdown.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
    dry = dry_run(extra)
    progress = ProgressLines(lambda: _run_layout(workdir, configfile), progress_every)
    if progress_every > 0 and not dry:
        progress.start()
    try:
        code = child.wait()
    finally:
        if progress.is_alive():
            progress.stop()
    if not dry:
        _report(workdir, configfile)
    return code


def _run_layout(workdir: Path, configfile: str | None):
    """The run directory's layout, or None while the config cannot be read."""

    try:
        cfg = load(Path(configfile).resolve() if configfile else workdir / "config.yaml")
    except (ConfigError, OSError):
        return None  # Snakemake says what is wrong
    return RunLayout.of(workdir / run_dir(cfg))


def _report(workdir: Path, configfile: str | None) -> None:
    from fedhpc.stages.status import format_table, round_states

    if (layout := _run_layout(workdir, configfile)) is None:
        return
    print(format_table(round_states(layout)))
    if layout.summary.exists():
        print(f"Report: {layout.report_dir / 'index.html'}")
