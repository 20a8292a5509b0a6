"""Three gaps closed in the components, the runtime and the spec:

1. a writing layer (a final fuser) whose every answer is empty falls back on the candidates it was given that have
   one (set_aside_empty's rule), and the trace says so: unit tests on scripted backends, and the real path (server,
   scripted upstream, the official SDK, plain and streamed);
2. a scorer never prefers an answer cut at the length limit to a complete one (the raw density ratio, a sum over
   tokens, did at a small max_tokens), on the best-of-n-cdr preset itself;
3. the spec's sampling fields take their bounds and words from sampling_fields, as the API's requests do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import fake_config
from pydantic import BaseModel, TypeAdapter, ValidationError

from archon_server.api.chat.protocol import ChatCompletionRequest
from archon_server.backends.base import (
    Backend,
    ChatRequest,
    ChatResult,
    Choice,
    ScoreRequest,
    ScoreResult,
    SequenceScore,
    Usage,
)
from archon_server.backends.registry import BackendRegistry
from archon_server.components import FinalOverrides, prompts
from archon_server.graph.runtime import GraphRuntime
from archon_server.sampling_fields import MinTokens
from archon_server.spec import SpecError, load_architecture, parse_architecture

ROOT = Path(__file__).resolve().parent.parent
Q = [{"role": "user", "content": "Say something."}]


def is_fusion(messages: list[dict[str, Any]]) -> bool:
    return any(prompts.FUSER_SYSTEM[:80] in str(m.get("content")) for m in messages)


class Scripted(Backend):
    """Generators' samples are ``samples`` (finish_reason "length" for those in ``cut``); a fusion is ``fused``."""

    supports_n = True

    def __init__(self, name: str, samples: list[str], fused: str = "", cut: frozenset[int] = frozenset()):
        self.name, self.samples, self.fused, self.cut = name, samples, fused, cut
        self.fusions: list[str] = []

    async def chat(self, request: ChatRequest) -> ChatResult:
        if is_fusion(request.messages):
            self.fusions.append(str(request.messages[0]["content"]))
            return ChatResult([Choice(self.fused, index=i) for i in range(request.params.n)], Usage(10, 1))
        return ChatResult([Choice(t, "length" if i in self.cut else "stop", i) for i, t in enumerate(self.samples[: request.params.n])],
                          Usage(5, 5))


class LogP(Backend):
    """A scorer whose log p(y|x) of a continuation is ``per_token`` times its word count (``per_token`` < 0)."""

    supports_scoring = True

    def __init__(self, name: str, per_token: float):
        self.name, self.per_token = name, per_token
        self.scored: list[list[str]] = []

    async def chat(self, request: ChatRequest) -> ChatResult:
        raise AssertionError("a scorer does not generate")

    async def score(self, request: ScoreRequest) -> ScoreResult:
        self.scored.append(list(request.continuations))
        out = []
        for c in request.continuations:
            n = len(c.split())
            out.append(SequenceScore(self.per_token * n, [self.per_token] * n, c.split()))
        return ScoreResult(out, Usage(prompt_tokens=10))


class WritesAndScores(Scripted):
    """best-of-n-cdr's ``default``: the generator, and the strong model of the density ratio."""

    supports_scoring = True
    score = LogP.score

    def __init__(self, name: str, samples: list[str], per_token: float, cut: frozenset[int] = frozenset()):
        super().__init__(name, samples, cut=cut)
        self.per_token = per_token
        self.scored: list[list[str]] = []


def runtime(*backends: Backend) -> GraphRuntime:
    reg = BackendRegistry()
    for b in backends:
        reg.register(b.name, b, b.name)
    return GraphRuntime(reg)


def notes(res: Any) -> str:
    return " | ".join(n for layer in res.trace.layers for n in layer.notes)


# ------------------------------------------------------------------------------------------ 1. empty synthesis


def moa(**fuser: Any) -> Any:
    return parse_architecture({"name": "t", "layers": [[{"type": "generator", "model": "gen", "samples": 3}],
                                                       [{"type": "fuser", "model": "gen", **fuser}]]})


