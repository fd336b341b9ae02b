"""Container definitions parse with spython and start from the right bases; building needs apptainer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fedhpc.cli import main
from fedhpc.containers import find_runtime, problems, recipe

TESTS = Path(__file__).parent


def fake_runtimes(tmp_path: Path, monkeypatch, *names: str) -> Path:
    """A PATH whose only container runtimes are recording stand-ins called `names`."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(TESTS / f"fake_{name}", bin_dir / name)
    real = [
        d
        for d in os.environ["PATH"].split(os.pathsep)
        if not any((Path(d) / n).exists() for n in ("apptainer", "singularity"))
    ]
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), *real]))
    return bin_dir


@pytest.mark.parametrize(
    "on_path,found",
    [
        (["singularity"], "singularity"),
        (["apptainer"], "apptainer"),
        (["apptainer", "singularity"], "apptainer"),
        ([], None),
    ],
)
def test_find_runtime_names_the_command_on_path(tmp_path, monkeypatch, on_path, found):
    fake_runtimes(tmp_path, monkeypatch, *on_path)
    assert find_runtime() == found


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


@pytest.mark.e2e
def test_sdm_apptainer_runs_coordinator_rules_in_the_image_and_training_in_the_sites(tmp_path, monkeypatch):
    """Snakemake's apptainer integration, wired end to end, against a recording stand-in for
    the apptainer binary (the real one cannot be installed here) that runs commands on the host."""
    import os

    from tests.workflow_util import REPO, run_workflow, tiny_config, write_config

    fake = tmp_path / "bin"
    fake.mkdir()
    shutil.copy(REPO / "tests" / "fake_apptainer", fake / "apptainer")
    log = tmp_path / "apptainer.log"
    cfg = tiny_config(tmp_path, run="images", rounds=1)
    cfg["container"] = "/images/fedhpc-cpu.sif"
    cfg["sites"]["laptop"]["container"] = "/images/laptop-cpu.sif"
    write_config(tmp_path, cfg)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(log))
    run_workflow(tmp_path, "--sdm", "apptainer")
    calls = [line for line in log.read_text().splitlines() if line.startswith("apptainer exec")]
    in_image = [c for c in calls if "/images/fedhpc-cpu.sif" in c]
    for verb in ("synth", "shard", "init", "plan", "gather", "verify", "aggregate", "evaluate", "promote", "report"):
        assert any(f"fedhpc {verb} " in c for c in in_image), verb
    assert not any("fedhpc train" in c for c in in_image), "training must not run inside the coordinator's image"
    site = [c for c in calls if "/images/laptop-cpu.sif" in c]
    assert len(site) == 1 and "fedhpc train" in site[0] and "--site laptop" in site[0]
    assert (tmp_path / "results" / "images" / "summary.json").exists()
