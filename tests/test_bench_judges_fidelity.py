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


class Rambler:
    """Streams a verdict then rambles on for thousands of tokens; records how far it got and if it was closed."""

    name = "rambler"
    supports_n = True
    supports_logprobs = False

    def __init__(self, head: str):
        self.head = head
        self.yielded = 0
        self.closed = False

    async def stream(self, request):
        from archon_server.backends.base import StreamChunk

        tokens = [self.head[i:i + 3] for i in range(0, len(self.head), 3)] + [" blah"] * 5000
        try:
            for t in tokens:
                self.yielded += 1
                yield StreamChunk(text=t)
            yield StreamChunk(finish_reason="length")
            yield StreamChunk(usage=jd.Usage(100, len(tokens)))
        finally:
            self.closed = True


async def test_mt_bench_judge_stops_at_its_rating():
    from archon_server.bench import datasets as ds

    item = ds.load_mt_bench()[0]
    up = Rambler("The answer is helpful. [5] is what I'd say... Rating: [[7]] because")
    s = await jd.MTBenchJudge(up, "j").score(item, ["a", "b"], 1)
    assert s.score == 7.0
    assert up.closed and up.yielded < 40  # not the 5000 rambling tokens
    assert "[[7]]" in s.raw and "because" not in s.raw


async def test_arena_judge_stops_at_its_verdict_and_prompts_stay_official():
    from archon_server.bench import datasets as ds

    item = ds.load_arena_hard()[0]
    up = Rambler("My own answer: x = a[b[0]] ... My final verdict is: [[B>A]] and")
    g = await jd.ArenaHardJudge(up, "j").game(item, "answer", True)
    assert g.verdict == "B>A" and up.closed and up.yielded < 40


async def test_a_judge_without_verdict_runs_to_the_end():
    from archon_server.bench import datasets as ds

    up = Rambler("no rating here")
    s = await jd.MTBenchJudge(up, "j").score(ds.load_mt_bench()[0], ["a", "b"], 1)
    assert s.score is None and up.yielded == 5 + 5000


def test_early_stopped_judge_answers_are_cached_and_replayed(tmp_path):
    import asyncio

    from archon_server.backends.base import ChatRequest, SamplingParams
    from archon_server.bench import cache as bc

    store = bc.CacheStore(tmp_path / "c.sqlite")
    req = ChatRequest("j", [{"role": "user", "content": "judge"}], SamplingParams(temperature=0.0))
    first = Rambler("ok [[6]] more")
    with bc.cache_scope("q"):
        r1 = asyncio.run(jd.chat_until(bc.CachingBackend(first, store), req, jd.rating_complete))
    again = Rambler("ok [[9]] different")  # would give another rating if it were asked
    with bc.cache_scope("q"):
        r2 = asyncio.run(jd.chat_until(bc.CachingBackend(again, store), req, jd.rating_complete))
    assert jd.parse_rating(r1.choices[0].text) == jd.parse_rating(r2.choices[0].text) == 6.0
    assert again.yielded == 0

    # a stream closed for another reason (the consumer failed) is not cached
    async def fail_midway():
        async for ch in bc.CachingBackend(Rambler("text [[3]]"), store).stream(ChatRequest("j", [{"role": "user", "content": "other"}])):
            raise RuntimeError("consumer failed")

    import pytest as _pytest

    with _pytest.raises(RuntimeError):
        asyncio.run(fail_midway())
    assert len(store) == 1
