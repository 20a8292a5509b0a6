"""The version of what a stored definition means: one number shared by sweeps and searches.

A sweep's ``sweep.json``, its registration in a shared store and a search study's stored config carry
``definition_version``.  Raise :data:`DEFINITION_VERSION` whenever the same definition would now give different
results: then a folder, store or study made before is refused on resume instead of mixing old and new results
(which the comparison of the definitions themselves cannot notice, since they are unchanged).

Version 2 (none before): one fixed dev/test split for every seed (``datasets.SPLIT_SEED``; it used to follow the
seed), pass@k's default ``k`` (those of 1, 10, 100 within ``n``; it was 1, 10, 100), and, when an architecture's
last layer selects (ranker, scorer, vote, verifier), a sweep's answer-length ``params`` (``max_tokens``, ``stop``)
going to the writers it picks from.
"""

from __future__ import annotations

from typing import Any

DEFINITION_VERSION = 2
VERSION_KEY = "definition_version"


def stamped(definition: dict[str, Any]) -> dict[str, Any]:
    """The definition as stored: with this archon-server's :data:`DEFINITION_VERSION`."""
    return {**definition, VERSION_KEY: DEFINITION_VERSION}


def version_problem(stored: dict[str, Any], what: str, instead: str) -> str | None:
    """One line refusing a stored definition of another version (``what``: what holds it, e.g. ``runs/x holds 12
    results``; ``instead``: what to use instead), or None when its version is this one's."""
    v = stored.get(VERSION_KEY)
    if v == DEFINITION_VERSION:
        return None
    by = "an older archon-server" if v is None or (isinstance(v, int) and v < DEFINITION_VERSION) else \
        "another archon-server"
    return (f"{what} made by {by} (definition version {v if v is not None else 'none'}, this one's is "
            f"{DEFINITION_VERSION}), whose dev/test splits, pass@k defaults and answer-length parameters differ: "
            f"resuming would mix old and new results; {instead}")
