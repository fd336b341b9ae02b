"""Container definitions parse with spython and start from the right bases; building needs apptainer."""

from __future__ import annotations

import shutil

import pytest

from fedhpc.cli import main
from fedhpc.containers import problems, recipe


@pytest.mark.parametrize("name,marker", [("rocm", "rocm"), ("cuda", "cuda"), ("cpu", "python")])
def test_definitions_parse_and_start_from_the_right_base(name, marker):
    r = recipe(name)
    assert marker in r.fromHeader.lower()
    assert problems(name) == []
    assert any("/opt/fedhpc" in line for line in r.install)
    assert r.cmd and "fedhpc" in r.cmd  # `apptainer run image.sif <verb>` runs fedhpc


def test_gpu_images_check_their_torch_build():
    from fedhpc.containers import DEFINITIONS

    assert "torch.version.hip" in DEFINITIONS["rocm"].read_text()
    assert "torch.version.cuda" in DEFINITIONS["cuda"].read_text()
    assert "NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3" in recipe("rocm").environ


def test_a_wrong_base_is_reported(tmp_path, monkeypatch):
    import fedhpc.containers as c

    bad = tmp_path / "rocm.def"
    bad.write_text(c.DEFINITIONS["rocm"].read_text().replace("From: rocm/dev-ubuntu-24.04:6.2.4", "From: ubuntu:24.04"))
    monkeypatch.setitem(c.DEFINITIONS, "rocm", bad)
    assert problems("rocm") == ["rocm.def: base image 'ubuntu:24.04' is not a rocm image"]
    assert main(["container", "check", "rocm"]) == 1


def test_cli_check_passes_on_the_shipped_definitions(capsys):
    assert main(["container", "check"]) == 0
    assert "checked rocm, cuda, cpu: ok" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("apptainer") or shutil.which("singularity"), reason="a container runtime is here")
def test_build_without_a_runtime_says_what_to_do(capsys, tmp_path):
    assert main(["container", "build", "cpu", "--out", str(tmp_path)]) == 1
    assert "neither apptainer nor singularity is on PATH" in capsys.readouterr().err


@pytest.mark.skipif(
    not (shutil.which("apptainer") or shutil.which("singularity")),
    reason="Apptainer cannot be installed on this machine (no Debian package, no wheel); "
    "the image is built and run where an apptainer binary exists",
)
def test_cpu_image_builds_and_runs_fedhpc(tmp_path):
    import subprocess

    assert main(["container", "build", "cpu", "--out", str(tmp_path)]) == 0
    out = subprocess.run(
        [
            "apptainer" if shutil.which("apptainer") else "singularity",
            "run",
            str(tmp_path / "fedhpc-cpu.sif"),
            "config",
            "schema",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and '"title": "fedhpc config.yaml"' in out.stdout
