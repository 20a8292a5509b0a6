"""The root of archon-server's own exceptions (as ``optuna.exceptions``): ``except ArchonError`` catches every
failure the package raises on purpose, and nothing else. A leaf module: anyone may import it.

Where each one lives: ``spec.SpecError`` (bad architecture or config, with the offending path),
``backends.base.BackendError`` / ``BackendTimeout`` (a backend call failed), ``backends.registry.UnknownModel``,
``graph.catalog.UnknownArchitecture``, ``graph.runtime.GraphError`` (the graph produced no answer),
``components.base.ComponentFailed`` / ``ParseError``; the HTTP layer's ``api.errors.APIError`` carries a status code.
"""

from __future__ import annotations


class ArchonError(Exception):
    """Base class of every exception archon-server raises deliberately."""


__all__ = ["ArchonError"]
