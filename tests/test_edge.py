"""The edge (archon_server/api/edge.py) against a real uvicorn server: text that cannot go upstream is a 400 naming
the field before any backend call; request-body bytes in flight are bounded (429 at once); the deadline starts
when the request arrives, so reading and parsing count."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import openai
import pytest
from conftest import fake_config
from test_fuzz import assert_openai_error

URL = "/v1/chat/completions"


@pytest.fixture
def up(upstream_factory):
    return upstream_factory()


@pytest.fixture
def srv(up, server_factory):
    return server_factory(fake_config(up.url, request_timeout_s=10))


def _raw(srv, body: bytes) -> httpx.Response:
    return httpx.post(srv.url + URL, content=body, headers={"content-type": "application/json"}, timeout=30)


# -- lone surrogates and NUL --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_sdk_nul_in_message_content_is_400_naming_the_field(srv, up, stream):
    """The official SDK sends what the user gave it; the server answers 400 with the field, never reaching a backend."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="self-moa", stream=stream,
                                       messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\x00b"}])
    err = ei.value.body
    assert err["param"] == "messages[1].content", err
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_value" and "NUL" in err["message"]
    assert up.requests == []  # nothing reached the upstream


@pytest.mark.parametrize("text", ["\ud800", "\udfff", "a\udbffb", "\ude00\ud83d"]) # noqa: PT014 (ruff sees lone surrogates as equal)
@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogate_in_message_content_is_400_naming_the_field(srv, up, text, stream):
    """The openai SDK cannot even encode a lone surrogate, but JSON can carry one (`"\\ud800"`, as JavaScript's
    JSON.stringify and Python's json.dumps write it): it used to reach the upstream and come back as a 502."""
    body = json.dumps({"model": "self-moa", "stream": stream,
                       "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]})
    err = assert_openai_error(_raw(srv, body.encode()), 400)
    assert err["param"] == "messages[1].content", err
    assert err["code"] == "invalid_value" and "surrogate" in err["message"]
    assert up.requests == []


@pytest.mark.parametrize(
    "patch,param",
    [
        ({"stop": ["ok", "\ud83d"]}, "stop[1]"),
        ({"stop": "\x00"}, "stop"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "fine"}, {"type": "text", "text": "x\udc00"}]}]},
         "messages[0].content[1].text"),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob\x00"}]}, "messages[0].name"),
        ({"user": "\ud800"}, "user"),
        ({"model": "self-moa\x00"}, "model"),
        ({"architecture": {"description": "\udfff", "layers": [[{"type": "generator", "model": "default", "system_prompt": "ok"}],
                                                            [{"type": "fuser", "model": "aggregator", "system_prompt": "\x00"}]]}},
         "architecture.description"),
        ({"metadata": {"k\ud800": "v"}}, "metadata"),  # a key, in a field we otherwise ignore
    ],
)
def test_bad_text_in_every_field_is_400_naming_it(srv, up, patch, param):
    body = {"model": "self-moa", "messages": [{"role": "user", "content": "hi"}], **patch}
    err = assert_openai_error(httpx.post(srv.url + URL, content=json.dumps(body), headers={"content-type": "application/json"}), 400)
    assert err["param"] == param, err
    assert up.requests == []


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                                  {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
def test_a_content_part_other_than_text_is_400_naming_it(srv, up, part):
    """The prompts are built from text: an image or audio part would have been dropped without a word, and the 400
    pydantic gave instead named a union branch ("content.str: Input should be a valid string")."""
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="self-moa", messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, part]}])
    err = ei.value.body
    assert err["param"] == "messages[0].content" and f"part 1 is of type {part['type']!r}" in err["message"], err
    assert up.requests == []


@pytest.mark.parametrize("part,kind", [("What is it?", "string"), (None, "null"), (3, "number")])
def test_a_content_part_that_is_not_an_object_is_400_naming_it(srv, up, part, kind):
    """A bare string in the parts list is a common slip (a list of strings, not of parts): the 400 says what it is."""
    body = {"model": "self-moa", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}
    err = assert_openai_error(httpx.post(srv.url + URL, content=json.dumps(body), headers={"content-type": "application/json"}), 400)
    assert err["param"] == "messages[0].content" and f'part 1 is a JSON {kind}, not an object with a "type"' in err["message"], err
    assert up.requests == []


def test_bad_text_in_a_body_nested_too_deep_is_still_a_400(srv):
    """The exact check parses the body: nested past the parser's depth it must not turn into a 500."""
    body = b'{"model":"fake","messages":[{"role":"user","content":"\\u0000"}],"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_openai_error(_raw(srv, body), 400)


def test_raw_utf8_surrogate_bytes_are_400(srv, up):
    # The bytes ED A0 80 (U+D800 "encoded" as UTF-8) are not UTF-8, yet json.loads(bytes) lets them through.
    body = b'{"model":"fake","messages":[{"role":"user","content":"x\xed\xa0\x80y"}]}'
    err = assert_openai_error(_raw(srv, body), 400)
    assert err["param"] == "messages[0].content"
    assert up.requests == []


@pytest.mark.parametrize("text", ["emoji \U0001f600 and \u00e9", "an escaped backslash: \\ud800 \\u0000", "\u202e\u200bx"])
def test_valid_text_near_the_check_is_served(srv, up, text):
    """Surrogate *pairs* (json.dumps writes emoji as two escapes) and escaped backslashes are fine."""
    for ensure_ascii in (True, False):
        r = _raw(srv, json.dumps({"model": "fake", "messages": [{"role": "user", "content": text}]}, ensure_ascii=ensure_ascii).encode())
        assert r.status_code == 200, r.text[:300]
    assert json.loads(json.dumps(up.requests[0].body))["messages"][0]["content"] == text


