"""A scripted OpenAI-compatible upstream HTTP server (aiohttp) for tests, benchmarks and fault injection.

It answers like a tiny, predictable model: judges get well-formed rankings and
verdicts, generators get a text that names the model and sample index.  A
``script`` callable may override any answer or inject faults:

    {"text": str | list[str], "latency": s, "jitter": s, "fault": "500" | "502" | "503" | "429" | "400" | "401" |
     "403" | "timeout" | "hang" | "reset" | "invalid_json" | "truncated" | "wrong_n" | "drip" | "stream_error",
     "message": error message of an HTTP-status fault, "usage": {...},
     "tool_calls": [{"id": ..., "type": "function", "function": {"name": ..., "arguments": "..."}}], "finish_reason": "length",
     "logprobs": a chat choice's whole ``logprobs`` object (non-streamed, when the request asks for logprobs)}

``tool_calls`` makes every choice call those tools (finish_reason "tool_calls"; streamed as tool_calls deltas,
the arguments in two pieces). POST /v1/completions answers raw text completions (``text``, ``echo``, ``logprobs``).
Streamed pieces carry logprobs when asked (logprob -0.25 each, the piece as its own top alternative; an echoed prompt
first, as one token with null logprob and top_logprobs, as vLLM sends a prompt's first token).

Every request is recorded (body, start, end, aborted) so tests can assert that k
samples went as one ``n=k`` request or that a disconnect aborted the upstream call.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Script = Callable[[dict[str, Any]], dict[str, Any] | None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Recorded:
    body: dict[str, Any]
    started: float
    ended: float | None = None
    aborted: bool = False
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def _prompt_text(body: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))


def default_answer(body: dict[str, Any], i: int) -> str:
    """A plausible, parseable answer for each kind of component prompt."""
    text = _prompt_text(body)
    if "[] > []" in text:  # ranker: reverse order, so tests can tell a ranking happened
        n = int(re.search(r"provide you with (\d+) responses", text).group(1)) if re.search(r"provide you with (\d+) responses", text) else 2
        return " > ".join(f"[{k}]" for k in range(n, 0, -1))
    if "synthesize" in text.lower():
        k = len(re.findall(r"^[0-9]+\. ", text, re.MULTILINE))
        return f"fused answer from {k} responses"
    if "Strengths" in text and "Weaknesses" in text:
        m = re.search(r"provide you with (\d+) responses", text)
        if m:
            return "\n\n".join(f"[{k}]\nStrengths:\n- clear\nWeaknesses:\n- short" for k in range(1, int(m.group(1)) + 1))
        return "Strengths:\n- clear\nWeaknesses:\n- short"
    if "[Correct]" in text and "[Incorrect]" in text:
        return "The response looks right.\n[Correct]"
    if "unit tests" in text.lower() and "[Passed]" in text:
        k = len(re.findall(r"^Test \d+:", text, re.MULTILINE)) or 1
        return "\n".join(f"Test {j}: [Passed]" for j in range(1, k + 1))
    if "Write " in text and "unit tests" in text:
        return "- mentions the answer\n- is polite\n- is short"
    return f"answer {i} from {body.get('model')}"


class FakeUpstream:
    def __init__(self, script: Script | None = None, *, latency: float = 0.0, jitter: float = 0.0, model: str = "fake-model", seed: int = 0):
        self.script = script
        self.latency = latency
        self.jitter = jitter
        self.model = model
        self.port = free_port()
        self.requests: list[Recorded] = []
        self._rng = random.Random(seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> "FakeUpstream":
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"fake-upstream-{self.port}")
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake upstream did not start")
        return self

    def _serve(self) -> None:
        try:  # uvloop (with uvicorn[standard]) keeps the fake's own CPU cost low in benchmarks
            import uvloop

            self._loop = uvloop.new_event_loop()
        except ImportError:
            self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        # handler_cancellation: a client that disconnects cancels our handler, so aborts are observable.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=4096)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop is None:
            return

        async def _down() -> None:
            assert self._runner is not None
            await self._runner.cleanup()

        fut = asyncio.run_coroutine_threadsafe(_down(), self._loop)
        try:
            fut.result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread:
                self._thread.join(10)

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- handlers ---------------------------------------------------------------
    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _health(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        rec = Recorded(body=body, started=time.perf_counter(), headers=dict(request.headers))
        self.requests.append(rec)
        act = dict((self.script(body) if self.script else None) or {})
        n = int(body.get("n") or 1)
        try:
            delay = act.get("latency", self.latency) + self._rng.uniform(0, act.get("jitter", self.jitter))
            fault = act.get("fault")
            if fault == "hang":
                await asyncio.sleep(3600)
            if delay:
                await asyncio.sleep(delay)
            if fault in ("500", "502", "503", "429", "400", "401", "403"):
                rec.status = int(fault)
                headers = {"Retry-After": str(act.get("retry_after", 0))} if fault == "429" else None
                msg = act.get("message", f"injected {fault}")  # e.g. a provider that echoes the key it refused
                return web.json_response({"error": {"message": msg, "type": "server_error"}}, status=int(fault), headers=headers)
            if fault == "timeout":
                await asyncio.sleep(act.get("timeout_s", 30))
            if fault == "reset":
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            texts = act.get("text")
            raw = "prompt" in body  # POST /v1/completions
            if texts is None and raw:
                texts = [f"completion {i} of {str(body['prompt'])[:40]}" for i in range(n)]
            elif texts is None:
                texts = [default_answer(body, i) for i in range(n)]
            elif isinstance(texts, str):
                texts = [texts] * n
            if fault == "wrong_n":
                texts = texts[: max(n - 1, 0)] or []
            usage = act.get("usage") or {"prompt_tokens": 10, "completion_tokens": 5 * max(len(texts), 1), "total_tokens": 10 + 5 * max(len(texts), 1)}
            if body.get("stream"):
                return await self._stream(request, body, texts, usage, fault, act)
            if fault == "invalid_json":
                return web.Response(text="{not json", content_type="application/json")
            calls = act.get("tool_calls")
            if raw:
                pre = str(body["prompt"]) if body.get("echo") else ""
                choices = [
                    {"index": i, "text": pre + t, "finish_reason": "stop",
                     "logprobs": {"tokens": t.split(), "token_logprobs": [-0.5] * len(t.split()), "top_logprobs": [{w: -0.5} for w in t.split()],
                                  "text_offset": list(range(len(t.split())))} if body.get("logprobs") is not None else None}
                    for i, t in enumerate(texts)
                ]
                return web.json_response({"id": "cmpl-fake", "object": "text_completion", "created": int(time.time()), "model": body.get("model"), "choices": choices, "usage": usage})
            choices = [
                {"index": i, "message": {"role": "assistant", "content": None if calls else t, **({"tool_calls": calls} if calls else {})},
                 "finish_reason": "tool_calls" if calls else act.get("finish_reason", "stop"),
                 **({"logprobs": act.get("logprobs") or {"content": [{"token": w, "logprob": -0.5, "top_logprobs": [{"token": w, "logprob": -0.5}]} for w in t.split()]}}
                    if body.get("logprobs") else {})}
                for i, t in enumerate(texts)
            ]
            return web.json_response({"id": "cmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"), "choices": choices, "usage": usage})
        except asyncio.CancelledError:
            rec.aborted = True
            raise
        finally:
            rec.ended = time.perf_counter()

    async def _stream(self, request: web.Request, body: dict[str, Any], texts: list[str], usage: dict[str, Any], fault: str | None, act: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        drip = act.get("drip_s", 0.05) if fault == "drip" else act.get("token_delay", 0.0)

        async def send(obj: Any) -> None:
            await resp.write(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

        raw = "prompt" in body
        base = {"id": "cmpl-fake", "object": "text_completion" if raw else "chat.completion.chunk", "created": int(time.time()), "model": body.get("model")}
        calls = act.get("tool_calls")
        for i, t in enumerate(texts):
            if calls and not raw:  # each call: id and name first, then the arguments in two pieces
                for k, c in enumerate(calls):
                    args = c["function"]["arguments"]
                    head = {"index": k, "id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": ""}}
                    for d in (head, {"index": k, "function": {"arguments": args[: len(args) // 2]}}, {"index": k, "function": {"arguments": args[len(args) // 2 :]}}):
                        await send({**base, "choices": [{"index": i, "delta": {"tool_calls": [d]}, "finish_reason": None}]})
                await send({**base, "choices": [{"index": i, "delta": {}, "finish_reason": "tool_calls"}]})
                continue
            want_lp = body.get("logprobs") is not None if raw else bool(body.get("logprobs"))
            sent = 0  # characters of this choice sent: a raw piece's text_offset

            def lp(piece: str, first: bool = False) -> dict[str, Any]:
                if not want_lp:
                    return {}
                if raw:
                    return {"logprobs": {"tokens": [piece], "token_logprobs": [None if first else -0.25],
                                         "top_logprobs": [None if first else {piece: -0.25}], "text_offset": [sent]}}
                return {"logprobs": {"content": [{"token": piece, "logprob": -0.25, "bytes": list(piece.encode()),
                                                  "top_logprobs": [{"token": piece, "logprob": -0.25, "bytes": list(piece.encode())}]}]}}

            if raw and body.get("echo"):
                await send({**base, "choices": [{"index": i, "text": str(body["prompt"]), "finish_reason": None, **lp(str(body["prompt"]), True)}]})
                sent += len(str(body["prompt"]))
            words = t.split(" ")
            for j, w in enumerate(words):
                if fault == "truncated" and j >= len(words) // 2:
                    await resp.write_eof()
                    return resp
                if fault == "stream_error" and j == 1:
                    await send({"error": {"message": act.get("message", "injected stream error")}})
                    await resp.write_eof()
                    return resp
                if fault == "invalid_json" and j == 1:
                    await send("{broken")
                    await resp.write_eof()
                    return resp
                piece = w if j == 0 else " " + w
                await send({**base, "choices": [{"index": i, **({"text": piece} if raw else {"delta": {"content": piece}}), "finish_reason": None, **lp(piece)}]})
                sent += len(piece)
                if drip:
                    await asyncio.sleep(drip)
            await send({**base, "choices": [{"index": i, **({"text": ""} if raw else {"delta": {}}), "finish_reason": act.get("finish_reason", "stop")}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({**base, "choices": [], "usage": usage})
        await send("[DONE]")
        await resp.write_eof()
        return resp
