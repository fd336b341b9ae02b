"""Module boundaries (issue 20): no module reaches into another's private names (what a module
does not export, it may change without telling anyone), no import cycles, and the package layers."""

from __future__ import annotations

import ast
import re
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


def import_cycles(graph) -> list[list[str]]:
    """The groups of fedhpc modules that import each other in a ring (strongly connected
    components of more than one module), function-level imports included."""
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    rings: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            ring = []
            while (w := stack.pop()) != v:
                ring.append(w)
            if ring:
                rings.append(sorted([v, *ring]))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return rings


def test_no_import_cycles():
    import grimp

    rings = import_cycles(grimp.build_graph("fedhpc", include_external_packages=False, cache_dir=None))
    assert not rings, "modules importing each other in a ring:\n" + "\n".join(" <-> ".join(r) for r in rings)


def test_the_cycle_check_sees_a_ring_behind_a_function_level_import(tmp_path, monkeypatch):
    import grimp

    pkg = tmp_path / "ringpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from ringpkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from ringpkg import c\n")
    (pkg / "c.py").write_text("import ringpkg.a\n")
    (pkg / "d.py").write_text("from ringpkg import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("ringpkg", include_external_packages=False, cache_dir=None)
    assert import_cycles(graph) == [["ringpkg.a", "ringpkg.b", "ringpkg.c"]]


def test_the_layers_contract_holds():
    """pyproject.toml's import-linter contract: each package imports only the packages below it."""
    import subprocess
    import sys

    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=SRC.parents[1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def map_blocks(block: str) -> dict[str, str]:
    """The package map's text per package: from its `name/` at the start of a line to the next."""
    parts = re.split(r"^([a-z_]+)/ ", block, flags=re.M)
    return {name: text for name, text in zip(parts[1::2], parts[2::2])}


def test_the_architecture_map_names_every_package_and_module():
    """docs/architecture.md's package map matches the tree: every subpackage has its entry, and
    every module is named in its own package's entry (a module added, moved or renamed without
    updating the map fails; so does an entry for a package that is gone)."""
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    section = doc.split("## The package: who may import whom", 1)[1].split("\n## ", 1)[0]
    blocks = map_blocks(section.split("```", 2)[1])
    packages = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file())
    assert sorted(blocks) == packages, "packages in the map vs the tree"
    missing = [
        f"{pkg}/{m.stem}"
        for pkg in packages
        for m in sorted((SRC / pkg).glob("*.py"))
        if m.stem != "__init__" and m.stem not in re.findall(r"[a-z_]+", blocks[pkg])
    ]
    assert not missing, f"docs/architecture.md's package map does not name, in their package's entry: {missing}"
    stray = sorted(SRC.glob("*.py"))
    assert [p.name for p in stray] == ["__init__.py", "__main__.py"], "modules outside the packages: " + str(stray)


def test_the_map_check_sees_a_module_under_the_wrong_package():
    blocks = map_blocks("core/  errors, files\nstages/  plan, gather\n")
    assert blocks == {"core": " errors, files\n", "stages": " plan, gather\n"}
    assert "gather" not in re.findall(r"[a-z_]+", blocks["core"])
