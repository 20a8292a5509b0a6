"""Scoring over an OpenAI-compatible HTTP upstream (vLLM's extensions), mixed into the HTTP backend.

- Continuation log-probs (:meth:`HTTPScoring.score`): vLLM's ``prompt_logprobs`` on a chat completion
  whose final assistant message is the candidate (``continue_final_message``, ``max_tokens: 1``); the
  prompt's own tokens come from vLLM's ``POST /tokenize`` with the same messages and the assistant turn
  opened, so only the candidate's tokens are summed.  One tokenize call plus one call per candidate, all
  concurrent (vLLM's prefix cache shares the prompt's prefill between them).
- Next-token top-k (:meth:`HTTPScoring.next_token_logprobs`): standard ``logprobs``/``top_logprobs`` on a
  one-token greedy completion; a final assistant message is continued (vLLM's ``continue_final_message``).
- Rewards (:meth:`HTTPScoring.reward`): vLLM's Score API (``POST /score {text_1, text_2}``; sequence-
  classification / cross-encoder models) or text-embeddings-inference's ``POST /rerank {query, texts}``.

Whether an upstream speaks these is only known by asking: :meth:`HTTPScoring.check_scoring` probes once at
start-up (a two-token request), so a plain OpenAI-compatible server without them is reported then.

- Prompt length and context (:meth:`HTTPScoring.prompt_tokens`, :meth:`HTTPScoring.context_window`): vLLM's
  ``POST /tokenize`` answers a prompt's ``count`` and the model's ``max_model_len``, which components/fit.py uses to
  cut a fuser's candidates to the context. Asked once at the first fit; an upstream without it is not asked again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

from .jsonbody import INVALID, dumps, loads
from .base import (
    BackendError,
    ChatRequest,
    NextTokenRequest,
    NextTokenResult,
    RewardRequest,
    RewardResult,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    ScoringUnsupported,
    SequenceScore,
    Usage,
    common_prefix,
)

MAX_TOP_LOGPROBS = 20  # vLLM's default --max-logprobs (and OpenAI's cap)


def with_continuation(messages: list[dict[str, Any]], continuation: str) -> list[dict[str, Any]]:
    """The conversation whose final assistant message ends with ``continuation``."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[-1].get("role") == "assistant" and isinstance(msgs[-1].get("content"), str):
        msgs[-1]["content"] = msgs[-1]["content"] + continuation
    else:
        msgs.append({"role": "assistant", "content": continuation})
    return msgs


def continues(messages: list[dict[str, Any]]) -> dict[str, bool]:
    """vLLM's template flags: continue a final assistant message, else open the assistant turn."""
    cont = bool(messages) and messages[-1].get("role") == "assistant"
    return {"add_generation_prompt": not cont, "continue_final_message": cont}


def forced_logprobs(data: Any, start: int, backend: str) -> tuple[list[int], list[float], list[str]]:
    """Token ids, log-probs and texts of prompt positions ``start..`` from a vLLM response with
    ``prompt_logprobs`` and ``prompt_token_ids`` (each position: ``{token_id: {logprob, decoded_token}}``)."""
    ids = data.get("prompt_token_ids") if isinstance(data, dict) else None
    plp = data.get("prompt_logprobs") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not isinstance(plp, list) or len(plp) != len(ids):
        raise ScoringUnsupported(
            f"upstream {backend} returned no prompt_logprobs/prompt_token_ids (not a vLLM server, or too old)", backend=backend
        )
    lps: list[float] = []
    toks: list[str] = []
    for i in range(max(start, 1), len(ids)):
        entry = plp[i] or {}
        e = entry.get(str(ids[i])) or entry.get(ids[i])  # JSON object keys are strings
        if not isinstance(e, dict):
            raise BackendError(f"upstream {backend}: prompt_logprobs lacks the prompt's own token at {i}", status=502, backend=backend)
        lps.append(float(e.get("logprob", float("-inf"))))
        toks.append(str(e.get("decoded_token", "")))
    return [int(t) for t in ids[max(start, 1) :]], lps, toks


