"""Backends shared by several server processes: one process hosts them, every ``--workers`` process calls them.

``archon serve --workers N`` runs N server processes on one port. A backend that lives inside a server process (the
embedded engine, managed vLLM) must not be loaded N times: N copies of the weights, N engines competing for the same
cores and no batching across workers. So the parent starts one **backend host** process (``backends/host.py``) that
builds and starts those backends once, and each worker's registry holds a :class:`SharedBackend` for each of them: a
:class:`Backend` whose every call (chat, stream, complete, score, next-token log-probs, reward, ...) goes to the host
over one Unix socket and comes back as the same objects. Requests of all workers meet in the host's one engine, which
batches them together.

Wire: frames of a 4-byte length and a pickled tuple, many calls multiplexed on one connection by call id.
Worker -> host: ``(op, id, alias, payload)``; host -> worker: ``("ok", id, value, stats)``, ``("item", id, chunk)``,
``("end", id, stats)``, ``("err", id, error)``. A call the worker abandons (client gone, timeout, a stream closed
early) sends ``("cancel", id)`` and the host cancels its task, so the engine drops the sequence and frees its blocks.
Written here rather than taken from a library: ``multiprocessing.connection`` blocks (no asyncio), and an RPC
framework (gRPC, ...) would add a dependency and a schema for what is a dozen lines over asyncio streams between two
processes of ours. Pickle is safe here only because the socket lives in a directory only this user can enter
(``host.py`` makes it 0700) and both ends are this package.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

from .base import (
    Backend,
    BackendError,
    BackendTimeout,
    ChatRequest,
    ChatResult,
    CompletionRequest,
    NextTokenRequest,
    NextTokenResult,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
    ScoringUnsupported,
    StreamChunk,
)

log = logging.getLogger("archon.backends.shared")

_LEN = struct.Struct("!I")

# Calls that return one value, and calls that stream chunks: the Backend methods a worker forwards.
UNARY = frozenset({"chat", "complete", "score", "next_token_logprobs", "reward", "check_scoring", "health", "models", "info",
                   "stats", "prompt_tokens", "context_window"})
STREAMS = frozenset({"stream", "stream_complete"})
# What ``info`` reports of a hosted backend: the capability flags components read synchronously (every class flag of
# Backend: one left out reads as its class default in a worker, as refuses_overflow did: a cut answer under
# ``--workers N`` where one worker gave OpenAI's 400).
FLAGS = ("supports_n", "supports_logprobs", "supports_tools", "supports_response_format", "supports_scoring", "supports_reward",
         "sampling_extras", "refuses_overflow", "compiles_response_format")


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return pickle.loads(await reader.readexactly(size))


def write_frame(writer: asyncio.StreamWriter, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LEN.pack(len(data)) + data)


def error_to_wire(e: BaseException) -> tuple[str, str, int | None, bool, float | None]:
    """An exception of the host as plain values (an exception with keyword-only arguments does not unpickle)."""
    if isinstance(e, BackendError):
        return type(e).__name__, str(e), e.status, e.retryable, e.retry_after
    return "BackendError", f"{type(e).__name__}: {e}", 500, False, None


def error_from_wire(wire: tuple[str, str, int | None, bool, float | None], alias: str) -> BackendError:
    kind, msg, status, retryable, retry_after = wire
    if kind == "ScoringUnsupported":
        return ScoringUnsupported(msg, backend=alias)
    if kind == "BackendTimeout":
        return BackendTimeout(msg, backend=alias)
    return BackendError(msg, status=status, retryable=retryable, backend=alias, retry_after=retry_after)


class HostConnection:
    """A worker's one connection to the backend host, shared by all its :class:`SharedBackend` s.

    Connects on first use and again after the host went away (the parent restarts it): calls in flight when the
    connection drops fail with a retryable 503, later calls wait up to ``connect_timeout_s`` for the host to listen.
    """

    def __init__(self, path: str, connect_timeout_s: float = 60.0):
        self.path = path
        self.connect_timeout_s = connect_timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[tuple[Any, ...]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def _connected(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            deadline = time.monotonic() + self.connect_timeout_s
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(self.path)
                    break
                except OSError as e:  # not listening yet, or restarting after a crash
                    if time.monotonic() >= deadline:
                        raise BackendError(f"the shared backend process is not reachable at {self.path}: {e}", status=503,
                                           retryable=True) from e
                    await asyncio.sleep(0.2)
            self._writer = writer
            self._reader_task = asyncio.create_task(self._read(reader, writer), name="shared-backends reader")
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                q = self._pending.get(frame[1])
                if q is not None:  # else: a call abandoned since (its cancel crossed this frame)
                    q.put_nowait(frame)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except Exception:  # an answer that does not unpickle: a bug, said once; the calls in flight fail below
            log.exception("reading from the shared backend process failed; dropping the connection")
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            # Every call still waiting learns that the host went away (it is restarted; the client may retry).
            for q in self._pending.values():
                q.put_nowait(("gone",))

    async def call(self, op: str, alias: str, payload: Any = None) -> AsyncIterator[tuple[Any, ...]]:
        """The host's frames for one call (``item`` frames, then one ``ok``/``end``/``err``); leaving early cancels it
        in the host."""
        writer = await self._connected()
        cid = next(self._ids)
        q: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._pending[cid] = q
        done = False
        try:
            write_frame(writer, (op, cid, alias, payload))
            while True:
                frame = await q.get()
                if frame[0] == "gone":
                    done = True
                    raise BackendError("the shared backend process went away during the call (it is being restarted)",
                                       status=503, retryable=True, backend=alias)
                done = frame[0] != "item"
                yield frame
                if done:
                    return
        finally:
            del self._pending[cid]
            if not done and self._writer is writer and not writer.is_closing():
                with contextlib.suppress(Exception):
                    write_frame(writer, ("cancel", cid, alias, None))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task


class SharedBackend(Backend):
    """A backend hosted by the backend host process, called over :class:`HostConnection` (see the module's doc).

    ``start()`` waits until the host's backend has started (loaded its model), reporting its ``start_status`` for
    ``/health`` meanwhile, and reads its capability flags. ``stats()`` are the host's counters (the one engine's
    batch and cache figures, for ``/metrics``) as of this worker's last answer or the refresh every ``stats_s``,
    whichever is newer: ``/metrics`` is read synchronously and must not wait on another process.
    """

    def __init__(self, alias: str, connection: HostConnection, poll_s: float = 0.5, stats_s: float = 1.0):
        self.name = alias
        self.conn = connection
        self.poll_s = poll_s
        self.stats_s = stats_s
        self._status = "waiting for the shared backend process"
        self._window: int | None = None  # the hosted model's context, once the host has told it
        self._stats: dict[str, Any] = {}
        self._refresher: asyncio.Task[None] | None = None

    async def _unary(self, op: str, payload: Any = None) -> Any:
        async with contextlib.aclosing(self.conn.call(op, self.name, payload)) as frames:
            async for frame in frames:
                if frame[0] == "err":
                    raise error_from_wire(frame[2], self.name)
                if frame[0] == "ok":
                    if frame[3] is not None:
                        self._stats = frame[3]
                    return frame[2]
        raise BackendError("the shared backend process ended the call without an answer", status=502, backend=self.name)

    async def _stream(self, op: str, payload: Any) -> AsyncIterator[StreamChunk]:
        async with contextlib.aclosing(self.conn.call(op, self.name, payload)) as frames:
            async for frame in frames:
                if frame[0] == "item":
                    yield frame[2]
                elif frame[0] == "err":
                    raise error_from_wire(frame[2], self.name)
                elif frame[0] == "end":
                    if frame[2] is not None:
                        self._stats = frame[2]
                    return

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        while True:
            try:
                info = await self._unary("info")
            except BackendError as e:
                if not e.retryable:
                    raise
                self._status = f"waiting for the shared backend process ({e})"  # died while loading: restarted
                await asyncio.sleep(self.poll_s)
                continue
            for flag in FLAGS:
                setattr(self, flag, info["flags"][flag])
            self._status = info["status"]
            if info["state"] == "ready":
                if self._refresher is None:
                    self._refresher = asyncio.create_task(self._refresh_stats(), name=f"stats of {self.name}")
                return
            if info["state"] == "failed":
                raise BackendError(f"failed to start in the shared backend process: {info['error']}", backend=self.name)
            await asyncio.sleep(self.poll_s)

    async def _refresh_stats(self) -> None:
        while True:
            await asyncio.sleep(self.stats_s)
            with contextlib.suppress(BackendError):  # the host restarting: the next refresh or answer brings them
                await self._unary("stats")

    @property
    def start_status(self) -> str:
        return self._status

    def stats(self) -> dict[str, Any]:
        return self._stats

    async def close(self) -> None:  # the backends of one registry share the connection; closing it is idempotent
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        await self.conn.close()

    async def health(self) -> bool:
        try:
            return bool(await self._unary("health"))
        except BackendError:
            return False

    async def models(self) -> list[str]:
        return list(await self._unary("models"))

    # ------------------------------------------------------------------ calls
    async def chat(self, request: ChatRequest) -> ChatResult:
        return await self._unary("chat", request)  # type: ignore[no-any-return]

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        async for ch in self._stream("stream", request):
            yield ch

    async def complete(self, request: CompletionRequest) -> ChatResult:
        return await self._unary("complete", request)  # type: ignore[no-any-return]

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        async for ch in self._stream("stream_complete", request):
            yield ch

    async def context_window(self) -> int | None:
        if self._window is None:  # asked until known (a lazy backend learns it at its first call), then kept
            self._window = await self._unary("context_window")
        return self._window

    async def prompt_tokens(self, request: ChatRequest) -> int | None:
        return await self._unary("prompt_tokens", request)  # type: ignore[no-any-return]

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return await self._unary("score", request)  # type: ignore[no-any-return]

    async def next_token_logprobs(self, request: NextTokenRequest) -> NextTokenResult:
        return await self._unary("next_token_logprobs", request)  # type: ignore[no-any-return]

    async def reward(self, request: RewardRequest) -> RewardResult:
        return await self._unary("reward", request)  # type: ignore[no-any-return]

    async def check_scoring(self, need: str = "score", model: str = "", protocol: str = "vllm_score", probe: bool = True) -> None:
        await self._unary("check_scoring", (need, model, protocol, probe))


# ---------------------------------------------------------------------------- the host's side


class BackendHost:
    """Serves ``backends`` (alias -> started or starting Backend) to worker connections on a Unix socket.

    Every backend starts once, at :meth:`serve`; a call that arrives before its backend is up waits for it.
    """

    def __init__(self, backends: dict[str, Backend]):
        self.backends = backends
        self.starting: dict[str, asyncio.Task[None]] = {}
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def serve(self, path: str) -> None:
        self.starting = {a: asyncio.create_task(b.start(), name=f"start {a}") for a, b in self.backends.items()}
        for alias, task in self.starting.items():
            task.add_done_callback(lambda t, a=alias: self._started(a, t))
        self._server = await asyncio.start_unix_server(self._connection, path)

    async def close(self) -> None:
        """Stop listening, drop every worker's connection (their calls in flight fail over there), close the backends."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in self.starting.values():
            task.cancel()
        results = await asyncio.gather(*(b.close() for b in self.backends.values()), return_exceptions=True)
        for alias, r in zip(self.backends, results):
            if isinstance(r, Exception):
                log.warning("closing backend %s failed: %s", alias, r)

    @staticmethod
    def _started(alias: str, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("backend %s failed to start: %s", alias, task.exception())

    def info(self, alias: str) -> dict[str, Any]:
        backend, task = self.backends[alias], self.starting[alias]
        state = "starting" if not task.done() else "failed" if task.cancelled() or task.exception() else "ready"
        error = str(task.exception()) if state == "failed" and not task.cancelled() else ("cancelled" if state == "failed" else "")
        return {"state": state, "error": error, "status": backend.start_status, "flags": {f: getattr(backend, f) for f in FLAGS}}

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        calls: dict[int, asyncio.Task[None]] = {}
        self._writers.add(writer)
        try:
            while True:
                op, cid, alias, payload = await read_frame(reader)
                if op == "cancel":
                    task = calls.get(cid)
                    if task is not None:
                        task.cancel()
                    continue
                task = asyncio.create_task(self._call(writer, op, cid, alias, payload))
                calls[cid] = task
                task.add_done_callback(lambda _t, c=cid: calls.pop(c, None))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the worker went away: what it had in flight is abandoned
        finally:
            for task in list(calls.values()):
                task.cancel()
            self._writers.discard(writer)
            writer.close()

    async def _call(self, writer: asyncio.StreamWriter, op: str, cid: int, alias: str, payload: Any) -> None:
        def send(frame: tuple[Any, ...]) -> None:
            if not writer.is_closing():  # the worker went away: nobody to tell
                write_frame(writer, frame)

        try:
            backend = self.backends.get(alias)
            if backend is None:
                raise BackendError(f"backend {alias!r} is not hosted here (hosted: {', '.join(self.backends)})", status=500)
            if op == "info":
                send(("ok", cid, self.info(alias), None))
                return
            if op not in ("health", "models", "stats") and not (op == "check_scoring" and not payload[3]):
                await asyncio.shield(self.starting[alias])  # a call before the model is loaded waits for it
            stats = getattr(backend, "stats", None)
            if op in STREAMS:
                async with contextlib.aclosing(getattr(backend, op)(payload)) as chunks:
                    async for ch in chunks:
                        send(("item", cid, ch))
                        await writer.drain()
                send(("end", cid, stats() if callable(stats) else None))
                return
            if op not in UNARY:
                raise BackendError(f"unknown call {op!r}", status=500)
            if op == "check_scoring":
                value = await backend.check_scoring(*payload)
            elif op in ("health", "models", "context_window"):
                value = await getattr(backend, op)()
            elif op == "stats":
                value = None  # the answer's stats are the value
            else:
                value = await getattr(backend, op)(payload)
            send(("ok", cid, value, stats() if callable(stats) else None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller as its BackendError
            send(("err", cid, error_to_wire(e)))
