"""A search whose trials fail for a reason of ours (the backends down: every question failed) printed a traceback per
trial at ERROR on top of each trial's progress line, which already says why (``trial 3: failed: EvaluationError: all 2
questions failed; first: ... connection refused``): a study of 30 failing trials buried its progress under 30
tracebacks. Such a failure is now logged at DEBUG only; an exception that is not ours (a bug) keeps its traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import pytest

from archon_server.backends.base import Backend, BackendError, ChatRequest, ChatResult
from archon_server.backends.registry import BackendRegistry
from archon_server.search.bench_eval import BenchEvaluator
from archon_server.search.config import parse_search_config
from archon_server.search.runner import ATTR_ERROR, run_search

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Down(Backend):
    async def chat(self, request: ChatRequest) -> ChatResult:
        raise BackendError("connection refused", status=502, retryable=False, backend="m")


def _config(name: str):  # two trials of one single-model graph over two MMLU questions
    return parse_search_config({
        "study": {"name": name, "n_trials": 2, "max_attempts_factor": 1, "sampler": {"type": "random", "seed": 0},
                  "pruner": {"type": "none"}, "heartbeat_interval": None},
        "evaluation": {"evaluator": "bench", "dataset": "mmlu", "stages": [2], "dev_limit": 2, "test_limit": 2, "test_top": 1,
                       "baselines": False},
        "models": [{"name": "m", "score": 0.5}],
        "space": {"families": ["moa"], "top_k_models": {"low": 1, "high": 1}, "samples_per_model": 1,
                  "fusion_layers": {"low": 0, "high": 0}, "fusers_per_layer": 1, "critic": [False], "ranker": [False],
                  "final": ["none"]},
    })


async def _run(tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture) -> tuple[list[logging.LogRecord], list[optuna.trial.FrozenTrial]]:
    reg = BackendRegistry()
    reg.register("m", Down())
    ev = BenchEvaluator("mmlu", reg, cache_path=tmp_path / f"{name}.sqlite")
    try:
        with caplog.at_level(logging.DEBUG, logger="archon.search.runner"):
            res = await run_search(_config(name), storage=f"sqlite:///{tmp_path}/{name}.db", evaluator=ev)
    finally:
        await ev.aclose()
    failed = [r for r in caplog.records if r.name == "archon.search.runner" and r.getMessage().endswith("failed")]
    return failed, res.study.get_trials()


async def test_trials_failing_for_our_reasons_log_no_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    failed, trials = await _run(tmp_path, "down", caplog)
    assert trials and all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    assert all("connection refused" in t.user_attrs[ATTR_ERROR] for t in trials)  # the reason stays with the trial
    assert len(failed) == len(trials) and all(r.levelno == logging.DEBUG for r in failed)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_bug_in_a_trial_keeps_its_traceback(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    async def broken(*_a, **_k):
        raise KeyError("oops")

    monkeypatch.setattr(BenchEvaluator, "evaluate", broken)
    failed, trials = await _run(tmp_path, "bug", caplog)
    assert trials and all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    assert failed and all(r.levelno == logging.ERROR and r.exc_info and r.exc_info[0] is KeyError for r in failed)