@pytest.mark.parametrize("fused", ["", "  \n\t "])
async def test_an_empty_final_synthesis_falls_back_on_the_first_candidate_with_an_answer(fused):
    gen = Scripted("gen", ["", "second sample", "third sample"], fused=fused)
    res = await runtime(gen).run(moa(), Q)
    assert gen.fusions  # the fuser ran, and wrote nothing
    assert res.text == "second sample"  # the first with an answer: the empty first sample is set aside
    assert res.candidates[0].finish_reason == "stop"
    last = res.trace.layers[-1]
    assert any(n.startswith("fallback: every answer this layer wrote was empty") and "2 candidate(s)" in n for n in last.notes), last.notes
    assert [c["text"] for c in last.candidates] == ["second sample", "third sample"]  # what the layer left, in the trace


async def test_the_fallback_takes_the_best_scored_candidate_and_the_clients_n():
    # A scorer before the fuser (self-moa-rank's shape): the fallback is the best-scored of the ones fused.
    spec = parse_architecture({"name": "t", "layers": [
        [{"type": "generator", "model": "gen", "samples": 3}],
        [{"type": "scorer", "method": "density_ratio", "model": "strong", "weak": "weak", "top_k": 2}],
        [{"type": "fuser", "model": "gen"}]]})
    gen = Scripted("gen", ["one", "one two three", "one two"], fused="")
    res = await runtime(gen, LogP("strong", -1.0), LogP("weak", -2.0)).run(spec, Q)  # ratio = +1 a word: longest best
    assert res.text == "one two three"
    res = await runtime(gen, LogP("strong", -1.0), LogP("weak", -2.0)).run(spec, Q, final=FinalOverrides(n=2))
    assert res.choices == ["one two three", "one two"]


async def test_no_fallback_when_the_synthesis_has_an_answer_or_nothing_had_one():
    gen = Scripted("gen", ["a", "b", "c"], fused="the synthesis")
    res = await runtime(gen).run(moa(), Q)
    assert res.text == "the synthesis" and "fallback" not in notes(res)
    gen = Scripted("gen", ["", " ", ""], fused="")
    res = await runtime(gen).run(moa(), Q)
    assert res.text == "" and "fallback" not in notes(res)  # every candidate empty: the answer is empty


def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_synthesis_over_the_wire_answers_with_a_sample(upstream_factory, server_factory, stream):
    """The real path: self-moa on a server whose upstream writes an empty synthesis, asked with the official SDK."""
    def script(body: dict[str, Any]) -> dict[str, Any] | None:
        if is_fusion(body.get("messages", [])):
            return {"text": ""}
        return {"text": ["", "the first sample with an answer"] + [f"sample {i}" for i in range(2, body.get("n", 1))]}

    up = upstream_factory(script)
    c = client(server_factory(fake_config(up.url)))
    kw: dict[str, Any] = {"model": "self-moa", "messages": [{"role": "user", "content": "Say hi."}], "extra_body": {"return_trace": True}}
    if stream:
        chunks = list(c.chat.completions.create(stream=True, **kw))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        trace = next(ch.model_extra["trace"] for ch in chunks if (ch.model_extra or {}).get("trace"))
    else:
        r = c.chat.completions.create(**kw)
        text, finish, trace = r.choices[0].message.content, [r.choices[0].finish_reason], r.model_extra["trace"]
    assert text == "the first sample with an answer"
    assert finish == ["stop"]
    assert sum(is_fusion(rec.body.get("messages", [])) for rec in up.requests) == 1  # the fuser was asked, once
    fuser_layer = trace["layers"][-1]
    assert any(n.startswith("fallback:") for n in fuser_layer["notes"]), fuser_layer["notes"]


# ------------------------------------------------------------------------------------------ 2. cut answers and CDR

COMPLETE = "A complete answer."
CUT = "A much longer answer that rambles on and on until the token limit cut it in the middle of"


async def test_best_of_n_cdr_prefers_a_complete_answer_to_a_longer_cut_one():
    spec = load_architecture(ROOT / "architectures" / "best-of-n-cdr.yaml")
    scorer = spec.layers[-1][0]
    assert scorer.method == "density_ratio" and not scorer.length_normalize  # the paper's reward: the whole answer's ratio
    # +0.5 a word: the raw ratio grows with length, so the cut answer (the longest) scores higher...
    strong = WritesAndScores("default", [CUT, COMPLETE, CUT + " x", COMPLETE + " Yes."] * 2, -1.0, cut=frozenset({0, 2, 4, 6}))
    res = await runtime(strong, LogP("weak", -1.5)).run(spec, Q)
    # ... yet the answer is the best complete one, and the cut ones were never scored.
    assert res.text == COMPLETE + " Yes." and res.candidates[0].finish_reason == "stop"
    assert strong.scored == [[COMPLETE, COMPLETE + " Yes."] * 2]
    n = notes(res)
    assert "4 of 8 candidate(s) cut at the length limit set aside ([1], [3], [5], [7])" in n
    assert "kept [4]" in n  # numbered as the layer got them


