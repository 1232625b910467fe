"""The package imports one way (issue 14, DESIGN.md's dependency rule).

The import graph is read from the source with ``ast`` rather than by importing the modules, so the test is fast,
needs no optional dependency, and also sees imports placed inside functions: hiding an import in a function
breaks no cycle, it only postpones it.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lmforge"

# (importer prefix, imported prefixes it must never use). A prefix matches the module itself and everything
# under it. Shared utilities every package may use live at the package root (lmforge.io, lmforge.device).
STAGE_MODULES = ("lmforge.data", "lmforge.model", "lmforge.train", "lmforge.finetune", "lmforge.eval", "lmforge.infer",
                 "lmforge.report", "lmforge.tokenizer", "lmforge.objectives", "lmforge.pretrain", "lmforge.hf",
                 "lmforge.embed", "lmforge.runs", "lmforge.outdir")
FORBIDDEN: list[tuple[str, tuple[str, ...]]] = [
    # data needs no model, and nothing that trains, fine-tunes, serves or evaluates one
    ("lmforge.data", ("lmforge.model", "lmforge.train", "lmforge.finetune", "lmforge.infer", "lmforge.eval")),
    # model knows nothing of training, fine-tuning, serving, evaluation or data
    ("lmforge.model", ("lmforge.train", "lmforge.finetune", "lmforge.infer", "lmforge.eval", "lmforge.data")),
    # train knows models and batches, not the stages that use it (nor the verbs, the run directory or the report)
    ("lmforge.train", ("lmforge.finetune", "lmforge.infer", "lmforge.eval", "lmforge.pipeline", "lmforge.pretrain",
                       "lmforge.embed", "lmforge.report", "lmforge.hf", "lmforge.outdir")),
    # the shared utilities every package may use stand on nothing of lmforge's (the registry and the settings
    # base included: every stage module imports them)
    *[(shared, ("lmforge",)) for shared in ("lmforge.io", "lmforge.device", "lmforge.stats", "lmforge.registry",
                                            "lmforge.settings")],
    # stages declare themselves and their settings; only the recipe runner assembles recipes (issue 14: settings
    # live beside their stage, and no package imports the one recipe module)
    *[(stage, ("lmforge.recipe", "lmforge.pipeline")) for stage in STAGE_MODULES],
    # cli is the top: nothing imports it
    ("lmforge", ("lmforge.cli",)),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name a ``from ... import`` statement names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    # a relative import inside a package's __init__ is relative to the package itself
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Every lmforge module -> the lmforge modules it imports, at any depth of its source."""
    files = {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(module, path.name == "__init__.py", node)
                # `from pkg import mod` imports the submodule pkg.mod when there is one
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for name in names:
                # `import lmforge.model.io` names a module; `from lmforge.x import func` resolves to lmforge.x
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name.startswith(PACKAGE) and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as module names."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """A concrete cycle inside one strongly connected component, so the failure names a path to cut."""
    start = min(members)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in parents:
                    parents[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return sorted(members)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        for importer, forbidden in FORBIDDEN:
            if not _within(module, importer):
                continue
            for target in sorted(targets):
                if any(_within(target, f) for f in forbidden):
                    found.append(f"{module} imports {target}")
    return found


def test_graph_sees_the_package():
    graph = import_graph()
    assert "lmforge.cli" in graph and "lmforge.model.transformer" in graph
    assert "lmforge.model.transformer" in graph["lmforge.pretrain"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layer_rule():
    violations = layer_violations(import_graph())
    assert not violations, "layer rule broken:\n" + "\n".join(violations)


def test_the_checks_catch_a_cycle_and_a_climb():
    """On a made-up graph: the checks above can fail, and name what to cut."""
    graph = {"lmforge.a": {"lmforge.b"}, "lmforge.b": {"lmforge.c"}, "lmforge.c": {"lmforge.a"},
             "lmforge.train.loop": {"lmforge.finetune.sft"}, "lmforge.io": {"lmforge.recipe"},
             "lmforge.data.readers": {"lmforge.model.io"}, "lmforge.finetune.sft": set(), "lmforge.recipe": set(),
             "lmforge.model.io": set()}  # fmt: skip
    assert find_cycles(graph) == [["lmforge.a", "lmforge.b", "lmforge.c", "lmforge.a"]]
    assert layer_violations(graph) == ["lmforge.data.readers imports lmforge.model.io",
                                       "lmforge.io imports lmforge.recipe",
                                       "lmforge.train.loop imports lmforge.finetune.sft"]  # fmt: skip


def test_tests_mirror_the_packages():
    """tests/<package>/ holds the tests of lmforge/<package>/; the tests of root modules stay in tests/."""
    tests = Path(__file__).resolve().parent
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))
    assert folders and all((SRC / PACKAGE / name / "__init__.py").is_file() for name in folders), folders
    stray = [p.name for p in tests.glob("test_*.py") if (SRC / PACKAGE / p.stem.removeprefix("test_")).is_dir()]
    assert stray == [], f"tests of a package belong in its folder: {stray}"
