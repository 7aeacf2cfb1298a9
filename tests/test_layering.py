"""The floors of the house: no module imports from a floor above its own.

``data -> models -> evaluate / recommend -> train -> experiments -> benchmarks``, with the shared
pieces each floor stands on (errors, sharding, config, run-directory records, checkpoints) placed
between them. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FLOORS = (
    ("studyrec.errors", "studyrec.data"),
    ("studyrec.sharding",),
    ("studyrec.models",),
    ("studyrec.config", "studyrec.rundir", "studyrec.checkpoint"),
    ("studyrec.evaluate",),
    ("studyrec.recommend",),
    ("studyrec.train",),
    ("experiments",),
    ("benchmarks",),
)


def floor(module: str) -> int | None:
    for level, prefixes in enumerate(FLOORS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return level
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


SOURCES = sorted(p for d in ("studyrec", "experiments", "benchmarks") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_reaches_a_floor_above(path):
    name = module_name(path)
    if name == "studyrec":
        return  # the package root re-exports load_run lazily
    own = floor(name)
    assert own is not None, f"{name} is on no floor: add it to FLOORS"
    above = sorted(m for m in imported(path) if (floor(m) or 0) > own)
    assert not above, f"{name} (floor {own}) imports from above: {above}"


def test_every_floor_is_populated():
    modules = {module_name(p) for p in SOURCES}
    for prefixes in FLOORS:
        assert any(floor(m) is not None and any(m == p or m.startswith(p + ".") for p in prefixes) for m in modules), prefixes
