"""The package layout (docs/architecture.md): the layers import only downward (lint-imports,
with the contracts in pyproject.toml), no two modules import each other in a ring, no class
grows past 200 lines, and the top of the package stays small."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sd_rest"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("api", "setup", "jobs", "runs", "cluster", "state", "images", "workerhost")
MAX_CLASS_LINES = 200
MAX_TOP_MODULES = 12


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layers_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("state/jobs.py", "from sd_rest.jobs import manager"),  # state above jobs
        ("runs/publisher.py", "from sd_rest.api import routes"),  # runs above api
        ("endpoints.py", "from sd_rest.state import store"),  # the base above state
        ("worker_driver/caches.py", "from sd_rest import fields"),  # the driver stands apart
    ],
)
def test_an_upward_import_breaks_a_contract(tmp_path: Path, module: str, upward: str) -> None:
    copy = tmp_path / "tree"
    shutil.copytree(PACKAGE, copy / "sd_rest", ignore=shutil.ignore_patterns("simulator", "static"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    target = copy / "sd_rest" / module
    target.write_text(target.read_text() + f"\n{upward}  # noqa\n")
    result = lint_imports(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout


def strongly_connected(graph: grimp.ImportGraph) -> list[set[str]]:
    """The import rings (Tarjan's algorithm, iterative): every set of modules of two or more
    that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    rings: list[set[str]] = []
    work: list[tuple[str, Iterator[str]]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        work.append((module, iter(sorted(graph.find_modules_directly_imported_by(module)))))

    for start in sorted(graph.modules):
        if start in index:
            continue
        visit(start)
        while work:
            module, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    visit(child)
                elif child in on_stack:
                    low[module] = min(low[module], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == index[module]:
                ring = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    ring.add(member)
                    if member == module:
                        break
                if len(ring) > 1:
                    rings.append(ring)
    return rings


def test_no_module_imports_itself_through_others() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("sd_rest")
    finally:
        sys.path.remove(str(ROOT))
    assert strongly_connected(graph) == []


def test_the_ring_finder_finds_rings() -> None:
    graph = grimp.ImportGraph()
    for name in ("p.a", "p.b", "p.c", "p.d"):
        graph.add_module(name)
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=importer, imported=imported)
    assert strongly_connected(graph) == [{"p.a", "p.b", "p.c"}]


def classes() -> Iterator[tuple[str, int]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        if "simulator" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                yield f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - node.lineno + 1


def test_no_class_is_longer_than_200_lines() -> None:
    sizes = dict(classes())
    assert sizes  # the walk found the classes
    assert {name: n for name, n in sizes.items() if n > MAX_CLASS_LINES} == {}


def test_the_top_holds_only_entry_points_and_what_every_layer_shares() -> None:
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    for name in PACKAGES:
        init = PACKAGE / name / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "May use" in doc, f"{init} says what it holds and what it may use"


def test_the_simulator_imports_nothing_of_sd_rest() -> None:
    """It is the stand-in repository, run as the fork is (not a package: lint-imports does not
    see it)."""
    scripts = sorted((PACKAGE / "simulator").rglob("*.py"))
    assert scripts
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("sd_rest"), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("sd_rest") for a in node.names), path
