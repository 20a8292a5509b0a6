"""Search-free references over a space: exhaustive enumeration (the known optimum) and Archon-style greedy search.

Both walk the same define-by-run builder as the Optuna trials (``sample_architecture``)
through :class:`DictTrial`, so "the known best" in tests and the efficiency
benchmark is the best over exactly the architectures the search can propose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from archon_server.search.config import BudgetConfig, SpaceConfig
from archon_server.search.space import architecture_key, check_rules, sample_architecture
from archon_server.spec import ArchitectureSpec


class _NeedParam(Exception):
    def __init__(self, name: str, choices: list[Any]):
        self.name = name
        self.choices = choices


class DictTrial:
    """A trial answered from a dict; records which parameters the builder actually asked for.

    With ``strict`` a missing parameter raises :class:`_NeedParam` (enumeration branches on it);
    otherwise the first choice is used.
    """

    def __init__(self, params: dict[str, Any], strict: bool = False, number: int = 0):
        self.params = params
        self.strict = strict
        self.number = number
        self.asked: dict[str, Any] = {}

    def _get(self, name: str, choices: list[Any]) -> Any:
        if name not in self.params:
            if self.strict:
                raise _NeedParam(name, choices)
            self.params[name] = choices[0]
        self.asked[name] = self.params[name]
        return self.params[name]

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1) -> int:
        return int(self._get(name, list(range(low, high + 1, step))))

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._get(name, list(choices))


def axes(space: SpaceConfig, ranked_models: list[str]) -> dict[str, list[Any]]:
    """Every parameter the builder may ask, with its choices, in Archon's greedy order
    (models and samples first, then fusion depth/width, then critic/ranker, then the final layer)."""
    found: dict[str, list[Any]] = {}
    order = ["family", "top_k", "samples", "model_rank", "sm_samples", "seq_samples", "seq_window", "temperature",
             "fuser_rank", "fusion_layers", "fusers", "critic", "ranker", "ranker_top_k", "final"]

    # Walking every branch is exponential; axes only need one path per parameter,
    # so explore with each new parameter set to each value only at the first level it appears.
    def walk_first(params: dict[str, Any]) -> None:
        t = DictTrial(dict(params), strict=True)
        try:
            sample_architecture(t, space, ranked_models)
        except _NeedParam as need:
            new = need.name not in found
            found.setdefault(need.name, need.choices)
            for c in (need.choices if new else need.choices[-1:]):
                walk_first({**params, need.name: c})

    walk_first({})
    return {k: found[k] for k in order if k in found} | {k: v for k, v in found.items() if k not in order}


def enumerate_space(space: SpaceConfig, ranked_models: list[str]) -> list[tuple[dict[str, Any], ArchitectureSpec]]:
    """All distinct parameter sets (define-by-run leaves) with their architectures."""
    out: list[tuple[dict[str, Any], ArchitectureSpec]] = []

    def walk(params: dict[str, Any]) -> None:
        t = DictTrial(dict(params), strict=True)
        try:
            spec = sample_architecture(t, space, ranked_models)
        except _NeedParam as need:
            for c in need.choices:
                walk({**params, need.name: c})
            return
        out.append((t.asked, spec))

    walk({})
    return out


@dataclass
class Optimum:
    value: float
    params: dict[str, Any]
    key: str
    n_params_sets: int
    n_architectures: int
    n_valid: int


def exhaustive_best(
    space: SpaceConfig, ranked_models: list[str], value: Callable[[ArchitectureSpec], float], budget: BudgetConfig | None = None
) -> Optimum:
    """The best valid architecture under ``value`` (ties: first in enumeration order)."""
    leaves = enumerate_space(space, ranked_models)
    best: tuple[float, dict[str, Any], str] | None = None
    keys: set[str] = set()
    valid = 0
    for params, spec in leaves:
        keys.add(architecture_key(spec))
        if check_rules(spec, budget):
            continue
        valid += 1
        v = value(spec)
        if best is None or v > best[0] + 1e-12:
            best = (v, params, architecture_key(spec))
    if best is None:
        raise ValueError("no valid architecture in the space")
    return Optimum(best[0], best[1], best[2], len(leaves), len(keys), valid)


@dataclass
class GreedyTrace:
    best_value: float
    best_params: dict[str, Any]
    evaluations: int  # distinct architectures evaluated
    history: list[float] = field(default_factory=list)  # best value after each new evaluation
    keys: list[str] = field(default_factory=list)  # architecture keys in evaluation order


def greedy_search(
    space: SpaceConfig,
    ranked_models: list[str],
    value: Callable[[ArchitectureSpec], float],
    budget: BudgetConfig | None = None,
    start: dict[str, Any] | None = None,
    max_evaluations: int = 10_000,
    stop_at: float | None = None,
) -> GreedyTrace:
    """Archon's ITAS-style greedy: one axis at a time, in order, keep any improvement; repeat until a full
    pass improves nothing. Repeated architectures are free (cache), as in the search."""
    ax = axes(space, ranked_models)
    params = {k: v[0] for k, v in ax.items()} | (start or {})
    cache: dict[str, float] = {}
    history: list[float] = []
    keys: list[str] = []

    def f(p: dict[str, Any]) -> float:
        spec = sample_architecture(DictTrial(dict(p)), space, ranked_models)
        k = architecture_key(spec)
        if k not in cache:
            if check_rules(spec, budget):
                cache[k] = float("-inf")  # rejected before any call: costs no evaluation
            else:
                cache[k] = value(spec)
                history.append(max(cache.values()))
                keys.append(k)
        return cache[k]

    best = f(params)
    improved = True
    while improved and len(history) < max_evaluations and not (stop_at is not None and best >= stop_at - 1e-12):
        improved = False
        for name, choices in ax.items():
            for c in choices:
                if c == params[name]:
                    continue
                cand = {**params, name: c}
                v = f(cand)
                if v > best + 1e-12:
                    best, params, improved = v, cand, True
                if stop_at is not None and best >= stop_at - 1e-12:
                    break
            if stop_at is not None and best >= stop_at - 1e-12:
                break
    return GreedyTrace(best, params, len(history), history, keys)
