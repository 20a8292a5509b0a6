"""The scorer component's math and plumbing.

Bradley-Terry against hand-worked examples; the pairwise judge's position swap with scripted judges whose
bias is known (a judge that always answers "a" must come out indifferent); density-ratio arithmetic, top_k and
the trace.  The same component on the real embedded model is in tests/test_scorer_e2e.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from archon_server.backends.base import (
    Backend,
    ChatRequest,
    ChatResult,
    NextTokenRequest,
    NextTokenResult,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
    ScoringUnsupported,
    SequenceScore,
    Usage,
)
from archon_server.backends.registry import BackendRegistry
from archon_server.components import FinalOverrides
from archon_server.components.scoring_math import (
    bradley_terry,
    expected_rating,
    preference,
    swapped_preference,
)
from archon_server.components.state import Candidate
from archon_server.graph.runtime import GraphError, GraphRuntime
from archon_server.spec import SpecError, parse_architecture

# ---------------------------------------------------------------------------- Bradley-Terry by hand


def test_bradley_terry_two_players_three_to_one():
    # A beat B 3 times of 4: the MLE is p_A / p_B = 3 (W_A = 4 p_A / (p_A + p_B) => 3 = 4 * 3/4).
    s = bradley_terry(2, [(0, 1, 1.0), (0, 1, 1.0), (0, 1, 1.0), (0, 1, 0.0)])
    assert s[0] - s[1] == pytest.approx(math.log(3), abs=1e-6)
    assert s[0] + s[1] == pytest.approx(0.0, abs=1e-9)


def test_bradley_terry_recovers_strengths_from_their_expected_results():
    # Strengths 4 : 2 : 1. Soft results equal to the model's own win probabilities (A-B 4/6, A-C 4/5, B-C 2/3)
    # satisfy the likelihood equations exactly, so the fit must return log 4, log 2, log 1 (centred).
    s = bradley_terry(3, [(0, 1, 4 / 6), (0, 2, 4 / 5), (1, 2, 2 / 3)])
    assert s[0] - s[1] == pytest.approx(math.log(2), abs=1e-6)
    assert s[1] - s[2] == pytest.approx(math.log(2), abs=1e-6)
    # Order of the pair does not matter: (j, i, 1 - w) is the same result.
    s2 = bradley_terry(3, [(1, 0, 2 / 6), (2, 0, 1 / 5), (2, 1, 1 / 3)])
    assert s2 == pytest.approx(s, abs=1e-6)


def test_bradley_terry_prior_keeps_an_unbeaten_player_finite():
    s = bradley_terry(3, [(0, 1, 1.0), (0, 2, 1.0), (1, 2, 1.0)], prior=0.5)
    assert all(math.isfinite(x) for x in s) and s[0] > s[1] > s[2]


def test_preferences_and_ratings():
    assert preference(0.3, 0.1) == pytest.approx(0.75)
    assert preference(0.0, 0.0) == 0.5
    # Position bias alone (always "a", whatever is shown) cancels out under the swap.
    assert swapped_preference((0.9, 0.1), (0.9, 0.1)) == pytest.approx(0.5)
    # Real preference survives it: x wins when shown first and when shown second.
    assert swapped_preference((0.8, 0.2), (0.3, 0.7)) == pytest.approx(0.75)
    assert expected_rating([("8", math.log(0.5)), (" 6", math.log(0.25)), ("x", math.log(0.25))]) == pytest.approx((8 * 0.5 + 6 * 0.25) / 0.75)
    assert expected_rating([("x", 0.0)]) is None


# ---------------------------------------------------------------------------- scripted backends


class ScriptedScorer(Backend):
    """Judges and scorers whose answers are a known function of the prompt (for the plumbing, not the model)."""

    supports_scoring = True
    supports_reward = True

    def __init__(self, name: str, *, judge: str = "quality", logp: dict[str, float] | None = None, rewards: dict[str, float] | None = None):
        self.name = name
        self.judge = judge
        self.logp = logp or {}
        self.rewards = rewards or {}
        self.prompts: list[str] = []

    async def chat(self, request: ChatRequest) -> ChatResult:
        raise AssertionError("scorers must not generate")

    async def score(self, request: ScoreRequest) -> ScoreResult:
        sys = request.messages[0]["content"] if request.messages and request.messages[0]["role"] == "system" else ""
        self.prompts.append(sys)
        out = [SequenceScore(self.logp[c], [self.logp[c] / len(c.split())] * len(c.split()), c.split()) for c in request.continuations]
        return ScoreResult(out, Usage(prompt_tokens=10))

    async def next_token_logprobs(self, request: NextTokenRequest) -> NextTokenResult:
        prompt = request.messages[0]["content"]
        self.prompts.append(prompt)
        if self.judge == "always_a":
            return NextTokenResult([("a", math.log(0.9)), ("b", math.log(0.1))])
        if self.judge == "rating":
            n = prompt.count("good")
            return NextTokenResult([(str(min(10, 2 + 3 * n)), math.log(0.8)), ("1", math.log(0.2))])
        # quality: prefers the output with more "good" in it, wherever it is shown
        a = prompt.split("# Output (a):")[1].split("# Output (b):")[0]
        b = prompt.split("# Output (b):")[1]
        pa = 0.5 + 0.1 * (a.count("good") - b.count("good"))
        return NextTokenResult([("a", math.log(max(pa, 1e-6))), ("b", math.log(max(1 - pa, 1e-6)))], Usage(prompt_tokens=50))

    async def reward(self, request: RewardRequest) -> RewardResult:
        return RewardResult([self.rewards[r] for r in request.responses])


class Runtime(GraphRuntime):
    async def run(self, spec, messages, **kw):  # type: ignore[no-untyped-def, override]
        # Every candidate the scorer kept, not only the final one (n = its top_k).
        return await super().run(spec, messages, final=FinalOverrides(n=spec.layers[-1][0].top_k), **kw)


def runtime(*backends: Backend) -> GraphRuntime:
    reg = BackendRegistry()
    for b in backends:
        reg.register(b.name, b, getattr(b, "model", "") or b.name)
    return Runtime(reg)


class Fixed(Backend):
    """A generator that returns fixed candidates (one n=k request)."""

    name = "gen"

    def __init__(self, texts: list[str]):
        self.texts = texts

    async def chat(self, request: ChatRequest) -> ChatResult:
        from archon_server.backends.base import Choice

        return ChatResult([Choice(t, index=i) for i, t in enumerate(self.texts[: request.params.n])], Usage(5, 5))


def arch(scorer: dict[str, Any], k: int) -> Any:
    return parse_architecture({"name": "t", "layers": [[{"type": "generator", "model": "gen", "samples": k}], [{"type": "scorer", **scorer}]]})


Q = [{"role": "user", "content": "Say something."}]


async def test_pairwise_position_swap_is_applied_and_cancels_a_position_bias():
    texts = ["plain", "good good", "good"]
    biased = ScriptedScorer("judge", judge="always_a")
    res = await runtime(Fixed(texts), biased).run(arch({"method": "pairwise", "model": "judge", "top_k": 3}, 3), Q)
    calls = [c for layer in res.trace.layers for c in layer.calls if c.type == "scorer"]
    assert len(calls) == 6  # 3 pairs x 2 orders
    assert sum("swapped" in c.purpose for c in calls) == 3
    # Each pair was asked with both texts in both positions.
    for x, y in (("plain", "good good"), ("plain", "good"), ("good good", "good")):
        assert any(f"(a):\n{x}\n" in p and f"(b):\n{y}\n" in p for p in biased.prompts)
        assert any(f"(a):\n{y}\n" in p and f"(b):\n{x}\n" in p for p in biased.prompts)
    # A judge that only ever says "a" expresses no preference: every candidate scores the same.
    assert {round(c.score, 6) for c in res.candidates} == {0.0}
    assert [c.text for c in res.candidates] == texts  # ties keep the incoming order
    fair = ScriptedScorer("judge", judge="quality")
    res = await runtime(Fixed(texts), fair).run(arch({"method": "pairwise", "model": "judge", "top_k": 2}, 3), Q)
    assert [c.text for c in res.candidates] == ["good good", "good"]
    assert res.candidates[0].meta["scorer"]["tournament"] == "round-robin"
    notes = " ".join(n for layer in res.trace.layers for n in layer.notes)
    assert "pairwise scores" in notes and "kept [2], [3]" in notes


async def test_knockout_beyond_round_robin_max():
    texts = [("good " * i).strip() or "none" for i in (0, 3, 1, 5, 2, 4, 0, 1, 2)]  # 9: a bye in round one
    fair = ScriptedScorer("judge", judge="quality")
    res = await runtime(Fixed(texts), fair).run(arch({"method": "pairwise", "model": "judge", "top_k": 1, "round_robin_max": 4}, 9), Q)
    calls = [c for layer in res.trace.layers for c in layer.calls if c.type == "scorer"]
    assert len(calls) == 2 * 8  # a knockout of 9 plays 8 matches, each in both orders
    assert res.candidates[0].text == "good good good good good"
    assert res.candidates[0].meta["scorer"]["tournament"] == "knockout"


async def test_density_ratio_arithmetic_criteria_and_length_normalisation():
    texts = ["a b", "c d e f"]
    strong = ScriptedScorer("strong", logp={"a b": -4.0, "c d e f": -6.0})
    weak = ScriptedScorer("weak", logp={"a b": -3.0, "c d e f": -10.0})
    spec = arch({"method": "density_ratio", "model": "strong", "weak": "weak", "top_k": 2, "criteria": "Be helpful."}, 2)
    res = await runtime(Fixed(texts), strong, weak).run(spec, Q)
    assert [(c.text, c.score) for c in res.candidates] == [("c d e f", 4.0), ("a b", -1.0)]
    assert strong.prompts == ["Be helpful."] and weak.prompts == [""]  # the criteria go to the strong model only
    assert res.candidates[0].meta["scorer"]["logp_weak"] == -10.0
    spec = arch({"method": "density_ratio", "model": "strong", "weak": "weak", "top_k": 1, "length_normalize": True}, 2)
    res = await runtime(Fixed(texts), strong, weak).run(spec, Q)
    assert res.candidates[0].text == "c d e f" and res.candidates[0].score == pytest.approx(-1.5 + 2.5)


async def test_pointwise_ratings_and_reward_model():
    texts = ["meh", "good good", "good"]
    res = await runtime(Fixed(texts), ScriptedScorer("judge", judge="rating")).run(arch({"method": "logprob_judge", "model": "judge", "top_k": 1}, 3), Q)
    assert res.candidates[0].text == "good good"
    assert res.candidates[0].score == pytest.approx((8 * 0.8 + 1 * 0.2) / 1.0)
    rm = ScriptedScorer("rm", rewards={"meh": 0.1, "good good": 2.0, "good": 1.0})
    res = await runtime(Fixed(texts), rm).run(arch({"method": "reward_model", "model": "rm", "top_k": 2}, 3), Q)
    assert [c.text for c in res.candidates] == ["good good", "good"]
    res = await runtime(Fixed(texts), rm).run(arch({"method": "pairwise", "pair_scorer": "reward_model", "model": "rm", "top_k": 1}, 3), Q)
    assert res.candidates[0].text == "good good"
    assert [c.type for layer in res.trace.layers for c in layer.calls].count("scorer") == 1  # one reward call, not one per pair


async def test_a_backend_that_cannot_score_is_refused_before_anything_runs():
    gen = Fixed(["x", "y"])
    spec = arch({"method": "density_ratio", "model": "gen", "weak": "gen", "top_k": 1}, 2)
    rt = runtime(gen)
    assert await rt.scoring_problems(spec, probe=False)  # known without asking: said at start-up
    with pytest.raises(GraphError) as e:
        await rt.run(spec, Q)
    assert e.value.status == 400 and "cannot score text" in str(e.value)
    with pytest.raises(ScoringUnsupported):
        await gen.score(ScoreRequest("m", Q, ["x"]))


def test_spec_validation_names_the_path():
    with pytest.raises(SpecError) as e:
        arch({"method": "density_ratio", "model": "strong", "top_k": 1}, 2)
    assert "layers[1][0]" in str(e.value) and "weak" in str(e.value)
    s = arch({"method": "pairwise", "model": "j", "top_k": 1}, 6)
    assert s.backend_calls_estimate() == 1 + 30
    assert s.scoring_needs() == [("j", "next_token", "")]
    assert Candidate("x").score is None


# ---------------------------------------------------------------------------- over HTTP


class RewardServer:
    """A scripted reward-model server on 127.0.0.1 speaking vLLM's Score API (POST /score {text_1, text_2}) and
    text-embeddings-inference's rerank (POST /rerank {query, texts}); the reward is the count of "good"."""

    def __init__(self) -> None:
        from aiohttp import web

        self.bodies: list[tuple[str, dict[str, Any]]] = []
        app = web.Application()
        app.router.add_post("/score", self._score)
        app.router.add_post("/rerank", self._rerank)
        self.runner = web.AppRunner(app)

    async def start(self) -> str:
        from aiohttp import web

        from archon_server.testing.upstream import free_port

        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/v1"

    async def _score(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.bodies.append(("score", body))
        data = [{"index": i, "object": "score", "score": t.count("good") + 0.5} for i, t in enumerate(body["text_2"])]
        return web.json_response({"id": "x", "object": "list", "model": body["model"], "data": list(reversed(data)),
                                  "usage": {"prompt_tokens": 7, "total_tokens": 7}})

    async def _rerank(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.bodies.append(("rerank", body))
        out = sorted(({"index": i, "score": float(t.count("good"))} for i, t in enumerate(body["texts"])), key=lambda r: -r["score"])
        return web.json_response(out)


async def test_reward_model_over_http_in_both_protocols():
    from archon_server.backends.http import OpenAIHTTPBackend

    srv = RewardServer()
    url = await srv.start()
    rm = OpenAIHTTPBackend("rm", [url], "my-reward-model", max_retries=0)
    try:
        texts = ["meh", "good good", "good"]
        for protocol in ("vllm_score", "tei_rerank"):
            rt = runtime(Fixed(texts), rm)
            res = await rt.run(arch({"method": "reward_model", "model": "rm", "top_k": 3, "reward_protocol": protocol}, 3), Q)
            assert [c.text for c in res.candidates] == ["good good", "good", "meh"]
            kind, body = srv.bodies[-1]
            if protocol == "vllm_score":
                assert kind == "score" and body == {"model": "my-reward-model", "text_1": "Say something.", "text_2": texts}
                assert [c.score for c in res.candidates] == [2.5, 1.5, 0.5]
            else:
                assert kind == "rerank" and body["query"] == "Say something." and body["texts"] == texts
        await rm.check_scoring("reward", "my-reward-model", "vllm_score")  # the start-up probe passes
        with pytest.raises(ScoringUnsupported) as e:  # this server has no prompt_logprobs/tokenize: said clearly
            await rm.check_scoring("score", "my-reward-model")
        assert "cannot score text" in str(e.value)
    finally:
        await rm.close()
        await srv.runner.cleanup()


async def test_an_upstream_that_cannot_score_is_refused_before_any_sample(upstream_factory):
    """An OpenAI-compatible upstream without vLLM's /tokenize + prompt_logprobs: best-of-n-cdr answers 400 naming the
    alias and the missing capability, after one probe and without generating a sample; other architectures run."""
    from pathlib import Path

    from archon_server.backends.registry import build_registry
    from archon_server.graph.catalog import load_catalog
    from tests.conftest import fake_config

    up = upstream_factory()
    cfg = fake_config(up.url)
    cfg.backends[0].aliases.append("weak")
    reg = build_registry(cfg)
    await reg.start()
    presets = load_catalog([str(Path(__file__).resolve().parent.parent / "architectures")])
    try:
        rt = GraphRuntime(reg)
        assert await rt.scoring_problems(presets["best-of-n-cdr"], probe=False) == []  # an HTTP upstream is only known by asking
        with pytest.raises(GraphError) as e:
            await rt.run(presets["best-of-n-cdr"], Q)
        assert e.value.status == 400 and "'default'" in str(e.value) and "cannot score text" in str(e.value)
        assert up.requests == []  # the probe's /tokenize got a 404 (not a chat request); no sample was generated
        with pytest.raises(GraphError):
            await rt.run(presets["self-moa-rank"], Q)  # same alias and capability: the answer is remembered
        # The logprob judge needs only standard logprobs, which this upstream has: best-of-n-judge runs.
        res = await rt.run(presets["best-of-n-judge"], Q)
        assert res.text and sum(c.type == "scorer" for layer in res.trace.layers for c in layer.calls) == 30
        assert (await rt.run(presets["self-moa"], Q)).text
    finally:
        await reg.close()
