"""Through the wire (a real uvicorn, the official openai SDK and httpx) on a scripted upstream:

* a /v1/completions trace carries the backends' speculative-decoding figures (``Trace.metrics``) as chat's does: on
  an architecture and on a backend alias, one prompt's as they are, several prompts' merged (counters summed, rates
  weighted by drafted tokens); they were ``{}``;
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from conftest import fake_config

from archon_server.testing.upstream import FakeUpstream

# What the upstream says it did, by the prompt it got (vLLM's names, as backends/http.py reads them).
FIGURES = {
    "alpha": {"num_draft_tokens": 10, "num_accepted_draft_tokens": 8, "draft_acceptance_rate": 0.8, "mean_acceptance_length": 2.6},
    "beta": {"num_draft_tokens": 30, "num_accepted_draft_tokens": 15, "draft_acceptance_rate": 0.5, "mean_acceptance_length": 1.9},
}


class SpecUpstream(FakeUpstream):
    """The fake upstream, its non-streamed answers carrying the figures of the prompt they answer."""

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        resp = await super()._chat(request)
        if not isinstance(resp, web.Response) or resp.status != 200 or resp.content_type != "application/json":
            return resp
        body = await request.json()
        text = json.dumps(body.get("messages") or body.get("prompt"))
        word = next((w for w in FIGURES if w in text), None)
        return resp if word is None else web.json_response({**json.loads(resp.body), **FIGURES[word]})


@pytest.fixture
def spec_upstream() -> Iterator[SpecUpstream]:
    up = SpecUpstream().start()
    yield up
    up.stop()


def client(srv: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)


def kept(srv: Any, rid: str) -> dict[str, Any]:
    r = httpx.get(srv.url + f"/v1/traces/{rid}")
    assert r.status_code == 200, r.text
    return r.json()


# -- 1. /v1/completions keeps Trace.metrics -------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["self-moa", "fake"])  # an architecture (two calls a prompt), a backend alias (one)
def test_a_completions_trace_has_the_metrics_a_chat_trace_has(spec_upstream, server_factory, model):
    srv = server_factory(fake_config(spec_upstream.url))
    c = client(srv)
    chat = {w: c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"{w} question"}], max_tokens=8,
                                         extra_body={"return_trace": True}) for w in FIGURES}
    per_prompt = {w: r.model_extra["trace"]["metrics"] for w, r in chat.items()}
    calls = 2 if model == "self-moa" else 1  # a run's counters sum its calls'; its rates are its last call's
    for w, m in per_prompt.items():
        assert m == {k: v * calls if k.startswith("num_") else v for k, v in FIGURES[w].items()}, m
    assert kept(srv, chat["alpha"].id)["trace"]["metrics"] == per_prompt["alpha"]

    one = c.completions.create(model=model, prompt="alpha question", max_tokens=8, extra_body={"return_trace": True})
    assert one.model_extra["trace"]["metrics"] == per_prompt["alpha"]  # was {}
    assert kept(srv, one.id)["trace"]["metrics"] == per_prompt["alpha"]

    both = c.completions.create(model=model, prompt=["alpha question", "beta question"], max_tokens=8,
                                extra_body={"return_trace": True})
    merged = kept(srv, both.id)["trace"]["metrics"]
    assert merged["num_draft_tokens"] == 40 * calls and merged["num_accepted_draft_tokens"] == 23 * calls
    assert merged["draft_acceptance_rate"] == pytest.approx(23 / 40)  # the request's accepted over its drafted
    assert merged["mean_acceptance_length"] == pytest.approx((2.6 * 10 + 1.9 * 30) / 40)
    if model == "self-moa":  # the answer's own traces: one per prompt, each with its prompt's figures
        assert [t["metrics"] for t in both.model_extra["trace"]] == [per_prompt["alpha"], per_prompt["beta"]]
    else:
        assert both.model_extra["trace"]["metrics"] == merged
