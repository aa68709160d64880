"""The package's layering (docs/architecture.md): imports flow down only, and no module imports
another module's private names."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "sed_dask"

# rank of each top-level part of the package; a module may import parts of its own rank or lower
RANK = {
    "errors": 0,
    "config": 0,
    "schema": 0,
    "progress": 0,
    "readers": 1,
    "cluster": 1,
    "sources": 2,
    "store": 3,
    "engine": 4,
    "results": 5,
    "analysis": 6,
    "weights": 6,
    "accessor": 7,
    "report": 7,
    "live": 7,
    "testing": 7,
    "demo": 8,
    "cli": 9,
    "__init__": 10,
    "__main__": 10,
}


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        yield path, parts


def _imports(path: pathlib.Path, parts: list[str]):
    """(absolute module, imported names, line) of every import in the file, lazy ones included."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts if is_pkg else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


def _part(mod: str, names: list[str]) -> str | None:
    bits = mod.split(".")
    if bits[0] != "sed_dask":
        return None
    if len(bits) == 1:  # from sed_dask import config / __version__
        return names[0] if names and names[0] in RANK else "__init__"
    return bits[1]


CASES = list(_modules())


@pytest.mark.parametrize("path,parts", CASES, ids=[".".join(p) for _, p in CASES])
def test_imports_flow_down(path, parts):
    own = parts[1] if len(parts) > 1 else "__init__"
    assert own in RANK, f"{path}: part {own!r} has no layer in RANK (docs/architecture.md)"
    bad = []
    for mod, names, line in _imports(path, parts):
        part = _part(mod, names)
        if part is None or part == own or mod == "sed_dask" and names == ["__version__"]:
            continue
        if RANK[part] > RANK[own]:
            bad.append(f"line {line}: {own} (layer {RANK[own]}) imports {mod} (layer {RANK[part]})")
    assert not bad, f"{path.relative_to(PKG.parent)} imports upward:\n" + "\n".join(bad)


@pytest.mark.parametrize("path,parts", CASES, ids=[".".join(p) for _, p in CASES])
def test_no_private_names_across_modules(path, parts):
    me = ".".join(parts)
    bad = []
    for mod, names, line in _imports(path, parts):
        if not mod.startswith("sed_dask") or mod == me:
            continue
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        bits = mod.split(".")
        # a private module (analysis._series) serves its own subpackage only
        outside = [
            b for i, b in enumerate(bits) if b.startswith("_") and not b.startswith("__") and bits[:i] != parts[:i]
        ]
        if private or outside:
            bad.append(f"line {line}: from {mod} import {', '.join(names)}")
    assert not bad, f"{path.relative_to(PKG.parent)} imports private names:\n" + "\n".join(bad)
