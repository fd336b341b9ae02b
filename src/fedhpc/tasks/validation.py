"""A whole config checked: the config layer's schema and cross-key rules, plus the task's and evaluators' own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedhpc.config.federation import Config
from fedhpc.config.schema import ConfigError, check_config, config_markdown, parse_config_file
from fedhpc.core.errors import FedhpcError
from fedhpc.tasks import load_task
from fedhpc.tasks.evaluators import load_evaluators


def task_problems(cfg: Config) -> tuple[Any, list[str]]:
    """The task (loaded, options checked) and its own problems; evaluators are resolved too."""

    problems = []
    try:
        task = load_task(cfg)
    except ConfigError as exc:
        return None, [line.strip(" -") for line in str(exc).splitlines()[1:]] or [str(exc)]
    except FedhpcError as exc:
        return None, [str(exc)]
    problems += task.problems()
    try:
        load_evaluators(cfg)
    except ConfigError as exc:
        problems += [line.strip(" -") for line in str(exc).splitlines()[1:]] or [str(exc)]
    except FedhpcError as exc:
        problems.append(str(exc))
    return task, problems


def validate(raw: Any, origin: str = "config", schema_file: str | Path | None = None, with_task: bool = True) -> Config:
    """Validate a parsed config; return it typed. `with_task=False` skips loading the task (for the
    built-in ones: torch), for a job that re-reads a config the workflow already checked whole."""
    return check_config(raw, origin, schema_file, task_problems if with_task else None)


def load(path: str | Path, with_task: bool = True) -> Config:
    """Read and validate a config file."""
    return validate(parse_config_file(path), str(path), with_task=with_task)


def markdown_docs() -> str:
    """docs/configuration.md: the config's dataclasses, then the built-in tasks' and evaluators'
    `options` (checked when the config is validated)."""
    from fedhpc.tasks.embedding import EmbeddingOptions  # torch: only when the docs are generated
    from fedhpc.tasks.evaluators import PerplexityOptions
    from fedhpc.tasks.hf_lm import HFCausalLMOptions

    return config_markdown((HFCausalLMOptions, EmbeddingOptions, PerplexityOptions))
