"""A resumed seeded search continues instead of replaying its first proposals; ``search status`` tells final failures
from trials whose worker died and that were retried."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from archon_server.search.config import load_search_config
from archon_server.search.objective import ATTR_DUPLICATE, ATTR_KEY
from archon_server.search.runner import run_search
from archon_server.search.samplers import sampler_seed

from test_search_workers import _cmd, _config, _env, _load

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
