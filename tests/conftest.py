"""Shared fixtures of the end-to-end tests: one real tiny federation, one Slurm cluster, one sshd, per session."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, SlurmUnavailable
from tests.sshd_hub import SshdHub, SshdUnavailable
from tests.workflow_util import run_workflow, tiny_config, write_config


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> tuple[Path, dict, Path]:
    """One complete, uninterrupted run of the tiny federation: (work dir, config, run dir)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(tmp, rounds=2, mlflow=True)
    write_config(tmp, cfg)
    run_workflow(tmp)
    return tmp, cfg, Path(cfg["output_dir"]) / cfg["run"]


def _started(cluster: SlurmCluster, what: str) -> SlurmCluster:
    """The cluster, started; in CI a cluster that cannot start fails the test, elsewhere skips it."""
    try:
        return cluster.start()
    except (SlurmUnavailable, PermissionError, OSError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the Slurm tests, but {what} did not start: {exc}")
        pytest.skip(f"no {what} on this machine: {exc}")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running single-host Slurm cluster; in CI its failure to start fails the test."""
    cluster = _started(SlurmCluster(tmp_path_factory.mktemp("slurm")), "Slurm")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_b(tmp_path_factory, slurm):
    """A second, independent single-host Slurm cluster (own config, ports, state, munge socket)."""
    root = tmp_path_factory.mktemp("slurm-b")
    b = SlurmCluster(root, name="fedhpc-b", ctld_port=16827, d_port=16828, conf=root / "slurm.conf")
    cluster = _started(b, "a second Slurm cluster")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def sshd_hub(tmp_path_factory):
    """An sshd on 127.0.0.1 that the rsync exchange logs in to; in CI its failure fails the test."""
    try:
        hub = SshdHub(tmp_path_factory.mktemp("sshd")).start()
    except (SshdUnavailable, PermissionError, OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the rsync-over-SSH tests, but sshd did not start: {exc}")
        pytest.skip(f"no sshd on this machine: {exc}")
    yield hub
    hub.stop()
