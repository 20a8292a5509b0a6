"""One trial: sample an architecture, reject it if it breaks a rule or the budget, skip it if it is a
duplicate, otherwise evaluate it cheap-first (dev subsets, reported to the pruner) and then on the full dev split.

Everything the report and ``search export`` need later is stored on the trial as
user attributes (the spec YAML, dev score, cost per query, why it was rejected or
pruned), so the study database alone is the record of the search.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from archon_server.search import claims
from archon_server.search.claims import storage_engine
from archon_server.search.config import SearchConfig
from archon_server.search.evaluator import EvalResult, Evaluator
from archon_server.search.space import (
    architecture_key,
    check_rules,
    sample_architecture,
)
from archon_server.search.storage import heartbeat_enabled, reap_stale_trials
from archon_server.spec import ArchitectureSpec, dump_architecture
from archon_server.exceptions import ArchonError

log = logging.getLogger("archon.search.objective")

# User-attribute keys (stable: reports and tests read them from the database).
ATTR_SPEC = "spec"
ATTR_KEY = "arch_key"
ATTR_REJECTED = "rejected"
ATTR_PRUNED = "pruned_reason"
ATTR_DUPLICATE = "duplicate_of"
ATTR_DEV_SCORE = "dev_score"
ATTR_COST = "cost_per_query"
ATTR_CALLS = "calls_per_query"
ATTR_TOKENS = "tokens_per_query"
ATTR_N_DEV = "n_dev"
ATTR_SKIPPED = "skipped"
ATTR_ERROR = "error"
ATTR_WORKER = "worker"
ATTR_EST_CALLS = "calls_estimate"


class Rejected(ArchonError):
    """The sampled architecture breaks a validity rule or the budget; no backend call was made."""


@dataclass
class Outcome:
    state: TrialState
    values: list[float] | None = None


def is_rejected(t: optuna.trial.FrozenTrial) -> bool:
    return ATTR_REJECTED in t.user_attrs


def is_evaluated(t: optuna.trial.FrozenTrial) -> bool:
    """Counts towards the study's target: a *new* architecture, complete or pruned after a real (partial)
    evaluation.  Rejections and duplicates cost nothing, so they do not use up the trial budget
    (``max_attempts_factor`` bounds them instead)."""
    if ATTR_DUPLICATE in t.user_attrs:
        return False
    return t.state == TrialState.COMPLETE or (t.state == TrialState.PRUNED and not is_rejected(t))


def failed_on_purpose(t: optuna.trial.FrozenTrial) -> bool:
    """A FAIL that is final: the trial raised (its error is kept), or was released as surplus; not to be retried."""
    return ATTR_SKIPPED in t.user_attrs or ATTR_ERROR in t.user_attrs


def is_duplicate(t: optuna.trial.FrozenTrial) -> bool:
    return ATTR_DUPLICATE in t.user_attrs and t.state in (TrialState.COMPLETE, TrialState.PRUNED)


class ArchitectureObjective:
    """Evaluates trials of one study; ``ranked_models`` is the pool ordered by single-model score."""

    def __init__(self, config: SearchConfig, evaluator: Evaluator, ranked_models: list[str], study_name: str):
        self.config = config
        self.evaluator = evaluator
        self.ranked_models = ranked_models
        self.study_name = study_name
        self.multi = config.objective.mode == "pareto"
        self.poll_s = 0.5  # how often a trial checks on a running twin (see _await_duplicate)

    # -- values --------------------------------------------------------------------------------------
    def cost(self, res: EvalResult) -> float:
        return res.cost(self.config.objective.cost)

    def scalar(self, res: EvalResult) -> float:
        return res.score - self.config.objective.lam * self.cost(res)

    def values(self, res: EvalResult) -> list[float]:
        return [res.score, self.cost(res)] if self.multi else [self.scalar(res)]

    def build(self, trial: Any) -> ArchitectureSpec:
        return sample_architecture(trial, self.config.space, self.ranked_models, name=f"{self.study_name}-t{trial.number}")

    # -- stages --------------------------------------------------------------------------------------
    def plan(self) -> list[int]:
        """Question counts evaluated in turn: the cheap stages, then the full (possibly capped) dev split."""
        full = self.evaluator.split_size("dev")
        if self.config.evaluation.dev_limit:
            full = min(full, self.config.evaluation.dev_limit)
        return [s for s in self.config.evaluation.stages if s < full] + [full]

    def _stage_should_prune(self, trial: optuna.Trial, step: int, score: float) -> bool:
        """Cheap-first for two objectives, where Optuna's pruners do not apply (``report`` is single-objective only):
        prune when the subset score is below the median of earlier trials' scores at the same subset."""
        cfg = self.config.study.pruner
        if cfg.type == "none":
            return False
        past = [
            t.user_attrs[f"stage_{step}"]
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if f"stage_{step}" in t.user_attrs and ATTR_DUPLICATE not in t.user_attrs
        ]
        if len(past) < max(1, cfg.n_startup_trials):
            return False
        return score < statistics.median(past)

    def _find_duplicate(self, trial: optuna.Trial, key: str) -> tuple[optuna.trial.FrozenTrial | None, bool]:
        """(finished trial with the same graph, whether an earlier trial with it is still running)."""
        running = False
        for t in trial.study.get_trials(deepcopy=False):
            if t.number == trial.number or t.user_attrs.get(ATTR_KEY) != key or is_rejected(t):
                continue
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                return t, False
            if t.state == TrialState.RUNNING and t.number < trial.number:
                running = True
        return None, running

    async def _await_duplicate(self, trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
        """A finished trial with the same graph, else None once this trial holds the graph's claim (it evaluates).

        The claim row (:mod:`archon_server.search.claims`) decides which of several workers that drew the
        same graph at the same time evaluates it; the others wait for its result.  A dead worker's trial is
        failed by the heartbeat check below and a waiter takes its claim over; without heartbeats a dead
        worker cannot be told from a slow one, so then nobody waits (a twin may be paid twice).
        """
        storage = trial.study._storage  # noqa: SLF001
        can_wait = heartbeat_enabled(storage)
        engine = storage_engine(storage)
        study_id = trial.study._study_id  # noqa: SLF001
        while True:
            dup, running = self._find_duplicate(trial, key)  # fast path, and studies from before claims
            if dup is not None:
                return dup
            if engine is None:  # in-memory storage: one process, the trial list is the truth
                if not running or not can_wait:
                    return None
            else:
                holder = claims.claim(engine, study_id, key, trial.number)
                if holder == trial.number:
                    return None
                t = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, holder))
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    return t
                if t.state == TrialState.FAIL:
                    if claims.take_over(engine, study_id, key, holder, trial.number):
                        return None
                    continue  # another waiter took it: wait for that one
                if not can_wait:
                    return None
            reap_stale_trials(trial.study, final=failed_on_purpose)
            await asyncio.sleep(self.poll_s)

    # -- the trial -----------------------------------------------------------------------------------
    async def run(self, trial: optuna.Trial) -> Outcome:
        spec = self.build(trial)
        key = architecture_key(spec)
        trial.set_user_attr(ATTR_KEY, key)
        trial.set_user_attr(ATTR_SPEC, dump_architecture(spec))
        trial.set_user_attr(ATTR_EST_CALLS, spec.backend_calls_estimate())
        errors = check_rules(spec, self.config.budget)
        if errors:
            trial.set_user_attr(ATTR_REJECTED, "; ".join(errors))
            return Outcome(TrialState.PRUNED)

        dup = await self._await_duplicate(trial, key)
        if dup is not None:
            # Same graph = same score: copy the result instead of paying for it again.
            trial.set_user_attr(ATTR_DUPLICATE, dup.number)
            for k in (ATTR_DEV_SCORE, ATTR_COST, ATTR_CALLS, ATTR_TOKENS, ATTR_N_DEV, ATTR_PRUNED):
                if k in dup.user_attrs:
                    trial.set_user_attr(k, dup.user_attrs[k])
            if not self.multi:
                for step, v in sorted(dup.intermediate_values.items()):
                    trial.report(v, step)
            if dup.state == TrialState.COMPLETE:
                return Outcome(TrialState.COMPLETE, list(dup.values))
            return Outcome(TrialState.PRUNED)

        plan = self.plan()
        res: EvalResult | None = None
        for i, n in enumerate(plan):
            res = await self.evaluator.evaluate(spec, "dev", limit=n)
            trial.set_user_attr(f"stage_{res.n}", res.score)
            last = i == len(plan) - 1
            if not self.multi:
                trial.report(self.scalar(res), res.n)
            if last:
                break
            prune = trial.should_prune() if not self.multi else self._stage_should_prune(trial, res.n, res.score)
            if prune:
                trial.set_user_attr(ATTR_PRUNED, f"pruned after {res.n} dev questions (score {res.score:.3f})")
                self._record(trial, res)
                return Outcome(TrialState.PRUNED)
        assert res is not None
        self._record(trial, res)
        return Outcome(TrialState.COMPLETE, self.values(res))

    def _record(self, trial: optuna.Trial, res: EvalResult) -> None:
        trial.set_user_attr(ATTR_DEV_SCORE, res.score)
        trial.set_user_attr(ATTR_COST, self.cost(res))
        trial.set_user_attr(ATTR_CALLS, res.calls_per_query)
        trial.set_user_attr(ATTR_TOKENS, res.tokens_per_query)
        trial.set_user_attr(ATTR_N_DEV, res.n)
