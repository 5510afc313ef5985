"""Layer order of the op columns, read from the source with ast (no imports run).

contract  <-  kernels  <-  ops  <-  features / compat, and model/ below features/:

- ``icons_fast/contract.py`` imports nothing from icons_fast;
- ``kernels/*`` import only the contract and each other;
- ``icons_fast/ops/*`` import only the contract, the kernels, other ops and ``icons_fast._C``;
- ``icons_fast/model/*`` and ``icons_fast/train/*`` never import ``features``, ``select`` or stages above;
- the extractor, the projector and the TRAK adapter never import ``select``, ``train`` or the stages.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ABOVE_FEATURES = ("icons_fast.select", "icons_fast.train", "icons_fast.cli", "icons_fast.pipeline",
                  "icons_fast.report", "icons_fast.rundir")


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":  # installed as icons_fast.kernels (package_dir mapping)
        parts = ["icons_fast"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def icons_imports(path: pathlib.Path) -> set[str]:
    """Every ``icons_fast...`` module the file imports, relative imports resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if base == "icons_fast")
    return {m for m in found if m == "icons_fast" or m.startswith("icons_fast.")} - {"icons_fast"}


def allowed_only(prefixes):
    return lambda m: any(m == p or m.startswith(p + ".") for p in prefixes)


def forbidden(prefixes):
    return lambda m: not any(m == p or m.startswith(p + ".") for p in prefixes)


RULES = [
    ("icons_fast/contract.py", allowed_only(())),
    ("kernels/*.py", allowed_only(("icons_fast.contract", "icons_fast.kernels"))),
    ("icons_fast/ops/*.py", allowed_only(("icons_fast.contract", "icons_fast.kernels", "icons_fast.ops",
                                          "icons_fast._C"))),
    ("icons_fast/model/*.py", forbidden(("icons_fast.features",) + ABOVE_FEATURES)),
    ("icons_fast/train/*.py", forbidden(("icons_fast.features", "icons_fast.select", "icons_fast.cli",
                                         "icons_fast.pipeline", "icons_fast.report"))),
    ("icons_fast/features/extractor.py", forbidden(ABOVE_FEATURES)),
    ("icons_fast/features/projection.py", forbidden(ABOVE_FEATURES)),
    ("icons_fast/compat/trak.py", forbidden(ABOVE_FEATURES)),
]


@pytest.mark.parametrize("pattern, ok", RULES, ids=[r[0] for r in RULES])
def test_imports_point_down(pattern, ok):
    files = sorted(ROOT.glob(pattern))
    assert files, f"no file matches {pattern}"
    bad = {str(f.relative_to(ROOT)): sorted(m for m in icons_imports(f) if not ok(m)) for f in files}
    assert {f: m for f, m in bad.items() if m} == {}


def test_the_walker_sees_imports():
    """The walker finds absolute, relative and ``from icons_fast import _C`` imports; a rule can refuse one."""
    assert "icons_fast.features.projection" in icons_imports(ROOT / "icons_fast/compat/trak.py")
    assert "icons_fast.kernels.rademacher" in icons_imports(ROOT / "kernels/project.py")
    assert "icons_fast._C" in icons_imports(ROOT / "icons_fast/ops/backend.py")
    assert not allowed_only(("icons_fast.contract",))("icons_fast.features.store")
