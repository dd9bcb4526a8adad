"""The package's shape, read from its source with ``ast`` (nothing is imported or run):

- imports between svdadapt's own modules point one way: no cycle, counting every import statement wherever it
  stands (module level, inside functions, under ``if TYPE_CHECKING:``), since a function-level import only hides a
  cycle from the interpreter, not from the design;
- the subpackages form layers (``PACKAGE_ORDER``, lowest first): a module imports only from its own layer and the
  layers below it, so no two subpackages import each other;
- only core/methods.py asks which method or mode it is running (``method == "corda"``): everywhere else the
  registry (``MethodSpec``) answers.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Callable
from pathlib import Path

import pytest

PACKAGE = "svdadapt"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE
ROUTER = "core.methods"  # the one module that may branch on a method or mode name
BRANCH_NAMES = {"method", "mode"}


def _module_name(path: Path) -> str:
    """'svdadapt.x.y' for src/svdadapt/x/y.py, 'svdadapt.x' for src/svdadapt/x/__init__.py."""
    parts = [PACKAGE, *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache  # the source is read once per test session
def _modules() -> dict[str, tuple[Path, ast.Module]]:
    paths = sorted(SRC.rglob("*.py"))
    assert paths, f"no Python files under {SRC}"
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p))) for p in paths}


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".") if module != PACKAGE else f"{PACKAGE} (__init__)"


def _file(module: str) -> str:
    """src/svdadapt/x/y.py -> 'x/y.py' (a package's __init__.py for a package)."""
    mods = _modules()
    return str(mods[module][0].relative_to(SRC)) if module in mods else module.replace(".", "/") + ".py"


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's own modules that one import statement in ``module`` loads (ignoring what each of them loads
    in turn): ``from .x import f`` -> x, ``from . import x`` -> x when x is a module (else the package's
    __init__), ``import svdadapt.x`` / ``from svdadapt.x import f`` -> x."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    if node.level:  # relative: resolve against the importing module's package
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base != PACKAGE and not base.startswith(PACKAGE + "."):
        return set()
    found = set()
    for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in known:
            found.add(sub)  # `from . import compress`: the submodule itself
        elif base in known:
            found.add(base)  # `from .wrap import wrap`: a name defined in `base`
    return found


