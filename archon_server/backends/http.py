"""OpenAI-compatible HTTP backend (vLLM, llama.cpp server, Ollama, any provider).

One keep-alive connection pool per backend (.transport); connect/read timeouts; retries with
exponential backoff and full jitter on 429/5xx/connection errors (never once a
stream has started emitting, so no text is duplicated); SSE parsing; several
replicas per backend with least-outstanding-requests routing and a circuit
breaker that skips a replica that keeps failing for a cool-down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar


from ..config import BackendConfigBase, OpenAIBackendConfig
from .base import (
    Backend,
    BackendError,
    BackendTimeout,
    ChatRequest,
    ChatResult,
    Choice,
    CompletionRequest,
    StreamChunk,
    TokenLogprob,
    Usage,
)
from .http_scoring import HTTPScoring
from .jsonbody import INVALID, dumps, loads
from .pool import Replica, ReplicaPool
from .transport import ConnectionPool, Response, header_block

T = TypeVar("T")

log = logging.getLogger("archon.backends.http")

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


def _greedy_n(request: ChatRequest) -> bool:
    return request.params.n > 1 and request.params.temperature == 0


def _single(request: ChatRequest) -> ChatRequest:
    return dataclasses.replace(request, params=dataclasses.replace(request.params, n=1))


def _body(request: ChatRequest, stream: bool) -> dict[str, Any]:
    p = request.params
    body: dict[str, Any] = {
        "model": request.model,
        "messages": request.messages,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_tokens": p.max_tokens,
        "n": p.n,
        "stream": stream,
    }
    if p.stop:
        body["stop"] = p.stop
    if p.seed is not None:
        body["seed"] = p.seed
    if p.top_k is not None:
        body["top_k"] = p.top_k
    if p.logprobs:
        body["logprobs"] = True
        if p.top_logprobs:
            body["top_logprobs"] = p.top_logprobs
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(p.extra)  # vLLM extra sampling params (repetition_penalty, min_tokens, ...)
    return body


def _completion_body(request: CompletionRequest, stream: bool) -> dict[str, Any]:
    """POST /v1/completions: the chat body's sampling fields with `prompt` for `messages`, `logprobs` an int."""
    body = _body(ChatRequest(request.model, [], request.params), stream)
    del body["messages"]
    body.pop("top_logprobs", None)
    body["prompt"] = request.prompt
    if request.params.logprobs:
        body["logprobs"] = request.params.top_logprobs
    if request.echo:
        body["echo"] = True
    return body


def _parse_logprobs(lp: Any) -> list[TokenLogprob] | None:
    """An upstream's logprobs, chat's shape (``content``) or text_completion's legacy one (``tokens``...); in the
    legacy shape an echoed prompt's first token has a null logprob and null top_logprobs, and keeps them."""
    if isinstance(lp, dict) and isinstance(lp.get("tokens"), list):  # text_completion's legacy shape
        tops = lp.get("top_logprobs") or []
        return [
            TokenLogprob(str(t), None if v is None else float(v),
                         [(str(a), float(b)) for a, b in tops[j].items()] if j < len(tops) and isinstance(tops[j], dict)
                         else None if j < len(tops) and tops[j] is None and v is None else [])
            for j, (t, v) in enumerate(zip(lp["tokens"], lp.get("token_logprobs") or []))
        ]
    if not isinstance(lp, dict) or not isinstance(lp.get("content"), list):
        return None
    out = []
    for t in lp["content"]:
        alts = [a for a in (t.get("top_logprobs") or []) if isinstance(a, dict)]
        top = [(a.get("token", ""), float(a.get("logprob", 0.0))) for a in alts]
        # The upstream's own bytes, kept: a token that is part of a multi-byte character has bytes its string cannot
        # give back (OpenAI's and vLLM's meaning); absent or malformed, the wire fills them from the string.
        top_bytes = [_raw_bytes(a.get("bytes")) for a in alts]
        out.append(TokenLogprob(token=t.get("token", ""), logprob=float(t.get("logprob", 0.0)), top=top, bytes=_raw_bytes(t.get("bytes")),
                                top_bytes=top_bytes if top_bytes and all(b is not None for b in top_bytes) else None))
    return out


def _raw_bytes(b: Any) -> list[int] | None:
    """A logprob entry's ``bytes`` as the upstream sent them (a list of 0-255 ints), else None."""
    if isinstance(b, list) and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 255 for x in b):
        return b
    return None


def _usage(u: Any) -> Usage:
    if not isinstance(u, dict):
        return Usage()
    return Usage(prompt_tokens=int(u.get("prompt_tokens") or 0), completion_tokens=int(u.get("completion_tokens") or 0))


