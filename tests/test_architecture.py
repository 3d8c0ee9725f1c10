"""Architecture rules over privlm's import graph (stdlib ``ast`` only, no third-party tool).

A module is one .py file under src/privlm; a package's ``__init__.py`` is the package module.
Every import counts -- module-level and inside functions, ``import x.y``, ``from x import y``
and relative imports -- except those under ``if TYPE_CHECKING:``. ``from privlm.a import b``
counts as importing ``privlm.a.b`` when that is a module, else ``privlm.a``; ``import a.b.c``
counts as the deepest existing module of ``a.b.c`` (parent packages are not counted).

Rules (names match by prefix: ``privlm.x`` means ``privlm.x`` and ``privlm.x.*``):

1. No import cycles between privlm modules.
2. Layers: ``ONLY_IMPORTS`` -- a module under the key imports privlm modules only from the
   listed prefixes (plus its own subtree); ``NEVER_IMPORTS`` -- a module under the key never
   imports the listed prefixes.
3. Runtimes never import one another: a module in one of ``RUNTIME_GROUPS`` may not import a
   module in another group. Modules in no group (e.g. ``privlm.runtime.training``) are shared.

Prefixes that match no existing module (planned ones such as ``privlm.engine``) match nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "privlm"

_HOSTS = ("privlm.engine", "privlm.runtime", "privlm.config", "privlm.build", "privlm.api", "privlm.cli")

ONLY_IMPORTS: dict[str, list[str]] = {
    "privlm.privacy": ["privlm.privacy", "privlm.errors"],
}

NEVER_IMPORTS: dict[str, list[str]] = {
    "privlm.mechanisms": list(_HOSTS),
    "privlm.federated": list(_HOSTS),
    "privlm.models": ["privlm.federated", "privlm.engine", "privlm.runtime"],
    "privlm.engine": ["privlm.runtime", "privlm.cli", "privlm.api", "privlm.build"],
    "privlm.data": ["privlm.engine", "privlm.runtime"],
    "privlm.audit": ["privlm.runtime"],
    "privlm.attacks": ["privlm.runtime", "privlm.build", "privlm.api", "privlm.cli"],
}

# Simulated attacks (issue #24) are reached from the one place that turns a config into objects,
# never from training, mechanism, aggregation or runtime code.
ATTACK_IMPORTERS = {"privlm.build"}

RUNTIME_GROUPS: list[list[str]] = [
    ["privlm.runtime.sequential"],
    ["privlm.runtime.threads"],
    ["privlm.runtime.processes", "privlm.runtime.workers"],  # (the process executor and its worker side)
    ["privlm.runtime.batched"],
    ["privlm.runtime.flower"],  # the whole subpackage is one runtime
]

Graph = dict[str, dict[str, int]]  # module -> {imported module: first line number}


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Yield every Import/ImportFrom node, skipping bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def build_graph(root: Path, package: str) -> Graph:
    """Import graph of ``package`` (a directory under ``root``), restricted to its own modules."""
    files = sorted((root / package).rglob("*.py"))
    modules = {_module_name(root, f): f for f in files}

    def deepest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: Graph = {}
    for mod, path in modules.items():
        edges = graph.setdefault(mod, {})
        pkg_parts = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        targets: list[tuple[str, int]] = []
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets += [(a.name, node.lineno) for a in node.names]
                continue
            base = node.module or ""
            if node.level:
                anchor = pkg_parts[: len(pkg_parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                targets.append((sub if sub in modules else base, node.lineno))
        for name, line in targets:
            if _matches(name, package) and (dst := deepest(name)) and dst != mod:
                edges.setdefault(dst, line)
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """Every elementary cycle, each listed once starting from its smallest module name."""
    cycles: list[list[str]] = []
    for start in sorted(graph):
        path, on_path = [start], {start}

        def walk(node: str) -> None:
            for nxt in sorted(graph.get(node, {})):
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt > start and nxt not in on_path:
                    path.append(nxt)
                    on_path.add(nxt)
                    walk(nxt)
                    path.pop()
                    on_path.discard(nxt)

        walk(start)
    return cycles


def layer_violations(graph: Graph, only: dict[str, list[str]], never: dict[str, list[str]],
                     groups: list[list[str]]) -> list[str]:
    """One line per offending import: ``src:line -> dst  (rule)``."""
    out = []
    for src in sorted(graph):
        for dst, line in sorted(graph[src].items()):
            edge = f"{src}:{line} -> {dst}"
            for layer, allowed in only.items():
                if _matches(src, layer) and not any(_matches(dst, p) for p in allowed + [layer]):
                    out.append(f"{edge}  ({layer} may only import {allowed})")
            for layer, banned in never.items():
                if _matches(src, layer) and (hit := [p for p in banned if _matches(dst, p)]):
                    out.append(f"{edge}  ({layer} never imports {hit[0]})")
            g_src = [i for i, g in enumerate(groups) if any(_matches(src, p) for p in g)]
            g_dst = [i for i, g in enumerate(groups) if any(_matches(dst, p) for p in g)]
            if g_src and g_dst and g_src[0] != g_dst[0]:
                out.append(f"{edge}  (runtime {groups[g_src[0]]} may not import runtime {groups[g_dst[0]]})")
    return out


def test_no_import_cycles():
    cycles = find_cycles(build_graph(SRC, PACKAGE))
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layer_rules():
    bad = layer_violations(build_graph(SRC, PACKAGE), ONLY_IMPORTS, NEVER_IMPORTS, RUNTIME_GROUPS)
    assert not bad, f"{len(bad)} layer violation(s):\n" + "\n".join(bad)


def test_only_build_imports_the_attacks():
    graph = build_graph(SRC, PACKAGE)
    assert "privlm.attacks" in graph
    importers = {src for src, edges in graph.items() if "privlm.attacks" in edges}
    assert importers <= ATTACK_IMPORTERS, f"{sorted(importers - ATTACK_IMPORTERS)} import privlm.attacks"


def test_checker_catches_cycles_and_violations(tmp_path):
    pkg = tmp_path / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import fakepkg.b\n",
        "b.py": "def f():\n    from fakepkg import a\n",  # function-level import closes the cycle
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fakepkg.d\n",
        "d.py": "from fakepkg import c\n",  # c -> d is type-only: no cycle
        "sub/__init__.py": "from . import x\n",
        "sub/x.py": "from ..c import thing\nimport os\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = build_graph(tmp_path, "fakepkg")
    assert graph["fakepkg.sub"] == {"fakepkg.sub.x": 1}
    assert graph["fakepkg.sub.x"] == {"fakepkg.c": 1}
    assert find_cycles(graph) == [["fakepkg.a", "fakepkg.b", "fakepkg.a"]]

    bad = layer_violations(graph, only={"fakepkg.sub": ["fakepkg.errors"]}, never={"fakepkg.d": ["fakepkg.c"]},
                           groups=[["fakepkg.a"], ["fakepkg.b"]])
    assert [v.split("  ")[0] for v in bad] == [
        "fakepkg.a:1 -> fakepkg.b", "fakepkg.b:2 -> fakepkg.a", "fakepkg.d:1 -> fakepkg.c",
        "fakepkg.sub.x:1 -> fakepkg.c"]
    assert not layer_violations(graph, {"fakepkg.nothing": []}, {"fakepkg.missing": ["fakepkg"]}, [])
