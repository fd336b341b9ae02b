"""`fedhpc container build` picks a build LUMI allows (proot, since it refuses fakeroot), fakeroot
elsewhere, or a plain build as root, says which, keeps its cache and temp dirs off $HOME, and fails
with what to do. Against recording stand-ins for singularity, apptainer and proot."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import fedhpc.ops.containers as c
from fedhpc.cli.main import main
from tests.test_containers import fake_runtimes

LUMI_BINDS = "/pfs,/scratch,/projappl,/project,/flash,/appl,/var/spool/slurmd,/opt/cray,/usr/lib64/libcxi.so.1"


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A non-root user with $HOME and $TMPDIR of their own, no runtime cache dirs exported, and a
    log of every runtime call."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setenv("USER", "alice")
    monkeypatch.setenv("FAKE_RUNTIME_LOG", str(tmp_path / "runtime.jsonl"))
    for var in ("CACHEDIR", "TMPDIR"):
        monkeypatch.delenv(f"SINGULARITY_{var}", raising=False)
        monkeypatch.delenv(f"APPTAINER_{var}", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    return tmp_path


def with_proot(bin_dir: Path) -> None:
    (bin_dir / "proot").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "proot").chmod(0o755)


def builds(tmp_path: Path) -> list[dict]:
    log = tmp_path / "runtime.jsonl"
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [call for call in calls if call["argv"][:1] == ["build"]]


def test_on_lumi_it_builds_with_proot_in_a_scratch_dir_without_the_run_time_binds(machine, monkeypatch, capsys):
    with_proot(fake_runtimes(machine, monkeypatch, "singularity"))
    monkeypatch.setenv("SINGULARITY_BIND", LUMI_BINDS)  # envs/lumi.sh sourced in this shell
    out = machine / "images"
    assert main(["container", "build", "cpu", "--out", str(out)]) == 0
    [call] = builds(machine)
    assert call["runtime"] == "singularity" and call["proot"]
    assert call["argv"] == ["build", "--force", str(out / "fedhpc-cpu.sif"), str(c.DEFINITIONS["cpu"])]
    scratch = machine / "tmp" / "fedhpc-build-alice"
    assert call["env"] == {
        "SINGULARITY_CACHEDIR": str(scratch / "cachedir"),
        "APPTAINER_CACHEDIR": str(scratch / "cachedir"),
        "SINGULARITY_TMPDIR": str(scratch / "tmpdir"),
        "APPTAINER_TMPDIR": str(scratch / "tmpdir"),
    }
    said = capsys.readouterr().out
    assert "with singularity: proot build (SingularityCE with proot on PATH" in said
    assert f"built {out / 'fedhpc-cpu.sif'}" in said and (out / "fedhpc-cpu.sif").exists()


def test_with_apptainer_it_builds_with_fakeroot(machine, monkeypatch, capsys):
    fake_runtimes(machine, monkeypatch, "apptainer")
    assert main(["container", "build", "cpu", "--out", str(machine / "images")]) == 0
    [call] = builds(machine)
    assert call["runtime"] == "apptainer" and "--fakeroot" in call["argv"]
    assert "fakeroot build (not root, and no SingularityCE with proot on PATH)" in capsys.readouterr().out


def test_as_root_it_builds_plainly(machine, monkeypatch, capsys):
    fake_runtimes(machine, monkeypatch, "apptainer")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert main(["container", "build", "cpu", "--out", str(machine / "images")]) == 0
    assert "--fakeroot" not in builds(machine)[0]["argv"]
    assert "root build (running as root)" in capsys.readouterr().out


def test_lumi_without_systools_fails_with_what_to_do(machine, monkeypatch, capsys):
    fake_runtimes(machine, monkeypatch, "singularity")
    monkeypatch.setenv("FAKE_FAKEROOT_REFUSED", "1")  # as LUMI does
    assert main(["container", "build", "cpu", "--out", str(machine / "images")]) == 1
    assert "--fakeroot" in builds(machine)[0]["argv"]
    err = capsys.readouterr().err
    assert "failed (exit 1); fakeroot builds are refused on some systems, LUMI among them" in err
    assert "`module load systools` (proot)" in err


def test_a_mode_this_machine_cannot_do_is_refused_before_building(machine, monkeypatch, capsys):
    bin_dir = fake_runtimes(machine, monkeypatch, "singularity")
    assert main(["container", "build", "cpu", "--mode", "proot", "--out", str(machine / "images")]) == 1
    assert "proot is not on PATH; on LUMI `module load systools`" in capsys.readouterr().err
    assert main(["container", "build", "cpu", "--mode", "root", "--out", str(machine / "images")]) == 1
    assert "--mode root builds as root" in capsys.readouterr().err
    (bin_dir / "singularity").unlink()
    fake_runtimes(machine, monkeypatch, "apptainer")
    with_proot(bin_dir)
    assert main(["container", "build", "cpu", "--mode", "proot", "--out", str(machine / "images")]) == 1
    assert "--mode proot needs SingularityCE" in capsys.readouterr().err
    assert builds(machine) == []


def test_build_dirs_under_home_are_refused_and_tmpdir_moves_them(machine, monkeypatch, capsys):
    fake_runtimes(machine, monkeypatch, "apptainer")
    monkeypatch.setenv("SINGULARITY_CACHEDIR", str(machine / "home" / ".singularity" / "cache"))
    assert main(["container", "build", "cpu", "--out", str(machine / "images")]) == 1
    assert "is under $HOME" in capsys.readouterr().err and builds(machine) == []
    scratch = machine / "scratch"
    assert main(["container", "build", "cpu", "--tmpdir", str(scratch), "--out", str(machine / "images")]) == 0
    env = builds(machine)[0]["env"]
    assert env["APPTAINER_CACHEDIR"] == str(scratch / "cachedir") and env["APPTAINER_TMPDIR"] == str(scratch / "tmpdir")


def test_the_rocm_image_is_built_where_its_lumi_base_is(machine, monkeypatch, capsys):
    fake_runtimes(machine, monkeypatch, "singularity")
    assert main(["container", "build", "rocm", "--out", str(machine / "images")]) == 1
    err = capsys.readouterr().err
    assert "/lumi-multitorch-full-" in err and "which is not on this machine: build the rocm image where it is" in err