def parse_rewards(data: Any, protocol: str, n: int, backend: str) -> list[float]:
    """Scores in request order from vLLM's Score API or TEI's /rerank answer."""
    if protocol == "vllm_score":
        items = data.get("data") if isinstance(data, dict) else None
        key = "score"
    else:  # tei_rerank: a bare list of {index, score}
        items = data if isinstance(data, list) else None
        key = "score"
    if not isinstance(items, list):
        raise BackendError(f"upstream {backend}: unexpected {protocol} answer", status=502, retryable=True, backend=backend)
    out: list[float | None] = [None] * n
    for pos, it in enumerate(items):
        if not isinstance(it, dict) or key not in it:
            raise BackendError(f"upstream {backend}: malformed {protocol} item", status=502, retryable=True, backend=backend)
        idx = it.get("index", pos)
        if isinstance(idx, int) and 0 <= idx < n:
            out[idx] = float(it[key])
    if any(v is None for v in out):
        raise BackendError(f"upstream {backend}: {protocol} answer misses some of the {n} responses", status=502, retryable=True, backend=backend)
    return [float(v) for v in out]  # type: ignore[arg-type]


class HTTPScoring:
    """Mixed into :class:`~archon_server.backends.http.OpenAIHTTPBackend` (uses its pool, retries and errors)."""

    supports_scoring = True  # may: check_scoring asks the upstream
    supports_reward = True
    # What /tokenize told: the model's context; whether the upstream has it (None: not asked yet, False: it has not).
    _window: int | None = None
    _tokenize_ok: bool | None = None
    _probe: asyncio.Lock | None = None

    async def prompt_tokens(self, request: ChatRequest) -> int | None:
        """vLLM's ``POST /tokenize`` with the messages and the assistant turn opened: its ``count``; its
        ``max_model_len`` is kept as the context window. An upstream without it (a 4xx, no count) is asked once."""
        if self._tokenize_ok is False:
            return None
        body: dict[str, Any] = {"messages": request.messages, "add_generation_prompt": True}
        if request.model:
            body["model"] = request.model
        try:
            data = await self._post_json("/tokenize", body, root=True)
        except BackendError as e:
            if not e.retryable and self._tokenize_ok is None:  # it answered, and never with a count: no /tokenize to use
                self._tokenize_ok = False  # (a 404, or a 401/403 of a provider): not asked on every fuse from now on
            return None
        count = data.get("count") if isinstance(data, dict) else None
        if not isinstance(count, int):
            self._tokenize_ok = False
            return None
        window = data.get("max_model_len")
        if isinstance(window, int) and window > 0:
            self._window = window
        self._tokenize_ok = True
        return count

    async def context_window(self) -> int | None:
        """``max_model_len`` from /tokenize: asked once (one probe however many calls wait for it), then kept."""
        if self._window is None and self._tokenize_ok is None:
            if self._probe is None:
                self._probe = asyncio.Lock()
            async with self._probe:
                if self._window is None and self._tokenize_ok is None:
                    await self.prompt_tokens(ChatRequest(self.model, [{"role": "user", "content": "x"}]))  # type: ignore[attr-defined]
        return self._window

    async def _post_json(self, path: str, body: dict[str, Any], *, root: bool = False) -> Any:
        """POST ``body`` to the replica's base URL + ``path`` (``root``: to its URL without ``/v1``) through the
        backend's one retry loop and replica pool; the decoded JSON answer."""

        payload = dumps(body)

        async def once(replica: Any) -> AsyncGenerator[Any, None]:
            base = replica.url.removesuffix("/v1") if root else replica.url
            async with await self._post(base, path, payload) as resp:  # type: ignore[attr-defined]
                if resp.status != 200:
                    raise await self._error_from(resp)  # type: ignore[attr-defined]
                data = loads(await resp.read())
                if data is INVALID:
                    raise BackendError(f"upstream {self.name} returned invalid JSON", status=502, retryable=True, backend=self.name)  # type: ignore[attr-defined]
            yield data

        return [d async for d in self._attempts(once)][0]  # type: ignore[attr-defined]

    async def score(self, request: ScoreRequest) -> ScoreResult:
        t0 = time.perf_counter()
        name = self.name  # type: ignore[attr-defined]
        tok = await self._post_json("/tokenize", {"model": request.model, "messages": request.messages, **continues(request.messages)}, root=True)
        prompt = tok.get("tokens") if isinstance(tok, dict) else None
        if not isinstance(prompt, list):
            raise ScoringUnsupported(f"upstream {name}: /tokenize gave no tokens (not a vLLM server?)", backend=name)
        todo = [i for i, c in enumerate(request.continuations) if c]

        async def one(cont: str) -> Any:
            body = {
                "model": request.model, "messages": with_continuation(request.messages, cont),
                "add_generation_prompt": False, "continue_final_message": True,
                "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "return_token_ids": True,
            }
            return await self._post_json("/chat/completions", body)

        answers = await asyncio.gather(*(one(request.continuations[i]) for i in todo))
        fulls = []
        for data in answers:
            ids = data.get("prompt_token_ids") if isinstance(data, dict) else None
            if not isinstance(ids, list):
                raise ScoringUnsupported(f"upstream {name} returned no prompt_token_ids (not a vLLM server, or too old)", backend=name)
            fulls.append(ids)
        # Every candidate is scored from the same place: a token merging the prompt's end with a candidate's start
        # belongs to the candidate (as on the embedded engine).
        cut = min([len(prompt)] + [common_prefix(prompt, f) for f in fulls])
        scores = [SequenceScore(0.0, [], []) for _ in request.continuations]
        usage = Usage()
        for i, data in zip(todo, answers):
            _, lps, toks = forced_logprobs(data, cut, name)
            scores[i] = SequenceScore(sum(lps), lps, toks)
            u = data.get("usage") or {}
            usage.add(Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)))
        return ScoreResult(scores, usage, time.perf_counter() - t0, requests=1 + len(todo))

    async def next_token_logprobs(self, request: NextTokenRequest) -> NextTokenResult:
        k = max(1, min(request.top_k, MAX_TOP_LOGPROBS))
        extra = {"continue_final_message": True, "add_generation_prompt": False} if continues(request.messages)["continue_final_message"] else {}
        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=k, extra=extra)
        res = await self.chat(ChatRequest(request.model, request.messages, params))  # type: ignore[attr-defined]
        lps = res.choices[0].logprobs if res.choices else None
        if not lps:
            raise ScoringUnsupported(f"upstream {self.name} returned no logprobs", backend=self.name)  # type: ignore[attr-defined]
        top = sorted(lps[0].top or [(lps[0].token, lps[0].logprob)], key=lambda t: -t[1])
        return NextTokenResult(top, res.usage, res.latency_s, res.requests)

    async def reward(self, request: RewardRequest) -> RewardResult:
        t0 = time.perf_counter()
        if request.protocol == "vllm_score":
            data = await self._post_json("/score", {"model": request.model, "text_1": request.query, "text_2": list(request.responses)}, root=True)
        elif request.protocol == "tei_rerank":
            data = await self._post_json("/rerank", {"query": request.query, "texts": list(request.responses), "raw_scores": True}, root=True)
        else:
            raise ScoringUnsupported(f"unknown reward protocol {request.protocol!r} (vllm_score | tei_rerank)", backend=self.name)  # type: ignore[attr-defined]
        u = data.get("usage") if isinstance(data, dict) else None
        usage = Usage(int((u or {}).get("prompt_tokens") or 0), 0)
        return RewardResult(parse_rewards(data, request.protocol, len(request.responses), self.name), usage, time.perf_counter() - t0)  # type: ignore[attr-defined]

    async def check_scoring(self, need: str = "score", model: str = "", protocol: str = "vllm_score", probe: bool = True) -> None:
        """Ask the upstream once; a missing capability becomes :class:`ScoringUnsupported` naming it."""
        if not probe:
            return
        probe = [{"role": "user", "content": "Hi"}]
        try:
            if need == "score":
                await self.score(ScoreRequest(model, probe, ["Hello"]))
            elif need == "next_token":
                await self.next_token_logprobs(NextTokenRequest(model, probe, 2))
            else:
                await self.reward(RewardRequest(model, "Hi", ["Hello"], protocol))
        except ScoringUnsupported:
            raise
        except BackendError as e:
            what = {"score": "score text (vLLM prompt_logprobs + /tokenize)", "next_token": "return next-token logprobs",
                    "reward": f"compute rewards ({protocol})"}[need]
            raise ScoringUnsupported(f"backend {self.name!r} cannot {what}: {e}", backend=self.name) from e  # type: ignore[attr-defined]
