"""Define-by-run sampling of one architecture from a :class:`SpaceConfig`.

``sample_architecture(trial, space, ranked_models)`` asks the Optuna trial for
each axis *only when it matters* (fusers per layer only if there is a fusion
layer, a ranker's top-k only if there is a ranker...), so the parameter set of a
trial is exactly the architecture's degrees of freedom; identical parameter sets
mean identical architectures.  The same function builds an architecture from a
plain dict through ``optuna.trial.FixedTrial`` (greedy search, baselines, tests).

The graph is valid by construction (generators only in the first layer, a critic
always directly before a ranker or fuser layer); :func:`check_rules` re-checks any
spec and also enforces the limits that depend on sampled numbers (candidates into
one fuser, backend calls per query), which reject a trial before any backend call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Protocol

from archon_server.search.config import BudgetConfig, IntAxis, SpaceConfig
from archon_server.spec import (
    ArchitectureSpec,
    CriticSpec,
    FuserSpec,
    GeneratorSpec,
    RankerSpec,
    ScorerSpec,
    SelfMoASeqSpec,
    UnitTestEvaluatorSpec,
    parse_architecture,
)


class TrialLike(Protocol):
    """The part of ``optuna.trial.Trial`` / ``FixedTrial`` the sampler uses."""

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def _int(trial: TrialLike, name: str, axis: IntAxis) -> int:
    # A fixed axis creates no Optuna parameter: the sampler never wastes a dimension on it.
    if axis.fixed:
        return axis.low
    return trial.suggest_int(name, axis.low, axis.high, step=axis.step)


def _cat(trial: TrialLike, name: str, choices: Sequence[Any]) -> Any:
    if len(choices) == 1:
        return choices[0]
    return trial.suggest_categorical(name, list(choices))


def _fusion_block(
    trial: TrialLike, space: SpaceConfig, ranked: list[str], fuser_models: list[str], temperature: float
) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
    """Critic/ranker/fuser layers shared by MoA and Self-MoA. Returns layers and the choices made."""
    n_fusion = _int(trial, "fusion_layers", space.fusion_layers)
    fusers = _int(trial, "fusers", space.fusers_per_layer) if n_fusion else 0
    ranker = bool(_cat(trial, "ranker", space.ranker))
    top_k = _int(trial, "ranker_top_k", space.ranker_top_k) if ranker else 0
    scorer = _cat(trial, "scorer", space.scorer)
    scorer_k = _int(trial, "scorer_top_k", space.scorer_top_k) if scorer != "none" else 0
    # A critic must feed a ranker or a fuser; without either there is nothing to ask.
    critic = bool(_cat(trial, "critic", space.critic)) if (n_fusion or ranker) else False

    def pre() -> list[list[dict[str, Any]]]:
        out: list[list[dict[str, Any]]] = []
        if scorer != "none":  # scores filter first: critic and ranker then read fewer, better candidates
            sc: dict[str, Any] = {"type": "scorer", "method": scorer, "model": fuser_models[0], "top_k": scorer_k}
            if scorer == "density_ratio":
                sc["weak"] = space.scorer_weak
            out.append([sc])
        if critic:
            out.append([{"type": "critic", "model": fuser_models[0]}])
        if ranker:
            out.append([{"type": "ranker", "model": fuser_models[0], "top_k": top_k}])
        return out

    layers: list[list[dict[str, Any]]] = []
    if n_fusion == 0:
        layers += pre()
    for _ in range(n_fusion):
        layers += pre()
        layers.append(
            [{"type": "fuser", "model": fuser_models[j % len(fuser_models)], "temperature": temperature} for j in range(fusers)]
        )
    return layers, {"fusion_layers": n_fusion, "fusers": fusers, "ranker": ranker, "ranker_top_k": top_k, "critic": critic,
                    "scorer": scorer, "scorer_top_k": scorer_k}


def _final_layers(trial: TrialLike, space: SpaceConfig, judge: str) -> list[list[dict[str, Any]]]:
    final = _cat(trial, "final", space.final)
    if final == "verifier":
        return [[{"type": "verifier", "model": judge}]]
    if final == "unit_test":
        # Tests must exist before the evaluator reads them: two layers, not one.
        return [[{"type": "unit_test_generator", "model": judge}], [{"type": "unit_test_evaluator", "model": judge, "top_k": 1}]]
    if final == "vote":
        return [[{"type": "vote", "extractor": {"kind": space.vote_extractor}}]]
    return []


def sample_architecture(trial: TrialLike, space: SpaceConfig, ranked_models: list[str], name: str = "search-trial") -> ArchitectureSpec:
    """Sample (define-by-run) and build one architecture; ``ranked_models`` is the pool, best first."""
    family = _cat(trial, "family", space.families)
    temperature = float(_cat(trial, "temperature", space.temperatures))
    layers: list[list[dict[str, Any]]] = []
    if family == "moa":
        k = _int(trial, "top_k", space.top_k_models)
        samples = _int(trial, "samples", space.samples_per_model)
        layers.append(
            [{"type": "generator", "model": m, "samples": samples, "temperature": temperature} for m in ranked_models[:k]]
        )
        rank = _int(trial, "fuser_rank", space.fuser_model_rank)
        block, _ = _fusion_block(trial, space, ranked_models, [ranked_models[rank]], temperature)
        layers += block
        layers += _final_layers(trial, space, ranked_models[rank])
    elif family == "self_moa":
        m = ranked_models[_int(trial, "model_rank", space.self_moa_model_rank)]
        samples = _int(trial, "sm_samples", space.self_moa_samples)
        layers.append([{"type": "generator", "model": m, "samples": samples, "temperature": temperature}])
        block, _ = _fusion_block(trial, space, ranked_models, [m], temperature)
        layers += block
        layers += _final_layers(trial, space, m)
    elif family == "self_moa_seq":
        m = ranked_models[_int(trial, "model_rank", space.self_moa_model_rank)]
        window = _int(trial, "seq_window", space.seq_window)
        samples = _int(trial, "seq_samples", space.seq_samples)
        layers.append(
            [{"type": "self_moa_seq", "model": m, "proposer": m, "samples": samples, "window": window,
              "proposer_temperature": temperature}]
        )
        layers += _final_layers(trial, space, m)
    else:  # pragma: no cover - pydantic restricts the literal
        raise ValueError(f"unknown family {family!r}")
    data: dict[str, Any] = {"name": name, "description": f"sampled by archon search ({family})", "layers": layers}
    if space.max_tokens:
        data["defaults"] = {"max_tokens": space.max_tokens}
    return parse_architecture(data, source=name)


def candidate_flow(spec: ArchitectureSpec) -> list[int]:
    """Candidates entering each layer (same simulation as ``backend_calls_estimate``)."""
    cands = 0
    into: list[int] = []
    for layer in spec.layers:
        into.append(cands)
        new = 0
        keep = None
        for c in layer:
            if isinstance(c, GeneratorSpec):
                new += len(c.models_used()) * c.samples
            elif isinstance(c, FuserSpec):
                new += c.samples
            elif isinstance(c, SelfMoASeqSpec):
                new += 1
            elif isinstance(c, (RankerSpec, UnitTestEvaluatorSpec, ScorerSpec)):
                keep = min(c.top_k, cands)
        cands = new if new else (keep if keep is not None else cands)
    return into


def check_rules(spec: ArchitectureSpec, budget: BudgetConfig | None = None) -> list[str]:
    """Archon's validity rules plus budget limits; returns ``path: reason`` lines (empty = valid)."""
    budget = budget or BudgetConfig()
    errors: list[str] = []
    flow = candidate_flow(spec)
    for i, layer in enumerate(spec.layers):
        for j, c in enumerate(layer):
            where = f"layers[{i}][{j}]"
            if i > 0 and (isinstance(c, GeneratorSpec) or (isinstance(c, SelfMoASeqSpec) and c.proposer)):
                errors.append(f"{where}: generators only in the first layer")
            if isinstance(c, CriticSpec):
                nxt = spec.layers[i + 1] if i + 1 < len(spec.layers) else []
                if not any(isinstance(x, (RankerSpec, FuserSpec)) for x in nxt):
                    errors.append(f"{where}: a critic must be followed by a ranker or fuser layer")
            if isinstance(c, FuserSpec) and flow[i] > budget.max_fuser_inputs:
                errors.append(f"{where}: {flow[i]} candidates into one fuser (max {budget.max_fuser_inputs})")
    if budget.max_calls_per_query is not None:
        calls = spec.backend_calls_estimate()
        if calls > budget.max_calls_per_query:
            errors.append(f"<root>: {calls} backend calls per query (max {budget.max_calls_per_query})")
    return errors


def architecture_key(spec: ArchitectureSpec) -> str:
    """Hash of the graph alone (name/description excluded): equal keys = same computation = same score."""
    data = spec.model_dump(mode="json", exclude_none=True)
    data.pop("name", None)
    data.pop("description", None)
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
