"""The import rules of the architecture, read from the source (README, "How it is built").

Layers, bottom up; a package may import only packages of lower layers (and itself)::

    3  llmswarm_cli                                the command line
    2  llmswarm_operator   llmswarm_local          the two substrates
    1  llmswarm   llmswarm_node   llmswarm_control client, block server, control-plane logic
    0  llmswarm_core                               wire, route map, security, sources, spans, defaults

Packages of one layer do not import each other. Every import counts, also one inside a
function, and no module takes part in an import loop.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "llmswarm_core": (ROOT / "core" / "llmswarm_core", 0),
    "llmswarm": (ROOT / "client" / "llmswarm", 1),
    "llmswarm_node": (ROOT / "node_image" / "llmswarm_node", 1),
    "llmswarm_control": (ROOT / "operator" / "llmswarm_control", 1),
    "llmswarm_operator": (ROOT / "operator" / "llmswarm_operator", 2),
    "llmswarm_local": (ROOT / "operator" / "llmswarm_local", 2),
    "llmswarm_cli": (ROOT / "cli" / "llmswarm_cli", 3),
}


def module_name(package: str, path: Path) -> str:
    relative = path.relative_to(PACKAGES[package][0]).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"]
    return ".".join([package, *parts])


def modules() -> dict[str, Path]:
    found = {}
    for package, (folder, _) in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            found[module_name(package, path)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that module `name` imports (the longest known prefix of each imported name)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    wanted: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            wanted += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            wanted += [f"{base}.{alias.name}" for alias in node.names] or [base]
            wanted.append(base)
    found = set()
    for target in wanted:
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in known:
                if candidate != name:
                    found.add(candidate)
                break
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, set(known)) for name, path in known.items()}


def package_of(module: str) -> str:
    return module.split(".")[0]


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in edges.items():
        own = package_of(module)
        for target in targets:
            other = package_of(target)
            if other != own and PACKAGES[other][1] >= PACKAGES[own][1]:
                wrong.append(f"{module} imports {target} (layer {PACKAGES[own][1]} -> {PACKAGES[other][1]})")
    return sorted(wrong)


def find_loops(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    loops: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                loops.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return loops


def test_every_import_goes_down_the_layers() -> None:
    wrong = upward_edges(graph())
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_no_other_part_of_the_project() -> None:
    for module, targets in graph().items():
        if package_of(module) == "llmswarm_core":
            assert {package_of(t) for t in targets} <= {"llmswarm_core"}, (module, targets)


def test_the_server_never_imports_the_control_plane_or_the_client() -> None:
    for module, targets in graph().items():
        if package_of(module) == "llmswarm_node":
            assert not {package_of(t) for t in targets} & {"llmswarm_control", "llmswarm_operator", "llmswarm_local", "llmswarm"}, \
                (module, targets)


def test_no_import_loops() -> None:
    loops = find_loops(graph())
    assert not loops, "\n".join(" -> ".join(loop) for loop in loops)


def test_the_checks_catch_what_they_name() -> None:
    """The checker reads real edges, and reports an upward import and a loop when it is shown one."""
    edges = graph()
    assert "llmswarm_core.wire" in edges["llmswarm_node.server"]
    assert upward_edges({"llmswarm_core.wire": {"llmswarm.remote"}, "llmswarm.remote": set()})
    assert upward_edges({"llmswarm_node.server": {"llmswarm_control.placement"}, "llmswarm_control.placement": set()})
    assert find_loops({"llmswarm.a": {"llmswarm.b"}, "llmswarm.b": {"llmswarm.c"}, "llmswarm.c": {"llmswarm.a"}}) == [
        ["llmswarm.a", "llmswarm.b", "llmswarm.c", "llmswarm.a"]]


@pytest.mark.parametrize("package", ["llmswarm_core", "llmswarm_control", "llmswarm_operator", "llmswarm_local", "llmswarm_node"])
def test_importing_a_package_has_no_side_effects(package: str) -> None:
    """A fresh interpreter imports the package: no Kopf registration, and the core and control plane load no torch."""
    code = (
        "import sys, importlib\n"
        f"importlib.import_module({package!r})\n"
        "import kopf\n"
        "handlers = kopf.get_default_registry()._spawning.get_all_handlers()"
        " + kopf.get_default_registry()._changing.get_all_handlers()\n"
        "print(len(handlers), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert out[0] == "0", f"importing {package} registered {out[0]} Kopf handlers"
    if package in ("llmswarm_core", "llmswarm_control"):
        assert out[1] == "False", f"importing {package} loaded torch"


def test_the_kopf_entry_module_registers_the_handlers() -> None:
    code = (
        "import importlib, kopf\n"
        "importlib.import_module('llmswarm_operator.entry')\n"
        "r = kopf.get_default_registry()\n"
        "print(len(r._changing.get_all_handlers()) + len(r._spawning.get_all_handlers()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.strip()
    assert int(out) > 0


def test_every_module_imports() -> None:
    for name in modules():
        if name.endswith("__main__") or name == "llmswarm_operator.entry":
            continue  # running them is their job; the entry module registers handlers (tested above)
        importlib.import_module(name)
