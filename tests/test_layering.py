"""The package's layering, read from the source: no import cycles; the engine never imports the
active-learning system; the kernels import nothing from the package they install into."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Layers above the engine: they may import the AL system, the engine may not import them.
ABOVE_THE_ENGINE = ("gradnorm_engine.al", "gradnorm_engine.commands", "gradnorm_engine.benchmark",
                    "gradnorm_engine.cli")


def module_names(root: Path, package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_edges(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the package modules it imports (at any depth of the file, lazy imports included)."""
    modules = module_names(root, package)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = here
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_the_package():
    assert cycles(import_edges(REPO, "gradnorm_engine")) == []


def test_the_engine_never_imports_the_layers_above_it():
    def above(name: str) -> bool:
        return any(name == top or name.startswith(top + ".") for top in ABOVE_THE_ENGINE)

    wrong = {m: sorted(t for t in targets if above(t))
             for m, targets in import_edges(REPO, "gradnorm_engine").items() if not above(m)}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_the_kernels_import_nothing_from_gradnorm_engine():
    for path in sorted((REPO / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports from above kernels/: {ast.unparse(node)}"
                assert node.level or not (node.module or "").startswith("gradnorm_engine"), \
                    f"{path.name}: {ast.unparse(node)}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("gradnorm_engine") for a in node.names), f"{path.name}"


def test_the_checks_find_a_cycle_and_a_layer_violation(tmp_path):
    """The helpers above on a small package made for the purpose: they can fail."""
    pkg = tmp_path / "gradnorm_engine"
    (pkg / "al").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")      # a lazy import closes the cycle
    (pkg / "c.py").write_text("from .al.loop import run\n")            # the engine reaching into al
    (pkg / "al" / "__init__.py").write_text("")
    (pkg / "al" / "loop.py").write_text("from ..a import x\n")
    edges = import_edges(tmp_path, "gradnorm_engine")
    assert cycles(edges) == [["gradnorm_engine.a", "gradnorm_engine.b"]]
    assert "gradnorm_engine.al.loop" in edges["gradnorm_engine.c"]
