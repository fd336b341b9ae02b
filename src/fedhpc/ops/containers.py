"""Apptainer/Singularity images for the three kinds of site (ROCm, CUDA, CPU).

Find the runtime, check the definitions (parsed with spython), build them.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from fedhpc.core.errors import FedhpcError

REPO = Path(__file__).resolve().parents[3]
DEFINITIONS = {name: REPO / "containers" / f"{name}.def" for name in ("rocm", "cuda", "cpu")}
# The environment file a ROCm site's jobs run in (LUMI): the image needs its bind paths.
RUN_ENVIRONMENTS = {"rocm": REPO / "envs" / "lumi.sh"}
# What the base image of the CUDA and CPU kinds must be built on.
BASE_MARKERS = {"cuda": "cuda", "cpu": "python"}
# LUMI's PyTorch images (LUMI AI Factory's lumi-multitorch, the older lumi-pytorch-rocm): RCCL with
# the aws-ofi network plugin and libfabric with the Slingshot (CXI) provider, built for LUMI.
LUMI_IMAGES = re.compile(
    r"^/appl/local/(laifs/containers/.*/lumi-multitorch-(torch|full)-|containers/.*/lumi-pytorch-rocm-).*\.sif$"
)
# torch.distributed.fsdp.fully_shard (FSDP2), which the fsdp engine uses, is public from torch 2.6.
MIN_TORCH = (2, 6)
# Where an image's torch version shows: a pip pin, or the base image's name.
TORCH_IN_POST = re.compile(r"torch==(\d+)\.(\d+)")
TORCH_IN_BASE = (
    re.compile(r"pytorch/pytorch:(\d+)\.(\d+)"),  # pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
    re.compile(r"pytorch-v(\d+)\.(\d+)"),  # lumi-pytorch-rocm-6.2.4-python-3.12-pytorch-v2.6.0.sif
    re.compile(r"lumi-multitorch-\w+-u\d+r\d+f\d+m\d+t(\d)(\d+)-"),  # …-u24r70f21m50t210-…: torch 2.10
)
# libfabric's CXI provider (Slingshot) in processes that fork (data loaders, compile workers).
CXI_VARIABLES = ("CXI_FORK_SAFE", "CXI_FORK_SAFE_HP", "FI_CXI_DISABLE_CQ_HUGETLB")
# What RCCL's network plugin needs from a LUMI node: Slurm's spool, Cray's libfabric, libcxi.
SLINGSHOT_BINDS = ("/var/spool/slurmd", "/opt/cray", "/usr/lib64/libcxi.so.1")
# Apptainer first: where both exist, `singularity` is usually Apptainer's compatibility link.
RUNTIMES = ("apptainer", "singularity")
BUILD_MODES = ("auto", "fakeroot", "proot", "root")


class ContainerError(FedhpcError, RuntimeError):
    """A definition is wrong, or this machine cannot build images."""


def find_runtime() -> str | None:
    """The container runtime command on PATH: "apptainer", "singularity" (LUMI has only
    SingularityCE's `singularity`), or None when there is neither."""
    return next((name for name in RUNTIMES if shutil.which(name)), None)


def recipe(name: str):
    """The parsed definition: spython's recipe (fromHeader, files, install, environ, …) plus
    `bootstrap` and `test_script`, the %test section's text."""
    from spython.main.parse.parsers import SingularityParser

    class Parser(SingularityParser):
        # spython knows only `Bootstrap: docker`, lower-cases From (a localimage path is
        # case-sensitive) and keeps %test only as a file name.
        def _check_bootstrap(self, line):
            self.bootstrap = line.split(":", 1)[1].strip().lower()
            if self.bootstrap not in ("docker", "localimage"):
                raise ContainerError(f"{name}.def: Bootstrap {self.bootstrap!r}: fedhpc builds docker or localimage")

        def _load_from(self, line):
            line = line.split("#", 1)[0].strip()
            self.recipe[self.active_layer].fromHeader = re.sub(r"^from:", "", line, flags=re.IGNORECASE).strip()

        def _test(self, lines):
            super()._test(lines)
            self.recipe[self.active_layer].test_script = "\n".join(lines)

    if name not in DEFINITIONS:
        raise ContainerError(f"no container {name!r}; known: {', '.join(DEFINITIONS)}")
    parser = Parser(str(DEFINITIONS[name]))
    r = next(iter(parser.recipe.values()))
    r.bootstrap = getattr(parser, "bootstrap", None)
    r.test_script = getattr(r, "test_script", "")
    return r


def torch_version(r) -> tuple[int, int] | None:
    """The torch (major, minor) an image gets: a `torch==` pin in %post, else its base image's name."""
    for line in r.install:
        if m := TORCH_IN_POST.search(line):
            return int(m[1]), int(m[2])
    for pattern in TORCH_IN_BASE:
        if m := pattern.search(r.fromHeader or ""):
            return int(m[1]), int(m[2])
    return None


def bind_paths(env_file: Path) -> list[str]:
    """What `export SINGULARITY_BIND=…` in a shell environment file binds (the last such line)."""
    binds: list[str] = []
    for line in env_file.read_text().splitlines():
        if m := re.match(r"\s*export\s+SINGULARITY_BIND=(.*)$", line):
            binds = m[1].strip().strip("\"'").split(",")
    return binds


def base_problems(name: str, r) -> list[str]:
    base = r.fromHeader or ""
    if name == "rocm":
        if r.bootstrap == "localimage" and LUMI_IMAGES.match(base):
            return []
        return [
            f"rocm.def: base image {base!r} is not one of LUMI's PyTorch images (Bootstrap: localimage, From: "
            "/appl/local/laifs/containers/<release>/lumi-multitorch-full-<release>.sif): only they carry RCCL's "
            "aws-ofi network plugin and the Slingshot (CXI) libraries; without them RCCL between LUMI nodes "
            "falls back to TCP sockets"
        ]
    return (
        []
        if BASE_MARKERS[name] in base.lower()
        else [f"{name}.def: base image {base!r} is not a {BASE_MARKERS[name]} image"]
    )


def torch_problems(name: str, r) -> list[str]:
    version = torch_version(r)
    if version is None:
        return [
            f"{name}.def: cannot tell which torch the image gets: pin it in %post (torch==X.Y.Z) or use a "
            "base image whose name carries its torch version"
        ]
    if version < MIN_TORCH:
        return [
            f"{name}.def: torch {version[0]}.{version[1]} has no torch.distributed.fsdp.fully_shard (FSDP2, "
            "public from torch 2.6), which fsdp sites train with: use a base image or pin with torch >= 2.6"
        ]
    if "fully_shard" not in r.test_script:
        return [f"{name}.def: %test does not import torch.distributed.fsdp.fully_shard, so a torch without it builds"]
    return []


def rccl_problems(r) -> list[str]:
    """What RCCL needs to use Slingshot between LUMI nodes rather than TCP sockets."""
    found = [
        f"rocm.def: %environment does not set {var}=1 (libfabric's Slingshot provider in forked processes)"
        for var in CXI_VARIABLES
        if f"{var}=1" not in r.environ
    ]
    if "ccl-net" not in r.test_script:
        found.append("rocm.def: %test does not check that RCCL's network plugin (lib*ccl-net*.so) is in the image")
    env_file = RUN_ENVIRONMENTS["rocm"]
    if missing := [b for b in SLINGSHOT_BINDS if b not in bind_paths(env_file)]:
        found.append(
            f"{env_file.relative_to(REPO) if env_file.is_relative_to(REPO) else env_file}: SINGULARITY_BIND does "
            f"not bind {','.join(missing)}: without them RCCL's network plugin in the rocm image cannot reach "
            "Slurm and the Slingshot network, and falls back to TCP sockets between nodes"
        )
    return found


def problems(name: str) -> list[str]:
    """What is wrong with a definition; empty when it is fit to build."""
    r = recipe(name)
    found = base_problems(name, r) + torch_problems(name, r)
    copied = {f.split()[0]: f.split()[-1] for f in r.files if f.split()}
    if copied.get("src") != "/opt/fedhpc/src" or copied.get("pyproject.toml") != "/opt/fedhpc/pyproject.toml":
        found.append(f"{name}.def: %files does not copy pyproject.toml and src/ to /opt/fedhpc")
    if whole := [src for src in copied if src in (".", "./")]:
        found.append(
            f"{name}.def: %files copies the whole checkout ({whole[0]}), with .venv, results/ and keys/: "
            "copy pyproject.toml, README.md and src/ only"
        )
    if not any("install" in line and "/opt/fedhpc" in line for line in r.install):
        found.append(f"{name}.def: %post does not install fedhpc from /opt/fedhpc")
    if not r.test_script:
        found.append(f"{name}.def: no %test section")
    if name == "rocm":
        found += rccl_problems(r)
    return found


def is_singularity_ce(runtime: str) -> bool:
    """SingularityCE (LUMI's runtime), not Apptainer under its `singularity` compatibility name."""
    if runtime != "singularity":
        return False
    out = subprocess.run([runtime, "--version"], capture_output=True, text=True)
    return "apptainer" not in out.stdout.lower()


def build_mode(requested: str, runtime: str) -> tuple[str, str]:
    """How to build without root privileges the system refuses, and why: (mode, reason)."""
    proot = shutil.which("proot")
    if requested == "auto":
        if os.geteuid() == 0:
            return "root", "running as root"
        if proot and is_singularity_ce(runtime):
            return "proot", f"SingularityCE with proot on PATH ({proot}), LUMI's unprivileged build"
        return "fakeroot", "not root, and no SingularityCE with proot on PATH"
    if requested == "proot":
        if not is_singularity_ce(runtime):
            raise ContainerError(
                f"--mode proot needs SingularityCE, which builds unprivileged with proot; {runtime} here is "
                "Apptainer: use --mode fakeroot"
            )
        if not proot:
            raise ContainerError(
                "--mode proot: proot is not on PATH; on LUMI `module load systools` (LUMI/23.09 or newer, "
                "or CrayEnv) provides it"
            )
    if requested == "root" and os.geteuid() != 0:
        raise ContainerError("--mode root builds as root: run it as root, or use --mode fakeroot or proot")
    return requested, "as asked"


def build_dirs(tmpdir: Path | None) -> dict[str, str]:
    """The runtime's cache and temp dirs for a build: `tmpdir`, else what the user exported, else
    `$TMPDIR` or /tmp (in memory on LUMI's login nodes, as LUMI's docs advise; Lustre is slow
    for the many small files of a build). Never under $HOME: 20 GB on LUMI, and a build
    unpacks several."""
    home = Path.home().resolve()
    base = tmpdir or Path(os.environ.get("TMPDIR") or "/tmp") / f"fedhpc-build-{getpass.getuser()}"
    env = {}
    for kind in ("CACHEDIR", "TMPDIR"):
        exported = None if tmpdir else os.environ.get(f"APPTAINER_{kind}") or os.environ.get(f"SINGULARITY_{kind}")
        path = Path(exported or base / kind.lower()).resolve()
        if path.is_relative_to(home):
            raise ContainerError(
                f"the build's {kind.lower()} {path} is under $HOME ({home}; 20 GB on LUMI, and a build unpacks "
                "several): pass --tmpdir on a node-local or scratch dir (on LUMI: /tmp/$USER)"
            )
        path.mkdir(parents=True, exist_ok=True)
        env[f"APPTAINER_{kind}"] = env[f"SINGULARITY_{kind}"] = str(path)
    return env


def build(
    name: str, out_dir: Path, mode: str = "auto", tmpdir: Path | None = None, say: Callable[[str], None] = print
) -> Path:
    """Build `<out_dir>/fedhpc-<name>.sif` with whichever runtime is on PATH, saying how."""
    if found := problems(name):
        raise ContainerError("; ".join(found))
    r = recipe(name)
    if r.bootstrap == "localimage" and not Path(r.fromHeader).is_file():
        raise ContainerError(
            f"{name}.def builds on {r.fromHeader}, which is not on this machine: build the {name} image where "
            "it is (the rocm image on a LUMI login node)"
        )
    runtime = find_runtime()
    if runtime is None:
        raise ContainerError(
            "neither apptainer nor singularity is on PATH: build the image where one is (on LUMI: singularity "
            "on a login node, with `module load systools` for proot), then point sites.<name>.container at it"
        )
    chosen, why = build_mode(mode, runtime)
    # Run-time binds (envs/lumi.sh) name host paths a build has no use for.
    env = {k: v for k, v in os.environ.items() if k not in ("SINGULARITY_BIND", "APPTAINER_BIND")}
    env |= build_dirs(tmpdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image = out_dir / f"fedhpc-{name}.sif"
    cmd = [runtime, "build", "--force", *(["--fakeroot"] if chosen == "fakeroot" else []), str(image)]
    cmd.append(str(DEFINITIONS[name]))
    say(
        f"building {image} with {runtime}: {chosen} build ({why})\n"
        f"  cache {env['SINGULARITY_CACHEDIR']}, temp {env['SINGULARITY_TMPDIR']}\n$ {shlex.join(cmd)}"
    )
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        hint = (
            "; fakeroot builds are refused on some systems, LUMI among them: there `module load systools` "
            "(proot) and build again, or pass --mode proot"
            if chosen == "fakeroot"
            else ""
        )
        raise ContainerError(f"`{shlex.join(cmd)}` failed (exit {proc.returncode}){hint}")
    if not image.exists():
        raise ContainerError(f"the build finished without producing {image}")
    return image
