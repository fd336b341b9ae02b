"""Shared fixtures of the end-to-end tests: one real tiny federation per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workflow_util import run_workflow, tiny_config, write_config


@pytest.fixture(scope="session")
def finished(tmp_path_factory) -> tuple[Path, dict, Path]:
    """One complete, uninterrupted run of the tiny federation: (work dir, config, run dir)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(tmp, rounds=2, mlflow=True)
    write_config(tmp, cfg)
    run_workflow(tmp)
    return tmp, cfg, Path(cfg["output_dir"]) / cfg["run"]
