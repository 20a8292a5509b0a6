"""The search loop: open (or resume) a study, run trials until the study holds its target number, finalize.

A worker is an ask/tell loop over a shared Optuna study rather than ``study.optimize``
because the stopping rule is *global*: "N evaluated trials in the study", counted
over all workers, past runs and retries.  Before each trial the worker

1. fails stale trials of dead workers (heartbeat) -- their retries become WAITING trials;
2. stops when the study holds N evaluated trials; waits while the remaining ones are
   running elsewhere (one of them may die and need a retry);
3. asks for a trial (a WAITING retry first) and, if trials numbered before it already
   cover the target, releases it as a ``skipped: surplus`` FAIL -- so racing workers
   never overshoot N.

A killed worker therefore loses at most its running trial, which another worker (or
a restart) re-runs with the same parameters.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from pydantic import ValidationError

from archon_server.bench.definition import VERSION_KEY, stamped, version_problem
from archon_server.bench.progress import QUIET, Reporter
from archon_server.db import redacted, retry_race, worker_id
from archon_server.exceptions import ArchonError
from archon_server.search import claims
from archon_server.search.config import SearchConfig
from archon_server.search.evaluator import Evaluator, Landscape, ScriptedEvaluator
from archon_server.search.objective import (
    ATTR_COST,
    ATTR_DEV_SCORE,
    ATTR_DUPLICATE,
    ATTR_ERROR,
    ATTR_PRUNED,
    ATTR_REJECTED,
    ATTR_SKIPPED,
    ATTR_SPEC,
    ATTR_WORKER,
    ArchitectureObjective,
    failed_on_purpose,
    is_duplicate,
    is_evaluated,
    is_rejected,
)
from archon_server.search.samplers import make_pruner, make_sampler
from archon_server.search.storage import (
    Heartbeat,
    heartbeat_ages,
    heartbeat_enabled,
    make_storage,
    reap_stale_trials,
    retried_from,
    retry_callback,
    storage_retry,
)
from archon_server.spec import ArchitectureSpec, SpecError, dump_architecture, parse_architecture

log = logging.getLogger("archon.search.runner")

STUDY_CONFIG = "config"
STUDY_TARGET = "target_n_trials"
STUDY_CONFIG_TARGET = "config_n_trials"  # the config's study.n_trials as last seen (a change of it sets the target)
STUDY_RANKING = "model_ranking"
STUDY_TEST = "test_results"
STUDY_BASELINES = "baselines"


# -- study ------------------------------------------------------------------------------------------
def open_study(
    config: SearchConfig,
    *,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    seed_offset: int = 0,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create or load (``load_if_exists``) the study; the config is stored in it so ``export`` needs only the URL.

    A study that exists was created by some config: a different one is refused (:class:`StudyMismatch`) before any
    trial runs, since its trials' values would not mean the same (see :func:`check_same_search`)."""
    url_or_storage = storage or config.storage_url()
    st = url_or_storage
    if isinstance(url_or_storage, str):
        st = make_storage(
            url_or_storage,
            heartbeat_interval=config.study.heartbeat_interval,
            grace_period=config.study.grace_period,
            max_retry=config.study.max_retry,
        )
    multi = config.objective.mode == "pareto"
    kwargs: dict[str, Any] = {"directions": ["maximize", "minimize"]} if multi else {"direction": "maximize"}
    # Workers started together race to create the study row; the loser loads it on the next try.
    study = retry_race(lambda: optuna.create_study(
        storage=st,
        study_name=study_name or config.study.name,
        sampler=sampler,
        pruner=pruner or make_pruner(config.study.pruner),
        load_if_exists=True,
        **kwargs,
    ), what="creating the study")
    assert study is not None  # no `settled`: retry_race returns fn's result or raises
    if sampler is None:
        # Seeded by the trials the study holds (none: a new study), so a resumed search continues, not repeats.
        study.sampler = make_sampler(config.study.sampler, multi_objective=multi, seed_offset=seed_offset,
                                     n_trials=len(study.get_trials(deepcopy=False)))
    engine = claims.storage_engine(study._storage)  # noqa: SLF001
    if engine is not None:
        claims.ensure_table(engine)  # before the workers race to
    if STUDY_CONFIG in study.user_attrs:
        check_same_search(config, study, url_or_storage)
    else:
        # One write: config and definition version together (a worker that sees the config sees its version).
        study.set_user_attr(STUDY_CONFIG, stamped(config.model_dump(mode="json", by_alias=True)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # What optuna-dashboard labels the objective axes with.
            study.set_metric_names(["dev score", "cost per query"] if multi else ["dev score - lambda x cost"])
    return study


class StudyMismatch(SpecError):
    """The study was created with a different search config (the CLI prints it, exit 2)."""


# Settings of a run or a worker, free to differ between runs and hosts: they change neither a trial's value nor
# which graphs the study proposes. Everything else in the config defines the search and must stay the same.
RUN_SETTINGS = (
    ("study", "name"),  # the study is named by --study or this; either way it is the study being opened
    ("study", "storage"),
    ("study", "n_trials"),  # the target is stored in the study (--n-trials changes it)
    ("study", "heartbeat_interval"), ("study", "grace_period"), ("study", "max_retry"),
    ("study", "max_attempts_factor"), ("study", "converged_after"),
    ("evaluation", "backends"),  # each host has its own server config for the same aliases
    ("evaluation", "concurrency"),
    ("export",),
)


def _definition(dumped: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dumped)
    for path in RUN_SETTINGS:
        node = out
        for k in path[:-1]:
            node = node.get(k, {})
        node.pop(path[-1], None)
    return out


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in [*old, *(k for k in new if k not in old)]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in new:
                out.append(f"{sub}: stored {json.dumps(old[k])}, not given")
            elif k not in old:
                out.append(f"{sub}: not stored, given {json.dumps(new[k])}")
            else:
                out += _differences(old[k], new[k], sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (o, n) in enumerate(zip(old, new)) for d in _differences(o, n, f"{path}[{i}]")]
    if old != new:
        return [f"{path}: stored {json.dumps(old)}, given {json.dumps(new)}"]
    return []


def check_same_search(config: SearchConfig, study: optuna.Study, storage: Any) -> None:
    """Refuse to run ``config`` on a study created with a different search definition (objective, budget, pool,
    space, evaluation, sampler, pruner): new trials would be scored differently from the stored ones, duplicates
    would copy the old values and the best would be picked across both. Run settings (``RUN_SETTINGS``) may differ.

    A study stored by an archon-server of another :data:`~archon_server.bench.definition.DEFINITION_VERSION` is
    refused too (its splits and parameters differ); a study without a stored config is not checked (a log line)."""
    where = redacted(storage) if isinstance(storage, str) else "its storage"
    stored = study.user_attrs.get(STUDY_CONFIG)
    if not isinstance(stored, dict):
        log.warning("study %r in %s has no stored search config: not compared with %s", study.study_name, where,
                    config.source or "the given config")
        return
    # Version 3 changed only what a sweep's params do; a search passes none, so its version-2 trials are today's.
    problem = version_problem(stored, f"study {study.study_name!r} in {where} holds trials",
                              "use a new study name (--study or study.name) or another --storage", same_results=(2,))
    if problem is not None:
        raise StudyMismatch([problem], config.source or "search config")
    stored = {k: v for k, v in stored.items() if k != VERSION_KEY}
    try:  # through the model, so a config stored before a field existed compares with that field's default
        stored = SearchConfig.model_validate(stored).model_dump(mode="json", by_alias=True)
    except ValidationError:
        pass  # compare as stored: whatever no longer validates shows up as a difference
    diffs = _differences(_definition(stored), _definition(config.model_dump(mode="json", by_alias=True)))
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise StudyMismatch([f"study {study.study_name!r} in {where} was created with a different search config "
                             f"({shown}); resuming would mix trials scored differently: run the config it was created "
                             "with, or use a new study name (--study or study.name) or another --storage"],
                            config.source or "search config")


@dataclass
class Progress:
    evaluated: int = 0  # new architectures: complete + pruned-after-evaluation
    duplicates: int = 0  # repeated architectures (result copied, free)
    running: int = 0
    waiting: int = 0
    rejected: int = 0
    failed: int = 0  # final failures: the trial raised (its error is kept), or its worker died and it is not retried
    retried: int = 0  # its worker died (or was interrupted): its parameters were queued again as a new trial
    surplus: int = 0  # released unrun: earlier trials had reached the target
    attempts: int = 0  # every trial ever created


def _fail_kind(t: optuna.trial.FrozenTrial, requeued: set[int | None]) -> str:
    """What a FAIL trial is: ``surplus`` (released unrun), ``retried`` (a later trial re-runs its parameters: its
    worker died) or ``failed`` (final). ``requeued``: the trials some trial re-runs (:func:`retried_from`)."""
    if ATTR_SKIPPED in t.user_attrs:
        return "surplus"
    return "retried" if t.number in requeued else "failed"


def progress(study: optuna.Study) -> Progress:
    p = Progress()
    trials = study.get_trials(deepcopy=False)
    requeued = {retried_from(t) for t in trials}
    for t in trials:
        p.attempts += 1
        if is_evaluated(t):
            p.evaluated += 1
        elif is_duplicate(t):
            p.duplicates += 1
        elif t.state == TrialState.RUNNING:
            p.running += 1
        elif t.state == TrialState.WAITING:
            p.waiting += 1
        elif is_rejected(t):
            p.rejected += 1
        elif t.state == TrialState.FAIL:
            kind = _fail_kind(t, requeued)
            setattr(p, kind, getattr(p, kind) + 1)
    return p


def failed_trials(study: optuna.Study, max_retry: int | None) -> list[dict[str, Any]]:
    """The final failures :func:`progress` counts in ``failed``, each with why: its error, or that its worker died
    (and whether its retries, ``max_retry``, are used up or the next worker to run retries it)."""
    trials = study.get_trials(deepcopy=False)
    requeued = {retried_from(t) for t in trials}
    out: list[dict[str, Any]] = []
    for t in trials:
        if t.state != TrialState.FAIL or _fail_kind(t, requeued) != "failed":
            continue
        why = t.user_attrs.get(ATTR_ERROR)
        if why is None:
            tries = len(t.system_attrs.get("retry_history", [])) + 1
            if max_retry is not None and tries > max_retry:
                why = f"its worker died on each of {tries} tries (study.max_retry {max_retry}: no retry left)"
            elif not t.params:
                why = "its worker died before it drew a graph: nothing to re-run"
            else:
                why = "its worker died; the next worker to run retries it"
        out.append({"trial": t.number, "error": str(why)[:300]})
    return out


def grace_period_s(config: SearchConfig | dict[str, Any] | None) -> float | None:
    """Seconds without a heartbeat after which a RUNNING trial's worker is deemed dead (the storage's rule); from a
    config, or a study's stored one; None: heartbeats are off."""
    study = (config.study.model_dump() if isinstance(config, SearchConfig) else (config or {}).get("study")) or {}
    interval = study.get("heartbeat_interval", 10)
    if not interval:
        return None
    return float(study.get("grace_period") or 2 * interval)


def stale_trials(study: optuna.Study, grace_s: float | None) -> list[dict[str, Any]]:
    """RUNNING trials whose heartbeat is older than ``grace_s``: their worker is dead (or cut off), and the next
    worker to run fails them and re-runs their parameters. Each: trial number, heartbeat age (s), worker."""
    return running_trials(study, grace_s)[1]


def running_trials(study: optuna.Study, grace_s: float | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """RUNNING trials as (live, stale): each with its heartbeat's age in seconds (None: none yet) and its worker.
    Stale: older than ``grace_s`` (see :func:`stale_trials`); with heartbeats off (None) every one is live."""
    ages = heartbeat_ages(study)
    trials = study.get_trials(deepcopy=False)
    live: list[dict[str, Any]] = []
    stale: list[dict[str, Any]] = []
    for n, age in sorted(ages.items()):
        row = {"trial": n, "heartbeat_age_s": None if age is None else round(age, 1), "worker": trials[n].user_attrs.get(ATTR_WORKER)}
        (stale if grace_s is not None and age is not None and age > grace_s else live).append(row)
    return live, stale


def resume_line(study: optuna.Study, target: int, grace_s: float | None) -> str:
    """What a run resumes: evaluated trials of the target, and what becomes of the trials of workers that died."""
    evaluated = progress(study).evaluated
    parts = [f"resuming study {study.study_name!r}: {evaluated} of {target} evaluated"
             + (" (the target is reached: no new trial)" if evaluated >= target else "")]
    live, stale = running_trials(study, grace_s)
    for r in stale:
        parts.append(f"trial {r['trial']} of a dead worker (heartbeat {r['heartbeat_age_s']:.0f} s old) will be retried")
    for r in live:
        seen = "no heartbeat yet" if r["heartbeat_age_s"] is None else f"heartbeat {r['heartbeat_age_s']:.0f} s old"
        parts.append(f"trial {r['trial']} is running ({seen})" + (
            f"; if its worker is dead it is retried after {grace_s:.0f} s without a heartbeat" if grace_s else ""))
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        origin = retried_from(t)
        parts.append(f"trial {origin} of a dead worker will be retried (as trial {t.number})" if origin is not None
                     else f"trial {t.number} (enqueued) will run")
    return "; ".join(parts)


def _live_before(study: optuna.Study, number: int) -> int:
    """Trials numbered below ``number`` that have counted or may still count towards the target."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.number >= number:
            continue
        if is_evaluated(t) or t.state in (TrialState.RUNNING, TrialState.WAITING):
            n += 1
    return n


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for study.optimize; we run our own Heartbeat thread.
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        return study.ask()


def _release(study: optuna.Study, trial: optuna.Trial, why: str) -> None:
    """Fail a trial that is not to run, and say why (a final FAIL: never retried)."""
    trial.set_user_attr(ATTR_SKIPPED, why)
    study.tell(trial, state=TrialState.FAIL)


# -- model ranking ----------------------------------------------------------------------------------
def single_model_spec(model: str, name: str | None = None) -> ArchitectureSpec:
    return parse_architecture({"name": name or f"single-{model}".replace(" ", "-"), "layers": [[{"type": "generator", "model": model}]]})


async def rank_models(config: SearchConfig, study: optuna.Study, evaluator: Evaluator, report: Reporter = QUIET) -> list[str]:
    """Pool ordered by single-model dev score (config scores, else measured once and stored in the study)."""
    scores: dict[str, float] = {}
    if all(m.score is not None for m in config.models):
        scores = {m.name: float(m.score) for m in config.models}  # type: ignore[arg-type]
    elif STUDY_RANKING in study.user_attrs:
        scores = dict(study.user_attrs[STUDY_RANKING])
    else:
        limit = config.evaluation.dev_limit
        todo = [m for m in config.models if m.score is None]
        report.line(f"ranking the model pool: {len(todo)} of {len(config.models)} models scored alone on the dev split"
                    f"{f' (at most {limit} questions)' if limit else ''}")
        for m in config.models:
            if m.score is not None:
                scores[m.name] = m.score
                continue
            scores[m.name] = (await evaluator.evaluate(single_model_spec(m.name), "dev", limit=limit)).score
            report.line(f"  {m.name}: dev score {scores[m.name]:.4f} ({todo.index(m) + 1} of {len(todo)})")
        study.set_user_attr(STUDY_RANKING, scores)
    # Stable sort: ties keep the config's order, so every worker derives the same ranking.
    return sorted((m.name for m in config.models), key=lambda n: -scores[n])


# -- evaluators -------------------------------------------------------------------------------------
def check_evaluation(config: SearchConfig) -> None:
    """Raise the :class:`SpecError` :func:`make_evaluator` would, without building anything (a ``--workers`` parent
    checks this before it creates the study its workers would then refuse to run)."""
    if config.evaluation.evaluator == "bench":
        from archon_server.search.bench_eval import check_bench_config

        check_bench_config(config)


def make_evaluator(config: SearchConfig) -> Evaluator:
    ev = config.evaluation
    if ev.evaluator == "scripted":
        s = ev.scripted
        landscape = Landscape(model_scores={m.name: (m.score if m.score is not None else 0.5) for m in config.models})
        return ScriptedEvaluator(landscape, n_dev=s.n_dev, n_test=s.n_test, noise=s.noise, step_sleep_s=s.step_sleep_s, seed=s.seed)
    from archon_server.search.bench_eval import (
        make_bench_evaluator,  # heavy imports only when needed
    )

    return make_bench_evaluator(config)


# -- worker -----------------------------------------------------------------------------------------
@dataclass
class WorkerStats:
    trials: int = 0
    complete: int = 0
    pruned: int = 0
    rejected: int = 0
    failed: int = 0
    surplus: int = 0
    converged: bool = False
    numbers: list[int] = field(default_factory=list)


def _ended_elsewhere(study: optuna.Study, trial: optuna.Trial) -> bool:
    """Whether another worker ended this worker's running trial: its heartbeat lapsed past the grace period (a
    stalled process, a loaded machine, a slow database), so a live worker was taken for dead, its trial failed and
    its parameters queued again. Then its result is not this worker's to tell (the storage refuses it:
    UpdateFinishedTrialError, which crashed the worker), and the queued retry runs them; say so and go on."""
    state = study._storage.get_trial(trial._trial_id).state  # noqa: SLF001 - the storage's word, not the cached trial's
    if not state.is_finished():
        return False
    log.warning("trial %d was ended by another worker while it ran here (%s: its heartbeat lapsed past the grace period);"
                " its parameters are retried as a new trial", trial.number, state.name)
    return True


def attempts_used_up(p: Progress, max_attempts: int, n_trials: int) -> str:
    """Why a worker stops short of the target: the study's attempts (``study.max_attempts_factor`` x the target) are
    used up, with what they went to -- duplicates of graphs already evaluated (the space holds fewer distinct graphs
    than the target), proposals the rules / budget rejected, or trials that failed -- and what to change."""
    if p.failed > max(p.duplicates, p.rejected):
        why = "most trials failed: `archon search status` lists why (failed_trials)"
    elif p.duplicates >= p.rejected:
        why = ("the space may hold fewer distinct architectures than the target: widen `space`, or lower the target "
               "(`study.n_trials`, `--n-trials`)")
    else:
        why = "most proposals break the space's rules or the budget: narrow `space` or raise `budget`"
    return (f"stopping: {p.attempts} attempts, the study's limit ({max_attempts}: study.max_attempts_factor x the target "
            f"of {n_trials}), for {p.evaluated} evaluated trials: {p.duplicates} duplicates of evaluated graphs, "
            f"{p.rejected} rejected by rules/budget, {p.failed} failed; {why}")


async def run_worker(
    study: optuna.Study,
    objective: ArchitectureObjective,
    n_trials: int,
    *,
    max_attempts: int | None = None,
    poll_s: float | None = None,
    report: Reporter = QUIET,
) -> WorkerStats:
    """Run trials of ``study`` until it holds ``n_trials`` evaluated trials (over all workers); ``report`` gets a line
    per finished trial (its value, the best so far, evaluated of the target)."""
    stats = WorkerStats()
    storage = study._storage  # noqa: SLF001 - Optuna exposes no public accessor; needed for heartbeats
    hb = heartbeat_enabled(storage)
    interval = storage.get_heartbeat_interval() if hb else None  # type: ignore[attr-defined]
    poll = poll_s if poll_s is not None else (max(0.5, interval / 2) if interval else 1.0)
    max_attempts = max_attempts or n_trials * objective.config.study.max_attempts_factor
    retry = storage_retry(storage) or retry_callback(objective.config.study.max_retry)
    me = worker_id()
    free_streak = 0  # consecutive trials that evaluated nothing new
    while True:
        if hb:
            reap_stale_trials(study, final=failed_on_purpose)
        p = progress(study)
        if p.evaluated >= n_trials:
            if not p.waiting:
                break
            # A retry enqueued after the target was reached (its trial's worker died late): nothing left to run it
            # for; release it rather than leave it WAITING in a finished study.
            _release(study, _ask(study), "surplus: the target was reached before this retry ran")
            stats.surplus += 1
            continue
        if free_streak >= objective.config.study.converged_after:
            log.warning("stopping: %d consecutive duplicate/rejected proposals (converged) at %d evaluated trials",
                        free_streak, p.evaluated)
            stats.converged = True
            break
        if p.attempts >= max_attempts:
            log.warning("%s", attempts_used_up(p, max_attempts, n_trials))
            break
        if p.waiting == 0 and p.evaluated + p.running >= n_trials:
            if hb and p.running:
                await asyncio.sleep(poll)  # the rest runs elsewhere; stay to retry it if its worker dies
                continue
            break
        trial = _ask(study)
        try:
            with Heartbeat(storage, trial._trial_id):  # noqa: SLF001
                if _live_before(study, trial.number) >= n_trials:
                    _release(study, trial, "surplus: the target was reached by earlier trials")
                    stats.surplus += 1
                    continue
                stats.trials += 1
                stats.numbers.append(trial.number)
                trial.set_user_attr(ATTR_WORKER, me)
                try:
                    outcome = await objective.run(trial)
                except Exception as e:  # a broken trial must not stop the search; the reason stays in the DB
                    if _ended_elsewhere(study, trial):
                        continue
                    # A failure of ours (ArchonError: the backends down, every question failed...) is said by the
                    # trial's progress line, which carries its reason; a traceback per trial buried those lines. Anything
                    # else is a bug: its traceback is what to report.
                    if isinstance(e, ArchonError):
                        log.debug("trial %d failed", trial.number, exc_info=True)
                    else:
                        log.exception("trial %d failed", trial.number)
                    trial.set_user_attr(ATTR_ERROR, f"{type(e).__name__}: {e}")
                    study.tell(trial, state=TrialState.FAIL)
                    stats.failed += 1
                    report.line(trial_line(study, trial.number, n_trials))
                    continue
                if _ended_elsewhere(study, trial):
                    continue
                attrs = trial.user_attrs
                free_streak = free_streak + 1 if ("rejected" in attrs or "duplicate_of" in attrs) else 0
                if outcome.state == TrialState.COMPLETE:
                    study.tell(trial, outcome.values)
                    stats.complete += 1
                else:
                    study.tell(trial, state=TrialState.PRUNED)
                    if "rejected" in trial.user_attrs:
                        stats.rejected += 1
                    else:
                        stats.pruned += 1
                report.line(trial_line(study, trial.number, n_trials))
        except (KeyboardInterrupt, asyncio.CancelledError):
            # Interrupted, not broken (Ctrl-C; a --workers parent that died): fail it and enqueue the same parameters
            # for the next worker, wherever it was — also before or after its evaluation, which left it RUNNING.
            if study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING:  # noqa: SLF001
                study.tell(trial, state=TrialState.FAIL)
                retry(study, study._storage.get_trial(trial._trial_id))  # noqa: SLF001
            raise
    return stats


def _value(t: optuna.trial.FrozenTrial) -> str:
    if t.values is None:
        return "–"
    if len(t.values) > 1:
        return f"score {t.values[0]:.4f}, cost {t.values[1]:.4g}"
    dev, cost = t.user_attrs.get(ATTR_DEV_SCORE), t.user_attrs.get(ATTR_COST)
    return f"{t.values[0]:.4f}" + (f" (dev {dev:.4f}, cost {cost:.4g}/query)" if dev is not None and cost is not None else "")


def _short(t: optuna.trial.FrozenTrial) -> str:
    return _value(t).split(" (")[0]


def trial_line(study: optuna.Study, number: int, target: int) -> str:
    """The progress line of a finished trial: what became of it, the best so far, evaluated trials of the target."""
    t = study.get_trials(deepcopy=False)[number]
    a = t.user_attrs
    if ATTR_REJECTED in a:
        what = f"rejected ({str(a[ATTR_REJECTED])[:120]}; free)"
    elif ATTR_DUPLICATE in a:
        what = f"duplicate of trial {a[ATTR_DUPLICATE]}: {_short(t) if t.state == TrialState.COMPLETE else 'pruned'}, free"
    elif t.state == TrialState.FAIL:
        what = f"failed: {str(a.get(ATTR_ERROR, '?'))[:160]}"
    elif t.state == TrialState.PRUNED:
        what = str(a.get(ATTR_PRUNED, "pruned"))
    else:
        what = _value(t)
    from archon_server.search.report import best_trial

    try:
        b = best_trial(study)
        best = f"best {_short(b)} (trial {b.number})"
    except LookupError:
        best = "no complete trial yet"
    took = f" in {t.duration.total_seconds():.0f} s" if t.duration is not None else ""
    origin = retried_from(t)
    again = f" (retry of trial {origin}, whose worker died)" if origin is not None else ""
    return f"trial {t.number}{again}{took}: {what}; {best}; {progress(study).evaluated} of {target} evaluated"


# -- results ----------------------------------------------------------------------------------------
def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Best first, one trial per architecture. Scalar: by objective. Pareto: the front by dev score, then cheaper."""
    multi = len(study.directions) > 1
    if multi:
        pool = study.best_trials
        pool.sort(key=lambda t: (-t.values[0], t.values[1], t.number))
    else:
        pool = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        # Equal objective: the cheaper graph wins, then the earlier trial (deterministic).
        pool.sort(key=lambda t: (-t.value, t.user_attrs.get("cost_per_query", 0.0), t.number))
    seen: set[str] = set()
    out = []
    for t in pool:
        k = t.user_attrs.get("arch_key", str(t.number))
        if k not in seen:
            seen.add(k)
            out.append(t)
    return out


def trial_spec(t: optuna.trial.FrozenTrial, name: str | None = None) -> ArchitectureSpec:
    from archon_server.spec import load_text

    data = load_text(t.user_attrs[ATTR_SPEC])
    if name:
        data["name"] = name
    return parse_architecture(data, source=f"trial {t.number}")


def baseline_specs(ranked_models: list[str]) -> dict[str, ArchitectureSpec]:
    """What the search must beat: the best single model, classic MoA (top-3 + fuser), Self-MoA (best model x6 + fuser)."""
    best = ranked_models[0]
    top = ranked_models[:3]
    return {
        "single": single_model_spec(best, "baseline-single"),
        "moa": parse_architecture({"name": "baseline-moa", "layers": [
            [{"type": "generator", "model": m} for m in top], [{"type": "fuser", "model": best}]]}),
        "self_moa": parse_architecture({"name": "baseline-self-moa", "layers": [
            [{"type": "generator", "model": best, "samples": 6}], [{"type": "fuser", "model": best}]]}),
    }


async def finalize(config: SearchConfig, study: optuna.Study, evaluator: Evaluator, ranked_models: list[str],
                   report: Reporter = QUIET) -> dict[str, Any]:
    """Score the best few trials and the baselines on the held-out test split; results go into study user attrs."""
    ev = config.evaluation
    objective = ArchitectureObjective(config, evaluator, ranked_models, study.study_name)
    tests: dict[str, Any] = dict(study.user_attrs.get(STUDY_TEST, {}))
    best = [t for t in ranked_trials(study)[: ev.test_top] if str(t.number) not in tests]  # resumed: not paid twice
    baselines: dict[str, Any] = dict(study.user_attrs.get(STUDY_BASELINES, {}))
    todo_baselines = [n for n in baseline_specs(ranked_models) if n not in baselines] if ev.baselines else []
    if best or todo_baselines:
        report.line(f"finalizing: {len(best)} best trial(s) on the test split"
                    f"{f', {len(todo_baselines)} baseline(s) on dev and test' if todo_baselines else ''}"
                    f"{f' (at most {ev.test_limit} test questions)' if ev.test_limit else ''}")
    for t in best:
        res = await evaluator.evaluate(trial_spec(t), "test", limit=ev.test_limit)
        tests[str(t.number)] = {"score": res.score, "cost": objective.cost(res), "calls_per_query": res.calls_per_query,
                                "tokens_per_query": res.tokens_per_query, "n": res.n}
        report.line(f"  trial {t.number}: test score {res.score:.4f} ({res.n} questions)")
    study.set_user_attr(STUDY_TEST, tests)
    if ev.baselines:
        for name, spec in baseline_specs(ranked_models).items():
            if name in baselines:
                continue
            row: dict[str, Any] = {"spec": dump_architecture(spec)}
            for split, limit in (("dev", ev.dev_limit), ("test", ev.test_limit)):
                res = await evaluator.evaluate(spec, split, limit=limit)
                row[split] = {"score": res.score, "cost": objective.cost(res), "n": res.n}
            baselines[name] = row
            report.line(f"  baseline {name}: dev {row['dev']['score']:.4f}, test {row['test']['score']:.4f}")
        study.set_user_attr(STUDY_BASELINES, baselines)
    return {"test": tests, "baselines": baselines}


async def finalize_study(config: SearchConfig, study: optuna.Study, evaluator: Evaluator | None = None,
                         report: Reporter = QUIET) -> dict[str, Any]:
    """Finalize an existing study (after multi-process workers, or from ``search export --finalize``)."""
    own = evaluator is None
    evaluator = evaluator or make_evaluator(config)
    try:
        return await finalize(config, study, evaluator, await rank_models(config, study, evaluator, report), report)
    finally:
        if own and hasattr(evaluator, "aclose"):
            await evaluator.aclose()


@dataclass
class SearchResult:
    study: optuna.Study
    stats: WorkerStats
    elapsed_s: float
    final: dict[str, Any] | None = None


def study_target(study: optuna.Study, config: SearchConfig, n_trials: int | None) -> int:
    """The study's target number of evaluated trials for this run, stored in the study (every worker reads it):
    ``--n-trials`` when given; else the config's ``study.n_trials`` when it differs from the value the study last saw
    in a config (the user changed it: a larger one runs more trials, a smaller one stops sooner); else the stored
    target (one an earlier ``--n-trials`` set stays, for workers started without it)."""
    attrs = study.user_attrs
    stored = attrs.get(STUDY_TARGET)
    # The config's n_trials as last seen; a study from before this attribute: the one it was created with.
    seen = attrs.get(STUDY_CONFIG_TARGET, ((attrs.get(STUDY_CONFIG) or {}).get("study") or {}).get("n_trials"))
    changed = config.study.n_trials != seen
    if n_trials is not None:
        target = n_trials
    elif stored is None or changed:
        target = config.study.n_trials
    else:
        target = int(stored)
    if stored is not None and target != stored:
        why = "--n-trials" if n_trials is not None else f"study.n_trials changed from {seen} in {config.source or 'the config'}"
        log.info("study %r: target %s -> %s evaluated trials (%s)", study.study_name, stored, target, why)
    if target != stored:
        study.set_user_attr(STUDY_TARGET, target)
    if changed or STUDY_CONFIG_TARGET not in attrs:
        study.set_user_attr(STUDY_CONFIG_TARGET, config.study.n_trials)
    return target


async def run_search(
    config: SearchConfig,
    *,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    evaluator: Evaluator | None = None,
    seed_offset: int = 0,
    do_finalize: bool = True,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    report: Reporter = QUIET,
    say_resume: bool = True,
) -> SearchResult:
    """One worker's whole run: open/resume, rank the pool, run trials to the target, optionally finalize. ``report``
    (the CLI's, on stderr) gets the phases, the resume and a line per finished trial; ``say_resume=False``: not the
    resume (a ``--workers`` child: its parent said it once, before the children's trials ran)."""
    t0 = time.perf_counter()
    own_evaluator = evaluator is None
    evaluator = evaluator or make_evaluator(config)
    try:
        return await _run_search(config, evaluator, t0, storage=storage, study_name=study_name, n_trials=n_trials,
                                 seed_offset=seed_offset, do_finalize=do_finalize, sampler=sampler, pruner=pruner,
                                 report=report, say_resume=say_resume)
    finally:
        if own_evaluator and hasattr(evaluator, "aclose"):
            await evaluator.aclose()


async def _run_search(config: SearchConfig, evaluator: Evaluator, t0: float, *, storage: Any, study_name: str | None,
                      n_trials: int | None, seed_offset: int, do_finalize: bool, sampler: Any, pruner: Any,
                      report: Reporter = QUIET, say_resume: bool = True) -> SearchResult:
    study = open_study(config, storage=storage, study_name=study_name, seed_offset=seed_offset, sampler=sampler, pruner=pruner)
    target = study_target(study, config, n_trials)
    if say_resume and report.enabled and study.get_trials(deepcopy=False):
        report.line(resume_line(study, target, grace_period_s(config)))
    ranked = await rank_models(config, study, evaluator, report)
    objective = ArchitectureObjective(config, evaluator, ranked, study.study_name)
    stats = await run_worker(study, objective, target, report=report)
    final = None
    # A converged search (the sampler only repeats known graphs) is as finished as one that hit its target.
    if do_finalize and (progress(study).evaluated >= target or stats.converged):
        final = await finalize(config, study, evaluator, ranked, report)
    return SearchResult(study=study, stats=stats, elapsed_s=time.perf_counter() - t0, final=final)
