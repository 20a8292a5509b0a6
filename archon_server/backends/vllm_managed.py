"""Managed vLLM: our server launches ``vllm serve`` processes and talks to them over HTTP.

Each replica is one OpenAI-compatible vLLM server on its own port.  A monitor task per
replica restarts it with exponential backoff when it dies; requests go through
:class:`~archon_server.backends.http.OpenAIHTTPBackend`, which balances replicas by
outstanding requests and skips one that is down (circuit breaker).

Launch command: by default ``<python> -m vllm.entrypoints.openai.api_server {args}``
where ``python`` is the interpreter of the vLLM venv (``scripts/install_vllm_cpu.sh``).
The module form is used because the ``vllm`` console script of the ``vllm-cpu``
distribution fails (it looks up metadata of a distribution named ``vllm``).  A full
``command`` template may replace it, e.g. ``["vllm", "serve", "{model}", "{args}"]``
on a GPU image; placeholders: ``{python} {model} {served_model_name} {host} {port}
{replica}``, and the list element ``"{args}"`` expands to the generated flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from ..config import VLLMBackendConfig, VLLMOptions
from .base import (
    Backend,
    BackendError,
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
from .process import SupervisedProcess, free_port

log = logging.getLogger("archon.backends.vllm")

R = TypeVar("R", ChatRequest, CompletionRequest)

DEFAULT_MODULE = "vllm.entrypoints.openai.api_server"


def default_python() -> str:
    env = os.environ.get("ARCHON_VLLM_PYTHON")
    if env:
        return env
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        cand = base / ".venv-vllm" / "bin" / "python"
        if cand.exists():
            return str(cand)
    return sys.executable


def vllm_missing(python: str | None = None) -> str | None:
    """Why vLLM cannot be launched with ``python`` (default: :func:`default_python`), or None if it can."""
    import subprocess

    py = python or default_python()
    if not Path(py).exists() and not any((Path(d) / py).exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
        return f"no vLLM interpreter at {py} (run scripts/install_vllm_cpu.sh or set ARCHON_VLLM_PYTHON)"
    try:
        probe = subprocess.run(
            [py, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"], capture_output=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {py}: {e}"
    if probe.returncode != 0:
        return f"vllm is not installed for {py} (run scripts/install_vllm_cpu.sh)"
    return None


def resolve_model(model: str) -> str:
    """A path is used as is; a model-store name is pulled (converted once); anything else is a hub id for vLLM."""
    if Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    try:
        from ..engine import model_store
    except ImportError:  # engine not installed: let vLLM resolve the name
        return model
    if model in getattr(model_store, "REGISTRY", {}):
        return str(model_store.pull(model))
    return model


def build_args(opts: VLLMOptions, model_path: str, served: str, port: int) -> list[str]:
    args = ["--model", model_path, "--served-model-name", served, "--host", opts.host, "--port", str(port)]
    if opts.tensor_parallel_size is not None:
        args += ["--tensor-parallel-size", str(opts.tensor_parallel_size)]
    if opts.gpu_memory_utilization is not None:
        args += ["--gpu-memory-utilization", str(opts.gpu_memory_utilization)]
    if opts.max_model_len is not None:
        args += ["--max-model-len", str(opts.max_model_len)]
    if opts.dtype:
        args += ["--dtype", opts.dtype]
    if opts.speculative_config:
        args += ["--speculative-config", json.dumps(opts.speculative_config)]
    if opts.enforce_eager:
        args.append("--enforce-eager")
    return args + list(opts.extra_args)


def build_command(opts: VLLMOptions, python: str, model_path: str, served: str, port: int, replica: int) -> list[str]:
    template = opts.command or ["{python}", "-m", DEFAULT_MODULE, "{args}"]
    values = {"python": python, "model": model_path, "served_model_name": served, "host": opts.host, "port": port, "replica": replica}
    argv: list[str] = []
    for part in template:
        if part == "{args}":
            argv += build_args(opts, model_path, served, port)
        else:
            argv.append(part.format(**values))
    return argv


@dataclass
class ReplicaState:
    index: int
    port: int
    argv: list[str]
    env: dict[str, str]
    state: str = "stopped"  # starting | ready | restarting | failed | stopped
    restarts: int = 0
    pids: list[int] = field(default_factory=list)  # every pid this replica ever had, newest last
    last_error: str | None = None
    proc: SupervisedProcess | None = None
    monitor: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def parse_prometheus(text: str) -> list[tuple[str, float]]:
    """(metric name, value) of every sample line of a Prometheus text exposition; ``*_created`` timestamps skipped."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        if not name or name.endswith("_created"):
            continue
        try:
            out.append((name, float(value)))
        except ValueError:
            continue
    return out


def _greedy_fanout(request: ChatRequest) -> bool:
    return request.params.n > 1 and request.params.temperature == 0


