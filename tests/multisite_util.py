"""Helpers for multi-site tests: a coordinator and sites, each a `fedhpc run` in its own directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from fedhpc.exchange.hub import INDEX

from .workflow_util import BIN, REPO, env, write_config

RUN = "results/tiny"


def side_config(cfg: dict, hub_exchange: dict) -> dict:
    cfg = {**cfg, "output_dir": "results"}  # each side's own directory
    cfg["trust"] = {"generate_missing": False}  # identities are made where they live, public halves swapped
    cfg["exchange"] = hub_exchange
    return cfg


def prepare(tmp: Path, cfg: dict, sites: list[str]) -> tuple[Path, dict[str, Path]]:
    """Directories, configs and identities of a coordinator and `sites`: each side makes its own
    key pair; only public keys travel, out of band."""
    coord = tmp / "coordinator"
    coord.mkdir()
    keys(coord, "coordinator")
    sides = {s: join(tmp, coord, s) for s in sites}
    for side in (coord, *sides.values()):
        write_config(side, cfg)
    return coord, sides


def join(tmp: Path, coord: Path, site: str) -> Path:
    """A new site's directory and identity; its public key goes to the coordinator, the
    coordinator's to it."""
    side = tmp / site
    side.mkdir()
    shutil.copy(keys(side, site) / f"{site}.pub", coord / RUN / "keys")
    shutil.copy(coord / RUN / "keys" / "coordinator.pub", side / RUN / "keys")
    return side


def keys(side: Path, name: str) -> Path:
    d = side / RUN / "keys"
    subprocess.run([str(BIN / "fedhpc"), "keys", "init", "--site", name, "--dir", str(d)], check=True, env=env())
    return d


def start(side: Path, *extra: str, profile: str = "local", environ: dict | None = None) -> subprocess.Popen:
    argv = [str(BIN / "fedhpc"), "run", "--profile", str(REPO / "profiles" / profile), "--directory", str(side)]
    log = open(side / "run.log", "a")
    return subprocess.Popen(
        [*argv, "--configfile", str(side / "config.yaml"), *extra],
        stdout=log,
        stderr=log,
        env=environ or env(),
        start_new_session=True,  # its own process group, so a test can kill the whole side
    )


@contextlib.contextmanager
def running() -> Iterator[dict[str, subprocess.Popen]]:
    """The sides a test starts, by name; whatever is still running at the end is killed."""
    procs: dict[str, subprocess.Popen] = {}
    try:
        yield procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                kill(p)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a side: its Snakemake and every job it started."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait(proc: subprocess.Popen, side: Path, timeout: float) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise AssertionError(f"{side.name} did not finish:\n{(side / 'run.log').read_text()[-4000:]}") from None
    assert code == 0, f"{side.name} failed ({code}):\n{(side / 'run.log').read_text()[-6000:]}"


def run_all(coord: Path, sides: dict[str, Path], site_timeout: float = 900) -> None:
    """Run the coordinator and every site side by side until each has finished."""
    with running() as procs:
        procs["coordinator"] = start(coord, "--role", "coordinator")
        procs.update({s: start(side, "--site", s) for s, side in sides.items()})
        for s in sides:
            wait(procs[s], sides[s], timeout=site_timeout)
        wait(procs["coordinator"], coord, timeout=300)


def wait_for(path: Path, what: str, proc: subprocess.Popen, side: Path, timeout: float = 300, poll: float = 0.2):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"{side.name} exited before {what}:\n{(side / 'run.log').read_text()[-4000:]}"
        assert time.time() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(poll)


def held_shards(side: Path, site: str) -> set[str]:
    """The shards a site's directory holds: its own (packed there) and the shared ones it pulled."""
    run = side / RUN / "data"
    return {
        p.name.removesuffix(".zarr")
        for d in (run / "shards", run / "sites" / site / "shards")
        for p in d.glob("*.zarr")
    }


def own_data_files(side: Path, site: str) -> list[Path]:
    """Every file of the data a site holds of its own (corpus, shards, held-out), not its catalogue."""
    root = side / RUN / "data" / "sites" / site
    return [p for p in root.rglob("*") if p.is_file() and p.name not in ("catalogue.json", INDEX)]


def fault_shim(directory: Path, rules: str) -> Path:
    """A `fedhpc` first on PATH that runs `rules` (bash, with "$@" the arguments) before it
    execs the real command: fault injection without touching the code under test."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "fedhpc"
    shim.write_text(f'#!/bin/bash\n{rules}\nexec {BIN / "fedhpc"} "$@"\n')
    shim.chmod(0o755)
    return directory


def slow_steps(directory: Path, seconds: float) -> Path:
    """A `fedhpc` first on PATH whose `train` spends at least `seconds` on each optimizer step (a
    sitecustomize hook): a test that acts on a job in the middle of its training has a window of
    steps x seconds whatever the machine's or the code's speed. (PYTHONPATH differs, so the job
    runs cold, not in the warm process.)"""
    site = directory / "slow-steps"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import time\n"
        "try:\n"
        "    from torch.optim.optimizer import register_optimizer_step_post_hook\n"
        "except Exception as exc:  # loud: a test relying on the window would race again\n"
        "    raise SystemExit(f'slow_steps: cannot slow training down: {exc}')\n"
        f"register_optimizer_step_post_hook(lambda *_: time.sleep({seconds}))\n"
    )
    return fault_shim(
        directory, f'if [[ "$1" == train ]]; then export PYTHONPATH={site}${{PYTHONPATH:+:$PYTHONPATH}}; fi'
    )


def env_with(path_first: Path | None = None, **extra: str) -> dict[str, str]:
    e = env()
    if path_first is not None:
        e["PATH"] = f"{path_first}{os.pathsep}{e['PATH']}"
    return {**e, **extra}
