"""Import layering of the metalearn package: a module may import only from its own layer or lower ones.

Every module under metalearn/ is parsed with `ast` (nothing is imported): every `import` and `from ... import`,
at module level or inside a function, under `if TYPE_CHECKING:` or not, plus `importlib.import_module("...")`
with a literal name. Relative imports are resolved; `from pkg import name` is an edge to the module pkg.name
when that is a module, else to pkg. A module belongs to the unit named by its first two name components
(metalearn/data/omniglot.py -> metalearn.data, metalearn/config.py -> metalearn.config), and a unit to a layer:

    layer  name         units                                                   may import
    0      foundation   errors, types, _io, stats, config, precision, presets  layer 0
    1      components   models, data, inner                                     layer 0; and inner -> models
    2      algorithms   algorithms                                              layers 0-1
    3      engine       engine (module or package), compiled                    layers 0-2
    4      training     train, evaluation, checkpoint, tracking, distributed,   layers 0-4
                        transfer, validation (config checks that need the
                        registries), guards, runfolder, and any top-level
                        module not in the table
    5      interface    cli, ablate, launch, __main__, the package root         everything
                        (metalearn/__init__.py re-exports from every layer)

Within layer 1 the three units are independent of one another except for the pairs in SAME_LAYER_ALLOWED (the
batched inner loop special-cases the shipped models). A top-level module that is not in the table (a new one)
counts as layer 4, and the test says so. Imports between units must also not form a cycle (test_no_cycles_*).
"""
from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]  # the tree this test lives in, not the installed metalearn
PACKAGE = ROOT / "metalearn"

LAYER_NAMES = {0: "foundation", 1: "components", 2: "algorithms", 3: "engine", 4: "training", 5: "interface"}
LAYERS: Dict[str, int] = {
    **dict.fromkeys(["metalearn.errors", "metalearn.types", "metalearn._io", "metalearn.stats", "metalearn.config",
                     "metalearn.precision", "metalearn.presets"], 0),
    **dict.fromkeys(["metalearn.models", "metalearn.data", "metalearn.inner"], 1),
    "metalearn.algorithms": 2,
    "metalearn.engine": 3,
    "metalearn.compiled": 3,  # the engine's compiled path (outer.compile)
    **dict.fromkeys(["metalearn.train", "metalearn.evaluation", "metalearn.checkpoint", "metalearn.tracking",
                     "metalearn.distributed", "metalearn.transfer", "metalearn.validation", "metalearn.guards",
                     "metalearn.runfolder"], 4),
    **dict.fromkeys(["metalearn.cli", "metalearn.ablate", "metalearn.launch", "metalearn.__main__", "metalearn"], 5),
}
DEFAULT_LAYER = 4  # a top-level module or package not in the table (e.g. a new run-folder module)
STRICT_LAYERS = {1}  # units of these layers must not import one another, but for:
SAME_LAYER_ALLOWED: Set[Tuple[str, str]] = {("metalearn.inner", "metalearn.models")}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. metalearn.data.download
    path: str  # its file, relative to the repository root
    line: int
    target: str  # imported module, e.g. metalearn.data.omniglot


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


def layer(u: str) -> int:
    return LAYERS.get(u, DEFAULT_LAYER)


@lru_cache(maxsize=1)
def scan() -> Tuple[Dict[str, Path], Tuple[Edge, ...]]:
    """All modules under metalearn/ (name -> file) and every import edge between them."""
    files = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p): p for p in files}
    packages = {module_name(p) for p in files if p.name == "__init__.py"}

    def known(name: str) -> str:
        """The longest prefix of `name` that is a scanned module (metalearn.x.Name -> metalearn.x)."""
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    edges: List[Edge] = []
    for name, path in modules.items():
        rel = str(path.relative_to(ROOT))
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        except SyntaxError as e:
            raise AssertionError(f"{rel}:{e.lineno}: cannot parse: {e.msg}") from None
        package = name if name in packages else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    if node.level - 1 >= len(base_parts):
                        raise AssertionError(f"{rel}:{node.lineno}: relative import beyond the top-level package")
                    base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):
                targets = [node.args[0].value]
            for t in dict.fromkeys(targets):
                if t == "metalearn" or t.startswith("metalearn."):
                    edges.append(Edge(name, rel, node.lineno, known(t)))
    return modules, tuple(sorted(set(edges), key=lambda e: (e.path, e.line, e.target)))


