"""Search-space files, define-by-run sampling and validity rules (no storage, no processes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from archon_server.search.config import BudgetConfig, load_search_config, parse_search_config
from archon_server.search.evaluator import EvalResult, Evaluator, Landscape, ScriptedEvaluator
from archon_server.search.objective import ATTR_REJECTED, ArchitectureObjective
from archon_server.search.oracle import enumerate_space
from archon_server.search.space import architecture_key, check_rules, sample_architecture
from archon_server.spec import CriticSpec, FuserSpec, GeneratorSpec, RankerSpec, SpecError, parse_architecture

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search" / "tiny-scripted.yaml"
DEMO = ROOT / "search" / "scripted-demo.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _ranked(cfg):
    return [m.name for m in sorted(cfg.models, key=lambda m: -(m.score or 0))]


@pytest.mark.parametrize("path", sorted((ROOT / "search").glob("*.yaml")))
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_search_config(path)
    assert cfg.study.name


@pytest.mark.parametrize(
    ("patch", "where"),
    [
        ({"space": {"samples_per_model": {"low": 3, "high": 1}}}, "space.samples_per_model"),
        ({"space": {"top_k_models": [1, 9]}}, "top_k_models"),
        ({"space": {"final": ["none", "oracle"]}}, "space.final[1]"),
        ({"objective": {"lambda": -1}}, "objective.lambda"),
        ({"study": {"name": "x", "sampler": {"type": "annealing"}}}, "study.sampler.type"),
        ({"evaluation": {"stages": [10, 5]}}, "evaluation"),
        ({"space": {"typo_axis": [1, 2]}}, "space.typo_axis"),
    ],
)
def test_config_errors_name_the_path(patch: dict, where: str) -> None:
    data = {"study": {"name": "x"}, "models": [{"name": "a", "score": 0.5}, {"name": "b", "score": 0.4}], **patch}
    with pytest.raises(SpecError) as e:
        parse_search_config(data, source="cfg.yaml")
    assert where in str(e.value), str(e.value)
    assert str(e.value).startswith("cfg.yaml: ")


def test_every_point_of_the_space_is_a_valid_architecture() -> None:
    """Exhaustive over the tiny space: each leaf parses, follows Archon's rules, and distinct params give distinct graphs."""
    cfg = load_search_config(TINY)
    leaves = enumerate_space(cfg.space, _ranked(cfg))
    assert len(leaves) > 500
    roomy = BudgetConfig(max_fuser_inputs=64)
    keys = set()
    for params, spec in leaves:
        assert check_rules(spec, roomy) == [], (params, check_rules(spec, roomy))
        assert all(isinstance(c, GeneratorSpec) for c in spec.layers[0])
        for i, layer in enumerate(spec.layers):
            if any(isinstance(c, CriticSpec) for c in layer):
                assert any(isinstance(c, (RankerSpec, FuserSpec)) for c in spec.layers[i + 1])
        keys.add(architecture_key(spec))
    assert len(keys) == len(leaves)


def test_random_samples_of_the_full_space_are_valid() -> None:
    cfg = load_search_config(DEMO)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    families = set()
    for _ in range(150):
        t = study.ask()
        spec = sample_architecture(t, cfg.space, _ranked(cfg), name=f"t{t.number}")
        parse_architecture(spec.model_dump(mode="json"))  # round-trips through the spec validator
        structural = [e for e in check_rules(spec, BudgetConfig(max_fuser_inputs=64)) if "candidates" not in e]
        assert structural == []
        families.add(t.params.get("family"))
        study.tell(t, 0.0)
    assert families == {"moa", "self_moa", "self_moa_seq"}


def _spec(layers):
    return parse_architecture({"name": "x", "layers": layers})


def test_rules_reject_bad_graphs() -> None:
    gen = {"type": "generator", "model": "a", "samples": 5}
    assert "generators only in the first layer" in check_rules(_spec([[gen], [gen]]))[0]
    assert "critic must be followed" in check_rules(_spec([[gen], [{"type": "critic", "model": "a"}], [{"type": "verifier", "model": "a"}]]))[0]
    assert check_rules(_spec([[gen], [{"type": "critic", "model": "a"}], [{"type": "ranker", "model": "a"}]])) == []
    wide = [[{"type": "generator", "models": ["a", "b", "c", "d", "e"], "samples": 5}], [{"type": "fuser", "model": "a"}]]
    errs = check_rules(_spec(wide))
    assert errs == ["layers[1][0]: 25 candidates into one fuser (max 24)"]
    errs = check_rules(_spec([[gen], [{"type": "fuser", "model": "a"}]]), BudgetConfig(max_calls_per_query=1))
    assert errs == ["<root>: 2 backend calls per query (max 1)"]


class CountingEvaluator:
    def __init__(self) -> None:
        self.calls = 0

    def split_size(self, split: str) -> int:
        return 10

    async def evaluate(self, spec, split, limit=None, on_step=None) -> EvalResult:
        self.calls += 1
        return EvalResult(score=0.5, n=limit or 10, calls=spec.backend_calls_estimate() * (limit or 10))


def test_budget_rejects_before_any_evaluation() -> None:
    cfg = load_search_config(TINY)
    cfg.budget.max_calls_per_query = 1  # only a single model with one sample fits
    ev = CountingEvaluator()
    assert isinstance(ev, Evaluator) and isinstance(ScriptedEvaluator(Landscape({})), Evaluator)
    obj = ArchitectureObjective(cfg, ev, _ranked(cfg), "t")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    rejected = 0
    for _ in range(30):
        t = study.ask()
        before = ev.calls
        out = asyncio.run(obj.run(t))
        if ATTR_REJECTED in t.user_attrs:
            rejected += 1
            assert out.state == TrialState.PRUNED
            assert ev.calls == before, "a rejected trial reached the evaluator"
            assert "backend calls per query (max 1)" in t.user_attrs[ATTR_REJECTED]
        study.tell(t, out.values) if out.state == TrialState.COMPLETE else study.tell(t, state=out.state)
    assert rejected >= 20
