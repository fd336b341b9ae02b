"""No fedhpc module reaches into another's private names (issue 20: what a module does not
export, it may change without telling anyone)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedhpc"


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[str]:
    """`from .mod import _name` and `mod._name` for fedhpc modules imported by `path`."""
    tree = ast.parse(path.read_text(), str(path))
    modules, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("fedhpc")):
            for alias in node.names:
                if private(alias.name):
                    found.append(
                        f"{path.name}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                    )
                modules[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fedhpc"):
                    modules[alias.asname or alias.name.rsplit(".", 1)[-1]] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if private(node.attr):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_or_uses_another_modules_private_names():
    found = [use for path in sorted(SRC.rglob("*.py")) for use in private_uses(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_check_sees_both_forms(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from .audit import _tail\nfrom fedhpc import tensorfile as tf\nx = tf._DTYPES\ny = tf.__name__\n")
    assert private_uses(probe) == ["probe.py:1: from .audit import _tail", "probe.py:3: tf._DTYPES"]