def unknown_units() -> List[str]:
    modules, _ = scan()
    return sorted({unit(m) for m in modules} - set(LAYERS))


def violations() -> List[str]:
    _, edges = scan()
    out = []
    for e in edges:
        us, ut = unit(e.source), unit(e.target)
        if us == ut:
            continue
        ls, lt = layer(us), layer(ut)
        if lt > ls:
            out.append(f"{e.path}:{e.line} imports {e.target} (layer {lt}, {LAYER_NAMES[lt]}) "
                       f"from layer {ls} ({LAYER_NAMES[ls]})")
        elif lt == ls and ls in STRICT_LAYERS and (us, ut) not in SAME_LAYER_ALLOWED:
            out.append(f"{e.path}:{e.line} imports {e.target} (layer {lt}) from {us}, also layer {ls}: the units of "
                       f"layer {ls} are independent (allowed: "
                       + ", ".join(f"{a} -> {b}" for a, b in sorted(SAME_LAYER_ALLOWED)) + ")")
    return out


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's algorithm (iterative): the components with more than one node, i.e. the import cycles."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    found: List[List[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    n = stack.pop()
                    on_stack.discard(n)
                    component.append(n)
                    if n == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def cycles(key) -> List[str]:
    """Import cycles between the nodes `key(module)` names: per strongly connected component, its members and
    one shortest cycle through its first member, with the import that makes each step."""
    _, edges = scan()
    graph: Dict[str, Set[str]] = {}
    where: Dict[Tuple[str, str], Edge] = {}
    for e in edges:
        a, b = key(e.source), key(e.target)
        graph.setdefault(a, set())
        graph.setdefault(b, set())
        if a != b:
            graph[a].add(b)
            where.setdefault((a, b), e)
    out = []
    for component in strongly_connected(graph):
        start, inside = component[0], set(component)
        parent: Dict[str, str] = {}
        frontier, closing = [start], None
        while frontier and closing is None:  # breadth-first, within the component, back to start
            nxt = []
            for a in frontier:
                for b in sorted(graph[a] & inside):
                    if b == start:
                        closing = a
                        break
                    if b not in parent:
                        parent[b] = a
                        nxt.append(b)
                if closing is not None:
                    break
            frontier = nxt
        path = [start]
        node = closing
        while node != start:
            path.insert(1, node)
            node = parent[node]
        path.append(start)
        steps = [f"{where[a, b].path}:{where[a, b].line} imports {where[a, b].target}" for a, b in zip(path, path[1:])]
        out.append(f"cycle among {len(component)} ({', '.join(component)}): " + " -> ".join(path)
                   + " [" + "; ".join(steps) + "]")
    return out


def test_the_scan_sees_the_package():
    modules, edges = scan()
    assert len(modules) > 30, f"only {len(modules)} modules found under {PACKAGE}"
    assert len(edges) > 100, f"only {len(edges)} imports between metalearn modules found"
    for u in ("metalearn.errors", "metalearn.config", "metalearn.data", "metalearn.algorithms", "metalearn.cli"):
        assert u in {unit(m) for m in modules}, f"{u} not found under {PACKAGE}"
    # the resolution of relative imports, inside functions too
    assert any(e.source == "metalearn.cli" and e.target == "metalearn.train" for e in edges)
    assert any(e.source == "metalearn.algorithms.maml" and e.target == "metalearn.algorithms.base" for e in edges)


def test_unknown_top_level_modules_are_reported():
    unknown = unknown_units()
    if unknown:
        msg = (f"not in the layer table of {Path(__file__).name}, counted as layer {DEFAULT_LAYER} "
               f"({LAYER_NAMES[DEFAULT_LAYER]}): {', '.join(unknown)}")
        print(msg)
        warnings.warn(msg)


def test_no_lower_layer_imports_a_higher_one():
    found = violations()
    assert not found, f"{len(found)} layering violation(s) (table: {Path(__file__).name}):\n" + "\n".join(found)


def test_no_cycles_between_top_level_units():
    found = cycles(unit)
    assert not found, "import cycles between top-level modules/subpackages:\n" + "\n".join(found)


def test_no_cycles_between_modules():
    found = cycles(lambda m: m)
    assert not found, "import cycles between modules:\n" + "\n".join(found)