# -- the byte budget ---------------------------------------------------------------------------------------------------


def test_body_bytes_in_flight_are_bounded_429_at_once(upstream_factory, server_factory):
    up = upstream_factory(latency=3.0)
    srv = server_factory(fake_config(up.url, max_body_bytes=1_000_000, max_inflight_body_bytes=2_500_000))
    big = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "x" * 900_000}]}).encode()

    async def go():  # type: ignore[no-untyped-def]
        async with httpx.AsyncClient(timeout=30) as h:
            async def post(body: bytes, chunked: bool = False):  # type: ignore[no-untyped-def]
                async def gen():  # type: ignore[no-untyped-def]
                    for i in range(0, len(body), 65536):
                        yield body[i:i + 65536]
                r = await h.post(srv.url + URL, content=gen() if chunked else body, headers={"content-type": "application/json"})
                return r, time.perf_counter()  # when it was answered (the upstream's clock: perf_counter too)

            held = [asyncio.ensure_future(post(big)) for _ in range(2)]  # 1.8 MB of the 2.5 MB budget
            deadline = time.time() + 10
            while len(up.requests) < 2 and time.time() < deadline:
                await asyncio.sleep(0.02)
            over = await post(big)  # announced: refused before its body is read
            over_chunked = await post(big, chunked=True)  # no Content-Length: refused as its bytes pass the budget
            small = await post(json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}).encode())
            done = await asyncio.gather(*held)
            after = await post(big)  # the held bytes were given back
            return over, over_chunked, small, done, after

    over, over_chunked, small, done, after = asyncio.run(go())
    # At once, not after the 3 s requests: both 429s came before the first held request could end at the upstream (a
    # bound of 1.5 s each, for 900 kB posted on a loaded machine, was the margin before).
    held_end = min(q.started for q in up.requests[:2]) + 3.0  # the upstream holds each 3 s from its start
    for r, answered in (over, over_chunked):
        err = assert_openai_error(r, 429)
        assert err["code"] == "rate_limit_exceeded" and "bytes" in err["message"]
        assert answered < held_end, (answered, held_end)
    assert small[0].status_code == 200  # a small body still fits beside the big ones
    assert [r.status_code for r, _ in done] == [200, 200]
    assert after[0].status_code == 200
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'archon_rejected_total{reason="body_bytes"} 2.0' in metrics


def test_budget_smaller_than_one_body_is_a_config_error():
    with pytest.raises(Exception, match="max_inflight_body_bytes"):
        fake_config("http://127.0.0.1:9/v1", max_body_bytes=2_000_000, max_inflight_body_bytes=1_000_000)


# -- the deadline starts at the edge ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_deadline_counts_from_arrival_not_from_the_graph(up, server_factory, stream):
    """A body that takes 1.6 s to arrive against a 1 s deadline: 504 at once when it is in (the graph, which would
    answer in milliseconds, must not get a fresh second of its own), and no upstream call."""
    srv = server_factory(fake_config(up.url, request_timeout_s=1.0))
    body = json.dumps({"model": "fake", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        for i in range(0, len(body), 8):  # drip the body in for 1.6 s (longer on a loaded machine: its sleeps overrun)
            s.sendall(body[i:i + 8])
            time.sleep(1.6 / (len(body) / 8))
        t_in = time.perf_counter()  # "at once" counts from here: the drip's own overrun is not the server's time
        head = b""
        while b"error" not in head and time.perf_counter() - t_in < 5:
            part = s.recv(65536)
            if not part:
                break
            head += part
        took = time.perf_counter() - t_in
        head = head.decode("latin-1")
    assert head.startswith("HTTP/1.1 504"), head[:300]
    assert '"timeout_error"' in head and took < 1.0, took
    assert up.requests == []


def test_text_check_agrees_with_a_plain_reference_on_any_json():
    """Property: for any JSON document (lone surrogates, pairs, NUL, escaped backslashes anywhere, keys included),
    written either way json.dumps can write it, the check flags exactly the documents a plain walk finds bad."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from archon_server.api.edge import find_invalid_text

    chars = st.one_of(st.characters(codec=None), st.sampled_from(["\ud800", "\udfff", "\ud83d\ude00", "\x00", "\\", "u", "d8", "\U0001f600"]))
    text = st.lists(chars, max_size=12).map("".join)
    doc = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), text),
                       lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)), max_leaves=12)

    def bad(obj) -> bool:  # type: ignore[no-untyped-def]
        if isinstance(obj, str):
            return "\x00" in obj or any(0xD800 <= ord(c) <= 0xDFFF for c in obj)
        if isinstance(obj, dict):
            return any(bad(k) or bad(v) for k, v in obj.items())
        if isinstance(obj, list):
            return any(bad(v) for v in obj)
        return False

    @settings(max_examples=500, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(d=doc, ascii_only=st.booleans())
    def check(d, ascii_only):  # type: ignore[no-untyped-def]
        body = json.dumps(d, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
        # What the server receives is what the JSON decodes to: two surrogate halves written as a pair of escapes
        # are one valid character there.
        assert (find_invalid_text(body) is not None) == bad(json.loads(body)), body[:200]

    check()
