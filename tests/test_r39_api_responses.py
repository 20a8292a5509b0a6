"""An application developer's walk over the Responses API and structured outputs on the embedded default (`archon
serve`, the official openai SDK), where it differed from OpenAI's documented API:

- a streamed response asked for its logprobs (``include: ["message.output_text.logprobs"]``) sent none: every
  ``response.output_text.delta`` and ``response.output_text.done`` had ``logprobs: []`` and the final response's
  ``output_text`` part too (a non-streamed one had them). Each delta now carries its tokens', as OpenAI sends them;
- a JSON schema the engine cannot constrain its decoding to (a keyword llguidance does not implement, a regex with
  look-around, an unsatisfiable schema) failed the run as a **502** ``upstream_error`` — which the SDKs send again, twice
  by default — after an architecture's samples were paid for; it is a 400 naming ``response_format`` (Responses:
  ``text.format``) before any call, as vLLM refuses a schema its guided decoding cannot honour;
- ``client.responses.delete(id)`` was a 405: DELETE /v1/responses/{id} forgets a stored response, as OpenAI's.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from archon_server.testing.server import serve_process

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
LOGPROBS = ["message.output_text.logprobs"]
# `not` is a keyword llguidance does not implement: the engine cannot enforce this schema.
UNENFORCEABLE = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]}


@pytest.fixture(scope="module")
def served():
    log = ROOT / ".pytest_cache" / "r39-api-responses-serve.log" if (ROOT / ".pytest_cache").is_dir() else None
    with serve_process(["serve"], log=log, cwd=str(ROOT)) as (_proc, url):
        yield url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_a_streamed_response_carries_the_logprobs_it_asked_for(served):
    url, client = served
    ask = dict(model="smollm2", input="Say hello to Ana.", max_output_tokens=12, temperature=0, include=LOGPROBS, top_logprobs=3)
    whole = client.responses.create(**ask)
    want = [(t.token, t.logprob) for t in whole.output[0].content[0].logprobs]
    assert want

    events = list(client.responses.create(stream=True, **ask))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    part = final.output[0].content[0]
    assert all(d.logprobs for d in deltas), [d.delta for d in deltas if not d.logprobs]
    for d in deltas:  # a delta's tokens are its text (a character split over byte tokens comes whole with its last)
        assert "".join(t.token for t in d.logprobs) == d.delta
        assert all(len(t.top_logprobs) == 3 for t in d.logprobs)
    got = [(t.token, t.logprob) for t in part.logprobs]
    assert [tok for tok, _ in got] == [tok for tok, _ in want]  # greedy: the same answer as the whole one
    assert [(t.token, t.logprob) for t in done.logprobs] == got
    assert [(t.token, t.logprob) for d in deltas for t in d.logprobs] == got[: sum(len(d.logprobs) for d in deltas)]
    # the stored response is the one the stream ended with
    assert httpx.get(f"{url}/v1/responses/{final.id}").json()["output"][0]["content"][0]["logprobs"] == [t.model_dump() for t in part.logprobs]

    plain = list(client.responses.create(stream=True, model="smollm2", input="Say hi.", max_output_tokens=4))
    assert all(e.logprobs == [] for e in plain if e.type in ("response.output_text.delta", "response.output_text.done"))


@pytest.mark.parametrize("model", ["smollm2", "self-moa", "best-of-n"])
def test_a_schema_the_engine_cannot_enforce_is_a_400_before_any_call(served, model):
    url, client = served
    before = httpx.get(url + "/metrics").text
    rf = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": UNENFORCEABLE}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON"}], response_format=rf,
                                               max_tokens=16, stream=stream)
            list(r) if stream else r
        assert e.value.body["param"] == "response_format" and "not" in e.value.body["message"], e.value.body
        with pytest.raises(openai.BadRequestError) as e:
            r = client.responses.create(model=model, input="JSON", max_output_tokens=16, stream=stream,
                                        text={"format": {"type": "json_schema", "name": "x", "strict": True, "schema": UNENFORCEABLE}})
            list(r) if stream else r
        assert e.value.body["param"] == "text.format" and "not" in e.value.body["message"], e.value.body
    after = httpx.get(url + "/metrics").text

    def count(text: str, name: str) -> float:
        line = next((ln for ln in text.splitlines() if ln.startswith(name + '{backend="smollm2"}')), None)
        return float(line.split()[-1]) if line else 0.0

    for name in ("archon_backend_requests_total", "archon_backend_errors_total"):  # refused before the engine saw it
        assert count(after, name) == count(before, name), name


def test_a_schema_the_engine_can_enforce_still_constrains(served):
    _url, client = served
    schema = {"type": "object", "properties": {"size": {"type": "string", "enum": ["small", "big"]}}, "required": ["size"],
              "additionalProperties": False}
    r = client.responses.create(model="smollm2", input="Is the sun small or big? Answer as JSON.", max_output_tokens=40,
                                text={"format": {"type": "json_schema", "name": "size", "strict": True, "schema": schema}})
    assert r.status == "completed" and r.output_text in ('{"size":"small"}', '{"size":"big"}'), r.output_text


def test_delete_forgets_a_stored_response(served):
    url, client = served
    first = client.responses.create(model="smollm2", input="My name is Ana.", max_output_tokens=8)
    second = client.responses.create(model="smollm2", input="And yours?", max_output_tokens=8, previous_response_id=first.id)
    assert client.responses.retrieve(first.id).id == first.id
    raw = httpx.delete(f"{url}/v1/responses/{first.id}")
    assert raw.status_code == 200 and raw.json() == {"id": first.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="smollm2", input="again", max_output_tokens=4, previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
    assert client.responses.delete(second.id) is None  # the SDK's own call
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
