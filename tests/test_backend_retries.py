"""The HTTP backend's one retry loop: chat and stream retry alike, honour Retry-After, never retry after output."""

from __future__ import annotations

import pytest

from archon_server.backends.base import BackendError, BackendTimeout, ChatRequest, SamplingParams
from archon_server.backends.http import OpenAIHTTPBackend

REQ = ChatRequest("fake-model", [{"role": "user", "content": "Q"}], SamplingParams(max_tokens=8))


def backend(url: str, **kw) -> OpenAIHTTPBackend:
    b = OpenAIHTTPBackend("x", [url], "fake-model", backoff_max_s=0.01, **{"max_retries": 2, "read_timeout_s": 5, **kw})
    waits: list[tuple[int, float | None]] = []
    pool_backoff = b.pool.backoff

    def recording(attempt: int, retry_after: float | None = None) -> float:
        waits.append((attempt, retry_after))
        return pool_backoff(attempt, retry_after)

    b.pool.backoff = recording  # type: ignore[method-assign]
    b.waits = waits  # type: ignore[attr-defined]
    return b


async def collect(b: OpenAIHTTPBackend) -> str:
    return "".join([ch.text async for ch in b.stream(REQ)])


@pytest.mark.parametrize("streamed", [False, True])
async def test_retry_after_is_honoured_by_chat_and_stream(upstream_factory, streamed):
    seen = {"n": 0}

    def script(body):
        seen["n"] += 1
        return {"fault": "429", "retry_after": "2.5"} if seen["n"] == 1 else {"text": "fine"}

    b = backend(upstream_factory(script).url)
    try:
        text = await collect(b) if streamed else (await b.chat(REQ)).choices[0].text
    finally:
        await b.close()
    assert text == "fine" and seen["n"] == 2
    assert b.waits == [(0, 2.5)]  # the stream used to ignore the header (and classify errors its own way)


@pytest.mark.parametrize("streamed", [False, True])
async def test_chat_and_stream_classify_failures_alike(upstream_factory, streamed):
    up = upstream_factory(lambda body: {"fault": "400"})
    b = backend(up.url)
    with pytest.raises(BackendError) as e:
        await (collect(b) if streamed else b.chat(REQ))
    assert e.value.status == 400 and not e.value.retryable and len(up.requests) == 1  # final: no retry
    await b.close()

    up = upstream_factory(lambda body: {"fault": "timeout"})
    b = backend(up.url, max_retries=1, read_timeout_s=0.3)
    with pytest.raises(BackendTimeout):
        await (collect(b) if streamed else b.chat(REQ))
    assert len(up.requests) == 2 and [w[0] for w in b.waits] == [0]  # retried once, then a timeout
    await b.close()


async def test_stream_is_not_retried_once_text_went_out(upstream_factory):
    up = upstream_factory(lambda body: {"text": "one two three four", "fault": "truncated"})
    b = backend(up.url)
    got: list[str] = []
    with pytest.raises(BackendError, match="truncated"):
        async for ch in b.stream(REQ):
            got.append(ch.text)
    await b.close()
    assert "".join(got) and len(up.requests) == 1 and b.waits == []


async def test_wrappers_forward_everything_and_the_registry_owns_the_limits(upstream_factory):
    """BackendWrapper: calls, lifecycle, models, health and capabilities go through (LimitedBackend dropped models and
    health); the sweep's per-backend cap is the registry's own limit, which judges get through registry.limited()."""
    import asyncio

    from archon_server.backends.base import BackendWrapper
    from archon_server.backends.registry import build_registry
    from archon_server.bench.cache import CacheStore, CachingBackend
    from archon_server.bench.sweep import SweepSpec, wrap_registry
    from conftest import fake_config

    up = upstream_factory(lambda body: {"latency": 0.1})
    cfg = fake_config(up.url)
    cfg.backends[0].supports_n = False
    reg = build_registry(cfg)
    wrap_registry(reg, SweepSpec.model_validate({"name": "s", "architectures": ["fake"], "benchmarks": [{"name": "math"}],
                                                 "backend_concurrency": {"default": 2}}), CacheStore(":memory:"))
    b = reg.get("fake")
    assert isinstance(b, CachingBackend) and isinstance(b, BackendWrapper) and b.supports_n is False
    assert b.unwrap() is b.inner and b.name == "fake"
    judge = reg.limited("judge")
    assert judge.inner is b and judge.sem is reg.limit("fake") and reg.limit("judge") is reg.limit("fake")
    reg.cap("fake", 8)  # never raises a limit
    assert reg.limit("fake")._value == 2  # noqa: SLF001
    await reg.start()
    try:
        assert await judge.health() and await judge.models() == ["fake-model"]
        reqs = [ChatRequest("fake-model", [{"role": "user", "content": f"q{i}"}]) for i in range(6)]
        await asyncio.gather(*(judge.chat(r) for r in reqs))
    finally:
        await reg.close()
    # Never more than 2 upstream requests at once.
    events = sorted([(q.started, 1) for q in up.requests] + [(q.ended, -1) for q in up.requests])
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    assert len(up.requests) == 6 and peak <= 2
