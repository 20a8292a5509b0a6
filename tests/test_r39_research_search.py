"""A researcher's walk through README's `archon search` section (round 39): what it found.

* ``archon search run ... --workers 0`` (or ``-1``) ran one worker as if nothing were wrong; ``--n-trials 0`` was
  already refused: ``--workers`` now is too, by argparse, creating nothing.
* A study whose space holds fewer distinct graphs than its target (the shipped ``embedded-smoke.yaml`` copied with
  ``n_trials: 6``) stopped at its attempts limit saying ``space mostly rejected by rules/budget?`` while nothing was
  rejected: every extra attempt was a duplicate. The line now counts duplicates, rejections and failures and says
  what to change (and, when most trials failed, where their errors are).
* A `space.temperatures` outside the API's [0, 2] was accepted: every trial failed on it (600 failures stored); a
  whole-config rule read `<root>: space.top_k_models.low ...`. Both are one line naming the field now.
* A resume past its target (`--n-trials` lowered) read `3 of 2 evaluated` and nothing more: it says the target is reached.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search" / "tiny-scripted.yaml"


def _archon(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # this checkout's
    return subprocess.run([sys.executable, "-m", "archon_server", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_below_one_is_refused_and_creates_nothing(tmp_path: Path, workers: str) -> None:
    db = tmp_path / "s.db"
    out = _archon("search", "run", str(TINY), "--storage", f"sqlite:///{db}", "--workers", workers, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"archon search run: error: argument --workers: {workers}: must be 1 or more"
    assert not db.exists() and list(tmp_path.iterdir()) == []


def test_a_space_smaller_than_the_target_stops_saying_so(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["study"].update(n_trials=5, max_attempts_factor=2, sampler={"type": "random", "seed": 0})
    data["evaluation"].update(stages=[], test_top=1, baselines=False)
    data["space"] = {"families": ["self_moa"], "temperatures": [0.7], "fusion_layers": 0, "critic": [False],
                     "ranker": [False], "final": ["none", "vote"], "self_moa_model_rank": 0,
                     "self_moa_samples": {"low": 4, "high": 4}}  # two distinct graphs
    cfg = tmp_path / "few.yaml"
    cfg.write_text(yaml.safe_dump(data))
    out = _archon("search", "run", str(cfg), "--storage", f"sqlite:///{tmp_path}/few.db", "--no-export", "--no-finalize",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    [stop] = [ln for ln in out.stderr.splitlines() if "stopping:" in ln]
    assert stop.endswith(
        "stopping: 10 attempts, the study's limit (10: study.max_attempts_factor x the target of 5), for 2 evaluated "
        "trials: 8 duplicates of evaluated graphs, 0 rejected by rules/budget, 0 failed; the space may hold fewer "
        "distinct architectures than the target: widen `space`, or lower the target (`study.n_trials`, `--n-trials`)"), stop


def test_workers_of_a_fresh_study_do_not_say_resuming_and_a_resume_says_it_once(tmp_path: Path) -> None:
    """`search run --workers 2` on a new study printed `resuming study 'x': 0 of N evaluated; trial 0 is running ...`
    (the second worker saw the first one's trial); on a real resume each worker said it, twice in all."""
    data = yaml.safe_load(TINY.read_text())
    data["study"].update(name="two", n_trials=4, heartbeat_interval=1, grace_period=4, sampler={"type": "random", "seed": 0})
    data["evaluation"].update(stages=[], test_top=1, baselines=False)
    data["evaluation"]["scripted"].update(n_dev=10, step_sleep_s=0.05)  # each trial runs a moment: the two overlap
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp_path}/two.db"
    fresh = _archon("search", "run", str(cfg), "--storage", url, "--workers", "2", "--no-export", "--no-finalize",
                    cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "resuming" not in fresh.stderr, fresh.stderr
    assert any(ln.endswith("of 4 evaluated") for ln in fresh.stderr.splitlines()), fresh.stderr
    again = _archon("search", "run", str(cfg), "--storage", url, "--workers", "2", "--n-trials", "6", "--no-export",
                    "--no-finalize", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = [ln for ln in again.stderr.splitlines() if "resuming" in ln]
    assert resumed == ["resuming study 'two': 4 of 6 evaluated"], again.stderr


@pytest.mark.parametrize("edit, line", [
    # each of the 600 trials failed on its architecture's temperature, and the study kept them
    (lambda d: d["space"].update(temperatures=[-0.5]), "space.temperatures[0]: Input should be greater than or equal to 0"),
    (lambda d: d["space"].update(temperatures=[0.7, 2.5]), "space.temperatures[1]: Input should be less than or equal to 2"),
    # a whole-config rule read `<root>: space.top_k_models.low must be >= 1`
    (lambda d: d["space"].update(top_k_models=[0, 3]), "space.top_k_models.low must be >= 1"),
    (lambda d: d["models"].append(dict(d["models"][0])), "models: duplicate names"),
])
def test_a_bad_search_space_is_one_line_naming_the_field(tmp_path: Path, edit, line: str) -> None:
    data = yaml.safe_load(TINY.read_text())
    edit(data)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(data))
    db = tmp_path / "bad.db"
    out = _archon("search", "run", str(cfg), "--storage", f"sqlite:///{db}", "--no-export", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.splitlines() == [f"{cfg}: {line}"], out.stderr[-3000:]
    assert not db.exists()


def test_attempts_used_up_by_failures_say_where_the_errors_are() -> None:
    from archon_server.search.runner import Progress, attempts_used_up

    line = attempts_used_up(Progress(evaluated=0, failed=600, attempts=600), 600, 60)
    assert line.endswith("for 0 evaluated trials: 0 duplicates of evaluated graphs, 0 rejected by rules/budget, 600 "
                         "failed; most trials failed: `archon search status` lists why (failed_trials)"), line
    rejected = attempts_used_up(Progress(evaluated=3, rejected=50, duplicates=7, attempts=60), 60, 6)
    assert rejected.endswith("most proposals break the space's rules or the budget: narrow `space` or raise `budget`")


def test_a_resume_past_its_target_says_the_target_is_reached(tmp_path: Path) -> None:
    """`--n-trials` lowered below what the study holds read `resuming study 'x': 3 of 2 evaluated`, nothing more."""
    data = yaml.safe_load(TINY.read_text())
    data["study"].update(name="low", n_trials=3, sampler={"type": "random", "seed": 0})
    data["evaluation"].update(stages=[], test_top=1, baselines=False)
    cfg = tmp_path / "low.yaml"
    cfg.write_text(yaml.safe_dump(data))
    url = f"sqlite:///{tmp_path}/low.db"
    first = _archon("search", "run", str(cfg), "--storage", url, "--no-export", "--no-finalize", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = _archon("search", "run", str(cfg), "--storage", url, "--n-trials", "2", "--no-export", "--no-finalize",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [ln for ln in again.stderr.splitlines() if "resuming" in ln] == [
        "resuming study 'low': 3 of 2 evaluated (the target is reached: no new trial)"], again.stderr
    assert not any(ln.startswith("trial ") for ln in again.stderr.splitlines()), again.stderr
