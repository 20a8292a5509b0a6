"""What a researcher meets at the command line: a resumed study refuses a changed config, bad input is one line
naming the config file and field (exit 2, nothing created), Ctrl-C says how to resume, and workers started together on
a fresh PostgreSQL database all open the study."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import yaml

from archon_server.search.config import load_search_config
from archon_server.search.runner import StudyMismatch, open_study
from archon_server.spec import SpecError

from test_search_workers import _cmd, _config, _env, _load, _wait_running_trial_of

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(*args), env=_env(), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def _one_line_error(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert out.returncode == code, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def _edit(path: Path, fn) -> Path:
    data = yaml.safe_load(path.read_text())
    fn(data)
    new = path.with_name("changed-" + path.name)
    new.write_text(yaml.safe_dump(data))
    return new


# -- 1. a resumed study refuses a different config -------------------------------------------------------------------
def test_resuming_with_a_changed_objective_is_refused_naming_what_differs(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    url = f"sqlite:///{tmp_path}/study.db"
    assert _cli("run", str(cfg), "--storage", url, "--n-trials", "3", "--no-finalize", "--no-export", cwd=tmp_path).returncode == 0
    before = len(_load(url).trials)

    changed = _edit(cfg, lambda d: d["objective"].update({"lambda": 0.5}))
    line = _one_line_error(_cli("run", str(changed), "--storage", url, "--n-trials", "6", "--no-finalize", "--no-export",
                                cwd=tmp_path))
    assert str(changed) in line and "objective.lambda" in line and "0.004" in line and "0.5" in line, line
    assert "study name" in line and "storage" in line, line  # how to get out of it
    assert len(_load(url).trials) == before  # nothing ran under the other objective
    assert _load(url).user_attrs["config"]["objective"]["lambda"] == 0.004


def test_run_settings_may_change_on_resume_but_the_search_definition_may_not(tmp_path: Path) -> None:
    cfg = load_search_config(_config(tmp_path))
    url = f"sqlite:///{tmp_path}/study.db"
    open_study(cfg, storage=url)
    # Worker and run settings (target, heartbeats, concurrency, where to export) do not change what a trial's value means.
    same = cfg.model_copy(deep=True)
    same.study.n_trials = 99
    same.study.heartbeat_interval = 5
    same.evaluation.concurrency = 16
    same.export.dir = "elsewhere"
    open_study(same, storage=url)
    for field, edit in [("space.top_k_models.high", lambda c: setattr(c.space.top_k_models, "high", 2)),
                        ("models[0].score", lambda c: setattr(c.models[0], "score", 0.1)),
                        ("evaluation.scripted.n_dev", lambda c: setattr(c.evaluation.scripted, "n_dev", 11))]:
        other = cfg.model_copy(deep=True)
        edit(other)
        with pytest.raises(StudyMismatch) as e:
            open_study(other, storage=url)
        assert field in str(e.value), (field, str(e.value))


def test_a_study_stored_by_an_older_archon_server_is_refused(tmp_path: Path) -> None:
    """Its config is the same, but its dev/test splits and parameters were not: a study stored without today's
    definition version (or with another) is refused in one line, naming the way out."""
    from archon_server.bench.definition import DEFINITION_VERSION

    path = _config(tmp_path)
    cfg = load_search_config(path)
    url = f"sqlite:///{tmp_path}/study.db"
    study = open_study(cfg, storage=url)
    stored = study.user_attrs["config"]
    assert stored["definition_version"] == DEFINITION_VERSION
    open_study(cfg, storage=url)  # the same archon-server resumes it
    study.set_user_attr("config", {**stored, "definition_version": 2})
    open_study(cfg, storage=url)  # version 3 changed only a sweep's params, which a search has none of: resumed
    for old in (None, 1):
        study.set_user_attr("config", {k: v for k, v in stored.items() if k != "definition_version"}
                            | ({} if old is None else {"definition_version": old}))
        with pytest.raises(StudyMismatch) as e:
            open_study(cfg, storage=url)
        [line] = e.value.errors
        assert "older archon-server" in line and f"definition version {old if old is not None else 'none'}" in line, line
        assert "dev/test splits" in line and "new study name" in line, line
    line = _one_line_error(_cli("run", str(path), "--storage", url, "--no-finalize", "--no-export", cwd=tmp_path))
    assert line.startswith(f"{path}: study 'shared'") and "older archon-server" in line, line
    assert _load(url).trials == []  # nothing ran


def test_finalize_of_a_study_without_a_stored_config_skips_the_check_saying_so(tmp_path: Path) -> None:
    from archon_server.search.storage import make_storage

    cfg = _config(tmp_path)
    url = f"sqlite:///{tmp_path}/study.db"
    optuna.create_study(study_name="shared", storage=make_storage(url, heartbeat_interval=None), direction="maximize")
    out = _cli("export", str(cfg), "--storage", url, "--finalize", cwd=tmp_path)
    assert "Traceback" not in out.stderr and "KeyError" not in out.stderr, out.stderr[-3000:]
    assert "has no stored search config: not compared" in out.stderr, out.stderr
    assert "no complete trial" in out.stderr  # then it goes on as for any study without trials


def test_a_storage_without_studies_says_so(tmp_path: Path) -> None:
    from archon_server.search.storage import StudyNotFound, make_storage, open_existing_study

    url = f"sqlite:///{tmp_path}/empty.db"
    make_storage(url, heartbeat_interval=None)  # Optuna's tables, no study
    for name in (None, "shared"):
        with pytest.raises(StudyNotFound) as e:
            open_existing_study(url, name)
        [line] = e.value.errors
        assert "several" not in line and "(it holds none)" in line and "--storage" in line, line
        assert (f"no study {name!r} in this storage" if name else "no study in this storage") in line, line
    for n in ("a", "b"):
        optuna.create_study(study_name=n, storage=make_storage(url, heartbeat_interval=None))
    with pytest.raises(StudyNotFound) as e:
        open_existing_study(url, None)
    assert e.value.errors == ["several studies in this storage ('a', 'b'); pass --study to name one"]


# -- 2. workers started together on a fresh PostgreSQL database ------------------------------------------------------
def test_workers_opening_a_fresh_postgresql_study_together_all_succeed(tmp_path: Path, postgres_url: str) -> None:
    cfg = load_search_config(_config(tmp_path))
    n = 4
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            open_study(cfg, storage=postgres_url)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, [repr(e) for e in errors]
    assert optuna.get_all_study_names(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)) == ["shared"]


# -- 3. bad input: one line naming the file and the field, exit 2, nothing created ------------------------------------
def _bench_config(tmp_path: Path, **evaluation) -> Path:
    (tmp_path / "cfg").mkdir(exist_ok=True)
    (tmp_path / "cfg" / "pool.yaml").write_text(yaml.safe_dump({"backends": [
        {"alias": "default", "kind": "openai", "model": "m", "urls": ["http://127.0.0.1:18599/v1"],
         "aliases": ["proposer-1", "proposer-2"]}]}))
    data = {"study": {"name": "badin", "n_trials": 2},
            "evaluation": {"evaluator": "bench", "dataset": "math500", "backends": "pool.yaml", **evaluation},
            "models": [{"name": "proposer-1"}, {"name": "proposer-2"}],
            "space": {"top_k_models": [1, 2]}}
    path = tmp_path / "cfg" / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_evaluation_backends_is_resolved_against_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from archon_server.search.bench_eval import check_bench_config

    cfg = load_search_config(_bench_config(tmp_path))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert check_bench_config(cfg) == tmp_path / "cfg" / "pool.yaml"


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["evaluation"].update({"dataset": "math5000"}), "evaluation.dataset"),
    (lambda d: d["models"].__setitem__(0, {"name": "propser-1"}), "models[0].name"),
    (lambda d: d["evaluation"].update({"backends": "missing.yaml"}), "evaluation.backends"),
    (lambda d: d["evaluation"].update({"judge": "jduge"}), "evaluation.judge"),
])
def test_a_bad_bench_config_is_one_line_naming_file_and_field(tmp_path: Path, edit, field: str) -> None:
    cfg = _edit(_bench_config(tmp_path), edit)
    line = _one_line_error(_cli("run", str(cfg), cwd=tmp_path))
    assert str(cfg) in line and field in line, line
    assert not (tmp_path / "runs").exists()  # no study, no cache


@pytest.mark.parametrize("command", ["status", "export"])
def test_status_or_export_of_a_missing_study_is_one_line_and_creates_nothing(tmp_path: Path, command: str) -> None:
    cfg = _config(tmp_path)  # study "shared", default storage runs/search/shared.db (relative to the cwd)
    line = _one_line_error(_cli(command, str(cfg), cwd=tmp_path))
    assert "shared" in line, line
    assert not (tmp_path / "runs").exists()
    url = f"sqlite:///{tmp_path}/study.db"
    open_study(load_search_config(cfg), storage=url)
    line = _one_line_error(_cli(command, "--storage", url, "--study", "other", cwd=tmp_path))
    assert "other" in line and "shared" in line, line  # names the studies there are


def test_a_spec_error_from_the_standalone_entry_point_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: {name: x}\nmodels: []\n")
    line = _one_line_error(_cli("status", str(bad), cwd=tmp_path))
    assert str(bad) in line and "models" in line, line
    with pytest.raises(SpecError):
        load_search_config(bad)


# -- 4. Ctrl-C ------------------------------------------------------------------------------------------------------------
def test_ctrl_c_during_run_is_one_line_saying_how_to_resume(tmp_path: Path) -> None:
    cfg = _config(tmp_path, step_sleep_s=0.3)
    url = f"sqlite:///{tmp_path}/shared.db"
    # A shell's background job ignores SIGINT, and a process inherits that (a CI replica started with `&` saw the run
    # go on to the end, exit 0); a terminal's Ctrl-C reaches a process that does not: as test_bench_cli does.
    proc = subprocess.Popen(_cmd("run", str(cfg), "--storage", url, "--n-trials", "5", "--no-finalize", "--no-export"),
                            env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        interrupted = _wait_running_trial_of(url, proc.pid, timeout=90, proc=proc)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Progress lines of the trials finished before (on stderr too), then the interrupt: one line.
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert all(ln.startswith("trial ") for ln in lines[:-1]), err
    line = _one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, lines[-1] if lines else ""), code=130)
    assert "shared" in line and "resume" in line and str(cfg) in line, line
    trials = _load(url).trials
    assert trials[interrupted].state == optuna.trial.TrialState.FAIL
    assert any(t.state == optuna.trial.TrialState.WAITING and t.params == trials[interrupted].params for t in trials)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_changed_study_n_trials_sets_the_target_on_resume(tmp_path: Path) -> None:
    """A user who raises study.n_trials in the config and runs again gets more trials (it was ignored once a target
    was stored); a target set by --n-trials stays for runs whose config did not change."""
    import asyncio

    from archon_server.search.runner import STUDY_TARGET, progress, run_search

    path = _config(tmp_path)
    url = f"sqlite:///{tmp_path}/study.db"

    def run(n_cfg: int, n_trials: int | None = None) -> tuple[int, int]:
        cfg = load_search_config(path)
        cfg.study.n_trials = n_cfg
        res = asyncio.run(run_search(cfg, storage=url, n_trials=n_trials, do_finalize=False))
        return progress(res.study).evaluated, res.study.user_attrs[STUDY_TARGET]

    assert run(2) == (2, 2)
    assert run(2) == (2, 2)  # resumed, nothing to do
    assert run(4) == (4, 4)  # the config asks for more: more
    assert run(4, n_trials=6) == (6, 6)
    assert run(4) == (6, 6)  # the config did not change: --n-trials' target stays
    assert run(5) == (6, 5)  # it changed again: its value is the target (already reached)


# -- 5. progress and stale trials --------------------------------------------------------------------------------------
def _unscored(tmp_path: Path, **study) -> Path:
    """The scripted config with a pool to rank (no model scores) and baselines to finalize."""
    path = _config(tmp_path)
    data = yaml.safe_load(path.read_text())
    for m in data["models"]:
        m.pop("score", None)
    data["study"].update(study)
    data["evaluation"]["baselines"] = True
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_shows_the_phases_and_each_finished_trial_on_stderr_unless_quiet(tmp_path: Path) -> None:
    """Ranking the pool and finalizing were minutes without a word: each phase says it starts, each trial says what
    it gave, the best so far and how many of the target are evaluated; stdout keeps the JSON summary alone."""
    cfg = _unscored(tmp_path)
    url = f"sqlite:///{tmp_path}/study.db"
    out = _cli("run", str(cfg), "--storage", url, "--n-trials", "3", "--no-export", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["evaluated"] == 3  # stdout: the summary only
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("ranking the model pool: 3 of 3 models scored alone on the dev split"), lines
    assert [ln.split(":")[0].strip() for ln in lines[1:4]] == ["model-a", "model-b", "model-c"], lines
    trials = [ln for ln in lines if ln.startswith("trial ")]
    assert trials and trials[-1].endswith("; 3 of 3 evaluated"), trials
    for ln in trials:
        assert re.match(r"trial \d+( in \d+ s)?: .*; (best -?\d\.\d{4} \(trial \d+\)|no complete trial yet); \d of 3 evaluated$", ln), ln
    fin = lines.index(next(ln for ln in lines if ln.startswith("finalizing: ")))
    assert fin > lines.index(trials[-1]) and "baseline(s) on dev and test" in lines[fin], lines
    assert any(ln.strip().startswith("baseline moa: dev ") for ln in lines[fin:]), lines

    url2 = f"sqlite:///{tmp_path}/quiet.db"
    for flag in ("--no-progress", "--quiet"):
        quiet = _cli("run", str(cfg), "--storage", url2, "--n-trials", "2", "--no-export", flag, cwd=tmp_path)
        assert quiet.returncode == 0 and quiet.stderr.strip() == "", quiet.stderr


def _dead_worker_trial(url: str, cfg: Path) -> int:
    """A trial a worker started (params drawn, heartbeat recorded) and then died on: its heartbeat is 60 s old."""
    import sqlalchemy as sa

    from archon_server.search.objective import ATTR_WORKER

    study = open_study(load_search_config(cfg), storage=url)
    trial = study.ask({"family": optuna.distributions.CategoricalDistribution(["moa", "self_moa"])})
    trial.set_user_attr(ATTR_WORKER, "gone:1")
    study._storage.record_heartbeat(trial._trial_id)
    engine = sa.create_engine(url)
    with engine.begin() as con:  # as if 60 s had passed since (the database's clock is what counts)
        con.execute(sa.text("UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-60 seconds')"))
    engine.dispose()
    return trial.number


def test_status_shows_a_dead_workers_trial_as_stale_with_its_heartbeat_age(tmp_path: Path) -> None:
    """It showed "running": 1 until a worker reaped it; a heartbeat past the grace period is a dead worker's."""
    cfg = _unscored(tmp_path, heartbeat_interval=5, grace_period=30)
    url = f"sqlite:///{tmp_path}/study.db"
    study = open_study(load_search_config(cfg), storage=url)
    live = study.ask()
    study._storage.record_heartbeat(live._trial_id)
    st = json.loads(_cli("status", "--storage", url, cwd=tmp_path).stdout)
    assert st["running"] == 1 and st["stale"] == 0 and st["running_trials"][0]["trial"] == live.number, st
    study.tell(live, state=optuna.trial.TrialState.FAIL)

    dead = _dead_worker_trial(url, cfg)
    for args in (["--storage", url], [str(cfg), "--storage", url]):  # the study's stored grace period, or the config's
        st = json.loads(_cli("status", *args, cwd=tmp_path).stdout)
        assert st["running"] == 0 and st["stale"] == 1, st
        [row] = st["stale_trials"]
        assert row["trial"] == dead and row["heartbeat_age_s"] >= 59 and row["worker"] == "gone:1", st
        assert st["grace_period_s"] == 30, st


def test_a_resumed_run_says_what_it_resumes_and_retries_the_dead_workers_trial(tmp_path: Path) -> None:
    cfg = _unscored(tmp_path, heartbeat_interval=5, grace_period=30)
    url = f"sqlite:///{tmp_path}/study.db"
    dead = _dead_worker_trial(url, cfg)
    out = _cli("run", str(cfg), "--storage", url, "--n-trials", "2", "--no-finalize", "--no-export", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert re.fullmatch(rf"resuming study 'shared': 0 of 2 evaluated; trial {dead} of a dead worker \(heartbeat \d+ s old\) "
                        r"will be retried", lines[0]), lines
    assert any(re.match(rf"trial \d+ \(retry of trial {dead}, whose worker died\)", ln) for ln in lines), lines
    st = json.loads(_cli("status", "--storage", url, cwd=tmp_path).stdout)
    assert st["evaluated"] == 2 and st["running"] == 0 and st["stale"] == 0, st