def import_graph() -> dict[str, dict[str, list[int]]]:
    """{module: {module it imports: [line numbers]}} over the package's own modules."""
    mods = _modules()
    known = set(mods)
    graph: dict[str, dict[str, list[int]]] = {m: {} for m in mods}
    for m, (path, tree) in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _imported(node, m, is_package, known):
                    if target != m:
                        graph[m].setdefault(target, []).append(node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The shortest cycle through each module that is on one (Tarjan's strongly connected components, then a
    breadth-first search inside each), each listed once as [a, b, ..., a], shortest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles: set[tuple[str, ...]] = set()
    for comp in components:
        members = set(comp)
        for start in comp:  # the shortest cycle through each member: breadth-first back to it
            parent: dict[str, str | None] = {start: None}
            frontier, closed = [start], None
            while frontier and closed is None:
                nxt = []
                for v in frontier:
                    if start in graph[v]:
                        closed = v
                        break
                    for w in sorted(graph[v]):
                        if w in members and w not in parent:
                            parent[w] = v
                            nxt.append(w)
                frontier = nxt
            path = [closed]  # back from the module that closes the cycle to the start
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            ring = list(reversed(path))
            first = ring.index(min(ring))  # one rotation per cycle, so that each is listed once
            ring = ring[first:] + ring[:first]
            cycles.add((*ring, ring[0]))
    return sorted(map(list, cycles), key=lambda c: (len(c), c))


def describe(cycle: list[str], graph: dict[str, dict[str, list[int]]]) -> str:
    """'wrap -> calibration (wrap.py:216) -> wrap (calibration.py:28)': each step with the lines that import it."""
    steps = [_short(cycle[0])]
    for a, b in zip(cycle, cycle[1:]):
        steps.append(f"{_short(b)} ({', '.join(f'{_file(a)}:{n}' for n in graph[a][b])})")
    return " -> ".join(steps)


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 3 and any(graph.values()), graph  # the walk found the modules and their imports
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in svdadapt:\n" + "\n".join("  " + describe(c, graph) for c in cycles)


def test_cycle_finder() -> None:
    """The finder itself, on made-up graphs: the shortest cycle through each module of a component, once each."""
    g = {"p.a": {"p.b": [1]}, "p.b": {"p.c": [2], "p.a": [3]}, "p.c": {"p.a": [4]}, "p.d": {"p.a": [5]}}
    assert find_cycles(g) == [["p.a", "p.b", "p.a"], ["p.a", "p.b", "p.c", "p.a"]]
    # two cycles through one hub (wrap <-> calibration, wrap <-> export): both reported
    hub = {"p.w": {"p.c": [1], "p.e": [2]}, "p.c": {"p.w": [3]}, "p.e": {"p.w": [4]}, "p.m": {}}
    assert find_cycles(hub) == [["p.c", "p.w", "p.c"], ["p.e", "p.w", "p.e"]]
    assert describe(["p.c", "p.w", "p.c"], hub) == "p.c -> p.w (p/c.py:3) -> p.c (p/w.py:1)"
    assert find_cycles({"p.a": {"p.b": [1]}, "p.b": {}}) == []


# ----------------------------------------------------------------------------------------- the layers
# svdadapt's layers, lowest first: a module may import from its own layer and the layers before it, never after.
# A layer is a subpackage (svdadapt/x/), a top-level module (svdadapt/x.py) or the package's __init__ ("svdadapt").
PACKAGE_ORDER = (
    "core",         # linalg, record, methods: imports no other layer
    "storage",      # manifest, shards: files on disk
    "modules",      # bnb, layers (the layer kinds), targets, qbase
    "calibration",  # covariances from forward hooks
    "engine",       # checks, plan, job, apply, sources, distributed (its collectives reduce Covariances)
    "blockwise",    # block-by-block calibration, on calibration's public API and the engine's plan
    "quant",        # quantized bases (QPiSSA) and simulated compression
    "lifecycle",    # checkpoint, export (save / load / unwrap), initdir
    "stream",       # init_checkpoint: the streaming entry point
    "wrap",         # wrap(): the in-memory entry point
    "loading",      # model loading for users and the CLI (imports no other layer)
    "cli",          # the svdadapt command: calls wrap, init_checkpoint, loading
    PACKAGE,        # __init__: the public names
)


def layer_of(module: str) -> str:
    """'engine' for svdadapt.engine.plan and svdadapt.engine, 'wrap' for svdadapt.wrap, 'svdadapt' for svdadapt."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def order_violations(graph: dict[str, dict[str, list[int]]], order: tuple[str, ...],
                     file_of: Callable[[str], str] = _file) -> list[str]:
    """For each import of a layer above the importer's own: 'engine/sources.py:18 imports lifecycle.checkpoint
    (layer 'lifecycle' is above 'engine')'; for a module outside every layer: 'x/y.py: layer 'x' is not in
    PACKAGE_ORDER'."""
    rank = {layer: i for i, layer in enumerate(order)}
    found = [f"{file_of(m)}: layer {layer_of(m)!r} is not in PACKAGE_ORDER" for m in sorted(graph)
             if layer_of(m) not in rank]
    for a in sorted(graph):
        for b, lines in sorted(graph[a].items()):
            la, lb = layer_of(a), layer_of(b)
            if la in rank and lb in rank and rank[lb] > rank[la]:
                found += [f"{file_of(a)}:{n} imports {_short(b)} (layer {lb!r} is above {la!r})" for n in lines]
    return found


def layer_graph(graph: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, list[int]]]:
    """The import graph between layers: {layer: {layer it imports: [line numbers]}} (imports inside one layer
    dropped)."""
    layers: dict[str, dict[str, list[int]]] = {layer_of(m): {} for m in graph}
    for a, targets in graph.items():
        for b, lines in targets.items():
            if layer_of(a) != layer_of(b):
                layers[layer_of(a)].setdefault(layer_of(b), []).extend(lines)
    return layers


def test_layers_import_downwards() -> None:
    graph = import_graph()
    assert {layer_of(m) for m in graph} == set(PACKAGE_ORDER), sorted({layer_of(m) for m in graph})
    bad = order_violations(graph, PACKAGE_ORDER)
    assert not bad, ("an svdadapt module imports a layer above its own (PACKAGE_ORDER in tests/test_structure.py, "
                     "lowest first):\n" + "\n".join("  " + b for b in bad))


def test_no_cycles_between_subpackages() -> None:
    layers = layer_graph(import_graph())
    assert layers["engine"] and layers[PACKAGE], layers  # the walk found imports between layers
    cycles = find_cycles(layers)
    assert not cycles, "import cycles between svdadapt's subpackages:\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


def test_order_checker() -> None:
    """The checker itself, on a made-up graph: an import of a higher layer is named with its file and line."""
    g = {"svdadapt.core.a": {"svdadapt.engine.b": [7]}, "svdadapt.engine.b": {"svdadapt.core.a": [3]},
         "svdadapt.wrap": {"svdadapt.engine.b": [2]}, "svdadapt.extra.c": {}}
    file_of = lambda m: m.removeprefix("svdadapt.").replace(".", "/") + ".py"  # noqa: E731
    assert order_violations(g, ("core", "engine", "wrap"), file_of) == [
        "extra/c.py: layer 'extra' is not in PACKAGE_ORDER",
        "core/a.py:7 imports engine.b (layer 'engine' is above 'core')"]
    assert layer_graph(g) == {"core": {"engine": [7]}, "engine": {"core": [3]}, "wrap": {"engine": [2]}, "extra": {}}
    assert find_cycles(layer_graph(g)) == [["core", "engine", "core"]]


