"""Distributed search through the storage: real worker processes share one SQLite study.

- two workers finish exactly N evaluated trials together, none lost, no surplus evaluation;
- a worker killed with SIGKILL mid-trial loses only that trial: its heartbeat stops, another
  worker marks it FAIL and re-runs the same parameters, and a restarted worker continues the study;
- ``export`` and ``status`` work from the storage URL alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from archon_server.search.objective import ATTR_SKIPPED, ATTR_WORKER, is_evaluated
from archon_server.search.objective import ATTR_KEY
from archon_server.search.storage import make_storage, retried_from
from archon_server.spec import load_architecture

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search" / "tiny-scripted.yaml"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _config(tmp_path: Path, **scripted) -> Path:
    data = yaml.safe_load(TINY.read_text())
    # Random sampler: what is under test is the coordination through the storage, and TPE over an RDB is slow.
    # Grace 4 s over 1 s beats: a live worker's beat can lapse by seconds on a loaded machine (SQLite locks, busy cores),
    # and at 2 s a CI run under load took a live trial for dead; a killed worker's trial is still failed 4 s on.
    data["study"].update({"name": "shared", "heartbeat_interval": 1, "grace_period": 4, "sampler": {"type": "random", "seed": 0}})
    data["evaluation"].update({"stages": [], "test_top": 1, "baselines": False})
    data["evaluation"]["scripted"].update({"n_dev": 10, **scripted})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "archon_server.search", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _load(url: str) -> optuna.Study:
    return _load_named(url, "shared")


def _load_named(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(url, heartbeat_interval=None))


def _check_bookkeeping(study: optuna.Study, n: int) -> None:
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert sum(is_evaluated(t) for t in trials) == n
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)], "a trial was lost"
    for t in trials:  # every failure is explained: surplus, or killed (and then retried)
        if t.state == TrialState.FAIL:
            assert ATTR_SKIPPED in t.user_attrs or any(
                retried_from(r) == t.number for r in trials), t


def test_retried_from_names_the_direct_predecessor_in_a_retry_chain() -> None:
    """A retry of a retry re-runs the retry, not the original (Optuna's ``failed_trial`` names the original)."""
    callback = optuna.storages.RetryFailedTrialCallback(max_retry=3)
    study = optuna.create_study()
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}
    first = study.ask(dist)
    study.tell(first, state=TrialState.FAIL)
    callback(study, study.trials[first.number])
    retry = study.trials[-1]
    assert retried_from(retry) == first.number
    second = study.ask()  # takes the WAITING retry
    assert second.number == retry.number and second.params == first.params
    study.tell(second, state=TrialState.FAIL)
    callback(study, study.trials[second.number])
    assert retried_from(study.trials[-1]) == second.number
    assert retried_from(study.trials[-1]) != optuna.storages.RetryFailedTrialCallback.retried_trial_number(study.trials[-1])
    assert retried_from(study.trials[first.number]) is None


