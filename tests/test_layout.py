"""The package's rooms import only what README.md's "Layout" table allows (dependencies point one way)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "archon_server"
LEAVES = {"exceptions", "spec", "config", "db", "sampling_fields"}  # anyone may import these (config itself only imports spec)

# room -> the other rooms it may import (besides the leaves). Keep in step with README.md's Layout table.
ALLOWED: dict[str, set[str]] = {
    "exceptions": set(),
    "db": set(),
    "spec": set(),
    "sampling_fields": set(),
    "config": set(),
    "engine": set(),
    "sandbox": set(),
    "testing": {"api"},  # the test server runs uvicorn as `archon serve` does (api/wire.py); nothing imports testing
    "backends": {"engine"},
    "components": {"backends", "sandbox"},
    "graph": {"components", "backends"},
    "bench": {"graph", "components", "backends", "sandbox"},
    "search": {"bench", "graph", "components", "backends"},
    "api": {"graph", "components", "backends"},
    "cli": {"api", "search", "bench", "graph", "components", "backends", "engine"},
    "__main__": {"cli"},
}


def _room(module_parts: list[str]) -> str:
    return module_parts[0]


def imported_rooms(path: Path) -> set[str]:
    rel = list(path.relative_to(PKG).with_suffix("").parts)
    package = rel[:-1] if path.name != "__init__.py" else rel[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [node.names[0].name])
            elif node.module and node.module.startswith("archon_server."):
                target = node.module.split(".")[1:]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1:] for a in node.names if a.name.startswith("archon_server.")]
            if not names:
                continue
            target = names[0]
        else:
            continue
        if target:
            out.add(target[0])
    return out


def test_every_room_imports_only_what_the_layout_allows():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        room = f.relative_to(PKG).parts[0].removesuffix(".py")
        if room == "__init__":
            continue
        assert room in ALLOWED, f"new room {room!r}: add it to ALLOWED and to README.md's Layout table"
        for target in imported_rooms(f) - {room} - LEAVES - ALLOWED[room]:
            bad.append(f"{f.relative_to(PKG)} imports {target}")
    assert not bad, bad


# Top-level packages beside the serving package: they may import archon_server, never the other way round.
OUTSIDE = ("training",)


def _top_level_imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
    return out


def test_the_serving_package_never_imports_the_offline_tooling():
    bad = [f"{f.relative_to(PKG)} imports {t}" for f in sorted(PKG.rglob("*.py")) for t in _top_level_imports(f) & set(OUTSIDE)]
    assert not bad, bad
    for name in OUTSIDE:
        assert (PKG.parent / name / "__init__.py").is_file(), name


def test_the_readme_layout_table_lists_every_room():
    readme = (PKG.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for room in ALLOWED:
        if room != "__main__":
            assert f"`{room}" in table, room
    for name in OUTSIDE:
        assert f"`{name}/`" in table, name
