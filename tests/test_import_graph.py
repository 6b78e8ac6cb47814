"""The layering the design fixes: trainer -> parallel -> models, models never imports
torch.distributed, and module-level imports inside models/ form no cycle."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _modules(package: str) -> dict[str, str]:
    files = glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True)
    names = {}
    for f in files:
        rel = os.path.relpath(f, ROOT)[:-3].replace(os.sep, ".")
        names[rel.removesuffix(".__init__")] = f
    return names


def test_models_never_import_parallel_trainer_or_distributed():
    for name, path in _modules("models").items():
        bad = {
            m
            for m in _imports(path, top_level_only=False)
            if m.split(".")[0] in ("parallel", "trainer", "bench") or m.startswith("torch.distributed")
        }
        assert not bad, f"{name} imports {sorted(bad)}"


def test_parallel_never_imports_trainer():
    for name, path in _modules("parallel").items():
        bad = {m for m in _imports(path, top_level_only=False) if m.split(".")[0] in ("trainer", "bench")}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_no_import_cycle_in_models():
    mods = _modules("models")
    graph = {n: {m for m in _imports(p, top_level_only=True) if m in mods and m != n} for n, p in mods.items()}
    for n in mods:  # a module's package __init__ is imported first: not an edge of its own
        graph[n] -= {p for p in mods if n.startswith(p + ".")}
    state = {}

    def visit(n, path):
        state[n] = "open"
        for m in graph[n]:
            assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [n, m])
            if m not in state:
                visit(m, path + [n])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [])