def test_two_workers_share_one_study_then_export(tmp_path: Path, storage_url: str) -> None:
    cfg = _config(tmp_path, step_sleep_s=0.08)  # ~1 s per trial: the second process starts before the first is done
    url = storage_url
    out = subprocess.run(_cmd("run", str(cfg), "--storage", url, "--n-trials", "8", "--workers", "2", "--no-export"),
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    study = _load(url)
    _check_bookkeeping(study, 8)
    workers = {t.user_attrs.get(ATTR_WORKER) for t in study.get_trials() if is_evaluated(t)}
    assert len(workers) == 2, workers  # both processes did real work

    exp = subprocess.run(_cmd("export", "--storage", url, "--out", str(tmp_path / "arch"), "--report-dir", str(tmp_path / "rep")),
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert exp.returncode == 0, exp.stderr[-3000:]
    paths = json.loads(exp.stdout.strip().splitlines()[-1])
    assert load_architecture(paths["architecture"]).name == "shared-best"
    assert "Best architectures" in Path(paths["report"]).read_text()
    st = subprocess.run(_cmd("status", "--storage", url), env=_env(), capture_output=True, text=True, timeout=120)
    status = json.loads(st.stdout.strip().splitlines()[-1])
    assert status["evaluated"] == 8 and status["target"] == 8 and status["best"]["trial"] is not None


def _wait_running_trial_of(url: str, pid: int, timeout: float, proc: subprocess.Popen[str] | None = None) -> int:
    """The number of a trial that worker ``pid`` is evaluating now. A worker that exits first, or a wait that ends,
    fails with what is known: the worker's output, the last error of reading the study."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            for t in _load(url).get_trials(states=(TrialState.RUNNING,)):
                # Sampled (the spec is stored) and now evaluating: a kill here is truly mid-trial.
                if str(t.user_attrs.get(ATTR_WORKER, "")).endswith(f":{pid}") and ATTR_KEY in t.user_attrs:
                    return t.number
        except Exception as e:  # the study may not exist yet
            last_error = e
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"worker {pid} exited ({proc.returncode}) before a trial was seen running:\n{err[-3000:]}\n{out[-1000:]}")
        time.sleep(0.1)
    states = "?"
    try:
        states = str([(t.number, t.state.name, t.user_attrs.get(ATTR_WORKER)) for t in _load(url).get_trials()])
    except Exception as e:  # noqa: BLE001 - only for the message
        states = f"unreadable: {e!r}"
    raise AssertionError(f"worker {pid} never ran a trial in {timeout:g}s; last read error: {last_error!r}; trials: {states}")


def test_killed_worker_trial_is_failed_by_heartbeat_retried_and_study_completes(tmp_path: Path) -> None:
    n = 6
    cfg = _config(tmp_path, step_sleep_s=0.2)  # ~2 s per trial: time to kill one mid-trial
    url = f"sqlite:///{tmp_path}/shared.db"
    run = lambda idx: subprocess.Popen(  # noqa: E731
        _cmd("run", str(cfg), "--storage", url, "--n-trials", str(n), "--no-finalize", "--no-export", "--worker-index", str(idx)),
        env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a = run(0)
    procs = [a]
    try:
        killed = _wait_running_trial_of(url, a.pid, timeout=60, proc=a)
        b = run(1)
        procs.append(b)
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=10)
        assert a.returncode == -signal.SIGKILL
        assert _load(url).trials[killed].state == TrialState.RUNNING  # nobody told the storage
        restarted = run(2)  # "restart the worker": it resumes the same study
        procs.append(restarted)
        for p in (b, restarted):
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    study = _load(url)
    _check_bookkeeping(study, n)
    trials = study.get_trials()
    assert trials[killed].state == TrialState.FAIL
    retries = [t for t in trials if retried_from(t) == killed]
    assert len(retries) == 1, "the killed trial must be re-run exactly once"
    r = retries[0]
    assert is_evaluated(r) and r.params == trials[killed].params
    assert not str(r.user_attrs[ATTR_WORKER]).endswith(f":{a.pid}")


def test_a_worker_killed_before_its_first_heartbeat_does_not_hang_the_next(tmp_path: Path) -> None:
    """Killed between ``ask`` and its first heartbeat, a worker leaves a RUNNING trial with no heartbeat row, which
    Optuna never deems stale: the restarted worker waited for it forever (a CI run hung 240 s this way)."""
    from archon_server.search.config import load_search_config
    from archon_server.search.runner import open_study

    cfg = _config(tmp_path, step_sleep_s=0.01)
    url = f"sqlite:///{tmp_path}/shared.db"
    dead = open_study(load_search_config(cfg), storage=url).ask()  # its worker died right here
    done = subprocess.run(_cmd("run", str(cfg), "--storage", url, "--n-trials", "3", "--no-finalize", "--no-export"),
                          env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    study = _load(url)
    assert study.trials[dead.number].state == TrialState.FAIL
    _check_bookkeeping(study, 3)


def test_a_trial_failed_by_a_reaper_that_died_before_its_retry_is_requeued_once(tmp_path: Path) -> None:
    """Optuna fails a stale trial, then calls the retry callback: a worker killed between the two left a FAIL trial
    with parameters and no retry (seen in CI: its parameters were never re-run). The next reaper enqueues it, once
    over all workers; a claim whose holder died before enqueuing is taken over once it is stale."""
    from archon_server.search import claims
    from archon_server.search.objective import failed_on_purpose
    from archon_server.search.storage import reap_stale_trials, retry_callback

    url = f"sqlite:///{tmp_path / 'study.db'}"
    dist = {"x": optuna.distributions.IntDistribution(0, 9)}

    def failed(x: int, **user_attrs: str) -> optuna.trial.FrozenTrial:
        return optuna.create_trial(state=TrialState.FAIL, params={"x": x}, distributions=dist, user_attrs=user_attrs)

    def waiting_retries_of(study: optuna.Study) -> dict[int, dict]:
        return {retried_from(t): t.params for t in study.get_trials() if t.state == TrialState.WAITING}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.create_study(study_name="s", storage=make_storage(url, heartbeat_interval=1, max_retry=3))
        study.add_trial(failed(1))  # 0: the orphan, its reaper died before the retry
        study.add_trial(failed(2, skipped="surplus"))  # 1: a surplus release: nothing to redo
        study.add_trial(failed(3, error="ValueError: boom"))  # 2: broken, not killed: its error stays, no retry
        study.add_trial(failed(4))  # 3: killed and already retried (just below)
        study.add_trial(failed(5))  # 4: another worker claimed its retry a moment ago and is enqueuing it
        study.add_trial(failed(6))  # 5: its claimant died between claiming and enqueuing, a minute ago
        study.add_trial(optuna.create_trial(state=TrialState.FAIL, params={"x": 7}, distributions=dist,
                                            system_attrs={"retry_history": [0, 1, 2]}))  # 6: retries used up
        retry_callback(3, stale_s=2)(study, study.trials[3])
        engine = claims.storage_engine(study._storage)  # noqa: SLF001
        assert claims.claim_retry(engine, study._study_id, 4, stale_s=2)  # noqa: SLF001
        assert claims.claim_retry(engine, study._study_id, 5, stale_s=2)  # noqa: SLF001
        with engine.begin() as con:
            con.execute(claims.RETRIES.update().where(claims.RETRIES.c.trial_number == 5).values(claimed_at=time.time() - 60))
        one, other = (optuna.load_study(study_name="s", storage=make_storage(url, heartbeat_interval=1, max_retry=3))
                      for _ in range(2))
        reap_stale_trials(one, final=failed_on_purpose)
        assert waiting_retries_of(one) == {0: {"x": 1}, 3: {"x": 4}, 5: {"x": 6}}
        reap_stale_trials(other, final=failed_on_purpose)  # another worker: claims taken, nothing enqueued twice
        reap_stale_trials(one, final=failed_on_purpose)
    assert waiting_retries_of(_load_named(url, "s")) == {0: {"x": 1}, 3: {"x": 4}, 5: {"x": 6}}
    assert len([t for t in _load_named(url, "s").trials if t.state == TrialState.WAITING]) == 3


def test_a_retry_enqueued_after_the_target_was_reached_is_released_not_left_waiting(tmp_path: Path) -> None:
    from archon_server.search.config import load_search_config
    from archon_server.search.runner import open_study, run_search

    cfg = load_search_config(_config(tmp_path, step_sleep_s=0.0))
    url = f"sqlite:///{tmp_path}/shared.db"
    asyncio.run(run_search(cfg, storage=url, n_trials=2, do_finalize=False))
    study = open_study(cfg, storage=url)
    done = [t for t in study.trials if is_evaluated(t)]
    study.enqueue_trial(done[0].params)  # a late retry: its original's worker died after the study was complete
    res = asyncio.run(run_search(cfg, storage=url, n_trials=2, do_finalize=False))
    assert res.stats.trials == 0 and res.stats.surplus == 1
    _check_bookkeeping(_load(url), 2)


@pytest.mark.parametrize("argv", [["search", "run", "c.yaml", "--workers", "3", "--n-trials", "7"], ["search", "export", "--storage", "sqlite:///x.db"]])
def test_add_cli_registers_on_any_parser(argv: list[str]) -> None:
    import argparse

    from archon_server.search.cli import add_cli

    parser = argparse.ArgumentParser(prog="archon")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    assert callable(args.func)
    if argv[1] == "run":
        assert (args.workers, args.n_trials, args.config) == (3, 7, "c.yaml")


async def test_a_trial_waits_for_its_running_twin_instead_of_paying_twice(tmp_path: Path, storage_url: str) -> None:
    """Two workers drew the same graph: the later trial waits for the earlier one and copies its result;
    if the earlier one's worker dies (heartbeat stops), the later trial is no longer blocked and evaluates."""
    from archon_server.search.config import load_search_config
    from archon_server.search.evaluator import Landscape, ScriptedEvaluator
    from archon_server.search.objective import ATTR_DUPLICATE, ArchitectureObjective
    from archon_server.search.runner import open_study
    from archon_server.search.space import architecture_key
    from archon_server.search.storage import Heartbeat

    cfg = load_search_config(_config(tmp_path))
    study = open_study(cfg, storage=storage_url)
    ev = ScriptedEvaluator(Landscape({m.name: m.score for m in cfg.models}), n_dev=10)
    obj = ArchitectureObjective(cfg, ev, [m.name for m in cfg.models], "twin")
    obj.poll_s = 0.1
    params = {"family": "moa", "top_k": 2, "samples": 1, "fusion_layers": 1, "fusers": 1, "ranker": False,
              "critic": False, "final": "none"}

    async def twin_of_running_trial(finish: bool, top_k: int) -> tuple[optuna.Trial, asyncio.Task]:
        study.enqueue_trial({**params, "top_k": top_k})
        study.enqueue_trial({**params, "top_k": top_k})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first = study.ask()
        hb = Heartbeat(study._storage, first._trial_id)
        key = architecture_key(obj.build(first))
        first.set_user_attr(ATTR_KEY, key)
        assert await obj._await_duplicate(first, key) is None  # the first trial claims the graph
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            second = study.ask()
        beat = Heartbeat(study._storage, second._trial_id)  # as run_worker does: its worker is alive

        async def run_beating() -> Any:
            try:
                return await obj.run(second)
            finally:
                beat.stop()

        task = asyncio.create_task(run_beating())
        await asyncio.sleep(1.0)
        assert not task.done(), "the twin must wait while the first trial runs"
        if finish:
            first.set_user_attr("dev_score", 0.5)
            study.tell(first, 0.5)
            hb.stop()
        else:
            hb.stop()  # the worker "dies": no more heartbeats, no tell
        return second, task

    second, task = await twin_of_running_trial(finish=True, top_k=2)
    out = await asyncio.wait_for(task, 30)
    assert out.values == [0.5] and second.user_attrs[ATTR_DUPLICATE] == second.number - 1
    assert ev.evaluations == 0

    second, task = await twin_of_running_trial(finish=False, top_k=3)
    out = await asyncio.wait_for(task, 30)  # grace period 4 s, then the first is failed
    assert study.trials[second.number - 1].state == TrialState.FAIL
    assert ATTR_DUPLICATE not in second.user_attrs and ev.evaluations == 10 and out.values


async def test_the_claim_row_closes_the_race_between_twins_seen_in_the_wrong_order(tmp_path: Path, storage_url: str) -> None:
    """The race the claim row closes: a *later* trial (another worker) started evaluating a graph before the
    earlier trial with the same graph had written its key.  Looking at the trial list, the earlier trial
    sees only a later twin and, by the old rule (wait only for earlier trials), paid again.  With the
    claim row the later trial holds the graph and the earlier one waits and copies its result."""
    from archon_server.search import claims
    from archon_server.search.config import load_search_config
    from archon_server.search.evaluator import Landscape, ScriptedEvaluator
    from archon_server.search.objective import ATTR_DUPLICATE, ArchitectureObjective
    from archon_server.search.runner import open_study
    from archon_server.search.storage import Heartbeat

    cfg = load_search_config(_config(tmp_path))
    study = open_study(cfg, storage=storage_url)
    workers = []  # two "workers": an evaluator each (an evaluator memoises, so one would hide a second evaluation)
    for _ in range(2):
        ev = ScriptedEvaluator(Landscape({m.name: m.score for m in cfg.models}), n_dev=10, step_sleep_s=0.1)
        workers.append(ArchitectureObjective(cfg, ev, [m.name for m in cfg.models], "race"))
        workers[-1].poll_s = 0.1
    params = {"family": "moa", "top_k": 2, "samples": 1, "fusion_layers": 1, "fusers": 1, "ranker": False,
              "critic": False, "final": "none"}
    study.enqueue_trial(params)
    study.enqueue_trial(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        early, late = study.ask(), study.ask()
    with Heartbeat(study._storage, early._trial_id), Heartbeat(study._storage, late._trial_id):
        late_task = asyncio.create_task(workers[0].run(late))
        await asyncio.sleep(0.3)  # the later trial is evaluating; the earlier one has not even sampled yet
        assert not late_task.done()
        early_task = asyncio.create_task(workers[1].run(early))
        late_out = await asyncio.wait_for(late_task, 30)
        study.tell(late, late_out.values)
        early_out = await asyncio.wait_for(early_task, 30)
    assert sum(w.evaluator.evaluations for w in workers) == 10, "the graph was evaluated twice"
    assert early.user_attrs[ATTR_DUPLICATE] == late.number and early_out.values == late_out.values
    engine = claims.storage_engine(study._storage)
    assert claims.holders(engine, study._study_id) == {late.user_attrs[ATTR_KEY]: late.number}


def _check_no_graph_evaluated_twice(url: str, study: optuna.Study) -> None:
    from archon_server.search import claims

    evaluated = [t for t in study.get_trials() if is_evaluated(t)]
    keys = [t.user_attrs[ATTR_KEY] for t in evaluated]
    assert len(keys) == len(set(keys)), "a graph was evaluated twice"
    held = claims.holders(claims.storage_engine(make_storage(url, heartbeat_interval=None)), study._study_id)
    for t in evaluated:  # every evaluation went through the claim
        assert held[t.user_attrs[ATTR_KEY]] == t.number


@pytest.mark.slow
def test_four_workers_on_postgresql_one_killed_mid_trial(tmp_path: Path, postgres_url: str) -> None:
    """Four worker processes on real PostgreSQL, a space small enough that they keep drawing the same graphs,
    one worker SIGKILLed mid-trial: exactly N evaluated trials, no graph evaluated twice, the killed trial
    re-run once with the same parameters."""
    n = 8
    cfg = _config(tmp_path, step_sleep_s=0.12)  # ~1.2 s per trial
    data = yaml.safe_load(cfg.read_text())
    # 2 models x 2 sample counts x 3 finals = 12 graphs: collisions between the 4 workers are the common case.
    data["space"].update({"families": ["self_moa"], "self_moa_model_rank": [0, 1], "final": ["none", "verifier", "vote"]})
    data["study"]["converged_after"] = 200
    cfg.write_text(yaml.safe_dump(data))
    run = lambda idx: subprocess.Popen(  # noqa: E731
        _cmd("run", str(cfg), "--storage", postgres_url, "--n-trials", str(n), "--no-finalize", "--no-export",
             "--worker-index", str(idx)),
        env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = run(0)
    procs = [victim]
    try:
        killed = _wait_running_trial_of(postgres_url, victim.pid, timeout=90, proc=victim)
        procs += [run(i) for i in (1, 2, 3)]
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        assert victim.returncode == -signal.SIGKILL
        for p in procs[1:]:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    study = _load(postgres_url)
    _check_bookkeeping(study, n)
    _check_no_graph_evaluated_twice(postgres_url, study)
    trials = study.get_trials()
    assert trials[killed].state == TrialState.FAIL
    retries = [t for t in trials if retried_from(t) == killed]
    assert len(retries) == 1 and retries[0].params == trials[killed].params
    workers = {t.user_attrs.get(ATTR_WORKER) for t in trials if is_evaluated(t)}
    assert len(workers) >= 3, workers  # the survivors shared the work


@pytest.mark.parametrize("argv", [["search", "run", str(TINY), "--storage", "postgresql://u:secret@127.0.0.1:1/x"],
                                  ["search", "status", "--storage", "postgresql://u:secret@127.0.0.1:1/x"],
                                  ["search", "export", str(TINY), "--storage", "postgresql://u:secret@127.0.0.1:1/x"],
                                  ["bench", "run", str(ROOT / "benchmarks" / "smoke.yaml"), "--store", "postgresql://u:secret@127.0.0.1:1/x"]])
def test_an_unreachable_database_is_one_clear_line_without_the_password(argv: list[str], tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "archon_server", *argv], env=_env(), cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "error: cannot open the database postgresql://u:***@127.0.0.1:1/x" in out.stderr
    assert "secret" not in out.stderr and "Traceback" not in out.stderr


def test_a_worker_whose_running_trial_another_worker_ended_goes_on(tmp_path: Path) -> None:
    """A live worker whose heartbeat lapsed past the grace period (a loaded machine, a slow database) is taken for
    dead: another worker fails its trial and queues the parameters again. The live worker then met the storage's
    UpdateFinishedTrialError when it recorded its outcome and crashed (seen in a CI run under load). It now says so
    and goes on: the trial ended elsewhere is not told again, and the study reaches its target."""
    from types import SimpleNamespace

    from archon_server.search.runner import run_worker

    study = optuna.create_study(study_name="s", storage=make_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_interval=None))
    calls = {"n": 0}

    class Objective:
        config = SimpleNamespace(study=SimpleNamespace(max_attempts_factor=5, max_retry=3, converged_after=100))

        async def run(self, trial: optuna.Trial) -> Any:
            calls["n"] += 1
            if calls["n"] <= 2:  # another worker's reaper ends the trial while it runs here
                study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            if calls["n"] == 1:
                trial.set_user_attr("step", 1)  # the storage refuses it: the objective raises
            return SimpleNamespace(state=TrialState.COMPLETE, values=[0.5])

    stats = asyncio.run(run_worker(study, Objective(), 2))  # type: ignore[arg-type]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert stats.complete == 2 and stats.failed == 0
