"""The package layers of docs/architecture.md, enforced: which deto package may import which,
and no import circle between any two modules.

Every import counts, wherever it stands (module level, inside a function, under
``TYPE_CHECKING``): a lazy import is still a dependency of the design, and a circle hidden
behind ``TYPE_CHECKING`` is still a circle to a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import deto

CORE = "core"
LAYERS: dict[str, frozenset[str]] = {
    CORE: frozenset({CORE}),
    "integrations": frozenset({CORE}),
    "run": frozenset({CORE, "plan"}),
    "proc": frozenset(),
    "netem": frozenset({"proc"}),
    "launch": frozenset({CORE, "run", "netem", "proc"}),
    "bench": frozenset({CORE, "integrations", "run", "netem", "proc", "plan"}),
    "plan": frozenset({CORE}),
    "cli": frozenset({CORE, "integrations", "run", "proc", "netem", "launch", "bench", "plan"}),
}
"""Package -> the other packages it may import (each may always import itself)."""
ENTRY_MODULES = {"cli": "cli", "__main__": "cli", "train": "cli", "plan_cli": "cli"}
"""Top-level modules that sit above every package (``deto.train``: the old names' alias)."""


def package_of(module: str) -> str:
    """The layer a dotted ``deto.*`` module belongs to."""
    parts = module.split(".")
    if len(parts) == 1:
        return CORE
    head = parts[1]
    if head in ENTRY_MODULES:
        return ENTRY_MODULES[head]
    return head if head in LAYERS else CORE


def modules_under(root: Path, top: str) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        dotted = ".".join((top, *path.relative_to(root).with_suffix("").parts))
        found[dotted.removesuffix(".__init__")] = path
    return found


def imports_of(module: str, path: Path, known: Iterable[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its source."""
    known = set(known)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
    return {t for t in targets if t in known and t != module}


def import_graph(root: Path, top: str) -> dict[str, set[str]]:
    mods = modules_under(root, top)
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def layer_violations(graph: Mapping[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        own = package_of(module)
        for dep in sorted(deps):
            theirs = package_of(dep)
            if theirs != own and theirs not in LAYERS[own]:
                bad.append(f"{module} ({own}) imports {dep} ({theirs})")
    return bad


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


DETO = Path(deto.__file__).parent


def test_every_package_imports_only_the_layers_below_it() -> None:
    assert layer_violations(import_graph(DETO, "deto")) == []


def test_no_module_is_in_an_import_circle() -> None:
    assert circles(import_graph(DETO, "deto")) == []


def test_every_package_has_a_layer() -> None:
    packages = {p.parent.name for p in DETO.glob("*/__init__.py")}
    unknown = packages - set(LAYERS) - set(ENTRY_MODULES) - {"compress", "replicators"}
    assert not unknown, f"add {sorted(unknown)} to LAYERS and to docs/architecture.md"


def test_the_checks_find_a_wrong_arrow_and_a_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "deto"
    for rel, text in {
        "__init__.py": "",
        "topology.py": "from deto.run import loop\n",  # core -> run: upward
        "run/__init__.py": "",
        "run/loop.py": "def f():\n    from . import tasks\n",
        "run/tasks.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from deto.run.loop import f\n",
        "proc/__init__.py": "",
        "proc/processes.py": "import deto.netem.rates\n",  # proc -> netem: upward
        "netem/__init__.py": "",
        "netem/rates.py": "from deto.proc import processes\n",  # allowed
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(pkg, "deto")
    assert layer_violations(graph) == [
        "deto.proc.processes (proc) imports deto.netem.rates (netem)",
        "deto.topology (core) imports deto.run.loop (run)",
    ]
    assert circles(graph) == [
        ["deto.netem.rates", "deto.proc.processes"],
        ["deto.run.loop", "deto.run.tasks"],
    ]
