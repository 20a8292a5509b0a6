"""Alias → backend resolution, shared by the runtime, the benchmarks and the search."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..config import BackendConfig, ServerConfig
from ..exceptions import ArchonError
from ..engine.model_store import unknown_model
from ..spec import SpecError
from .base import (
    Backend,
    BackendWrapper,
    ChatRequest,
    ChatResult,
    CompletionRequest,
    NextTokenRequest,
    NextTokenResult,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
    StreamChunk,
)

log = logging.getLogger("archon.backends")


class UnknownModel(ArchonError, KeyError):
    pass


@dataclass
class Binding:
    key: str  # the backend's primary alias
    model: str  # model name sent upstream


class _Limited(BackendWrapper):
    """Every call of ``inner`` holds one slot of the registry's limit for it (a stream: until it ends)."""

    def __init__(self, inner: Backend, limit: asyncio.Semaphore):
        super().__init__(inner)
        self.sem = limit

    async def chat(self, request: ChatRequest) -> ChatResult:
        async with self.sem:
            return await self.inner.chat(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        # aclosing: a consumer that stops early (a judge at its verdict) ends the inner stream now, not at GC
        async with self.sem, contextlib.aclosing(self.inner.stream(request)) as chunks:
            async for ch in chunks:
                yield ch

    async def complete(self, request: CompletionRequest) -> ChatResult:
        async with self.sem:
            return await self.inner.complete(request)

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        async with self.sem:
            async for ch in self.inner.stream_complete(request):
                yield ch

    async def score(self, request: ScoreRequest) -> ScoreResult:
        async with self.sem:
            return await self.inner.score(request)

    async def next_token_logprobs(self, request: NextTokenRequest) -> NextTokenResult:
        async with self.sem:
            return await self.inner.next_token_logprobs(request)

    async def reward(self, request: RewardRequest) -> RewardResult:
        async with self.sem:
            return await self.inner.reward(request)


class BackendRegistry:
    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._bindings: dict[str, Binding] = {}
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._sizes: dict[str, int] = {}

    def register(self, alias: str, backend: Backend, model: str = "", *, aliases: list[str] | tuple[str, ...] = (), max_concurrency: int | None = None) -> None:
        for a in [alias, *aliases]:
            if a in self._bindings:
                raise ValueError(f"alias {a!r} registered twice")
            self._bindings[a] = Binding(alias, model or alias)
        self._backends[alias] = backend
        if max_concurrency:
            self._limits[alias] = asyncio.Semaphore(max_concurrency)
            self._sizes[alias] = max_concurrency

    def __contains__(self, alias: str) -> bool:
        return alias in self._bindings

    def aliases(self) -> list[str]:
        return list(self._bindings)

    def backends(self) -> dict[str, Backend]:
        return dict(self._backends)

    def _binding(self, alias: str) -> Binding:
        try:
            return self._bindings[alias]
        except KeyError:
            raise UnknownModel(alias) from None

    def get(self, alias: str) -> Backend:
        return self._backends[self._binding(alias).key]

    def model_name(self, alias: str) -> str:
        return self._binding(alias).model

    def limit(self, alias: str) -> asyncio.Semaphore | None:
        """The backend's concurrency limit (config ``max_concurrency``; all aliases of a backend share it)."""
        return self._limits.get(self._binding(alias).key)

    def cap(self, alias: str, max_concurrency: int) -> None:
        """Lower the backend's limit to ``max_concurrency`` (never raises it), e.g. a sweep's per-backend cap.
        Call before any call is in flight: calls holding the old limit's slots are not counted against the new one."""
        key = self._binding(alias).key
        old = self._limits.get(key)
        if old is None or max_concurrency < self._sizes.get(key, max_concurrency + 1):
            self._limits[key] = asyncio.Semaphore(max_concurrency)
            self._sizes[key] = max_concurrency

    def limited(self, alias: str) -> Backend:
        """The backend with its limit applied to every call, for callers outside the graph runtime (a sweep's
        judges); the runtime's components take the same slots (ComponentContext.call)."""
        backend, limit = self.get(alias), self.limit(alias)
        return backend if limit is None else _Limited(backend, limit)

    def wrap(self, fn: Callable[[str, Backend], Backend]) -> None:
        """Replace every backend by ``fn(alias, backend)`` (e.g. a caching wrapper)."""
        self._backends = {k: fn(k, b) for k, b in self._backends.items()}

    async def start(self) -> None:
        await asyncio.gather(*(b.start() for b in self._backends.values()))

    async def close(self) -> None:
        results = await asyncio.gather(*(b.close() for b in self._backends.values()), return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                log.warning("closing a backend failed: %s", r)


# kind -> (module, class) of its backend, imported on first use (torch is heavy, vLLM's client side less so); each
# class builds itself with ``from_config(cfg)`` from its kind's typed config (config.BackendConfig).
BACKEND_FACTORIES: dict[str, tuple[str, str]] = {
    "openai": ("archon_server.backends.http", "OpenAIHTTPBackend"),
    "local": ("archon_server.backends.local", "LocalBackend"),
    "vllm": ("archon_server.backends.vllm_managed", "VLLMManagedBackend"),
}


def make_backend(cfg: BackendConfig) -> Backend:
    try:
        module, cls = BACKEND_FACTORIES[cfg.kind]
    except KeyError:
        raise ValueError(f"unknown backend kind {cfg.kind!r}") from None
    return getattr(importlib.import_module(module), cls).from_config(cfg)  # type: ignore[no-any-return]


# Kinds whose backend lives inside the server process (a model loaded, processes launched): with ``--workers N`` they
# run once, in the backend host (backends/host.py), and each worker calls them there.
IN_PROCESS_KINDS = frozenset(BACKEND_FACTORIES) - {"openai"}


def _built(i: int, b: BackendConfig) -> Backend:
    try:
        return make_backend(b)
    except (ValueError, TypeError) as e:
        raise SpecError([f"backends[{i}] ({b.alias}): {e}"]) from None


def build_registry(config: ServerConfig, shared: str | None = None) -> BackendRegistry:
    """Every backend of the config, built now: a backend that cannot be built is a start-up error naming its entry.
    ``shared``: the socket of a backend host serving the in-process kinds to several server processes; those
    backends are then :class:`~.shared.SharedBackend` s calling it, built and validated in the host."""
    conn = None
    if shared is not None:
        from .shared import HostConnection

        conn = HostConnection(shared)
    reg = BackendRegistry()
    for i, b in enumerate(config.backends):
        # The model store's names are fixed: a local model it does not know is refused now, naming the entry, not
        # after start-up behind a /health that stays 503 (checked here, not in config: config is a leaf).
        why = unknown_model(b.model) if b.kind == "local" and b.model else None  # "": the default model
        if why is not None:
            raise SpecError([f"backends[{i}].model: {why}"])
        if conn is not None and b.kind in IN_PROCESS_KINDS:
            from .shared import SharedBackend

            backend: Backend = SharedBackend(b.alias, conn)
        else:
            backend = _built(i, b)
        reg.register(b.alias, backend, b.model or b.alias, aliases=b.aliases, max_concurrency=b.max_concurrency)
    return reg


def hosted_backends(config: ServerConfig) -> dict[str, Backend]:
    """The config's in-process backends by alias, built and not started: what a backend host serves."""
    return {b.alias: _built(i, b) for i, b in enumerate(config.backends) if b.kind in IN_PROCESS_KINDS}
