"""A backend hosted in one process and called from others (``archon serve --workers N``, backends/shared.py): the
wire gives back the same objects and errors, an abandoned call is cancelled in the host, a host that goes away fails
only the calls in flight and a new one is used, and a worker's start waits for the host's model to load."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from archon_server.backends.base import (
    Backend,
    BackendError,
    ChatRequest,
    ChatResult,
    Choice,
    SamplingParams,
    ScoreRequest,
    ScoringUnsupported,
    StreamChunk,
    Usage,
)
from archon_server.backends.local import LocalBackend
from archon_server.backends.shared import FLAGS, BackendHost, HostConnection, SharedBackend


class Scripted(Backend):
    """Answers by the first message: ``fail`` (a retryable 429), ``crash`` (a bug), ``hang`` (until cancelled)."""

    name = "scripted"
    supports_tools = False

    def __init__(self, start_gate: asyncio.Event | None = None, start_error: str | None = None):
        self.start_gate = start_gate
        self.start_error = start_error
        self.calls = 0
        self.cancelled = asyncio.Event()
        self.stream_closed = asyncio.Event()
        self.sent = 0

    async def start(self) -> None:
        if self.start_gate is not None:
            await self.start_gate.wait()
        if self.start_error:
            raise BackendError(self.start_error)

    @property
    def start_status(self) -> str:
        return "loading scripted-model" if self.start_gate is not None and not self.start_gate.is_set() else "ready"

    def stats(self) -> dict[str, int]:
        return {"requests": self.calls}

    async def chat(self, request: ChatRequest) -> ChatResult:
        self.calls += 1
        what = request.messages[0]["content"]
        if what == "fail":
            raise BackendError("upstream said no", status=429, retryable=True, retry_after=2.0)
        if what == "crash":
            raise RuntimeError("boom")
        if what == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return ChatResult([Choice(text=f"echo {what} #{i}", index=i) for i in range(request.params.n)], Usage(3, 4), model="m")

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        try:
            for i in range(300):
                self.sent += 1
                yield StreamChunk(text=f"t{i} ")
                await asyncio.sleep(0.001)
        finally:
            self.stream_closed.set()


def ask(text: str, n: int = 1) -> ChatRequest:
    return ChatRequest(model="m", messages=[{"role": "user", "content": text}], params=SamplingParams(n=n))


@contextlib.asynccontextmanager
async def hosted(path: str, backend: Backend) -> AsyncIterator[tuple[BackendHost, SharedBackend]]:
    host = BackendHost({"a": backend})
    await host.serve(path)
    shared = SharedBackend("a", HostConnection(path, connect_timeout_s=5), poll_s=0.02, stats_s=0.05)
    try:
        yield host, shared
    finally:
        await shared.close()
        await host.close()


async def test_calls_come_back_as_the_same_objects(tmp_path):
    backend = Scripted()
    async with hosted(str(tmp_path / "s"), backend) as (_host, shared):
        await shared.start()
        assert shared.supports_tools is False and shared.supports_n is True  # the hosted backend's flags
        res = await shared.chat(ask("hello", n=3))
        assert shared.stats() == {"requests": 1}  # the host's counters as of that answer
        assert res == await backend.chat(ask("hello", n=3))  # (another caller of the hosted backend: requests 2)
        assert [c.text for c in res.choices] == ["echo hello #0", "echo hello #1", "echo hello #2"]
        for _ in range(500):  # another worker's calls: this worker's /metrics learns of them within a refresh
            if shared.stats() == {"requests": 2}:
                break
            await asyncio.sleep(0.02)
        assert shared.stats() == {"requests": 2}
        chunks = [c async for c in shared.stream(ask("x"))]
        assert len(chunks) == 300 and chunks[3].text == "t3 "
        assert await shared.health() is True and await shared.models() == []
        with pytest.raises(ScoringUnsupported, match="cannot score"):  # the hosted backend's own refusal, same type
            await shared.score(ScoreRequest(model="m", messages=[{"role": "user", "content": "q"}], continuations=["a"]))


async def test_errors_keep_their_kind(tmp_path):
    async with hosted(str(tmp_path / "s"), Scripted()) as (_host, shared):
        with pytest.raises(BackendError) as e:
            await shared.chat(ask("fail"))
        assert (e.value.status, e.value.retryable, e.value.retry_after, e.value.backend) == (429, True, 2.0, "a")
        assert str(e.value) == "upstream said no"
        with pytest.raises(BackendError, match="RuntimeError: boom") as e:
            await shared.chat(ask("crash"))
        assert e.value.status == 500 and not e.value.retryable
        assert (await shared.chat(ask("fine"))).choices[0].text == "echo fine #0"  # the connection goes on


async def test_abandoned_calls_are_cancelled_in_the_host(tmp_path):
    backend = Scripted()
    async with hosted(str(tmp_path / "s"), backend) as (_host, shared):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(shared.chat(ask("hang")), 0.2)
        await asyncio.wait_for(backend.cancelled.wait(), 5)  # the host's task was cancelled, not left running
        async with contextlib.aclosing(shared.stream(ask("long"))) as chunks:
            async for ch in chunks:
                if ch.text == "t2 ":
                    break
        await asyncio.wait_for(backend.stream_closed.wait(), 5)
        assert backend.sent < 300
        assert (await shared.chat(ask("after"))).choices[0].text == "echo after #0"


async def test_a_host_that_goes_away_fails_the_calls_in_flight_and_the_next_host_is_used(tmp_path):
    path = str(tmp_path / "s")
    host = BackendHost({"a": Scripted()})
    await host.serve(path)
    shared = SharedBackend("a", HostConnection(path, connect_timeout_s=10))
    try:
        await shared.start()
        inflight = asyncio.create_task(shared.chat(ask("hang")))
        await asyncio.sleep(0.1)
        await host.close()  # as a crash would: the connection drops under the call
        with pytest.raises(BackendError, match="went away") as e:
            await asyncio.wait_for(inflight, 10)
        assert e.value.status == 503 and e.value.retryable
        (tmp_path / "s").unlink()
        later = asyncio.create_task(shared.chat(ask("again")))  # waits for a host to listen
        await asyncio.sleep(0.3)
        host = BackendHost({"a": Scripted()})
        await host.serve(path)
        assert (await asyncio.wait_for(later, 10)).choices[0].text == "echo again #0"
    finally:
        await shared.close()
        await host.close()


async def test_start_waits_for_the_hosted_backend_and_says_what_it_waits_for(tmp_path):
    gate = asyncio.Event()
    async with hosted(str(tmp_path / "s"), Scripted(start_gate=gate)) as (_host, shared):
        starting = asyncio.create_task(shared.start())
        early = asyncio.create_task(shared.chat(ask("early")))  # a call before the load waits for it
        for _ in range(500):
            if shared.start_status == "loading scripted-model":
                break
            await asyncio.sleep(0.02)
        assert shared.start_status == "loading scripted-model" and not starting.done() and not early.done()
        # what a worker asks while it starts (its lifespan checks scorers) is answered without waiting for the load
        with pytest.raises(ScoringUnsupported):
            await asyncio.wait_for(shared.check_scoring("score", probe=False), 2)
        gate.set()
        await asyncio.wait_for(starting, 5)
        assert (await asyncio.wait_for(early, 5)).choices[0].text == "echo early #0"
    async with hosted(str(tmp_path / "t"), Scripted(start_error="model file is corrupt")) as (_host, shared):
        with pytest.raises(BackendError, match="failed to start in the shared backend process: model file is corrupt"):
            await shared.start()


async def test_start_outlives_a_host_that_dies_while_loading(tmp_path):
    path = str(tmp_path / "s")
    host = BackendHost({"a": Scripted(start_gate=asyncio.Event())})  # never finishes loading
    await host.serve(path)
    shared = SharedBackend("a", HostConnection(path, connect_timeout_s=10), poll_s=0.02)
    try:
        starting = asyncio.create_task(shared.start())
        for _ in range(500):  # wait for the host to say it is loading (a fixed 0.2 s sleep may end first on a loaded machine)
            if shared.start_status == "loading scripted-model":
                break
            await asyncio.sleep(0.02)
        assert shared.start_status == "loading scripted-model"
        await host.close()  # crashed while loading: the parent starts another
        (tmp_path / "s").unlink()
        await asyncio.sleep(0.2)
        assert not starting.done()
        host = BackendHost({"a": Scripted()})
        await host.serve(path)
        await asyncio.wait_for(starting, 10)
        assert (await shared.chat(ask("up"))).choices[0].text == "echo up #0"
    finally:
        await shared.close()
        await host.close()


class LikeLocal(Scripted):
    """The embedded engine's capability flags (LocalBackend's own class attributes) on a scripted backend."""

    refuses_overflow = LocalBackend.refuses_overflow
    supports_response_format = LocalBackend.supports_response_format


async def test_a_workers_backend_has_the_hosted_backends_flags(tmp_path):
    """``refuses_overflow`` was not copied: under ``--workers N`` an explicit max_tokens past the context was cut
    instead of OpenAI's 400 (one worker: the 400). Every capability flag of Backend is copied, this one included."""
    flags = {k for cls in Backend.__mro__ for k in vars(cls)
             if k.startswith(("supports_", "refuses_")) or k == "sampling_extras"}
    assert flags <= set(FLAGS)
    assert LikeLocal.refuses_overflow is True
    async with hosted(str(tmp_path / "s"), LikeLocal()) as (_host, shared):
        assert shared.refuses_overflow is False  # not known before start: the class default
        await shared.start()
        assert {f: getattr(shared, f) for f in FLAGS} == {f: getattr(LikeLocal, f) for f in FLAGS}
        assert shared.refuses_overflow is True
