"""Judges over scripted backends: label/position handling, parsing, win rates, the null-model guard."""

from __future__ import annotations

import math
import re

import pytest

from archon_server.backends.base import Backend, ChatRequest, ChatResult, Choice, TokenLogprob, Usage
from archon_server.bench import alpaca_eval as ae
from archon_server.bench import datasets as ds
from archon_server.bench import judges as jd


class ScriptedJudge(Backend):
    """Replies by a Python function of the last user message; optional first-token logprobs."""

    def __init__(self, fn, logprobs: bool = True):
        self.fn = fn
        self.with_logprobs = logprobs
        self.requests: list[ChatRequest] = []

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.requests.append(request)
        out = self.fn(request.messages[-1]["content"])
        if isinstance(out, dict):  # {label: prob}
            text = max(out, key=out.get)
            lp = [TokenLogprob(text, math.log(out[text]), [(k, math.log(v)) for k, v in out.items()])] if self.with_logprobs else None
            return ChatResult([Choice(text, logprobs=lp)], Usage(100, 1))
        return ChatResult([Choice(out)], Usage(100, 20))


def _alpaca_outputs(prompt: str) -> tuple[str, str]:
    outs = re.findall(r'"output": """(.*?)"""', prompt, re.DOTALL)
    return outs[0], outs[1]


def quality_judge(prompt: str) -> dict[str, float]:
    """Prefers the output containing GOOD with probability 0.8, whatever its position."""
    m, M = _alpaca_outputs(prompt)
    p_M = 0.8 if "GOOD" in M else 0.2 if "GOOD" in m else 0.5
    return {"M": p_M, "m": 1 - p_M, "The": 1e-4}


async def test_alpaca_judge_weighted_preference_and_position_randomisation():
    judge = jd.AlpacaJudge(ScriptedJudge(quality_judge), "judge-model", seed=1)
    items = ds.load_alpaca_eval()[:40]
    res = [await judge.judge(it.prompt, it.reference, "GOOD answer") for it in items]
    assert {r.swapped for r in res} == {True, False}  # both positions used
    assert all(r.method == "logprobs" for r in res)
    # normalised over the two labels only: 0.8 / (0.8 + 0.2)
    assert all(r.preference == pytest.approx(1.8) for r in res)
    worse = [await judge.judge(it.prompt, "GOOD baseline", "meh") for it in items]
    assert all(r.preference == pytest.approx(1.2) for r in worse)
    # the seeded coin is reproducible
    again = [await jd.AlpacaJudge(ScriptedJudge(quality_judge), "x", seed=1).judge(it.prompt, it.reference, "y") for it in items]
    assert [r.swapped for r in again] == [r.swapped for r in res]


async def test_alpaca_judge_text_fallback_is_recorded():
    judge = jd.AlpacaJudge(ScriptedJudge(quality_judge, logprobs=False), "j", seed=0)
    r = await judge.judge("Say hi", "hello", "GOOD hi")
    assert r.method == "text" and r.preference == 2.0
    junk = jd.AlpacaJudge(ScriptedJudge(lambda p: "I cannot decide"), "j")
    r = await junk.judge("Say hi", "hello", "hi")
    assert r.method == "unparsed" and r.preference == 1.5


async def test_null_model_is_caught_by_a_sound_judge():
    # A judge that looks at substance (here: overlap with the baseline's length class) gives a
    # constant refusal a low win rate, raw and length-controlled.
    def sound(prompt: str) -> dict[str, float]:
        m, M = _alpaca_outputs(prompt)
        null_is_M = M == jd.NULL_OUTPUT
        null_is_m = m == jd.NULL_OUTPUT
        p_M = 0.05 if null_is_M else 0.95 if null_is_m else 0.5
        return {"M": p_M, "m": 1 - p_M}

    items = ds.load_alpaca_eval()[:60]
    judge = jd.AlpacaJudge(ScriptedJudge(sound), "j", seed=0)
    outs = jd.null_model_outputs(items)
    res = [await judge.judge(it.prompt, it.reference, o) for it, o in zip(items, outs)]
    assert ae.win_rate(r.preference for r in res).win_rate < 10


async def test_mt_bench_prompts_reference_and_turns():
    judge = jd.MTBenchJudge(ScriptedJudge(lambda p: "Fine answer. Rating: [[7]]"), "j")
    items = {it.meta["category"]: it for it in ds.load_mt_bench()}
    math_item, writing = items["math"], items["writing"]
    name1, msgs1 = judge.build(math_item, ["a1", "a2"], 1)
    name2, msgs2 = judge.build(writing, ["a1", "a2"], 2)
    assert name1 == "single-math-v1" and math_item.reference[0] in msgs1[1]["content"]
    assert name2 == "single-v1-multi-turn" and writing.turns[1] in msgs2[1]["content"]
    scores = await judge.score_both(math_item, ["a1", "a2"]) + await judge.score_both(writing, ["b1", "b2"])
    summary = jd.mt_bench_summary(scores)
    assert summary == {"turn1": 7.0, "turn2": 7.0, "overall": 7.0, "n_unparsed": 0}


def test_parse_rating():
    assert jd.parse_rating("Rating: [[8.5]]") == 8.5
    assert jd.parse_rating("score [6]") == 6
    assert jd.parse_rating("no score") is None


def test_parse_verdict():
    assert jd.parse_verdict("... My final verdict is: [[B>>A]]") == "B>>A"
    assert jd.parse_verdict("[[A=B]] but later [[A>B]]") is None
    assert jd.parse_verdict("nothing") is None


async def test_arena_both_orders_cancel_position_bias():
    items = ds.load_arena_hard()[:30]
    always_a = ScriptedJudge(lambda p: "Verdict: [[A>B]]")
    judge = jd.ArenaHardJudge(always_a, "j")
    games = [g for it in items for g in await judge.both_orders(it, "answer")]
    assert len(always_a.requests) == 60
    wr = jd.arena_win_rate(games)
    assert wr["win_rate"] == pytest.approx(50.0)

    def prefers_model(p: str) -> str:
        a = p.split("<|The Start of Assistant A's Answer|>")[1].split("<|The End")[0]
        return "[[A>>B]]" if "MODEL" in a else "[[B>A]]"

    games = [g for it in items for g in await jd.ArenaHardJudge(ScriptedJudge(prefers_model), "j").both_orders(it, "MODEL says")]
    wr = jd.arena_win_rate(games)
    assert wr["win_rate"] == pytest.approx(100.0)
    mixed = games[:30] + [jd.ArenaGame(g.question_id, g.model_first, "A=B") for g in games[30:]]
    wr = jd.arena_win_rate(mixed, n_boot=500)
    assert wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"]
    assert wr["ci_low"] < wr["ci_high"]
