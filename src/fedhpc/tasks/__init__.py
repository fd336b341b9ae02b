"""Training tasks: the built-in ones by name, a user's by import path (`task.name` in config.yaml)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from fedhpc.tasks.base import EvalContext, LocalResult, NoOptions, RoundContext, Task, TaskError, options_from

BUILTIN = {
    "gpt": "fedhpc.tasks.gpt:GPTTask",
    "hf_causal_lm": "fedhpc.tasks.hf_lm:HFCausalLMTask",
    "embedding": "fedhpc.tasks.embedding:EmbeddingTask",
}

__all__ = ["EvalContext", "LocalResult", "NoOptions", "RoundContext", "Task", "TaskError", "load_task", "resolve"]


def resolve(spec: str, key: str, builtin: dict[str, str]) -> Any:
    """The object an import path names: `package.module:Name`, `path/to/file.py:Name` (relative to the
    working directory), or a built-in short name. Errors name the config `key`."""
    spec = builtin.get(spec, spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(
            f"{key}: {spec!r} is neither a built-in ({', '.join(sorted(builtin))}) nor an import path 'module:Class'"
        )
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            name = f"fedhpc_user_{path.stem}_{abs(hash(str(path))):x}"
            module = sys.modules.get(name)
            if module is None:
                if not path.is_file():
                    raise TaskError(f"{key}: no such file {module_name!r} (relative to {os.getcwd()})")
                loader_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                loader_spec.loader.exec_module(module)
        else:
            # Like `python -m`: modules in the working directory are importable.
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except TaskError:
        raise
    except Exception as exc:  # a user's module can fail to import in any way
        raise TaskError(f"{key}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise TaskError(f"{key}: {module_name!r} has no {attr!r}")
    return obj


def load_task(cfg) -> Task:
    """The configured task, its options checked (unknown keys name `task.options.<key>`)."""
    cls = resolve(cfg.task.name, "task.name", BUILTIN)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(f"task.name: {cfg.task.name!r} is not a subclass of fedhpc.tasks.Task")
    if cls.__abstractmethods__:  # say which, before the first site finds out mid-round
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise TaskError(f"task.name: {cfg.task.name!r} does not implement {missing} (docs/writing-a-task.md)")
    return cls(cfg, options_from(cls.Options, cfg.task.options, "task.options"))
