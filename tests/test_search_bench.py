"""The real evaluator (bench item runner + graph runtime + call cache) under a search, on in-process backends.

The backends know MMLU's answers: ``good`` answers every question it recognises in its
prompt correctly, ``bad`` always answers A.  So single-model, MoA and fused scores are
predictable, and the call counts show what the cache saves.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from archon_server.backends.base import Backend, ChatRequest, ChatResult, Choice, Usage
from archon_server.backends.registry import BackendRegistry
from archon_server.bench import datasets as ds
from archon_server.search.bench_eval import BenchEvaluator
from archon_server.search.config import parse_search_config
from archon_server.search.objective import is_evaluated
from archon_server.search.runner import STUDY_RANKING, progress, run_search
from archon_server.spec import parse_architecture

optuna.logging.set_verbosity(optuna.logging.WARNING)

try:
    _ITEMS = ds.select("mmlu", split_name="dev")
    _ALL = ds.select("mmlu")
except Exception as e:  # pragma: no cover - the shared data folder is part of the environment
    pytest.skip(f"MMLU data not available: {e}", allow_module_level=True)


def _question(prompt: str) -> str:
    parts = prompt.split("\n\n")
    return parts[1].strip() if len(parts) > 2 else prompt.strip()  # header / question+choices / instruction


class Oracle(Backend):
    """Answers MMLU questions found in the prompt: correctly (``good``) or always A (``bad``)."""

    def __init__(self, good: bool):
        self.good = good
        self.calls = 0
        self.answers: dict[str, str] = {}
        for it in _ALL:
            self.answers.setdefault(_question(it.prompt), it.reference)  # a few repeated questions: first wins

    def letter(self, messages: list[dict]) -> str:
        if not self.good:
            return "A"
        # The question paragraph identifies an item, also when a fuser prompt quotes it.
        paragraphs = (p.strip() for m in messages for p in str(m.get("content", "")).split("\n\n"))
        return next((self.answers[p] for p in paragraphs if p in self.answers), "A")

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.calls += 1
        letter = self.letter(request.messages)
        n = request.params.n
        size = sum(len(str(m.get("content", ""))) for m in request.messages)
        return ChatResult(choices=[Choice(text=f"Answer: {letter}", index=i) for i in range(n)],
                          usage=Usage(prompt_tokens=size // 4, completion_tokens=3 * n), model=request.model)


def _registry() -> tuple[BackendRegistry, Oracle, Oracle]:
    reg = BackendRegistry()
    good, bad = Oracle(True), Oracle(False)
    reg.register("good", good)
    reg.register("bad", bad)
    return reg, good, bad


async def test_bench_evaluator_scores_counts_and_caches(tmp_path: Path) -> None:
    reg, good, bad = _registry()
    ev = BenchEvaluator("mmlu", reg, cache_path=tmp_path / "cache.sqlite", concurrency=4)
    assert ev.split_size("dev") == len(_ITEMS) and ev.split_size("test") > 3 * ev.split_size("dev")
    single_good = parse_architecture({"name": "g", "layers": [[{"type": "generator", "model": "good"}]]})
    single_bad = parse_architecture({"name": "b", "layers": [[{"type": "generator", "model": "bad"}]]})
    moa = parse_architecture({"name": "m", "layers": [[{"type": "generator", "models": ["good", "bad"]}], [{"type": "fuser", "model": "good"}]]})
    r = await ev.evaluate(single_good, "dev", limit=6)
    expected_good = sum(good.letter(it.messages()) == it.reference for it in ev.items["dev"][:6]) / 6
    assert expected_good >= 5 / 6  # the oracle recognises (nearly) every question
    assert (r.n, r.score, r.calls) == (6, pytest.approx(expected_good), 6) and r.tokens > 0
    expected_bad = sum(it.reference == "A" for it in ev.items["dev"][:6]) / 6
    assert (await ev.evaluate(single_bad, "dev", limit=6)).score == pytest.approx(expected_bad)
    m = await ev.evaluate(moa, "dev", limit=6)
    assert m.score == pytest.approx(expected_good) and m.calls_per_query == 3  # the good model fuses
    # A longer prefix after a shorter one pays only for the new questions (the cheap stage is not wasted).
    before = good.calls
    r10 = await ev.evaluate(single_good, "dev", limit=10)
    assert r10.n == 10 and good.calls - before == 4
    await ev.aclose()


async def test_search_over_real_runtime_ranks_pool_and_finds_fusion(tmp_path: Path) -> None:
    """No pool scores given: the search measures single models first, then finds that fusing with the good model wins."""
    cfg = parse_search_config({
        "study": {"name": "bench-e2e", "n_trials": 6, "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 3},
                  "pruner": {"type": "none"}, "heartbeat_interval": None},
        "objective": {"mode": "scalar", "cost": "calls", "lambda": 0.01},
        "evaluation": {"evaluator": "bench", "dataset": "mmlu", "stages": [4], "dev_limit": 8, "test_limit": 8,
                       "test_top": 1, "baselines": False},
        "models": [{"name": "bad"}, {"name": "good"}],
        "space": {"families": ["moa"], "top_k_models": [1, 2], "samples_per_model": 1, "fusion_layers": [0, 1],
                  "fusers_per_layer": 1, "critic": [False], "ranker": [False], "final": ["none"]},
    })
    reg, good, _ = _registry()
    ev = BenchEvaluator("mmlu", reg, cache_path=tmp_path / "cache.sqlite")
    res = await run_search(cfg, storage=f"sqlite:///{tmp_path}/s.db", evaluator=ev)
    study = res.study
    assert study.user_attrs[STUDY_RANKING]["good"] == 1.0 > study.user_attrs[STUDY_RANKING]["bad"]
    # 2 x 2 architectures exist; all are evaluated once, then the sampler only repeats them (converged).
    evaluated = [t for t in study.get_trials() if is_evaluated(t)]
    assert len(evaluated) == 4 and progress(study).evaluated == 4
    best = study.best_trial
    assert best.user_attrs["dev_score"] == 1.0
    assert best.params.get("top_k", 1) == 1 and best.params["fusion_layers"] == 0  # cheapest perfect graph
    assert res.stats.converged  # finalized although the 6-trial target was out of reach (4 graphs exist)
    assert study.user_attrs["test_results"][str(best.number)]["score"] == 1.0
    await ev.aclose()


@pytest.mark.e2e
def test_cli_search_on_the_embedded_model(tmp_path: Path) -> None:
    """`search run` end to end on the in-process default model: 2 trials x 2 MMLU questions, then export."""
    import json
    import subprocess
    import sys

    from archon_server.spec import load_architecture

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-m", "archon_server.search", "run", str(root / "search" / "embedded-smoke.yaml"),
         "--storage", f"sqlite:///{tmp_path}/e2e.db", "--out", str(tmp_path / "arch")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    study = optuna.load_study(study_name="embedded-smoke", storage=f"sqlite:///{tmp_path}/e2e.db")
    errors = [t.user_attrs.get("error") for t in study.get_trials()]
    assert summary["evaluated"] == 2 and summary["failed"] == 0, errors
    spec = load_architecture(summary["architecture"])
    assert spec.models_used() == ["proposer-1"]
    for t in study.get_trials():
        assert t.user_attrs["calls_per_query"] >= 1 and t.user_attrs["tokens_per_query"] > 0  # real backend calls
    assert (tmp_path / "runs" / "search" / "embedded-smoke" / "cache.sqlite").exists()
