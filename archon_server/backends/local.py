"""Backend kind ``local``: the in-process engine (default model SmolLM2-135M-Instruct).

Runs on the machine's CPU (or a GPU when present) with no server to start.  All
requests of all callers go through one :class:`~archon_server.engine.scheduler.Engine`
that batches them; ``n`` samples share one prompt prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import time
from collections.abc import AsyncIterator
from typing import Any

from archon_server.backends.base import (
    REFUSE_OVERFLOW,
    Backend,
    BackendError,
    ChatRequest,
    ChatResult,
    Choice,
    CompletionRequest,
    NextTokenRequest,
    NextTokenResult,
    SamplingParams,
    ScoreRequest,
    ScoreResult,
    SequenceScore,
    StreamChunk,
    TokenLogprob,
    Usage,
    common_prefix,
    content_text,
)
from archon_server.config import LocalBackendConfig
from archon_server.engine import model_store
from archon_server.config import DEFAULT_PREFIX_CACHE_MB
from archon_server.engine.types import DoneEvent, ErrorEvent, FinishEvent, GenParams, TokenEvent


class LocalBackend(Backend):
    """In-process generation.  ``await start()`` loads (and on first use converts) the model.

    ``options``: ``progress`` (bool, print conversion progress; default True);
    ``threads`` (int, or ``"auto"``: tune between 1 and all cores from measured step times);
    ``lazy`` (bool: load on first use rather than at server start; for a model only some architectures use,
    like the default config's ``weak`` base model for density-ratio scoring);
    ``prefix_cache_mb`` (MB for prompt-prefix K/V reused across requests, engine/prefix_cache.py; 0: off);
    ``kv_cache_mb`` (most MB of the sequences' KV cache, or ``"auto"``: engine/runner.py's ``kv_budget``).
    """

    supports_n = True
    supports_logprobs = True
    supports_scoring = True
    supports_tools = False  # SmolLM2's template has no tool-calling format
    refuses_overflow = True  # extra[REFUSE_OVERFLOW]: the engine's ContextOverflow instead of a cut (a 400)
    compiles_response_format = True  # a schema its grammar compiler refuses is a 400 before any call
    # response_format constrains decoding (engine/constrain.py, llguidance); without llguidance installed the
    # server prompts for JSON and validates instead.
    supports_response_format = importlib.util.find_spec("llguidance") is not None

    def __init__(
        self,
        model: str = model_store.DEFAULT_MODEL,
        *,
        name: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_batch: int = 16,
        **options: Any,
    ):
        self.model = model
        self.name = name or model
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.progress = bool(options.pop("progress", True))
        # Backend-wide speculative decoding ({method, draft, head, threshold, k}); a request may set its own
        # through `extra={"speculative": {...}}` (or disable it with `extra={"speculative": None}`).
        self.speculative: dict[str, Any] | None = options.pop("speculative", None)
        self.threads: int | str = options.pop("threads", "auto")
        self.lazy = bool(options.pop("lazy", False))
        self.prefix_cache_mb = float(options.pop("prefix_cache_mb", DEFAULT_PREFIX_CACHE_MB))
        self.kv_cache_mb: float | str = options.pop("kv_cache_mb", "auto")
        if options:
            raise TypeError(f"unknown LocalBackend options: {sorted(options)}")
        self.engine: Any = None  # archon_server.engine.scheduler.Engine once started
        self.loaded: Any = None  # archon_server.engine.loader.LoadedModel
        self._start_lock = asyncio.Lock()

    @classmethod
    def from_config(cls, cfg: LocalBackendConfig) -> "LocalBackend":
        """The config's options are validated already (a bad ``speculative`` block fails at start-up, naming its path)."""
        opts = cfg.options.model_dump(exclude={"speculative"})
        spec = cfg.options.speculative
        return cls(cfg.model or model_store.DEFAULT_MODEL, name=cfg.alias, speculative=spec.model_dump(exclude_unset=True) if spec else None, **opts)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if not self.lazy:
            await self._load()

    async def _load(self) -> None:
        async with self._start_lock:
            if self.engine is not None:
                return
            def load() -> Any:
                # Imported in the worker thread: torch and transformers take seconds to import, and the event
                # loop must go on answering (/health says 503 "loading" meanwhile).
                from archon_server.engine.loader import load_engine

                return load_engine(self.model, self.device, self.dtype, self.max_batch, self.progress, self.threads,
                                   self.prefix_cache_mb, self.kv_cache_mb)

            try:
                self.engine, self.loaded = await asyncio.to_thread(load)
            except (model_store.ModelStoreError, NotImplementedError, OSError) as e:
                raise BackendError(f"local model {self.model!r} failed to load: {e}", backend=self.name) from e

    @property
    def start_status(self) -> str:
        if self.engine is not None:
            return "ready"
        try:
            converted = model_store.is_converted(self.model)
        except model_store.ModelStoreError:
            return f"loading {self.model}"
        if converted:
            return f"loading {self.model}"
        return f"converting {self.model} from its GGUF (first start only; progress in the server log)"

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.shutdown)

    async def models(self) -> list[str]:
        return [self.model]

    async def health(self) -> bool:
        if self.engine is None:
            return self.lazy  # not loaded yet by design: healthy until a first use fails
        return self.engine.alive

    @property
    def model_path(self) -> str:
        return str(model_store.model_path(self.model))

    def stats(self) -> dict[str, Any]:
        """Engine counters (requests, prefills, decode_steps, max_batch_seen, ...) plus live gauges."""
        if self.engine is None:
            return {}
        from dataclasses import asdict

        cache, prefix = self.engine.cache, self.engine.prefix.stats
        return {**asdict(self.engine.stats), "active_sequences": self.engine.active_sequences, "queued": self.engine.queued_requests,
                "cache_slots": cache.slots, "cache_capacity": cache.capacity, "cache_bytes": cache.nbytes(),
                "cache_budget_bytes": self.engine.kv_budget,
                **{f"prefix_{k}": v for k, v in asdict(prefix).items()}, "prefix_hit_rate": prefix.hit_rate}

    # ------------------------------------------------------------------ helpers
    async def context_window(self) -> int | None:
        """Known once the model is loaded (a lazy backend's before its first call: None, nothing is fitted)."""
        return self.engine.runner.dims.max_positions if self.engine is not None else None

    async def prompt_tokens(self, request: ChatRequest) -> int | None:
        if self.engine is None:
            return None
        # A thread: an 8K-token prompt takes 13-50 ms to template and tokenize, and a fit counts a few times.
        return len(await asyncio.to_thread(self._prompt_ids, request.messages, None, *_template(request)))

    def _prompt_ids(self, messages: list[dict[str, Any]], continuation: str | None = None,
                    continue_final: bool = True, generation_prompt: bool = True) -> list[int]:
        """The prompt's tokens under the model's chat template. A final assistant message is continued
        (``continue_final``: scoring, whose continuation is the rest of that reply, and the logprob judges' prefilled
        answers) or, for a generation (:func:`_template`), answered by a new assistant turn unless the request asks
        for vLLM's ``continue_final_message``; ``generation_prompt`` False (vLLM's ``add_generation_prompt``): the
        conversation as it is, without the new turn's header."""
        tok = self.loaded.tokenizer
        msgs = [{"role": m.get("role", "user"), "content": content_text(m.get("content"))} for m in messages]
        if not msgs:
            raise BackendError("no messages", status=400, backend=self.name)
        if continuation is not None:  # scoring: the continuation is (the rest of) the assistant's reply
            if msgs[-1]["role"] == "assistant":
                msgs[-1] = {"role": "assistant", "content": msgs[-1]["content"] + continuation}
            else:
                msgs.append({"role": "assistant", "content": continuation})
        if not getattr(tok, "chat_template", None):  # base model: plain completion of the concatenated text
            if continuation is not None and len(msgs) > 1:  # the reply follows the prompt after a blank line
                return tok("\n\n".join(m["content"] for m in msgs[:-1]) + "\n\n" + msgs[-1]["content"])["input_ids"]
            return tok("\n\n".join(m["content"] for m in msgs))["input_ids"]
        cont = continue_final and msgs[-1]["role"] == "assistant"  # continue a partial assistant answer
        ids = tok.apply_chat_template(
            msgs, tokenize=True, add_generation_prompt=generation_prompt and not cont, continue_final_message=cont,
            return_dict=False,
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _gen_params(self, p: SamplingParams) -> Any:
        return GenParams(
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=p.seed,
            n=p.n,
            stop=list(p.stop or []),
            logprobs=p.logprobs or p.top_logprobs > 0,
            top_logprobs=p.top_logprobs,
            # vLLM's extra sampling params of the same names
            ignore_eos=bool(p.extra.get("ignore_eos", False)),
            repetition_penalty=float(p.extra.get("repetition_penalty", 1.0)),
            presence_penalty=float(p.extra.get("presence_penalty", 0.0)),
            frequency_penalty=float(p.extra.get("frequency_penalty", 0.0)),
            min_p=float(p.extra.get("min_p", 0.0)),
            min_tokens=min(int(p.extra.get("min_tokens", 0) or 0), p.max_tokens),
            speculative=p.extra.get("speculative", self.speculative),
            grammar=self._grammar(p.extra.get("response_format")),
            # JSON keys are strings; the engine checks the ids against the vocabulary (a ValueError: a 400)
            logit_bias={int(k): float(v) for k, v in p.extra["logit_bias"].items()} if p.extra.get("logit_bias") else None,
            refuse_overflow=bool(p.extra.get(REFUSE_OVERFLOW)),
        )

    def _grammar(self, response_format: dict[str, Any] | None) -> str | None:
        if not response_format or not self.supports_response_format:
            return None
        from archon_server.engine.constrain import grammar_for

        try:
            return grammar_for(response_format)
        except ValueError as e:
            raise BackendError(f"response_format: cannot constrain decoding to it: {e}", status=400, backend=self.name) from e

    def _raw_prompt_ids(self, text: str) -> list[int]:
        """A raw completion's prompt tokens (no chat template)."""
        prompt = list(self.loaded.tokenizer(text)["input_ids"])
        if not prompt:
            raise BackendError("empty prompt", status=400, backend=self.name)
        return prompt

    async def _events(self, request: ChatRequest | CompletionRequest) -> AsyncIterator[Any]:
        """Engine events of one request; leaving early (cancel, break) drops it from the batch."""
        if self.engine is None:
            await self._load()
        if isinstance(request, CompletionRequest):  # raw text: no chat template
            prompt = self._raw_prompt_ids(request.prompt)
        else:
            prompt = self._prompt_ids(request.messages, None, *_template(request))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[list[Any]] = asyncio.Queue()
        try:
            handle = self.engine.submit(prompt, self._gen_params(request.params), lambda evs: loop.call_soon_threadsafe(q.put_nowait, evs))
        except ValueError as e:
            raise BackendError(str(e), status=400, backend=self.name) from e
        try:
            while True:
                for ev in await q.get():
                    if isinstance(ev, ErrorEvent):
                        raise BackendError(f"local engine: {ev.error}", status=500, backend=self.name) from ev.error
                    yield ev
                    if isinstance(ev, DoneEvent):
                        return
        finally:
            handle.cancel()  # no-op once done; otherwise the worker drops the rows next step

    async def _on_worker(self, fn: Any) -> Any:
        """Run ``fn(runner)`` on the engine's worker thread (between decode steps) and await its result.  A step-wise
        ``fn`` (engine/scoring.py's ``*_steps``) takes turns with the decode steps, and leaving the await (a deadline, a
        client gone) cancels its future: the engine drops it before its next step."""
        if self.engine is None:
            await self._load()
        try:
            return await asyncio.wrap_future(self.engine.run_job(fn))
        except ValueError as e:  # too long for the context, empty prompt
            raise BackendError(str(e), status=400, backend=self.name) from e
        except RuntimeError as e:
            raise BackendError(f"local engine: {e}", status=500, backend=self.name) from e

    # ------------------------------------------------------------------ scoring
    async def score(self, request: ScoreRequest) -> ScoreResult:
        """One teacher-forced pass: the prompt prefilled once, the continuations batched after it."""
        from archon_server.engine.scoring import score_steps

        t0 = time.perf_counter()
        if self.engine is None:
            await self._load()
        prompt = self._score_prompt(request.messages)
        fulls = [self._prompt_ids(request.messages, c) for c in request.continuations]
        cut = min([len(prompt)] + [common_prefix(prompt, f) for f in fulls])  # a boundary token may merge
        conts = [f[cut:] for f in fulls]
        forced = await self._on_worker(lambda runner: score_steps(runner, prompt[:cut], conts))
        scores = []
        for f in forced:
            # A token merging the prompt's last characters with the continuation's first counts as the
            # continuation's (cut is the shortest common prefix), so every candidate is scored from one place.
            toks = [self._token_str(t) for t in f.token_ids]
            scores.append(SequenceScore(sum(f.logprobs), f.logprobs, toks))
        usage = Usage(prompt_tokens=cut + sum(len(c) for c in conts))
        return ScoreResult(scores, usage, time.perf_counter() - t0, requests=1)

    def _score_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """The tokens before a continuation: the prompt with the assistant turn opened (what generation sees),
        or, on a base model, the prompt and the blank line the continuation follows."""
        tok = self.loaded.tokenizer
        if not getattr(tok, "chat_template", None):
            return self._prompt_ids(messages, "")
        return self._prompt_ids(messages)

    def _token_str(self, tid: int) -> str:
        return self.loaded.tokenizer.decode([tid], skip_special_tokens=False)

    async def next_token_logprobs(self, request: NextTokenRequest) -> NextTokenResult:
        from archon_server.engine.scoring import next_token_top_steps

        t0 = time.perf_counter()
        if self.engine is None:
            await self._load()
        prompt = self._prompt_ids(request.messages)
        top = await self._on_worker(lambda runner: next_token_top_steps(runner, prompt, request.top_k))
        return NextTokenResult([(self._token_str(t), lp) for t, lp in top], Usage(prompt_tokens=len(prompt)), time.perf_counter() - t0)

    async def _echoed(self, request: CompletionRequest) -> tuple[int, list[TokenLogprob] | None]:
        """An echoed prompt's token count and, when logprobs are asked for, its tokens' log-probabilities as vLLM
        returns them: the first token's None (nothing predicts it), then ``log p(t_i | t_<i)`` with the
        ``top_logprobs`` best at each position - the scoring pass (engine/scoring.py) with the first token as its
        prompt, so it is one teacher-forced pass on the worker thread, not a second implementation; step-wise, so it
        takes turns with the streams decoding beside it and stops when this request is let go.  The tokens' strings are
        their pieces of the decoded text (engine/detokenize.token_pieces, the streams' incremental decoding): they
        concatenate to the echoed prompt, so text_offset indexes the returned text (a BOS adds "", a character split
        into byte tokens comes whole with its last one)."""
        from archon_server.engine.detokenize import token_pieces
        from archon_server.engine.scoring import score_steps

        if self.engine is None:
            await self._load()
        p = request.params
        want_lp = p.logprobs or p.top_logprobs > 0

        def tokenize() -> tuple[list[int], list[str] | None]:
            ids = self._raw_prompt_ids(request.prompt)
            return ids, token_pieces(self.loaded.tokenizer, ids) if want_lp else None

        prompt, pieces = await asyncio.to_thread(tokenize)
        if pieces is None:
            return len(prompt), None
        k = p.top_logprobs
        (forced,) = await self._on_worker(lambda runner: score_steps(runner, prompt[:1], [prompt[1:]], top=k))
        lps = [TokenLogprob(pieces[0], None, None)]
        for j, (tid, lp) in enumerate(zip(forced.token_ids, forced.logprobs)):
            piece = pieces[j + 1]
            # an alternative is its own string, the chosen token its piece (so top_logprobs names it as tokens does)
            top = [(piece if t == tid else self._token_str(t), v) for t, v in forced.top[j]] if forced.top else []
            lps.append(TokenLogprob(piece, lp, top))
        return len(prompt), lps

    async def complete(self, request: CompletionRequest) -> ChatResult:
        """A raw completion; with ``echo`` the prompt comes first in each choice's text and logprobs (see
        :class:`CompletionRequest`), and with ``max_tokens`` 0 it is all there is (finish_reason ``length``)."""
        if not request.echo:
            return await self.chat(request)
        t0 = time.perf_counter()
        n = request.params.n
        count, echoed = await self._echoed(request)
        if request.params.max_tokens > 0:
            res = await self.chat(request)
        else:
            want_lp = request.params.logprobs or request.params.top_logprobs > 0
            res = ChatResult([Choice("", "length", i, [] if want_lp else None) for i in range(n)], Usage(count, 0), self.model)
        for c in res.choices:
            c.text = request.prompt + c.text
            if echoed is not None:
                c.logprobs = echoed + (c.logprobs or [])
        res.latency_s = time.perf_counter() - t0
        return res

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        if request.echo:
            count, echoed = await self._echoed(request)
            for i in range(request.params.n):
                yield StreamChunk(index=i, text=request.prompt, logprobs=echoed)
            if request.params.max_tokens <= 0:
                for i in range(request.params.n):
                    yield StreamChunk(index=i, finish_reason="length")
                yield StreamChunk(usage=Usage(count, 0))
                return
        async for ch in self.stream(request):
            yield ch

    async def chat(self, request: ChatRequest | CompletionRequest) -> ChatResult:
        t0 = time.perf_counter()
        n = request.params.n
        texts: list[str] = [""] * n
        reasons = ["stop"] * n
        want_lp = request.params.logprobs or request.params.top_logprobs > 0
        lps: list[list[TokenLogprob]] = [[] for _ in range(n)]
        usage = Usage()
        metrics: dict[str, Any] = {}
        async with contextlib.aclosing(self._events(request)) as events:
            async for ev in events:
                if isinstance(ev, TokenEvent):
                    for e in ev.logprobs or ():
                        lps[ev.index].append(TokenLogprob(e.token, e.logprob, e.top, e.bytes, e.top_bytes))
                elif isinstance(ev, FinishEvent):
                    texts[ev.index] = ev.text
                    reasons[ev.index] = ev.reason
                elif isinstance(ev, DoneEvent):
                    usage = Usage(ev.prompt_tokens, ev.completion_tokens)
                    metrics = ev.metrics
        choices = [Choice(text=texts[i], finish_reason=reasons[i], index=i, logprobs=lps[i] if want_lp else None) for i in range(n)]
        return ChatResult(choices=choices, usage=usage, model=self.model, latency_s=time.perf_counter() - t0, requests=1, metrics=metrics)

    async def stream(self, request: ChatRequest | CompletionRequest) -> AsyncIterator[StreamChunk]:
        async with contextlib.aclosing(self._events(request)) as events:
            async for ev in events:
                if isinstance(ev, TokenEvent):
                    if ev.text or ev.logprobs:
                        lps = [TokenLogprob(e.token, e.logprob, e.top, e.bytes, e.top_bytes) for e in ev.logprobs] if ev.logprobs else None
                        yield StreamChunk(index=ev.index, text=ev.text, logprobs=lps)
                elif isinstance(ev, FinishEvent):
                    yield StreamChunk(index=ev.index, finish_reason=ev.reason)
                elif isinstance(ev, DoneEvent):
                    yield StreamChunk(usage=Usage(ev.prompt_tokens, ev.completion_tokens), metrics=ev.metrics)


def _template(request: ChatRequest) -> tuple[bool, bool]:
    """A generation's chat-template switches, vLLM's: whether it continues the conversation's final assistant message
    (only when asked with ``continue_final_message``: the default, as OpenAI's, opens a new assistant turn that
    answers the conversation; this engine had continued it, so an assistant-last conversation got a continuation, not
    an answer), and whether a new turn's header is added (``add_generation_prompt``, default on)."""
    extra = request.params.extra
    return bool(extra.get("continue_final_message", False)), extra.get("add_generation_prompt", True) is not False