def parse_completion(data: Any, backend: str) -> ChatResult:
    """Validate an upstream chat.completion body; anything malformed is a retryable BackendError."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise BackendError("upstream returned a body without `choices`", status=502, retryable=True, backend=backend)
    choices = []
    for i, c in enumerate(data["choices"]):
        if not isinstance(c, dict):
            raise BackendError("malformed choice from upstream", status=502, retryable=True, backend=backend)
        # chat.completion: message.content (and message.tool_calls); text_completion: text
        msg = c.get("message")
        if isinstance(msg, dict):
            text, calls = msg.get("content"), msg.get("tool_calls")
        else:
            text, calls = c.get("text"), None
        index = c.get("index", i)
        lp = c.get("logprobs")
        choices.append(
            Choice(
                text if isinstance(text, str) else "",
                c.get("finish_reason") or "stop",
                int(index) if isinstance(index, int) else i,
                _parse_logprobs(lp) if lp else None,
                ([t for t in calls if isinstance(t, dict)] or None) if isinstance(calls, list) else None,
            )
        )
    choices.sort(key=lambda c: c.index)
    metrics = {}
    for k in ("mean_acceptance_length", "draft_acceptance_rate", "num_draft_tokens", "num_accepted_draft_tokens"):
        if k in data:
            metrics[k] = data[k]
    return ChatResult(choices=choices, usage=_usage(data.get("usage")), model=str(data.get("model", "")), metrics=metrics)


class OpenAIHTTPBackend(HTTPScoring, Backend):
    def __init__(
        self,
        name: str,
        base_urls: list[str],
        model: str = "",
        *,
        api_key_env: str | None = None,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 300.0,
        max_retries: int = 2,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 8.0,
        max_connections: int = 256,
        supports_n: bool = True,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 10.0,
        extra_headers: dict[str, str] | None = None,
    ):
        self.pool = ReplicaPool(name, base_urls, breaker_failures=breaker_failures, breaker_cooldown_s=breaker_cooldown_s,
                                backoff_base_s=backoff_base_s, backoff_max_s=backoff_max_s)
        self.name = name
        self.model = model
        self.api_key_env = api_key_env
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_connections = max_connections
        self.supports_n = supports_n
        self.extra_headers = dict(extra_headers or {})
        header_block(self.extra_headers)  # a header with a line break fails here, at start-up, not on the first call
        self._conns: ConnectionPool | None = None
        self._head: tuple[str | None, bytes] | None = None  # (API key it was made with, header block)

    @classmethod
    def from_config(cls, cfg: OpenAIBackendConfig) -> "OpenAIHTTPBackend":
        """Every field of the config's kind reaches the backend (none copied by hand in the registry)."""
        common = set(BackendConfigBase.model_fields) | {"kind", "urls"}  # the registry's (names, limit) and ours
        fields = cfg.model_dump(exclude=common)
        return cls(cfg.alias, cfg.urls, cfg.model, **fields)

    # -- plumbing -------------------------------------------------------------
    def _headers(self) -> bytes:
        """The request's header block; made again only when the API key in the environment changed."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if self._head is None or self._head[0] != key:
            h = {"Content-Type": "application/json", **self.extra_headers}
            if key:
                h["Authorization"] = f"Bearer {key}"
            self._head = (key, header_block(h))
        return self._head[1]

    def _redact(self, text: str) -> str:
        """Upstreams may echo the key they refused ("Incorrect API key provided: sk-..."); their error text goes into
        traces, logs and our clients' error bodies, so the key is cut out of it first."""
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key and len(key) >= 4:
            text = text.replace(key, "***")
        return text

    def connections(self) -> ConnectionPool:
        if self._conns is None or self._conns.closed:
            # A bounded pool per backend: back-pressure instead of unbounded sockets. Waiting for a free connection
            # is not counted in the connect timeout (under load that turned into timeouts and opened the breaker of a
            # healthy replica); it is bounded by the request's deadline instead.
            self._conns = ConnectionPool(limit=self.max_connections, connect_timeout_s=self.connect_timeout_s,
                                         read_timeout_s=self.read_timeout_s)
        return self._conns

    async def _post(self, url: str, path: str, payload: bytes) -> Response:
        return await self.connections().request("POST", url, path, headers=self._headers(), body=payload)

    async def start(self) -> None:
        self.connections()

    async def close(self) -> None:
        if self._conns is not None:
            await self._conns.close()
        self._conns = None

    @property
    def replicas(self) -> list[Replica]:
        return self.pool.replicas

    async def _error_from(self, resp: Response) -> BackendError:
        try:
            # Read well past what we keep, so that a key straddling the cut is still redacted whole (see _redact).
            text = (await resp.text())[:4000]
        except Exception:  # noqa: BLE001 - body may be broken; status is what matters
            text = ""
        msg = text
        try:
            j = json.loads(text)
            if isinstance(j, dict) and isinstance(j.get("error"), dict):
                msg = str(j["error"].get("message", text))
        except ValueError:
            pass
        return BackendError(
            f"upstream {self.name} answered {resp.status}: {self._redact(msg)}"[:600],
            status=resp.status,
            retryable=resp.status in RETRY_STATUSES,
            backend=self.name,
            retry_after=_retry_after(resp.headers.get("retry-after")),
        )

    def _failure(self, e: Exception) -> BackendError:
        """Any failure of one attempt as a BackendError: timeouts are BackendTimeout, broken connections retryable."""
        if isinstance(e, BackendError):
            return e
        if isinstance(e, asyncio.TimeoutError):
            return BackendTimeout(f"upstream {self.name} timed out", backend=self.name)
        if isinstance(e, (ConnectionError, OSError)):
            return BackendError(f"upstream {self.name} connection failed: {type(e).__name__}", status=502, retryable=True, backend=self.name)
        raise e

    async def _attempts(self, attempt_on: Callable[[Replica], AsyncGenerator[T, None]]) -> AsyncIterator[T]:
        """The one retry loop (chat, completions, and their streams): each attempt on the pool's pick, retried on a
        retryable failure with the pool's backoff (Retry-After honoured) up to ``max_retries`` times - but never once
        the attempt has yielded anything, since the caller has passed it on (a retry would duplicate text)."""
        for attempt in range(self.max_retries + 1):
            emitted = False
            with self.pool.attempt() as replica:
                items = attempt_on(replica)
                try:
                    try:
                        async for item in items:
                            emitted = True
                            yield item
                    finally:
                        # a consumer that stops early (client gone) closes the attempt, and its connection, now
                        # (contextlib.aclosing, written out: its object and coroutines were a cost on every call)
                        await items.aclose()
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - classified by _failure (unknown ones re-raised there)
                    err = self._failure(e)
                    # A client error (400 prompt too long, 404 no such route) is an answer: the replica is healthy, and
                    # five of them in a row must not open its breaker against every other request.
                    answered = 400 <= err.status < 500 and not err.retryable
                    self.pool.record(replica, answered, None if answered else err)
                    if emitted or not err.retryable or attempt >= self.max_retries:
                        if err is e:
                            raise
                        raise err from None
                    delay = self.pool.backoff(attempt, err.retry_after)
                else:
                    self.pool.record(replica, True)
                    return
            await asyncio.sleep(delay)

    # -- API ------------------------------------------------------------------
    async def chat(self, request: ChatRequest) -> ChatResult:
        if _greedy_n(request):
            # vLLM rejects n>1 with greedy sampling (all samples would be equal anyway): ask once, copy.
            one = await self.chat(_single(request))
            one.choices = [dataclasses.replace(one.choices[0], index=i) for i in range(request.params.n)]
            return one
        return await self._post_completion("/chat/completions", _body(request, stream=False), request.params.n)

    async def complete(self, request: CompletionRequest) -> ChatResult:
        if _greedy_n(request):
            one = await self.complete(dataclasses.replace(request, params=dataclasses.replace(request.params, n=1)))
            one.choices = [dataclasses.replace(one.choices[0], index=i) for i in range(request.params.n)]
            return one
        return await self._post_completion("/completions", _completion_body(request, stream=False), request.params.n)

    async def _post_completion(self, path: str, body: dict[str, Any], n: int) -> ChatResult:
        """POST a (chat) completion body to the least-loaded replica, with retries; validate the answer."""
        payload = dumps(body)

        async def once(replica: Replica) -> AsyncGenerator[ChatResult, None]:
            t0 = time.perf_counter()
            async with await self._post(replica.url, path, payload) as resp:
                if resp.status != 200:
                    raise await self._error_from(resp)
                data = loads(await resp.read())
                if data is INVALID:
                    raise BackendError(f"upstream {self.name} returned invalid JSON", status=502, retryable=True, backend=self.name)
            res = parse_completion(data, self.name)
            if len(res.choices) != n:
                raise BackendError(
                    f"upstream {self.name} returned {len(res.choices)} choices for n={n}",
                    status=502,
                    retryable=True,
                    backend=self.name,
                )
            res.latency_s = time.perf_counter() - t0
            yield res

        return [r async for r in self._attempts(once)][0]

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        if _greedy_n(request):
            async for ch in self.stream(_single(request)):
                if ch.usage is not None:
                    yield ch
                    continue
                for i in range(request.params.n):  # every copy gets each piece
                    yield dataclasses.replace(ch, index=i)
            return
        async for ch in self._stream_completion("/chat/completions", _body(request, stream=True), request.params.n):
            yield ch

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        if _greedy_n(request):
            one = dataclasses.replace(request, params=dataclasses.replace(request.params, n=1))
            async for ch in self.stream_complete(one):
                if ch.usage is not None:
                    yield ch
                    continue
                for i in range(request.params.n):
                    yield dataclasses.replace(ch, index=i)
            return
        async for ch in self._stream_completion("/completions", _completion_body(request, stream=True), request.params.n):
            yield ch

    async def _stream_completion(self, path: str, body: dict[str, Any], n: int) -> AsyncIterator[StreamChunk]:
        payload = dumps(body)

        async def once(replica: Replica) -> AsyncGenerator[StreamChunk, None]:
            async with await self._post(replica.url, path, payload) as resp:
                if resp.status != 200:
                    raise await self._error_from(resp)
                finished: set[int] = set()
                usage: Usage | None = None
                async for chunk in _sse_events(resp, self.name):
                    if isinstance(chunk.get("error"), dict):
                        raise BackendError(
                            f"upstream {self.name} stream error: {self._redact(str(chunk['error'].get('message', '')))}"[:500],
                            status=502,
                            retryable=True,  # only until something was passed on (_attempts)
                            backend=self.name,
                        )
                    for c in chunk.get("choices") or []:
                        if not isinstance(c, dict):
                            continue
                        idx = c.get("index", 0) if isinstance(c.get("index", 0), int) else 0
                        delta = c.get("delta") or {}
                        # chat: delta.content (and delta.tool_calls); raw completions: text
                        text = delta.get("content") if isinstance(delta, dict) and delta else c.get("text")
                        calls = delta.get("tool_calls") if isinstance(delta, dict) else None
                        lps = _parse_logprobs(c["logprobs"]) if c.get("logprobs") else None  # forwarded as they come
                        if text or calls or lps:
                            yield StreamChunk(index=idx, text=text if isinstance(text, str) else "",
                                              tool_calls=calls if isinstance(calls, list) else None, logprobs=lps or None)
                        if c.get("finish_reason"):
                            finished.add(idx)
                            yield StreamChunk(index=idx, finish_reason=c["finish_reason"])
                    if chunk.get("usage"):
                        usage = _usage(chunk["usage"])
                if len(finished) < n:
                    raise BackendError(
                        f"upstream {self.name} stream ended before all choices finished (truncated)",
                        status=502,
                        retryable=True,
                        backend=self.name,
                    )
            yield StreamChunk(usage=usage or Usage())

        async for ch in self._attempts(once):
            yield ch

    async def _get_json(self, base: str, path: str) -> Any:
        """GET a small JSON document (5 s in all); None when it is not there or not JSON."""
        async with asyncio.timeout(5):
            async with await self.connections().request("GET", base, path, headers=self._headers(), timeout_s=5) as resp:
                body = await resp.read()
                return None if resp.status != 200 else loads(body)

    async def models(self) -> list[str]:
        for replica in self.replicas:
            try:
                data = await self._get_json(replica.url, "/models")
            except (ConnectionError, OSError):  # TimeoutError is an OSError
                continue
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                return [m["id"] for m in data["data"] if isinstance(m, dict) and "id" in m]
        return []

    async def health(self) -> bool:
        for replica in self.replicas:
            root = replica.url[: -len("/v1")] if replica.url.endswith("/v1") else replica.url
            try:
                async with asyncio.timeout(5):
                    async with await self.connections().request("GET", root, "/health", timeout_s=5) as resp:
                        await resp.read()
                        if resp.status == 200:
                            return True
            except (ConnectionError, OSError):
                continue
        return False


def _retry_after(value: str | None) -> float | None:
    """An upstream's Retry-After: seconds, or an HTTP date (RFC 9110 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def _sse_events(resp: Response, backend: str) -> AsyncIterator[dict[str, Any]]:
    """Yield JSON payloads of `data:` lines until `[DONE]`; malformed JSON is an error, not silently skipped.
    Reads what has arrived, not line by line: one read for the many events a busy upstream sends in one packet."""
    buf = b""
    async for raw in resp.chunks():
        buf = buf + raw if buf else raw
        if b"\n" not in raw:
            continue
        lines = buf.split(b"\n")
        buf = lines.pop()  # an incomplete last line waits for the next read
        for line in lines:
            if not line.startswith(b"data:"):
                line = line.strip()
                if not line.startswith(b"data:"):  # blank separators, `:` comments, `event:`/`id:` fields
                    continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                return
            data = loads(payload)
            if data is INVALID:
                raise BackendError(f"upstream {backend} sent invalid JSON in its stream", status=502, retryable=True, backend=backend)
            if isinstance(data, dict):
                yield data
