"""docs/running-on-lumi.md stays true: its fedhpc commands parse, the files it names exist, and its example config is sound."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from fedhpc.cli.main import parser
from fedhpc.tasks.validation import validate
from tests.workflow_util import REPO

DOC = REPO / "docs" / "running-on-lumi.md"


def shell_lines() -> list[str]:
    """The commands of the page's ```sh blocks, continuation lines joined, comments cut."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def fedhpc_argvs() -> list[list[str]]:
    argvs = []
    for line in shell_lines():
        words = shlex.split(line.replace("<", "_").replace(">", "_"))
        for i, word in enumerate(words):
            if word.endswith("bin/fedhpc") or (word == "fedhpc" and i == 0):
                argvs.append(words[i + 1 :])
                break
    return argvs


def test_the_page_has_the_walk_through_commands():
    verbs = {argv[0] for argv in fedhpc_argvs()}
    assert {"container", "doctor", "submit", "status", "audit", "provenance", "export"} <= verbs, verbs


@pytest.mark.parametrize("argv", fedhpc_argvs(), ids=" ".join)
def test_every_fedhpc_command_on_the_page_parses(argv):
    try:
        parser().parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing an argument
        pytest.fail(f"`fedhpc {' '.join(argv)}` in {DOC.name} does not parse (exit {exc.code})")


def test_every_repository_file_the_page_names_exists():
    text = DOC.read_text()
    named = set(re.findall(r"\b((?:scripts|profiles|envs|containers|examples)/[\w./-]+\w)", text))
    assert {"scripts/sbatch/lumi-head.sh", "profiles/lumi-dev", "examples/lumi/config.yaml"} <= named
    missing = sorted(p for p in named if not (REPO / p).exists() and "<" not in p)
    assert not missing, f"{DOC.name} names files that do not exist: {missing}"


def test_the_first_federation_config_trains_on_the_gcds_and_keeps_its_run_off_project():
    path = REPO / "examples" / "lumi" / "config.yaml"
    cfg = validate(yaml.safe_load(path.read_text()), str(path))
    assert cfg.training.device == "auto"  # a GPU site that sees no GPU stops instead of training on the CPU
    assert cfg.output_dir.startswith("/scratch/project_")
    for name, site in cfg.sites.items():
        assert site.accelerator == "rocm" and site.ranks_per_node == 8, name
        assert site.container.startswith("/projappl/project_") and site.container.endswith("fedhpc-rocm.sif"), name
    # Every training job must fit in dev-g's 3 hours, and the coordinator must wait for its queue.
    dev = yaml.safe_load((REPO / "profiles" / "lumi-dev" / "config.yaml").read_text())
    assert dev["set-resources"]["train"]["runtime"] <= 180
    assert cfg.rounds.deadline_minutes < 180
