"""Apptainer images for the three kinds of site (ROCm, CUDA, CPU): check the definitions, build them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .errors import FedhpcError

REPO = Path(__file__).resolve().parents[2]
DEFINITIONS = {name: REPO / "containers" / f"{name}.def" for name in ("rocm", "cuda", "cpu")}
# What the base image of each kind must be built on.
BASE_MARKERS = {"rocm": "rocm", "cuda": "cuda", "cpu": "python"}


# Apptainer first: where both exist, `singularity` is usually Apptainer's compatibility link.
RUNTIMES = ("apptainer", "singularity")


class ContainerError(FedhpcError, RuntimeError):
    """A definition is wrong, or this machine cannot build images."""


def find_runtime() -> str | None:
    """The container runtime command on PATH: "apptainer", "singularity" (LUMI has only
    SingularityCE's `singularity`), or None when there is neither."""
    return next((name for name in RUNTIMES if shutil.which(name)), None)


def recipe(name: str):
    """The parsed definition (spython's recipe: fromHeader, files, install, environ, test, …)."""
    from spython.main.parse.parsers import SingularityParser

    if name not in DEFINITIONS:
        raise ContainerError(f"no container {name!r}; known: {', '.join(DEFINITIONS)}")
    parsed = SingularityParser(str(DEFINITIONS[name])).recipe
    return next(iter(parsed.values()))


def problems(name: str) -> list[str]:
    """What is wrong with a definition; empty when it is fit to build."""
    r = recipe(name)
    found = []
    base = r.fromHeader or ""
    if BASE_MARKERS[name] not in base.lower():
        found.append(f"{name}.def: base image {base!r} is not a {BASE_MARKERS[name]} image")
    if not any(f.split()[-1] == "/opt/fedhpc" for f in r.files):
        found.append(f"{name}.def: %files does not copy the repository to /opt/fedhpc")
    if not any("install" in line and "/opt/fedhpc" in line for line in r.install):
        found.append(f"{name}.def: %post does not install fedhpc from /opt/fedhpc")
    if not r.test:
        found.append(f"{name}.def: no %test section")
    return found


def build(name: str, out_dir: Path, fakeroot: bool = True) -> Path:
    """Build `<out_dir>/fedhpc-<name>.sif` with spython (which drives `singularity`), or apptainer."""
    if found := problems(name):
        raise ContainerError("; ".join(found))
    out_dir.mkdir(parents=True, exist_ok=True)
    image = out_dir / f"fedhpc-{name}.sif"
    options = ["--fakeroot"] if fakeroot else []
    if shutil.which("singularity"):
        from spython.main import Client

        Client.build(recipe=str(DEFINITIONS[name]), image=str(image), sudo=False, options=options, force=True)
    elif shutil.which("apptainer"):
        subprocess.run(
            ["apptainer", "build", "--force", *options, str(image), str(DEFINITIONS[name])], check=True, cwd=REPO
        )
    else:
        raise ContainerError(
            "neither apptainer nor singularity is on PATH: build the image where one is "
            "(on LUMI: a login node has singularity), then point sites.<name>.container at it"
        )
    if not image.exists():
        raise ContainerError(f"the build finished without producing {image}")
    return image
