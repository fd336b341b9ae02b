"""Container definitions parse with spython, start from the right bases and carry what training on
LUMI and A100 sites needs; `fedhpc container check` reports each thing missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from fedhpc.cli.main import main
from fedhpc.ops.containers import find_runtime, problems, recipe, torch_version

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


def test_definitions_parse_and_start_from_the_right_base():
    rocm, cuda, cpu = recipe("rocm"), recipe("cuda"), recipe("cpu")
    # LUMI AI Factory's PyTorch image: RCCL's network plugin and the Slingshot libraries inside.
    assert rocm.bootstrap == "localimage" and rocm.fromHeader.startswith("/appl/local/laifs/containers/")
    assert "/lumi-multitorch-full-" in rocm.fromHeader
    assert cuda.bootstrap == "docker" and "cuda" in cuda.fromHeader and "python" in cpu.fromHeader
    # FSDP2 (fully_shard) is public from torch 2.6; the images check it at build time.
    assert {name: torch_version(r) for name, r in [("rocm", rocm), ("cuda", cuda), ("cpu", cpu)]} == {
        "rocm": (2, 10),
        "cuda": (2, 7),
        "cpu": (2, 13),
    }
    for name, r in [("rocm", rocm), ("cuda", cuda), ("cpu", cpu)]:
        assert problems(name) == [], name
        assert any("/opt/fedhpc" in line for line in r.install)
        assert "from torch.distributed.fsdp import fully_shard" in r.test_script
        assert r.cmd and "fedhpc" in r.cmd  # `apptainer run image.sif <verb>` runs fedhpc


def test_gpu_images_check_their_torch_build():
    assert "torch.version.hip" in recipe("rocm").test_script
    assert "torch.version.cuda" in recipe("cuda").test_script
    rocm = recipe("rocm")
    for line in ("NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3", "CXI_FORK_SAFE=1", "CXI_FORK_SAFE_HP=1"):
        assert line in rocm.environ
    assert "FI_CXI_DISABLE_CQ_HUGETLB=1" in rocm.environ and "ccl-net" in rocm.test_script


def broken(tmp_path, monkeypatch, name: str, *edits: tuple[str, str]) -> Path:
    """A copy of a shipped definition with `edits` (old, new) made, checked in its place."""
    import fedhpc.ops.containers as c

    text = (c.REPO / "containers" / f"{name}.def").read_text()
    for old, new in edits:
        assert old in text, f"{name}.def no longer contains {old!r}"
        text = text.replace(old, new)
    copy = tmp_path / f"{name}.def"
    copy.write_text(text)
    monkeypatch.setitem(c.DEFINITIONS, name, copy)
    return copy


PLUGIN_TEST = (
    """    ldconfig -p | grep -qE 'lib(rccl|nccl)-net' || { echo "no RCCL network plugin (lib*ccl-net*.so): """
    """RCCL between nodes would use TCP sockets"; exit 1; }\n"""
)
ROCM_BASE = (
    "Bootstrap: localimage\nFrom: /appl/local/laifs/containers/lumi-multitorch-u24r70f21m50t210-20260415_130625/"
    "lumi-multitorch-full-u24r70f21m50t210-20260415_130625.sif"
)


def test_a_rocm_image_without_lumis_rccl_plugin_or_new_enough_torch_is_reported(tmp_path, monkeypatch, capsys):
    # What rocm.def was: ROCm's own base and the ROCm wheel of torch 2.5.1.
    broken(
        tmp_path,
        monkeypatch,
        "rocm",
        (ROCM_BASE, "Bootstrap: docker\nFrom: rocm/dev-ubuntu-24.04:6.2.4"),
        (
            "/opt/venv/bin/python -m pip install --no-cache-dir /opt/fedhpc",
            "/opt/venv/bin/pip install --index-url https://download.pytorch.org/whl/rocm6.2 torch==2.5.1\n"
            "    /opt/venv/bin/pip install /opt/fedhpc",
        ),
    )
    found = problems("rocm")
    assert len(found) == 2
    assert found[0].startswith("rocm.def: base image 'rocm/dev-ubuntu-24.04:6.2.4' is not one of LUMI's PyTorch")
    assert "RCCL between LUMI nodes falls back to TCP sockets" in found[0]
    assert found[1].startswith("rocm.def: torch 2.5 has no torch.distributed.fsdp.fully_shard")
    assert main(["container", "check", "rocm"]) == 1
    assert "rocm.def: torch 2.5" in capsys.readouterr().err


