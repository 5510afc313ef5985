"""The layer order of the package, read from the source with ``ast`` (nothing is imported).

Layers, lowest first (``docs/architecture.md`` draws the same table)::

    0 foundation  contract, config, fileio, logs, distributed, runlock, signals, _C
    1 kernels     Triton kernels (installed as icons_fast.kernels)
    2 ops         checks, dispatch through one registry, the torch references
    3 inputs      data/ (formats, records, templates, images, replica), model/ (loading, LoRA, inputs)
    4 math        features/ (extractor, projector, store), select/ (influence, voting, rules),
                  train/ (loop, checkpoints, fine-tune, evaluate), compat/ (LESS, ICONS, TRAK files)
    5 run layout  rundir (where each stage reads and writes)
    6 stages      stages/ (warmup, featurize, influence, select, neighbors, target_index, pipeline), report/,
                  bench/, demo
    7 interface   cli, __main__, the package's public API (icons_fast/__init__.py)

Every import, at module level or inside a function, must point to the same layer or
below; no two modules may import each other, directly or through others (no cycle).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Longest prefix wins; every module of the package must match one entry.
LAYERS = {
    "icons_fast.contract": 0,
    "icons_fast.config": 0,
    "icons_fast.fileio": 0,
    "icons_fast.logs": 0,
    "icons_fast.distributed": 0,
    "icons_fast.runlock": 0,
    "icons_fast.signals": 0,
    "icons_fast._C": 0,
    "icons_fast.kernels": 1,
    "icons_fast.ops": 2,
    "icons_fast.data": 3,
    "icons_fast.model": 3,
    "icons_fast.features": 4,
    "icons_fast.select": 4,
    "icons_fast.train": 4,
    "icons_fast.compat": 4,
    "icons_fast.rundir": 5,
    "icons_fast.stages": 6,
    "icons_fast.report": 6,
    "icons_fast.bench": 6,
    "icons_fast.demo": 6,
    "icons_fast.cli": 7,
    "icons_fast.__main__": 7,
    "icons_fast": 7,
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":  # installed as icons_fast.kernels (package_dir mapping in setup.py)
        parts = ["icons_fast"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/architecture.md")
    return LAYERS[best]


def source_files() -> list[pathlib.Path]:
    return sorted(ROOT.glob("icons_fast/**/*.py")) + sorted(ROOT.glob("kernels/*.py"))


def imports_of(path: pathlib.Path) -> set[str]:
    """Every ``icons_fast`` module the file imports (relative imports resolved, ``from pkg import mod`` as ``pkg.mod``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    modules = {module_name(p) for p in source_files()} | {"icons_fast._C"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            # `from icons_fast.ops import backend` imports the submodule icons_fast.ops.backend;
            # `from icons_fast.data import ErrorLog` imports the package icons_fast.data itself.
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(base)
    return {m for m in found if m.startswith("icons_fast.") or m == "icons_fast"} - {name}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in source_files()}


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_point_down():
    upward = {
        mod: sorted(f"{t} (layer {layer_of(t)})" for t in targets if layer_of(t) > layer_of(mod))
        for mod, targets in import_graph().items()
    }
    upward = {f"{m} (layer {layer_of(m)})": t for m, t in upward.items() if t}
    assert upward == {}, "imports that point up the layer order (see docs/architecture.md)"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm over the modules of ``graph`` (edges to unknown modules ignored)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v] & graph.keys()):
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
            out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    # A package's __init__ that re-exports its submodules is not a cycle with them unless a
    # submodule imports the package back; the graph holds exactly what each file imports.
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert cycles == []


def test_the_walker_sees_every_kind_of_import():
    """Absolute, relative, lazy (inside a function) and ``from pkg import module`` imports are all seen."""
    assert "icons_fast.rundir" in imports_of(ROOT / "icons_fast/stages/pipeline.py")  # module level
    assert "icons_fast.stages.featurize" in imports_of(ROOT / "icons_fast/stages/pipeline.py")  # inside a function
    assert "icons_fast.kernels.rademacher" in imports_of(ROOT / "kernels/project.py")  # relative
    assert "icons_fast._C" in imports_of(ROOT / "icons_fast/ops/backend.py")  # from icons_fast import _C
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph)[0] == ["a", "b", "c"]


# Inside layer 4 the folders stay apart: training never needs features or selection, the
# feature and selection math never need training (checkpoints are read by the stages), and
# selection is arrays in, indices out: no config, no processes.
APART = {
    "icons_fast.train": ("icons_fast.features", "icons_fast.select"),
    "icons_fast.features": ("icons_fast.select", "icons_fast.train"),
    "icons_fast.select": ("icons_fast.train", "icons_fast.config", "icons_fast.distributed"),
    # the report reads run directories (rundir) and never runs a stage
    "icons_fast.report": ("icons_fast.stages", "icons_fast.bench", "icons_fast.demo"),
}


def test_math_folders_stay_apart():
    crossing = {
        mod: sorted(t for t in targets if t.startswith(tuple(p + "." for p in apart)) or t in apart)
        for mod, targets in import_graph().items()
        for src, apart in APART.items()
        if mod == src or mod.startswith(src + ".")
    }
    assert {m: t for m, t in crossing.items() if t} == {}


# Narrower than the layer numbers: what docs/architecture.md's "may import" column says for
# the bottom of the stack, and for the two inputs folders, which stay apart from each other.
ONLY = {
    "icons_fast.contract": (),
    "icons_fast.kernels": ("icons_fast.contract", "icons_fast.kernels"),
    "icons_fast.ops": ("icons_fast.contract", "icons_fast.config", "icons_fast.fileio", "icons_fast.logs",
                       "icons_fast._C", "icons_fast.kernels", "icons_fast.ops"),
}
INPUTS_APART = {"icons_fast.data": "icons_fast.model", "icons_fast.model": "icons_fast.data"}


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_bottom_layers_import_only_what_they_may():
    bad = {
        mod: sorted(t for t in targets if not any(_inside(t, ok) for ok in allowed))
        for mod, targets in import_graph().items()
        for src, allowed in ONLY.items()
        if _inside(mod, src)
    }
    assert {m: t for m, t in bad.items() if t} == {}


def test_data_and_model_stay_apart():
    crossing = {
        mod: sorted(t for t in targets if _inside(t, other))
        for mod, targets in import_graph().items()
        for src, other in INPUTS_APART.items()
        if _inside(mod, src)
    }
    assert {m: t for m, t in crossing.items() if t} == {}


@pytest.mark.parametrize("module, layer", [("icons_fast.ops.segment_reduce", 2), ("icons_fast.stages.select", 6),
                                           ("icons_fast.kernels.project", 1), ("icons_fast", 7)])
def test_layer_table(module, layer):
    assert layer_of(module) == layer
