"""The workflow stays `snakemake --lint` clean and snakefmt-formatted."""

from __future__ import annotations

import subprocess

from tests.workflow_util import BIN, REPO, env


def test_snakemake_lint_is_clean():
    proc = subprocess.run(
        [str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True, env=env(), timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Congratulations, your workflow is in a good condition!" in out, out[-3000:]


def test_snakefmt_has_nothing_to_change():
    proc = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "workflow", "rules"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_finds_nothing():
    proc = subprocess.run(
        [str(BIN / "ruff"), "check", "src", "tests", "benchmarks"], cwd=REPO, capture_output=True, text=True, env=env()
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