def test_a_cuda_image_on_torch_2_5_is_reported(tmp_path, monkeypatch):
    broken(
        tmp_path,
        monkeypatch,
        "cuda",
        ("From: pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime", "From: pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"),
    )
    assert problems("cuda") == [
        "cuda.def: torch 2.5 has no torch.distributed.fsdp.fully_shard (FSDP2, public from torch 2.6), which "
        "fsdp sites train with: use a base image or pin with torch >= 2.6"
    ]


def test_an_image_whose_torch_cannot_be_told_or_is_not_checked_is_reported(tmp_path, monkeypatch):
    broken(tmp_path, monkeypatch, "cpu", ('"torch==2.13.0"', "torch"))
    assert problems("cpu") == [
        "cpu.def: cannot tell which torch the image gets: pin it in %post (torch==X.Y.Z) or use a base image "
        "whose name carries its torch version"
    ]
    broken(tmp_path, monkeypatch, "cpu", ("from torch.distributed.fsdp import fully_shard; ", ""))
    assert problems("cpu") == [
        "cpu.def: %test does not import torch.distributed.fsdp.fully_shard, so a torch without it builds"
    ]


def test_a_rocm_image_without_the_slingshot_settings_is_reported(tmp_path, monkeypatch):
    broken(
        tmp_path,
        monkeypatch,
        "rocm",
        ("    export CXI_FORK_SAFE_HP=1\n", ""),
        (PLUGIN_TEST, ""),
    )
    assert problems("rocm") == [
        "rocm.def: %environment does not set CXI_FORK_SAFE_HP=1 (libfabric's Slingshot provider in forked processes)",
        "rocm.def: %test does not check that RCCL's network plugin (lib*ccl-net*.so) is in the image",
    ]


def test_lumi_environment_without_the_slingshot_binds_is_reported(tmp_path, monkeypatch):
    import fedhpc.ops.containers as c

    env = tmp_path / "lumi.sh"
    env.write_text("export SINGULARITY_BIND=/pfs,/scratch,/projappl,/project,/flash,/appl\n")
    monkeypatch.setitem(c.RUN_ENVIRONMENTS, "rocm", env)
    assert problems("rocm") == [
        f"{env}: SINGULARITY_BIND does not bind /var/spool/slurmd,/opt/cray,/usr/lib64/libcxi.so.1: without them "
        "RCCL's network plugin in the rocm image cannot reach Slurm and the Slingshot network, and falls back to "
        "TCP sockets between nodes"
    ]
    # The shipped environment binds them, after the filesystems.
    assert c.bind_paths(c.REPO / "envs" / "lumi.sh")[-3:] == list(c.SLINGSHOT_BINDS)


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


def test_an_image_that_copies_the_whole_checkout_is_reported(tmp_path, monkeypatch):
    # `. /opt/fedhpc` put .venv (GBs), results/ (a site's data) and keys/ into every image.
    broken(
        tmp_path,
        monkeypatch,
        "cpu",
        (
            "    pyproject.toml /opt/fedhpc/pyproject.toml\n    README.md /opt/fedhpc/README.md\n"
            "    src /opt/fedhpc/src\n",
            "    . /opt/fedhpc\n",
        ),
    )
    assert problems("cpu") == [
        "cpu.def: %files does not copy pyproject.toml and src/ to /opt/fedhpc",
        "cpu.def: %files copies the whole checkout (.), with .venv, results/ and keys/: copy pyproject.toml, "
        "README.md and src/ only",
    ]
