"""The lock (envs/pip-lock.txt) pins every package fedhpc can install, and this venv was built from it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.workflow_util import REPO

LOCK = REPO / "envs" / "pip-lock.txt"


def locked() -> dict[str, Version]:
    pins = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert m, f"{LOCK}:{n}: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def declared() -> list[tuple[str, Requirement]]:
    """Every requirement pyproject.toml names: build system, dependencies, every extra."""
    p = project()
    reqs = [("build-system", Requirement(r)) for r in p["build-system"]["requires"]]
    reqs += [("dependencies", Requirement(r)) for r in p["project"]["dependencies"]]
    for extra, items in p["project"]["optional-dependencies"].items():
        reqs += [(f"extra {extra}", Requirement(r)) for r in items]
    return reqs


def test_every_declared_requirement_is_pinned_within_its_range():
    pins = locked()
    for where, req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{where}: {req} is not pinned in {LOCK.name}; run `make lock`"
        # A local build label (torch's +cpu) does not count against the range.
        assert req.specifier.contains(Version(pins[name].public), prereleases=True), (
            f"{where}: {LOCK.name} pins {req.name}=={pins[name]}, outside {req}; run `make lock`"
        )


def _closure(extras: set[str]) -> dict[str, str]:
    """{distribution: the requirement that first brought it in}, walking installed metadata from fedhpc."""
    env = default_environment()
    found: dict[str, str] = {}
    walked: set[tuple[str, str]] = set()
    todo = [(canonicalize_name("fedhpc"), e, "fedhpc") for e in {"", *extras}]
    while todo:
        name, extra, why = todo.pop()
        if (name, extra) in walked:
            continue
        walked.add((name, extra))
        found.setdefault(name, why)
        for raw in metadata.requires(name) or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({**env, "extra": extra}):
                for e in {"", *req.extras}:
                    todo.append((canonicalize_name(req.name), e, f"{name} requires {req}"))
    return found


def test_this_environment_holds_exactly_the_locked_versions():
    """`make test` installs from the lock: every package the test extra pulls in, however deep, is
    pinned there and installed at that version (a fresh clone runs what CI passed with)."""
    pins = locked()
    for name, why in sorted(_closure({"test"}).items()):
        if name == "fedhpc":
            continue
        assert name in pins, f"{name} ({why}) is installed but not pinned in {LOCK.name}; run `make lock`"
        have = Version(metadata.version(name))
        assert have.public == pins[name].public, (
            f"{name} is {have} here but {pins[name]} in {LOCK.name}: this venv was not installed from the lock"
        )


def test_the_makefile_installs_every_step_from_the_lock():
    recipe = (REPO / "Makefile").read_text().split("$(BIN)/.installed:", 1)[1].split("\n\n", 1)[0]
    installs = [line.strip() for line in recipe.splitlines() if "pip install" in line]
    assert installs and all(line.startswith("$(LOCKED) ") for line in installs), installs
