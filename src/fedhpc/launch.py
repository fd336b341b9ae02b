"""`fedhpc run`: start the Snakemake head process so that rerunning after any crash just works.

Snakemake leaves its directory lock behind when it is SIGKILLed, and the next run then
refuses to start. We hold a kernel flock for the lifetime of the head process instead: the
kernel drops it when the process dies, however it dies, so if we can take it no head
process is alive in this directory and a leftover Snakemake lock is stale.
"""

from __future__ import annotations

import fcntl
import os
import shutil
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


def run(profile: str, configfile: str | None, directory: str, extra: list[str]) -> None:
    """Replace this process by Snakemake, keeping the head lock open across the exec."""
    workdir = Path(directory).resolve()
    fd = acquire_head_lock(workdir)
    os.set_inheritable(fd, True)
    exe = shutil.which("snakemake") or str(Path(sys.executable).parent / "snakemake")
    argv = [exe, "--snakefile", str(snakefile_path(workdir)), "--directory", str(workdir), "--profile", profile]
    if configfile:
        argv += ["--configfile", configfile]
    os.execv(exe, argv + extra)