class VLLMManagedBackend(Backend):
    supports_n = True
    supports_logprobs = True

    def __init__(self, name: str = "vllm", model: str = "", **options: Any):
        self.name = name
        opts = dict(options)
        if model:
            opts.setdefault("model", model)
        self.opts = VLLMOptions(**opts)
        self.served_model_name = self.opts.served_model_name or name
        self.python = self.opts.python or default_python()
        self._level = logging.getLevelName(self.opts.log_level.upper())
        if not isinstance(self._level, int):
            self._level = logging.INFO
        self.replicas: list[ReplicaState] = []
        self._http: Backend | None = None
        self._closing = False
        self._started = False
        self._start_lock = asyncio.Lock()
        # vLLM calls tools only when launched with --enable-auto-tool-choice (and a --tool-call-parser for the model).
        self.supports_tools = "--enable-auto-tool-choice" in self.opts.extra_args or bool(self.opts.command)

    @classmethod
    def from_config(cls, cfg: VLLMBackendConfig) -> "VLLMManagedBackend":
        return cls(name=cfg.alias, **cfg.options.model_dump(exclude_unset=True))

    # -- introspection (tests, /metrics) ---------------------------------------
    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    @property
    def pids(self) -> list[int | None]:
        return [r.proc.pid if r.proc and r.proc.running else None for r in self.replicas]

    @property
    def base_urls(self) -> list[str]:
        return [f"{r.url}/v1" for r in self.replicas]

    def stats(self) -> dict[str, Any]:
        return {
            "replicas": [
                {"index": r.index, "url": r.url, "state": r.state, "pid": self.pids[r.index], "restarts": r.restarts, "last_error": r.last_error}
                for r in self.replicas
            ],
            "restarts": self.restarts,
        }

    async def vllm_metrics(self) -> dict[str, float]:
        """vLLM's Prometheus counters/gauges summed over replicas (labels dropped), e.g.
        ``vllm:generation_tokens_total``, ``vllm:spec_decode_num_draft_tokens_total``,
        ``vllm:spec_decode_num_accepted_tokens_total``, ``vllm:num_requests_running``.

        Speculative-decoding acceptance is only reported here: vLLM does not put it in
        the completion body.  Replicas that do not answer are skipped.
        """
        out: dict[str, float] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            for r in self.replicas:
                try:
                    async with s.get(f"{r.url}/metrics") as resp:
                        if resp.status != 200:
                            continue
                        text = await resp.text()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    continue
                for name, value in parse_prometheus(text):
                    out[name] = out.get(name, 0.0) + value
        return out

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            self._closing = False
            loop = asyncio.get_running_loop()
            # Pulling may convert a GGUF (seconds); keep the event loop free meanwhile.
            model_path = await loop.run_in_executor(None, resolve_model, self.opts.model)
            for i in range(self.opts.replicas):
                port = self.opts.port + i if self.opts.port else free_port(self.opts.host)
                env = dict(self.opts.env)
                if self.opts.replica_devices is not None:
                    env["CUDA_VISIBLE_DEVICES"] = self.opts.replica_devices[i]
                if self.opts.api_key_env and os.environ.get(self.opts.api_key_env):
                    env["VLLM_API_KEY"] = os.environ[self.opts.api_key_env]
                argv = build_command(self.opts, self.python, model_path, self.served_model_name, port, i)
                self.replicas.append(ReplicaState(index=i, port=port, argv=argv, env=env))
            try:
                await asyncio.gather(*(self._launch(r) for r in self.replicas))
            except BaseException:
                await self.close()
                raise
            for r in self.replicas:
                r.monitor = asyncio.create_task(self._monitor(r), name=f"vllm monitor {self.name}:{r.index}")
            from .http import OpenAIHTTPBackend

            self._http = OpenAIHTTPBackend(
                self.name,
                self.base_urls,
                self.served_model_name,
                api_key_env=self.opts.api_key_env,
                read_timeout_s=self.opts.read_timeout_s,
            )
            await self._http.start()
            self._started = True

    async def _launch(self, r: ReplicaState) -> None:
        """Start one replica and wait for /health; raise BackendError naming the command and its last log lines."""
        r.state = "starting"
        proc = SupervisedProcess(r.argv, prefix=f"[vllm:{self.name}:{r.index}]", env=r.env, logger=log, log_level=self._level)
        r.proc = proc
        try:
            await proc.start()
        except OSError as e:
            r.state = "failed"
            r.last_error = f"cannot execute {proc.command_line()}: {e}"
            raise BackendError(r.last_error, status=503, backend=self.name) from None
        assert proc.pid is not None
        r.pids.append(proc.pid)
        log.info("vllm %s replica %d: started pid %d on port %d: %s", self.name, r.index, proc.pid, r.port, proc.command_line())
        t0 = time.monotonic()
        deadline = t0 + self.opts.startup_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while True:
                if not proc.running:
                    rc = await proc.wait()
                    r.state = "failed"
                    r.last_error = (
                        f"vLLM replica {r.index} of {self.name!r} exited with status {rc} before it was ready.\n"
                        f"command: {proc.command_line()}\nlast log lines:\n{proc.last_lines()}"
                    )
                    raise BackendError(r.last_error, status=503, backend=self.name)
                if time.monotonic() > deadline:
                    await proc.stop(self.opts.stop_grace_s)
                    r.state = "failed"
                    r.last_error = (
                        f"vLLM replica {r.index} of {self.name!r} was not healthy within {self.opts.startup_timeout_s:.0f}s.\n"
                        f"command: {proc.command_line()}\nlast log lines:\n{proc.last_lines()}"
                    )
                    raise BackendError(r.last_error, status=503, backend=self.name)
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with s.get(f"{r.url}/health") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.5)
        r.state = "ready"
        r.last_error = None
        log.info("vllm %s replica %d: ready after %.1fs", self.name, r.index, time.monotonic() - t0)

    async def _monitor(self, r: ReplicaState) -> None:
        """Restart a replica that died, with exponential backoff; reset the backoff once it comes up."""
        failures = 0
        while not self._closing:
            assert r.proc is not None
            rc = await r.proc.wait()
            if self._closing:
                return
            r.state = "restarting"
            r.last_error = f"exited with status {rc}; last log lines:\n{r.proc.last_lines(10)}"
            log.warning("vllm %s replica %d (pid %s) exited with status %s", self.name, r.index, r.proc.pid, rc)
            if not self.opts.restart:
                r.state = "failed"
                return
            while not self._closing:
                delay = min(self.opts.restart_backoff_s * 2**failures, self.opts.restart_backoff_max_s)
                await asyncio.sleep(delay)
                if self._closing:
                    return
                r.restarts += 1
                try:
                    await self._launch(r)
                    failures = 0
                    break
                except BackendError as e:
                    failures += 1
                    r.state = "restarting"
                    log.error("vllm %s replica %d: restart %d failed (next try in %.0fs): %s", self.name, r.index, r.restarts,
                              min(self.opts.restart_backoff_s * 2**failures, self.opts.restart_backoff_max_s), e)

    async def close(self) -> None:
        self._closing = True
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.close()
            self._http = None
        for r in self.replicas:
            if r.monitor is not None and r.monitor is not asyncio.current_task():
                r.monitor.cancel()
        for r in self.replicas:
            if r.monitor is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await r.monitor
        await asyncio.gather(*(r.proc.stop(self.opts.stop_grace_s) for r in self.replicas if r.proc is not None), return_exceptions=True)
        for r in self.replicas:
            r.state = "stopped"
        self.replicas = []
        self._started = False

    # -- requests: delegated to the HTTP backend -----------------------------------
    def _client(self) -> Backend:
        if self._http is None:
            raise BackendError(f"vLLM backend {self.name!r} is not started", status=503, retryable=False, backend=self.name)
        return self._http

    def _rename(self, request: R) -> R:
        # We launched the server, so the only model it serves is ours, whatever alias the caller used.
        return request if request.model == self.served_model_name else replace(request, model=self.served_model_name)

    async def chat(self, request: ChatRequest) -> ChatResult:
        request = self._rename(request)
        k = request.params.n
        if not _greedy_fanout(request):
            return await self._client().chat(request)
        # vLLM answers 400 "n must be 1 when using greedy sampling": greedy samples are
        # identical anyway, so ask once and copy (one upstream request, honest usage).
        res = await self._client().chat(replace(request, params=replace(request.params, n=1)))
        one = res.choices[0]
        res.choices = [replace(one, index=i) for i in range(k)]
        return res

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        request = self._rename(request)
        k = request.params.n
        if not _greedy_fanout(request):
            async for chunk in self._client().stream(request):
                yield chunk
            return
        async for chunk in self._client().stream(replace(request, params=replace(request.params, n=1))):
            if chunk.text or chunk.finish_reason:
                for i in range(k):
                    yield replace(chunk, index=i)
            else:
                yield chunk

    async def complete(self, request: CompletionRequest) -> ChatResult:
        return await self._client().complete(self._rename(request))

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        async for chunk in self._client().stream_complete(self._rename(request)):
            yield chunk

    # Scoring goes to the same server (vLLM's prompt_logprobs, /tokenize, /score): see backends/http_scoring.py.
    supports_scoring = True
    supports_reward = True

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return await self._client().score(replace(request, model=self.served_model_name))

    async def next_token_logprobs(self, request: NextTokenRequest) -> NextTokenResult:
        return await self._client().next_token_logprobs(replace(request, model=self.served_model_name))

    async def reward(self, request: RewardRequest) -> RewardResult:
        return await self._client().reward(replace(request, model=self.served_model_name))

    async def check_scoring(self, need: str = "score", model: str = "", protocol: str = "vllm_score", probe: bool = True) -> None:
        if probe:
            await self._client().check_scoring(need, self.served_model_name, protocol)

    async def context_window(self) -> int | None:
        return await self._http.context_window() if self._http is not None else None

    async def prompt_tokens(self, request: ChatRequest) -> int | None:
        return await self._http.prompt_tokens(self._rename(request)) if self._http is not None else None

    async def models(self) -> list[str]:
        return await self._client().models() if self._http is not None else []

    async def health(self) -> bool:
        return self._http is not None and any(r.state == "ready" for r in self.replicas) and await self._http.health()