async def test_prefer_complete_off_scores_them_all_and_all_cut_are_scored_as_they_are():
    spec = parse_architecture({"name": "t", "layers": [
        [{"type": "generator", "model": "gen", "samples": 2}],
        [{"type": "scorer", "method": "density_ratio", "model": "strong", "weak": "weak", "prefer_complete": False}]]})
    res = await runtime(Scripted("gen", [COMPLETE, CUT], cut=frozenset({1})), LogP("strong", -1.0), LogP("weak", -1.5)).run(spec, Q)
    assert res.text == CUT  # what the raw ratio alone says
    spec = parse_architecture({"name": "t", "layers": [
        [{"type": "generator", "model": "gen", "samples": 2}],
        [{"type": "scorer", "method": "density_ratio", "model": "strong", "weak": "weak"}]]})
    res = await runtime(Scripted("gen", [COMPLETE, CUT], cut=frozenset({0, 1})), LogP("strong", -1.0), LogP("weak", -1.5)).run(spec, Q)
    assert res.text == CUT and "set aside" not in notes(res)  # no complete one: the best cut one


async def test_a_scorer_left_with_one_complete_answer_keeps_it_without_scoring():
    spec = parse_architecture({"name": "t", "layers": [
        [{"type": "generator", "model": "gen", "samples": 3}],
        [{"type": "scorer", "method": "density_ratio", "model": "strong", "weak": "weak", "top_k": 2}]]})
    strong = LogP("strong", -1.0)
    res = await runtime(Scripted("gen", [CUT, COMPLETE, CUT], cut=frozenset({0, 2})), strong, LogP("weak", -1.5)).run(
        spec, Q, final=FinalOverrides(n=2))
    assert res.choices == [COMPLETE] and strong.scored == []


# ------------------------------------------------------------------------------------------ 3. one rule for the fields

BAD = [("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0), ("max_tokens", 131073),
       ("seed", 2**63), ("stop", ["a", "b", "c", "d", "e"]), ("stop", ["ok", ""])]


def api_message(field: str, value: Any) -> str:
    try:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], field: value})
    except ValidationError as e:
        (err,) = e.errors()
        return err["msg"].removeprefix("Value error, ")
    raise AssertionError(f"the API took {field}={value!r}")


@pytest.mark.parametrize(("field", "value"), BAD)
def test_the_spec_refuses_what_the_api_refuses_in_the_same_words(field, value):
    want = api_message(field, value)
    for where, data in [
        ("defaults", {"defaults": {field: value}, "layers": [[{"type": "generator", "model": "m"}]]}),
        ("layers[1][0]", {"layers": [[{"type": "generator", "model": "m"}], [{"type": "fuser", "model": "m", field: value}]]}),
    ]:
        with pytest.raises(SpecError) as e:
            parse_architecture({"name": "t", **data})
        assert e.value.errors == [f"{where}.{field}: {want}"]


def test_the_spec_takes_what_the_api_takes():
    spec = parse_architecture({"name": "t", "defaults": {"stop": "\n\n", "seed": -(2**63), "max_tokens": 131072},
                               "layers": [[{"type": "generator", "model": "m", "stop": ["a", "b", "c", "d"], "top_p": 1.0}]]})
    assert spec.defaults.stop == ["\n\n"]  # one string is a list of one, as in a request
    assert spec.layers[0][0].stop == ["a", "b", "c", "d"]
    with pytest.raises(SpecError) as e:
        parse_architecture({"name": "t", "layers": [[{"type": "self_moa_seq", "model": "m", "proposer": "m", "proposer_temperature": 3}]]})
    assert e.value.errors == [f"layers[0][0].proposer_temperature: {api_message('temperature', 3)}"]


def test_min_tokens_is_one_rule_too():
    class M(BaseModel):
        min_tokens: MinTokens | None = None

    for bad in (-1, 131073):
        with pytest.raises(ValidationError) as want:
            M(min_tokens=bad)
        assert api_message("min_tokens", bad) == want.value.errors()[0]["msg"]
    assert TypeAdapter(MinTokens).validate_python(0) == 0
