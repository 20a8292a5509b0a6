"""The version of what a stored definition means: one number shared by sweeps and searches.

A sweep's ``sweep.json``, its registration in a shared store and a search study's stored config carry
``definition_version``.  Raise :data:`DEFINITION_VERSION` whenever the same definition would now give different
results: then a folder, store or study made before is refused on resume instead of mixing old and new results
(which the comparison of the definitions themselves cannot notice, since they are unchanged).

Version 2 (none before): one fixed dev/test split for every seed (``datasets.SPLIT_SEED``; it used to follow the
seed), pass@k's default ``k`` (those of 1, 10, 100 within ``n``; it was 1, 10, 100), and, when an architecture's
last layer selects (ranker, scorer, vote, verifier), a sweep's answer-length ``params`` (``max_tokens``, ``stop``)
going to the writers it picks from.

Version 3: a sweep's ``params`` reach the final stage as set, nothing filled in (before, SamplingParams' defaults --
temperature 0.7, top_p 1.0, max_tokens 512 -- replaced what a sweep left unset, and ``top_k``/``extra`` were dropped).
Results of version 2 are the same where no ``params`` were given (every search study; :func:`params_unchanged`), so
those are still resumed.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

DEFINITION_VERSION = 3
VERSION_KEY = "definition_version"
# What version 2 filled into a sweep's params that version 3 leaves to the architecture (see the module's docstring).
_FILLED_BEFORE_3 = ("temperature", "top_p", "max_tokens")


def stamped(definition: dict[str, Any]) -> dict[str, Any]:
    """The definition as stored: with this archon-server's :data:`DEFINITION_VERSION`."""
    return {**definition, VERSION_KEY: DEFINITION_VERSION}


def params_unchanged(params: Any) -> bool:
    """Whether a version-2 sweep's ``params`` gave the results version 3 gives: none given, or all of those version 2
    filled in given (and nothing it dropped)."""
    if not params:
        return True
    return isinstance(params, dict) and all(params.get(k) is not None for k in _FILLED_BEFORE_3) and \
        not params.get("top_k") and not params.get("extra")


def version_problem(stored: dict[str, Any], what: str, instead: str, same_results: Container[int] = ()) -> str | None:
    """One line refusing a stored definition of another version (``what``: what holds it, e.g. ``runs/x holds 12
    results``; ``instead``: what to use instead), or None when its version is this one's or one of ``same_results``
    (older versions whose results this definition would reproduce)."""
    v = stored.get(VERSION_KEY)
    if v == DEFINITION_VERSION or (v is not None and v in same_results):
        return None
    by = "an older archon-server" if v is None or (isinstance(v, int) and v < DEFINITION_VERSION) else \
        "another archon-server"
    return (f"{what} made by {by} (definition version {v if v is not None else 'none'}, this one's is "
            f"{DEFINITION_VERSION}), whose dev/test splits, pass@k defaults or final-stage parameters differ: "
            f"resuming would mix old and new results; {instead}")
