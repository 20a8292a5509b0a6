"""The one catalog of what can be asked for by name: architecture files from folders, plus backend aliases served
straight through (one generator). Chat serving, /v1/models, the other endpoints, bench sweeps and the CLI all resolve
names here (as vLLM's ``OpenAIServingModels`` is the one list of served models for every endpoint).

Public API::

    catalog = Catalog(config.architectures_dirs, registry)   # loads now; a bad file is a SpecError naming its path
    spec = catalog.lookup("self-moa")        # ArchitectureSpec, or None when the name is unknown
    spec = catalog.resolve("x.yaml", files=True)  # lookup, or a file path too; UnknownArchitecture when neither
    cards = catalog.list_models()            # ModelCard per architecture (sorted), then per backend alias
    catalog.reload()                         # re-read the folders; on a bad file the old set stays and SpecError rises
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from ..backends.registry import BackendRegistry
from ..exceptions import ArchonError
from ..spec import ArchitectureSpec, GeneratorSpec, SpecError, load_architecture

log = logging.getLogger("archon.catalog")

# The file names an architecture may have (the one list: folders, the CLI and sweeps all go by it).
ARCHITECTURE_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")


def is_architecture_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in ARCHITECTURE_SUFFIXES


def find_file(given: str | Path, base_dir: str | Path | None = None) -> Path | None:
    """Where a path that the CLI or a sweep names (an architecture file, a sweep's ``config:``, ``--config``) is, the
    one order for all of them: a relative path in ``base_dir`` (a sweep's folder) when it is there, else from the
    working directory; an absolute path as it is. None when it is in neither (:func:`looked_in` says where it was
    looked for, in that order)."""
    p = Path(given)
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
        return Path(base_dir) / p
    return p if p.exists() else None


def looked_in(given: str | Path, base_dir: str | Path | None = None) -> str:
    """The places :func:`find_file` tried, in the order it tried them (for a "no such file" error)."""
    if Path(given).is_absolute():
        return "absolute path"
    if base_dir is None or Path(base_dir).resolve() == Path.cwd().resolve():
        return "looked in the working directory"
    return f"looked in {base_dir}, then in the working directory"


class UnknownArchitecture(ArchonError, LookupError):
    """A name that is neither an architecture of the catalog, a backend alias, nor (where allowed) a file."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown architecture {name!r}; known: {', '.join(known) or '(none)'}")
        self.name = name
        self.known = known


@dataclass(frozen=True)
class ModelCard:
    """One entry of /v1/models."""

    id: str
    kind: Literal["architecture", "backend"]
    description: str | None = None


def load_catalog(dirs: Iterable[str | Path]) -> dict[str, ArchitectureSpec]:
    """Every architecture file in the folders; an invalid file fails loudly with its path."""
    out: dict[str, ArchitectureSpec] = {}
    errors: list[str] = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            log.warning("architectures folder %s does not exist", p)
            continue
        for f in sorted(p.iterdir()):
            if not is_architecture_file(f):
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


def is_passthrough(spec: ArchitectureSpec) -> bool:
    """Whether ``spec`` is :func:`passthrough`'s: a backend model served as it is."""
    only = spec.layers[0][0] if len(spec.layers) == 1 and len(spec.layers[0]) == 1 else None
    return isinstance(only, GeneratorSpec) and only.model == spec.name


class Catalog:
    """Name → architecture for everything that serves or runs architectures.

    ``dirs``: folders of architecture files (loaded at construction; :meth:`reload` re-reads them).
    ``registry``: its aliases are served straight through (:func:`passthrough`); None: architectures only.
    ``specs``: a fixed set instead of (or on top of) folders, e.g. for an embedded server or a test.
    Architectures win over aliases of the same name.
    """

    def __init__(
        self,
        dirs: Iterable[str | Path] = (),
        registry: BackendRegistry | None = None,
        *,
        specs: Mapping[str, ArchitectureSpec] | None = None,
    ):
        self.dirs = [Path(d) for d in dirs]
        self.registry = registry
        self._fixed = dict(specs or {})
        self._lock = threading.Lock()
        self._specs = self._load()

    def _load(self) -> dict[str, ArchitectureSpec]:
        return {**self._fixed, **load_catalog(self.dirs)} if self.dirs else dict(self._fixed)

    # -- reading -----------------------------------------------------------------------------------------------------
    @property
    def architectures(self) -> Mapping[str, ArchitectureSpec]:
        """The architectures by name (read-only; a reload swaps the whole set)."""
        return MappingProxyType(self._specs)

    def names(self) -> list[str]:
        """Architecture names, sorted (backend aliases not included)."""
        return sorted(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.lookup(name) is not None

    def lookup(self, name: str) -> ArchitectureSpec | None:
        """The architecture of that name, else a backend alias served straight through, else None."""
        spec = self._specs.get(name)
        if spec is None and self.registry is not None and name in self.registry:
            spec = passthrough(name)
        return spec

    def resolve(self, name: str, *, files: bool = False, base_dir: str | Path | None = None) -> ArchitectureSpec:
        """:meth:`lookup`, or with ``files`` (CLI, sweeps: never a network client) a path to an architecture file,
        found by :func:`find_file` (``base_dir`` first, then the working directory). Raises :class:`UnknownArchitecture`, or SpecError for a bad file."""
        if files:
            p = find_file(name, base_dir) or Path(name)
            if is_architecture_file(p) or p.is_file():
                return load_architecture(p)
        spec = self.lookup(name)
        if spec is None:
            raise UnknownArchitecture(name, self.names())
        return spec

    def unbound(self) -> dict[str, list[str]]:
        """Architectures that use aliases the registry has no backend for (name → those aliases): not servable."""
        if self.registry is None:
            return {}
        out = {n: [m for m in s.models_used() if m not in self.registry] for n, s in sorted(self._specs.items())}
        return {n: missing for n, missing in out.items() if missing}

    def list_models(self) -> list[ModelCard]:
        """Architectures that can run on the registry's backends (sorted by name), then backend aliases not shadowed
        by one, in the registry's order. A preset whose aliases are not bound is left out: listed, it was offered to
        clients and the console, and every request to it was a 400."""
        unbound = self.unbound()
        cards = [ModelCard(n, "architecture", s.description) for n, s in sorted(self._specs.items()) if n not in unbound]
        if self.registry is not None:
            cards += [ModelCard(a, "backend") for a in self.registry.aliases() if a not in self._specs]
        return cards

    # -- changing ----------------------------------------------------------------------------------------------------
    def reload(self) -> list[str]:
        """Re-read the folders and swap the set in one step (requests in flight keep the spec they resolved).
        On an invalid file nothing changes and the SpecError (naming the files) is raised. Returns the names."""
        with self._lock:
            specs = self._load()
            self._specs = specs
        log.info("catalog reloaded: %d architecture(s)", len(specs))
        return sorted(specs)