# ----------------------------------------------------------------------------------------- method / mode branches
def _names_branch_variable(node: ast.expr) -> bool:
    """``method``, ``x.method``, ``x["method"]`` (likewise mode)."""
    if isinstance(node, ast.Name):
        return node.id in BRANCH_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in BRANCH_NAMES
    if isinstance(node, ast.Subscript):
        key = node.slice
        return isinstance(key, ast.Constant) and key.value in BRANCH_NAMES
    return False


def _is_string_literal(node: ast.expr) -> bool:
    """'corda', or a tuple / list / set of string literals (``method in ("pissa", "milora")``)."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return bool(node.elts) and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts)
    return False


def method_branches(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, source) of every comparison of a method or mode name with string literals, either way round and
    with any of ==, !=, in, not in, is, is not, and every ``match`` on one."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any((_names_branch_variable(a) and _is_string_literal(b))
                   or (_names_branch_variable(b) and _is_string_literal(a)) for a, b in zip(operands, operands[1:])):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Match) and _names_branch_variable(node.subject):
            found.append((node.lineno, f"match {ast.unparse(node.subject)}"))
    return found


def test_only_methods_py_branches_on_method_or_mode() -> None:
    """An AST check rather than a regex on the source: it sees ``"corda" == method`` and ``method in (...)``, and
    it does not trip on docstrings, comments or error messages that quote such a test."""
    offenders = []
    for module, (path, tree) in _modules().items():
        if module != f"{PACKAGE}.{ROUTER}":
            offenders += [f"  {path.relative_to(SRC.parent)}:{line}: {src}" for line, src in sorted(method_branches(tree))]
    assert not offenders, ("only core/methods.py may branch on a method or mode name (ask the MethodSpec instead):\n"
                           + "\n".join(offenders))


@pytest.mark.parametrize("source, hits", [
    ('if method == "corda": pass', 1),
    ('if "eora" != spec.method: pass', 1),
    ('x = options["mode"] in ("ipa", "kpa")', 1),
    ('if args.method not in ["pissa"]: pass', 1),
    ("match mode:\n    case 'ipa': pass", 1),
    ('if method == other: pass', 0),  # not a literal: no branch on a name
    ('if name == "corda": pass', 0),
    ('"""method == "corda" in a docstring"""', 0),
])
def test_branch_finder(source: str, hits: int) -> None:
    assert len(method_branches(ast.parse(source))) == hits


# ----------------------------------------------------------------------------------------- the tests themselves
ASSERTING_CALLS = {"pytest.raises", "pytest.warns", "raises_exactly", "torch.testing.assert_close"}


def _calls(node: ast.AST) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}


def unchecked_tests(tree: ast.Module) -> list[str]:
    """Test functions that check nothing: no ``assert``, no ``pytest.raises`` / ``warns``, and no call to a function
    of the same file that does (``_raises(...)``, ``assert_untouched(...)``)."""
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    checking: set[str] = set()
    changed = True
    while changed:  # a helper checks if it asserts, or calls one that does
        changed = False
        for name, f in funcs.items():
            if name not in checking and (any(isinstance(n, ast.Assert) for n in ast.walk(f))
                                         or _calls(f) & (ASSERTING_CALLS | checking)):
                checking.add(name)
                changed = True
    return [name for name in funcs if name.startswith("test_") and name not in checking]


TESTS = Path(__file__).resolve().parent
TEST_FILES = sorted(TESTS.rglob("test_*.py"))  # tests/ and its folders, one per subpackage (names unique: no __init__.py)


def test_every_test_checks_something() -> None:
    bare = [f"  {p.relative_to(TESTS).as_posix()}::{name}" for p in TEST_FILES
            for name in unchecked_tests(ast.parse(p.read_text(encoding="utf-8")))]
    assert not bare, "tests that cannot fail (no assert, no pytest.raises):\n" + "\n".join(bare)


def test_unchecked_finder() -> None:
    tree = ast.parse("def _check(x):\n    assert x\n\n"
                     "def test_a():\n    _check(1)\n\n"
                     "def test_b():\n    wrap(1)\n\n"
                     "def test_c():\n    with pytest.raises(ValueError):\n        wrap(0)\n")
    assert unchecked_tests(tree) == ["test_b"]
