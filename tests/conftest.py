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
        cluster.stop()  # what did start (munged) must not outlive the test
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


@pytest.fixture(scope="session")
def s3_hub():
    """An S3 API on 127.0.0.1 (moto's server) with one bucket; its endpoint and credentials are
    in the environment, so subprocesses reach it too."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="fedhpc-test", AWS_SECRET_ACCESS_KEY="fedhpc-test", AWS_DEFAULT_REGION="us-east-1"
    )
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="federation")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.hookimpl(tryfirst=True)  # xdist's loadgroup reads the marks in its own hook of this name
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs two workers), tests that share a session resource run
    in one worker: every Slurm test (one cluster per machine: /etc/slurm/slurm.conf and fixed
    ports), and the users of the finished federation (built once, not once per worker)."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & {"slurm", "slurm_b"}:
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif "finished" in fixtures:
            item.add_marker(pytest.mark.xdist_group("finished"))
