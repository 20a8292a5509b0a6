"""A gap closed in the spec (more in later commits):

3. the spec's sampling fields take their bounds and words from sampling_fields, as the API's requests do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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
from archon_server.components import prompts
from archon_server.graph.runtime import GraphRuntime
from archon_server.sampling_fields import MinTokens
from archon_server.spec import SpecError, parse_architecture
from pydantic import BaseModel, TypeAdapter, ValidationError

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
