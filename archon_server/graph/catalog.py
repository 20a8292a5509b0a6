"""The architectures a server offers: preset files from folders, plus backend models served straight through."""

from __future__ import annotations

import logging
from pathlib import Path

from ..spec import ArchitectureSpec, GeneratorSpec, SpecError, load_architecture

log = logging.getLogger("archon.catalog")


def load_catalog(dirs: list[str | Path]) -> dict[str, ArchitectureSpec]:
    """Every *.yaml / *.yml / *.json file in the folders; an invalid file fails loudly with its path."""
    out: dict[str, ArchitectureSpec] = {}
    errors: list[str] = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            log.warning("architectures folder %s does not exist", p)
            continue
        for f in sorted(p.iterdir()):
            if f.suffix.lower() not in (".yaml", ".yml", ".json"):
                continue
            try:
                spec = load_architecture(f)
            except SpecError as e:
                errors.append(str(e))
                continue
            if spec.name in out:
                errors.append(f"{f}: architecture name {spec.name!r} defined twice")
            out[spec.name] = spec
    if errors:
        raise SpecError(errors)
    return out


def passthrough(alias: str) -> ArchitectureSpec:
    """A backend model served straight through: one generator (the client's n becomes an n=k request)."""
    return ArchitectureSpec(name=alias, layers=[[GeneratorSpec(model=alias)]], final="first")
