"""`fedhpc doctor`: each check passes on what works and fails, naming what and saying what to do, on what does not."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from fedhpc.cli.main import main
from tests.workflow_util import BIN, REPO, env, tiny_config, write_config


def doctor(capsys, tmp_path: Path, cfg: dict, profile: Path | str = REPO / "profiles" / "local", *extra: str):
    """(exit code, checks by name) of `fedhpc doctor --json` on `cfg` written into tmp_path."""
    write_config(tmp_path, cfg)
    argv = ["doctor", "--profile", str(profile), "--configfile", str(tmp_path / "config.yaml")]
    code = main([*argv, "--directory", str(tmp_path), "--json", *extra])
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] == (code == 0)
    return code, {c["name"]: c for c in report["checks"]}


def slurm_profile(tmp_path: Path, **resources) -> Path:
    prof = tmp_path / "profile"
    prof.mkdir()
    conf = {"executor": "slurm", "slurm-no-account": True, "default-resources": resources.pop("default")}
    conf["set-resources"] = resources
    (prof / "config.yaml").write_text(yaml.safe_dump(conf))
    return prof


def test_on_this_machine_the_local_profile_passes_and_says_what_it_skipped(tmp_path):
    write_config(tmp_path, tiny_config(tmp_path))
    proc = subprocess.run(
        [str(BIN / "fedhpc"), "doctor", "--configfile", str(tmp_path / "config.yaml"), "--directory", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skip  slurm" in proc.stdout and "runs jobs on this machine" in proc.stdout
    assert "ok    run directory" in proc.stdout and "ok    space" in proc.stdout
    assert proc.stdout.splitlines()[-1].endswith("skipped")  # the closing tally


def test_an_existing_partition_passes_and_a_missing_one_fails_with_its_name(slurm, tmp_path, capsys):
    prof = slurm_profile(
        tmp_path, default={"slurm_partition": "debug", "runtime": 30}, train={"slurm_partition": "gpu-nosuch"}
    )
    code, checks = doctor(capsys, tmp_path, tiny_config(tmp_path), prof)
    assert code == 1
    assert checks["slurm"]["status"] == "ok"
    assert checks["partition debug"]["status"] == "ok"
    missing = checks["partition gpu-nosuch"]
    assert missing["status"] == "fail" and "'gpu-nosuch'" in missing["detail"] and "train" in missing["detail"]
    assert "debug" in missing["fix"] and str(prof / "config.yaml") in missing["fix"]
    assert checks["account"]["status"] == "skipped" and "slurm-no-account" in checks["account"]["detail"]


def test_an_account_without_an_accounting_database_is_reported_as_unverifiable(slurm, tmp_path, capsys):
    prof = slurm_profile(tmp_path, default={"slurm_partition": "debug", "slurm_account": "proj_x"})
    _, checks = doctor(capsys, tmp_path, tiny_config(tmp_path), prof)
    assert checks["account proj_x"]["status"] == "skipped"
    assert "cannot be verified" in checks["account proj_x"]["detail"]


def test_a_partition_whose_time_limit_is_shorter_than_the_runtime_asked_fails(tmp_path, capsys, monkeypatch):
    # The test cluster's partition has no limit; a recording of LUMI's dev-g stands in for it.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sinfo").write_text("#!/bin/sh\necho dev-g\n")
    (fake / "scontrol").write_text(
        "#!/bin/sh\necho 'PartitionName=dev-g AllowGroups=ALL AllowAccounts=ALL MaxTime=03:00:00 State=UP'\n"
    )
    for f in fake.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    prof = slurm_profile(tmp_path, default={"slurm_partition": "dev-g", "runtime": 60}, train={"runtime": "12h"})
    code, checks = doctor(capsys, tmp_path, tiny_config(tmp_path), prof)
    assert code == 1
    check = checks["partition dev-g"]
    assert check["status"] == "fail"
    assert "03:00:00 (180 min)" in check["detail"] and "720 min" in check["detail"] and "train" in check["detail"]
    assert "at most 180 min" in check["fix"]


@pytest.fixture(params=["apptainer", "singularity"])
def runtime(request, tmp_path, monkeypatch):
    """A stand-in container runtime on PATH whose `exec` runs the command on this host (whose
    torch is a CPU build); the calls it saw are in the returned log."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / request.param).symlink_to(REPO / "tests" / "fake_singularity")
    log = tmp_path / "runtime.log"
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(log))
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}")
    for var in ("APPTAINER_BIND", "SINGULARITY_BIND"):
        monkeypatch.delenv(var, raising=False)
    return request.param, log


