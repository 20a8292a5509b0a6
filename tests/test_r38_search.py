"""A resumed seeded search continues instead of replaying its first proposals; ``search status`` tells final failures
from trials whose worker died and that were retried."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from archon_server.search.config import load_search_config
from archon_server.search.objective import ATTR_DUPLICATE, ATTR_ERROR, ATTR_KEY, ATTR_SKIPPED, is_evaluated
from archon_server.search.runner import open_study, run_search
from archon_server.search.samplers import sampler_seed
from archon_server.search.storage import retried_from

from test_search_workers import _cmd, _config, _env, _load, _wait_running_trial_of

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _with_sampler(path: Path, sampler: dict) -> Path:
    data = yaml.safe_load(path.read_text())
    data["study"]["sampler"] = sampler
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(_cmd(*args), env=_env(), cwd=cwd, capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


# -- 1. a resumed seeded search continues ------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [{"type": "random", "seed": 0}, {"type": "tpe", "seed": 0, "n_startup_trials": 10}])
def test_a_resumed_seeded_search_proposes_new_graphs_not_the_first_runs_again(tmp_path: Path, sampler: dict) -> None:
    """A search stopped after 4 evaluated trials (killed, or run to a smaller target: the next process starts the same
    way) and run again on the same storage. The sampler restarted its seeded stream: the resumed part proposed the
    first run's graphs again, in order, each a duplicate that took a trial and told nothing new."""
    cfg = _with_sampler(_config(tmp_path), sampler)
    url = f"sqlite:///{tmp_path}/study.db"
    _cli("run", str(cfg), "--storage", url, "--n-trials", "4", "--no-finalize", "--no-export", cwd=tmp_path)
    first = len(_load(url).trials)
    _cli("run", str(cfg), "--storage", url, "--n-trials", "8", "--no-finalize", "--no-export", cwd=tmp_path)
    trials = _load(url).trials
    resumed = trials[first:]
    assert resumed, "the second run ran nothing"
    first_keys = {t.user_attrs.get(ATTR_KEY): t.number for t in trials[:first]}
    repeats = [(t.number, first_keys[t.user_attrs.get(ATTR_KEY)]) for t in resumed if t.user_attrs.get(ATTR_KEY) in first_keys]
    assert repeats == [], f"resumed trials repeat first-run graphs (trial, of trial): {repeats}"
    assert not [t.number for t in resumed if ATTR_DUPLICATE in t.user_attrs]


def _proposals(url: str, cfg_path: Path, n: int, seed_offset: int = 0) -> list[dict]:
    cfg = load_search_config(cfg_path)
    res = asyncio.run(run_search(cfg, storage=url, n_trials=n, seed_offset=seed_offset, do_finalize=False))
    return [t.params for t in res.study.get_trials()]


def test_the_same_seed_and_history_give_the_same_proposals_on_resume(tmp_path: Path) -> None:
    """Determinism is kept: two studies with the same seed and the same history propose the same graphs when
    resumed; another worker (its seed offset) proposes others; a new study proposes what it always did."""
    cfg = _config(tmp_path)
    a, b, c = (f"sqlite:///{tmp_path}/{n}.db" for n in "abc")
    first = _proposals(a, cfg, 3)
    assert _proposals(b, cfg, 3) == first and _proposals(c, cfg, 3) == first
    resumed_a = _proposals(a, cfg, 6)
    assert _proposals(b, cfg, 6) == resumed_a
    assert resumed_a[: len(first)] == first and len(resumed_a) > len(first)
    assert _proposals(c, cfg, 6, seed_offset=1)[len(first):] != resumed_a[len(first):]
    # A new study: the configured seed (plus the worker's offset) as before, so seeded results stay reproducible.
    res = asyncio.run(run_search(load_search_config(cfg), storage=f"sqlite:///{tmp_path}/d.db", n_trials=3,
                                 do_finalize=False, sampler=optuna.samplers.RandomSampler(seed=0)))
    assert [t.params for t in res.study.get_trials()] == first


