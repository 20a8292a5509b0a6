"""Alias → backend resolution, shared by the runtime, the benchmarks and the search."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..config import BackendConfig, ServerConfig
from .base import Backend

log = logging.getLogger("archon.backends")


class UnknownModel(KeyError):
    pass


@dataclass
class Binding:
    key: str  # the backend's primary alias
    model: str  # model name sent upstream


class BackendRegistry:
    def __init__(self) -> None:
        self._backends: dict[str, Backend] = {}
        self._bindings: dict[str, Binding] = {}
        self._limits: dict[str, asyncio.Semaphore] = {}

    def register(self, alias: str, backend: Backend, model: str = "", *, aliases: list[str] | tuple[str, ...] = (), max_concurrency: int | None = None) -> None:
        for a in [alias, *aliases]:
            if a in self._bindings:
                raise ValueError(f"alias {a!r} registered twice")
            self._bindings[a] = Binding(alias, model or alias)
        self._backends[alias] = backend
        if max_concurrency:
            self._limits[alias] = asyncio.Semaphore(max_concurrency)

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
        return self._limits.get(self._binding(alias).key)

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


def make_backend(cfg: BackendConfig) -> Backend:
    if cfg.kind == "openai":
        from .http import OpenAIHTTPBackend

        return OpenAIHTTPBackend(
            cfg.alias,
            cfg.urls,
            cfg.model,
            api_key_env=cfg.api_key_env,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            max_retries=cfg.max_retries,
            max_connections=cfg.max_connections,
            supports_n=cfg.supports_n,
            breaker_failures=cfg.breaker_failures,
            breaker_cooldown_s=cfg.breaker_cooldown_s,
        )
    if cfg.kind == "local":
        from .local import LocalBackend  # imported lazily: torch is heavy

        return LocalBackend(cfg.model, name=cfg.alias, **cfg.options)
    if cfg.kind == "vllm":
        from .vllm_managed import VLLMManagedBackend

        return VLLMManagedBackend(name=cfg.alias, model=cfg.model, **cfg.options)
    raise ValueError(f"unknown backend kind {cfg.kind!r}")


def build_registry(config: ServerConfig) -> BackendRegistry:
    reg = BackendRegistry()
    for b in config.backends:
        reg.register(b.alias, make_backend(b), b.model or b.alias, aliases=b.aliases, max_concurrency=b.max_concurrency)
    return reg
