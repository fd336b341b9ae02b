"""`fedhpc run`: run the Snakemake head process so that rerunning after any crash just works.

Snakemake leaves its directory lock behind when it is SIGKILLed, and the next run then
refuses to start. We hold a kernel flock for the lifetime of the head process instead: the
kernel drops it when the process dies, however it dies, so if we can take it no head
process is alive in this directory and a leftover Snakemake lock is stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO_SNAKEFILE = Path(__file__).resolve().parents[2] / "workflow" / "Snakefile"


def snakefile_path(directory: Path) -> Path:
    local = directory / "workflow" / "Snakefile"
    return local if local.exists() else REPO_SNAKEFILE


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


def run(
    profile: str,
    configfile: str | None,
    directory: str,
    extra: list[str],
    role: str | None = None,
    site: str | None = None,
) -> int:
    """Run Snakemake under the head lock; afterwards show where the federation stands."""
    workdir = Path(directory).resolve()
    fd = acquire_head_lock(workdir)
    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    argv = [exe, "--snakefile", str(snakefile_path(workdir)), "--directory", str(workdir), "--profile", profile]
    if configfile:
        argv += ["--configfile", str(Path(configfile).resolve())]
    # Snakemake inherits the lock, so it stays held while Snakemake lives even if we die.
    child = subprocess.Popen(argv + role_config(role, site) + extra, pass_fds=(fd,))
    # Ctrl-C reaches Snakemake too (same process group); we wait for its clean shutdown.
    signal.signal(signal.SIGINT, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
    code = child.wait()
    if "--dry-run" not in extra and "-n" not in extra:
        _report(workdir, configfile)
    return code


def _report(workdir: Path, configfile: str | None) -> None:
    from .cli import run_dir
    from .config_schema import ConfigError, load
    from .layout import RunLayout
    from .status import format_table, round_states

    try:
        cfg = load(Path(configfile).resolve() if configfile else workdir / "config.yaml")
    except (ConfigError, OSError):
        return  # Snakemake has already said what is wrong
    layout = RunLayout.of(workdir / run_dir(cfg))
    print(format_table(round_states(layout)))
    if layout.summary.exists():
        print(f"Report: {layout.report_dir / 'index.html'}")