def test_a_cpu_only_torch_for_a_rocm_site_fails_with_what_to_do(runtime, tmp_path, capsys):
    name, log = runtime
    image = tmp_path / "images" / "fedhpc.sif"
    image.parent.mkdir()
    image.write_text("an image")
    cfg = tiny_config(tmp_path)
    cfg["sites"]["lumi"]["container"] = str(image)
    cfg["sites"]["laptop"]["container"] = str(image)
    code, checks = doctor(capsys, tmp_path, cfg)
    assert code == 1
    assert checks["container runtime"]["status"] == "ok" and name in checks["container runtime"]["detail"]
    lumi = checks["site lumi"]
    assert lumi["status"] == "fail" and "not a ROCm build" in lumi["detail"] and str(image) in lumi["detail"]
    assert "containers/rocm.def" in lumi["fix"]
    assert checks["site laptop"]["status"] == "ok"  # the same image serves a CPU site
    # One probe for the image both sites use, run through the runtime's exec.
    assert log.read_text().count(f"{name} exec {image} python -c") == 1


def test_a_missing_image_fails_naming_the_site_and_key(runtime, tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg["sites"]["a100"]["container"] = str(tmp_path / "nowhere" / "cuda.sif")
    code, checks = doctor(capsys, tmp_path, cfg)
    assert code == 1
    a100 = checks["site a100"]
    assert a100["status"] == "fail"
    assert f"sites.a100.container: {tmp_path / 'nowhere' / 'cuda.sif'} does not exist" in a100["detail"]
    assert "fedhpc container build cuda" in a100["fix"]


def test_a_bind_path_that_does_not_exist_fails(runtime, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path)
    # An image that is not there keeps the test quick: no torch probe; the bind check runs all the same.
    cfg["sites"]["laptop"]["container"] = str(tmp_path / "absent.sif")
    monkeypatch.setenv("SINGULARITY_BIND", f"{tmp_path},/nonexistent-flash:/flash")
    code, checks = doctor(capsys, tmp_path, cfg)
    assert code == 1
    binds = checks["bind paths"]
    assert (
        binds["status"] == "fail"
        and "/nonexistent-flash" in binds["detail"]
        and str(tmp_path) + "," not in binds["detail"]
    )


def test_a_node_local_bind_missing_on_the_login_node_warns_and_the_image_is_still_probed(
    runtime, tmp_path, capsys, monkeypatch
):
    # envs/lumi.sh binds slurmd's spool, which only compute nodes have: the runtime refuses a
    # missing bind source, so the probe on the login node must run without it.
    name, log = runtime
    image = tmp_path / "fedhpc.sif"
    image.write_text("an image")
    cfg = tiny_config(tmp_path)
    cfg["sites"]["laptop"]["container"] = str(image)
    monkeypatch.setenv("SINGULARITY_BIND", f"{tmp_path},/var/spool/slurmd-not-on-this-node")
    monkeypatch.setenv("APPTAINER_BIND", f"{tmp_path},/var/spool/slurmd-not-on-this-node")
    _, checks = doctor(capsys, tmp_path, cfg)
    assert checks["bind paths"]["status"] == "warn" and "slurmd-not-on-this-node" in checks["bind paths"]["detail"]
    assert checks["site laptop"]["status"] == "ok", checks["site laptop"]
    assert f"{name} exec {image} python -c" in log.read_text()


@pytest.mark.parametrize("profile", ["lumi", "lumi-dev"])
def test_the_binds_checked_are_those_of_the_environment_the_profiles_head_job_sources(profile, monkeypatch):
    from types import SimpleNamespace

    from fedhpc.ops.doctor_images import bind_paths

    for var in ("APPTAINER_BIND", "SINGULARITY_BIND"):
        monkeypatch.delenv(var, raising=False)
    origin, paths = bind_paths(SimpleNamespace(profile_dir=REPO / "profiles" / profile), "singularity")
    assert origin == str(REPO / "envs" / "lumi.sh")  # head.yaml's site_env, whatever the profile is called
    assert {"/scratch", "/opt/cray", "/var/spool/slurmd"} <= set(paths)


def test_an_unwritable_run_directory_fails(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg["output_dir"] = "/sys/fedhpc-results"  # sysfs takes no files, whoever asks (root included)
    code, checks = doctor(capsys, tmp_path, cfg)
    assert code == 1
    check = checks["run directory"]
    assert check["status"] == "fail" and "/sys/fedhpc-results/tiny" in check["detail"]
    assert "output_dir" in check["fix"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "exchange",
    [
        pytest.param({"kind": "rsync", "hub": "127.0.0.1:/srv/hub", "ssh_port": closed_port()}, id="rsync"),
        pytest.param({"kind": "shared", "hub": "/sys/fedhpc-hub"}, id="shared"),
    ],
)
def test_a_hub_that_cannot_be_reached_fails(exchange, tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg["exchange"] = exchange
    code, checks = doctor(capsys, tmp_path, cfg)
    assert code == 1
    hub = checks[f"hub ({exchange['kind']})"]
    assert hub["status"] == "fail" and exchange["hub"] in hub["detail"] and hub["fix"]


def test_a_reachable_rsync_hub_passes(sshd_hub, tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    cfg["exchange"] = {
        "kind": "rsync",
        "hub": f"{sshd_hub.user}@127.0.0.1:{tmp_path}/hub/results",
        "ssh_port": sshd_hub.port,
        "ssh_key": str(sshd_hub.client_key),
        "known_hosts": str(sshd_hub.known_hosts),
    }
    code, checks = doctor(capsys, tmp_path, cfg)
    assert checks["hub (rsync)"]["status"] == "ok", checks["hub (rsync)"]
    assert not (tmp_path / "hub").exists()  # the check writes nothing


def test_a_lustre_quota_smaller_than_the_run_fails_the_space_check(tmp_path, capsys, monkeypatch):
    import fedhpc.ops.doctor_storage as storage

    # This machine has no Lustre: the run directory's filesystem is reported as one, and `lfs`
    # answers as LUMI's does for a project group with 1 GB of its quota left.
    monkeypatch.setattr(storage, "mount_of", lambda path: (str(tmp_path), "lustre"))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "lfs").write_text(
        "#!/bin/sh\n"
        'case "$1 $3" in\n'
        f'  "quota -g") echo "{tmp_path}"; echo " 52428800  0 53428800 - 1200 0 0 -";;\n'
        "  *) exit 0;;\n"
        "esac\n"
    )
    (fake / "lfs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    cfg = tiny_config(tmp_path)
    cfg["model"] = {"n_layer": 24, "n_head": 16, "d_model": 1024, "seq_len": 512}  # ~300M parameters
    code, checks = doctor(capsys, tmp_path, cfg)
    assert code == 1
    space = checks["space"]
    assert space["status"] == "fail" and "1.0 GB left under lfs quota -g" in space["detail"]
    assert "output_dir" in space["fix"]


@pytest.mark.parametrize("bucket,status", [("federation", "ok"), ("no-such-bucket", "fail")])
def test_an_s3_hub_passes_when_an_object_can_be_written_and_fails_naming_the_bucket_otherwise(
    s3_hub, bucket, status, tmp_path, capsys
):
    cfg = tiny_config(tmp_path)
    cfg["exchange"] = {"kind": "s3", "hub": f"s3://{bucket}/run1", "s3_endpoint": s3_hub}
    _, checks = doctor(capsys, tmp_path, cfg)
    hub = checks["hub (s3)"]
    assert hub["status"] == status, hub
    if status == "fail":
        assert f"s3://{bucket}/run1" in hub["detail"] and "bucket" in hub["fix"]
    else:
        import boto3

        left = boto3.client("s3", endpoint_url=s3_hub).list_objects_v2(Bucket=bucket, Prefix="run1/.fedhpc-doctor")
        assert "Contents" not in left  # the probe object is gone again
