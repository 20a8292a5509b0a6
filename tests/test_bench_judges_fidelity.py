"""Judged benchmarks against their reference implementations (issue #17 items 6, 7).

Arena-Hard: the judge prompt, template, regex and sampling settings are held against the
official ``config/judge_config.yaml`` (verbatim copy in tests/data); the verdict parsing against
upstream's ``get_score`` + battle weighting rules; the CI is a bootstrap over battle rows.
MT-Bench: the overall score is the mean over all valid turn scores, ``[[08]]`` is invalid as
FastChat's ``ast.literal_eval`` makes it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from archon_server.bench import judges as jd
from archon_server.bench import report

OFFICIAL = yaml.safe_load((Path(__file__).parent / "data" / "arena_hard_judge_config.yaml").read_text())


def test_arena_prompt_is_the_official_one_verbatim():
    assert jd.ARENA_SYSTEM == OFFICIAL["system_prompt"]
    ours = jd.ARENA_TEMPLATE.replace("{question}", "{question_1}").replace("{answer_a}", "{answer_1}").replace("{answer_b}", "{answer_2}")
    assert [ours] == OFFICIAL["prompt_template"]
    assert jd._VERDICT.pattern == OFFICIAL["regex_pattern"]
    assert jd.ArenaHardJudge(None, "j").max_tokens == OFFICIAL["max_tokens"]  # type: ignore[arg-type]


def _upstream_label(judgment: str) -> str | None:
    """Arena-Hard v0.1 get_score (pairwise) followed by show_result's label table (others: weight 0)."""
    pattern = re.compile(OFFICIAL["regex_pattern"])
    matches = [m for m in pattern.findall(judgment) if m != ""]
    if len(set(matches)) != 1:
        return None
    label = matches[0].strip("\n")
    return label if label in ("A=B", "A>B", "A>>B", "B>A", "B>>A") else None


@pytest.mark.parametrize("text", [
    "My final verdict is tie: [[A=B]]", "[[A>>B]]", "x [[B>A]] y [[B>A]]", "[[A>B]] then [[B>A]]",
    "[[A<B]]", "[[B<<A]]", "[[]]", "[[AB]]", "no verdict", "[[A>B]] [[A>B]] [[A=B]]", "[[ A>B ]]", "[[B>>A]]\n",
])
def test_arena_verdict_parsing_matches_upstream(text):
    assert jd.parse_verdict(text) == _upstream_label(text)


def test_arena_bootstrap_resamples_battles_like_upstream():
    # 10 questions: model wins strongly 4, wins 2, ties 2, loses 2 (each game one verdict)
    verdicts = ["A>>B"] * 4 + ["A>B"] * 2 + ["A=B"] * 2 + ["B>A"] * 2
    games = [jd.ArenaGame(str(i), True, v) for i, v in enumerate(verdicts)]
    battles = jd.arena_battles(games)
    assert len(battles) == 4 * 3 + 6  # decisive verdicts count three times
    wr = jd.arena_win_rate(games, n_boot=100, seed=7)
    assert wr["win_rate"] == pytest.approx(100 * (12 + 2 + 1) / 18)
    rng = np.random.default_rng(7)
    boots = battles[rng.integers(0, len(battles), size=(100, len(battles)))].mean(axis=1) * 100
    assert (wr["ci_low"], wr["ci_high"]) == pytest.approx(tuple(np.quantile(boots, [0.025, 0.975])))
    assert wr["n_battles"] == 18 and wr["n_games"] == 10


def _fastchat_rating(judgment: str) -> float:
    """FastChat run_judge_single: [[x]] else [x], ast.literal_eval; -1 when absent (and, here, when it raises)."""
    m = re.search(r"\[\[(\d+\.?\d*)\]\]", judgment) or re.search(r"\[(\d+\.?\d*)\]", judgment)
    if not m:
        return -1
    try:
        return ast.literal_eval(m.groups()[0])
    except SyntaxError:  # FastChat's judging thread dies here; the rating never reaches show_result
        return -1


@pytest.mark.parametrize("text", ["Rating: [[8]]", "[[8.5]]", "[[08]]", "[[10]]", "[7] and [[3]]", "[[8.]]", "none", "[[0]]", "[[007.5]]"])
def test_mt_bench_rating_parses_as_fastchat(text):
    want = _fastchat_rating(text)
    assert jd.parse_rating(text) == (None if want == -1 else want)


def test_mt_bench_overall_is_the_mean_over_valid_turn_scores():
    # question 1: turns 10 and (unparsed); question 2: 2 and 4.  FastChat: (10 + 2 + 4) / 3, not mean(10, 3).
    recs = [{"arch": "a", "benchmark": "mt_bench", "id": "81", "score": 10.0, "turn_scores": [10.0, None]},
            {"arch": "a", "benchmark": "mt_bench", "id": "82", "score": 3.0, "turn_scores": [2.0, 4.0]}]
    row = report.aggregate(recs)[0]
    assert row.score == pytest.approx(16 / 3)
    assert row.notes["turn1"] == 6.0 and row.notes["turn2"] == 4.0
    scores = [jd.MTBenchScore("81", 1, 10.0, "single-v1"), jd.MTBenchScore("81", 2, None, "single-v1-multi-turn"),
              jd.MTBenchScore("82", 1, 2.0, "single-v1"), jd.MTBenchScore("82", 2, 4.0, "single-v1-multi-turn")]
    assert jd.mt_bench_summary(scores)["overall"] == pytest.approx(16 / 3)
