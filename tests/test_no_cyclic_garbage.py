"""Requests leave no reference cycles behind: what a request allocates is freed by reference counting when it ends.

Why it matters: cyclic garbage is what made the collector run while serving, and every collection walks the
objects of every request in flight (at 200 self-moa clients: 6 % of the server's CPU, from one Trace <-> LayerTrace
cycle per request; streams added a self-re-arming keep-alive closure). One server, several shapes of request, as a
user sends them; then every object the collector had to free is listed, and none may be ours.
"""

from __future__ import annotations

import collections
import gc
from typing import Any

import httpx
import openai

from tests.conftest import fake_config


def _ours(obj: Any) -> str | None:
    """A name if ``obj`` is an object of this package (an instance of one of its classes, or one of its functions)."""
    mod = getattr(obj, "__module__", None) if callable(obj) and not isinstance(obj, type) else type(obj).__module__
    if isinstance(mod, str) and mod.startswith("archon_server"):
        return f"{mod}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    return None


def test_requests_of_every_shape_leave_no_cyclic_garbage(upstream_factory, server_factory):
    up = upstream_factory(latency=0.05)
    srv = server_factory(fake_config(up.url, keep_traces=3))
    srv.config.app.state.chat.keepalive_s = 0.02  # keep-alives fire while the inner samples run
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]

    def walk() -> None:
        client.chat.completions.create(model="self-moa", messages=msgs, max_tokens=20)
        client.chat.completions.create(model="archon-rank-critic-fuse", messages=msgs, max_tokens=20, n=2,
                                       extra_body={"return_trace": True})
        with client.chat.completions.create(model="self-moa", messages=msgs, max_tokens=20, stream=True,
                                            extra_body={"stream_trace": True}) as s:
            assert sum(1 for _ in s) > 1
        client.completions.create(model="moa-lite", prompt="Say hi", max_tokens=10)
        with client.responses.create(model="self-moa", input="Say hi", stream=True) as s:
            assert sum(1 for _ in s) > 1
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "no-such-arch", "messages": msgs})
        assert r.status_code == 404
        assert httpx.get(srv.url + "/v1/traces").status_code == 200

    walk()  # first use: caches, pools and lazily built things are not garbage
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            walk()
        gc.collect()
        ours = collections.Counter(name for name in map(_ours, gc.garbage) if name)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not ours, ours
