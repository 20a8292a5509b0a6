"""Through the wire (a real uvicorn, the official openai SDK) on a scripted upstream: the `bytes` an upstream sends
in its logprobs are forwarded as they are (they were rebuilt from the token strings)."""

from __future__ import annotations

import openai
from conftest import fake_config

Q = [{"role": "user", "content": "Q"}]


def client(srv) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)


def test_an_upstreams_logprob_bytes_are_kept(upstream_factory, server_factory):
    # A CJK character split over two byte-level tokens: their strings cannot give their bytes back.
    lps = {"content": [{"token": "\ufffd", "logprob": -0.1, "bytes": [230, 157], "top_logprobs": [{"token": "\ufffd", "logprob": -0.1, "bytes": [230, 157]}]},
                       {"token": "東", "logprob": -0.2, "bytes": [177], "top_logprobs": [{"token": "東", "logprob": -0.2, "bytes": [177]}]}]}
    up = upstream_factory(lambda b: {"text": "東", "logprobs": lps})
    srv = server_factory(fake_config(up.url))
    r = client(srv).chat.completions.create(model="fake", messages=Q, logprobs=True, top_logprobs=1)
    content = r.choices[0].logprobs.content
    assert [t.bytes for t in content] == [[230, 157], [177]]
    assert [t.top_logprobs[0].bytes for t in content] == [[230, 157], [177]]
    assert bytes(sum((t.bytes for t in content), [])).decode() == "東"