def test_sampler_seed() -> None:
    assert sampler_seed(None, 3, 10) is None  # unseeded stays unseeded
    assert sampler_seed(7, 0, 0) == 7 and sampler_seed(7, 2, 0) == 9  # a new study: seed + worker offset, as before
    resumed = sampler_seed(7, 0, 12)
    assert resumed == sampler_seed(7, 0, 12)  # deterministic
    assert resumed not in (7, sampler_seed(7, 0, 13), sampler_seed(7, 1, 12), sampler_seed(8, 0, 12))
    assert 0 <= resumed < 2**32
    assert sampler_seed(0, 1, 0) != sampler_seed(0, 0, 1)  # a worker's offset and a resume do not share a stream


# -- 2. status: final failures apart from retried trials ---------------------------------------------------------------
def _status(url: str, cwd: Path) -> dict:
    return json.loads(_cli("status", "--storage", url, cwd=cwd).stdout.strip().splitlines()[-1])


def test_status_counts_a_killed_workers_retried_trial_as_retried_not_failed(tmp_path: Path) -> None:
    """A worker killed mid-trial, then `search run` again: the trial is failed by its lapsed heartbeat and re-run with
    its parameters, and the study completes. `status` said `failed: 1` for it, as for a trial that broke."""
    cfg = _config(tmp_path, step_sleep_s=0.1)  # ~1 s per trial: time to kill one mid-trial
    url = f"sqlite:///{tmp_path}/shared.db"
    args = ("run", str(cfg), "--storage", url, "--n-trials", "4", "--no-finalize", "--no-export")
    first = subprocess.Popen(_cmd(*args), env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        killed = _wait_running_trial_of(url, first.pid, timeout=60, proc=first)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    _cli(*args, cwd=tmp_path)
    trials = _load(url).trials
    assert trials[killed].state == TrialState.FAIL
    assert [t.number for t in trials if retried_from(t) == killed and is_evaluated(t)], "the killed trial was not re-run"
    status = _status(url, tmp_path)
    assert status["evaluated"] == 4, status
    assert (status["failed"], status["retried"]) == (0, 1), status
    assert "failed_trials" not in status, status


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_status_tells_final_failures_retried_and_surplus_trials_apart(tmp_path: Path) -> None:
    """One trial of each kind: re-run after its worker died (retried), released unrun at the target (surplus), broken
    (its error), and killed on each of its tries (max_retry 1: no retry left). Only the last two are failures, and
    `failed_trials` says why; the report's counts agree."""
    from archon_server.search.report import write_report
    from archon_server.search.storage import retry_callback

    cfg = load_search_config(_config(tmp_path))
    cfg.study.max_retry = 1
    url = f"sqlite:///{tmp_path}/shared.db"
    study = open_study(cfg, storage=url)
    dist = {"x": optuna.distributions.IntDistribution(0, 99)}
    retry = retry_callback(max_retry=1)

    def died(trial: optuna.Trial) -> None:  # what the reaper does to a dead worker's trial
        study.tell(trial, state=TrialState.FAIL)
        retry(study, study._storage.get_trial(trial._trial_id))  # noqa: SLF001

    died(study.ask(dist))  # 0: its worker died; retried as 1, which completes
    rerun = study.ask()
    assert retried_from(study.trials[rerun.number]) == 0
    study.tell(rerun, 0.5)
    surplus = study.ask(dist)  # 2: released unrun
    surplus.set_user_attr(ATTR_SKIPPED, "surplus: the target was reached by earlier trials")
    study.tell(surplus, state=TrialState.FAIL)
    broken = study.ask(dist)  # 3: raised
    broken.set_user_attr(ATTR_ERROR, "ValueError: boom")
    study.tell(broken, state=TrialState.FAIL)
    died(study.ask(dist))  # 4: its worker died; retried as 5, whose worker died too: max_retry 1, no retry left
    last = study.ask()
    died(last)
    assert retried_from(study.trials[last.number]) == 4 and len(study.trials) == 6

    status = _status(url, tmp_path)
    assert {k: status[k] for k in ("failed", "retried", "surplus", "attempts")} == \
        {"failed": 2, "retried": 2, "surplus": 1, "attempts": 6}, status
    assert status["failed_trials"] == [
        {"trial": 3, "error": "ValueError: boom"},
        {"trial": 5, "error": "its worker died on each of 2 tries (study.max_retry 1: no retry left)"},
    ], status
    report = write_report(_load(url), tmp_path / "report", url).markdown.read_text()
    assert "2 failed, 2 retried (their worker died), 1 surplus" in report, report
