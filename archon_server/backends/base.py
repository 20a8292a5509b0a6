"""The backend interface shared by HTTP backends, the managed vLLM backend and the in-process engine.

Everything above (components, graph runtime) talks to a :class:`Backend`; nothing
here knows about the HTTP layer of our own server.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import ArchonError


class BackendError(ArchonError):
    """A backend call failed. ``status`` is the upstream HTTP status (or None); ``retryable`` drives retries;
    ``retry_after``: seconds the upstream asked us to wait before the next try (its Retry-After header)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False, backend: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.backend = backend
        self.retry_after = retry_after


class BackendTimeout(BackendError):
    """A backend call ran out of time (the runtime answers 504 when every failed call of a layer is one)."""

    def __init__(self, message: str, *, backend: str | None = None):
        super().__init__(message, status=504, retryable=True, backend=backend)


def content_text(content: Any) -> str:
    """The text of an OpenAI message ``content``: a string, or a list of parts of which the text parts count (a part
    without a ``type`` is text); None and anything else are empty. The one flattener: the API layer, the components'
    prompts and the local engine's chat template all read content through it."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


# Sampling parameters a client may send beyond temperature / top_p (OpenAI's penalties and vLLM's extra sampling
# params, by vLLM's names and meanings). They apply to the final stage; a backend call carries them in
# ``SamplingParams.extra`` (``top_k`` in its own field), and a backend says which it honours (``sampling_extras``).
# ``logit_bias``: OpenAI's and vLLM's {token id as a string: bias added to that token's logit before sampling}.
SAMPLING_EXTRAS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "top_k", "min_p", "min_tokens", "ignore_eos",
                   "logit_bias")

# A ``SamplingParams.extra`` flag the API sets on a request sent straight to a backend alias with an explicit max_tokens,
# for a backend that honours it (``Backend.refuses_overflow``): a prompt and max_tokens past the model's context are
# refused (OpenAI's and older vLLM's 400, ``exceptions.ContextOverflow``) instead of the generation being cut at the context's end, which
# the calls inside an architecture rely on (their max_tokens are the architecture's, not the client's).
REFUSE_OVERFLOW = "refuse_overflow"


@dataclass
class SamplingParams:
    """What one backend call asks for. ``extra`` is passed through (vLLM's extra sampling params)."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = None
    max_tokens: int = 512
    stop: list[str] | None = None
    seed: int | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def with_n(self, n: int) -> "SamplingParams":
        """These params for ``n`` samples: itself when it already asks for ``n``, else a shallow copy (``extra``
        shared, as ``dataclasses.replace`` shares it) - replace() was ~3 us on every backend call."""
        if n == self.n:
            return self
        new = object.__new__(SamplingParams)
        new.__dict__.update(self.__dict__)
        new.n = n
        return new


@dataclass
class ChatRequest:
    model: str  # the model name the backend knows (not our alias)
    messages: list[dict[str, Any]]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class CompletionRequest:
    """A raw text completion (no chat template). ``echo``: the prompt is prepended to each choice's text and, with
    logprobs, its tokens' log-probabilities come first in each choice's logprobs (the first token's None: nothing
    predicts it), as vLLM returns them; ``params.max_tokens`` 0 with ``echo``: the prompt alone, nothing generated."""

    model: str
    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    echo: bool = False


@dataclass
class TokenLogprob:
    """One token's log-probability and its ``top`` alternatives. ``logprob`` and ``top`` are None only for the first
    token of an echoed prompt (legacy completions), which nothing before it predicts."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None = field(default_factory=list)
    # The raw bytes of the token and of each ``top`` alternative when the backend knows them (the embedded engine: a
    # byte-fallback piece's own bytes); None: the wire fills ``bytes`` from the token string's UTF-8.
    bytes: list[int] | None = None
    top_bytes: list[list[int]] | None = None


@dataclass
class Choice:
    text: str
    finish_reason: str = "stop"
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's shape: {id, type: function, function: {name, arguments}}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: "Usage") -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens


@dataclass
class ChatResult:
    choices: list[Choice]
    usage: Usage = field(default_factory=Usage)
    model: str = ""
    latency_s: float = 0.0
    requests: int = 1  # how many upstream requests this result took (n=k in one request -> 1)
    metrics: dict[str, Any] = field(default_factory=dict)  # e.g. speculative decoding counters


@dataclass
class StreamChunk:
    """One streamed piece: text delta of choice ``index``; the last chunk carries finish_reason and usage.
    ``logprobs``: the log-probabilities of the tokens this piece adds (when the request asked for them); a piece may
    carry them with no text yet (the engine holds text back while a stop string is undecided)."""

    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    metrics: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's streamed tool_calls deltas (index, id, function pieces)
    logprobs: list[TokenLogprob] | None = None


def accumulate_tool_calls(acc: dict[int, dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Fold streamed tool_calls deltas into whole calls, keyed by their index: ids and names arrive once, the
    arguments in pieces (OpenAI's and vLLM's streaming shape)."""
    for d in deltas:
        if not isinstance(d, dict):
            continue
        i = d.get("index", 0) if isinstance(d.get("index", 0), int) else 0
        call = acc.setdefault(i, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
        if d.get("id"):
            call["id"] = d["id"]
        fn = d.get("function") if isinstance(d.get("function"), dict) else {}
        if fn.get("name"):
            call["function"]["name"] += fn["name"]
        if isinstance(fn.get("arguments"), str):
            call["function"]["arguments"] += fn["arguments"]


# ---------------------------------------------------------------------------- scoring (no generation)
# Rankers that *score* candidates read log-probabilities instead of asking a model to write a verdict:
# density ratio (log p_strong(y|x) - log p_weak(y|x)), AlpacaEval-style logprob preferences, reward models.


class ScoringUnsupported(BackendError):
    """This backend cannot compute what a scoring ranker needs (continuation log-probs, next-token
    log-probs or rewards). Raised at start-up by :meth:`Backend.check_scoring` and at call time."""

    def __init__(self, message: str, *, backend: str | None = None):
        super().__init__(message, status=400, retryable=False, backend=backend)


@dataclass
class ScoreRequest:
    """Log-probability of each ``continuations[i]`` as the assistant's reply after ``messages``.

    If the last message is the assistant's, the continuation extends it. All continuations share the
    prompt: backends that can (the embedded engine) run its prefill once.  Only the continuation's own
    tokens are scored (no end-of-turn token), so two models with different tokenizers and chat templates
    score the same string.
    """

    model: str
    messages: list[dict[str, Any]]
    continuations: list[str]


def numeric_stats(backend: Any) -> dict[str, int | float]:
    """A backend's own numeric counters (``stats()``: the embedded engine's batch, KV and prefix-cache figures),
    looking through wrappers that hold the real backend as ``inner``; {} for a backend without any.  The one
    reader of ``stats()`` for /metrics and a sweep's ``runs.jsonl``."""
    while backend is not None and not callable(getattr(backend, "stats", None)):
        backend = getattr(backend, "inner", None)
    stats = backend.stats() if backend is not None else {}
    return {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists: where a continuation's own tokens start once the
    prompt alone and the prompt with the continuation are tokenized (a boundary token may merge the two)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class SequenceScore:
    logprob: float  # sum over the continuation's tokens
    token_logprobs: list[float]
    tokens: list[str]

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs)

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(1, self.num_tokens)


@dataclass
class ScoreResult:
    scores: list[SequenceScore]  # aligned with the request's continuations
    usage: Usage = field(default_factory=Usage)  # prompt_tokens = tokens run through the model
    latency_s: float = 0.0
    requests: int = 1


@dataclass
class NextTokenRequest:
    """Top-``top_k`` log-probabilities of the first token the model would write after ``messages``
    (a final assistant message is continued: e.g. ``"Output ("`` so the next token is ``a`` or ``b``)."""

    model: str
    messages: list[dict[str, Any]]
    top_k: int = 20


@dataclass
class NextTokenResult:
    top: list[tuple[str, float]]  # (token text, logprob), most likely first
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0
    requests: int = 1

    def prob_of(self, *labels: str) -> float:
        """Total probability of the top tokens that read as one of ``labels`` (case/space-insensitive)."""
        import math

        want = {lab.strip().lower() for lab in labels}
        return sum(math.exp(lp) for tok, lp in self.top if tok.strip().lower() in want)


@dataclass
class RewardRequest:
    """Scalar rewards of ``responses`` to ``query`` from a sequence-classification (reward / cross-encoder)
    model. ``protocol``: ``vllm_score`` (vLLM's Score API: POST /score {text_1, text_2}) or ``tei_rerank``
    (text-embeddings-inference: POST /rerank {query, texts})."""

    model: str
    query: str
    responses: list[str]
    protocol: str = "vllm_score"


@dataclass
class RewardResult:
    rewards: list[float]  # aligned with the request's responses
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0
    requests: int = 1


class ScoringMixin:
    """Default scoring API of every :class:`Backend`: "cannot score", said clearly.

    ``supports_scoring``: continuation log-probs (:meth:`score`) and next-token log-probs
    (:meth:`next_token_logprobs`); ``supports_reward``: :meth:`reward`.  :meth:`check_scoring` is what
    start-up calls for backends an architecture scores with: a backend whose capability is only known
    by asking (an OpenAI-compatible URL that may or may not be vLLM) probes there, so a missing
    capability shows when the server starts, not at the first request.
    """

    name: str
    supports_scoring: bool = False
    supports_reward: bool = False

    def _cannot(self, what: str) -> ScoringUnsupported:
        return ScoringUnsupported(f"backend {self.name!r} ({type(self).__name__}) cannot {what}", backend=self.name)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        raise self._cannot("score text (continuation log-probabilities)")

    async def next_token_logprobs(self, request: NextTokenRequest) -> NextTokenResult:
        raise self._cannot("return next-token log-probabilities")

    async def reward(self, request: RewardRequest) -> RewardResult:
        raise self._cannot("compute rewards (it is not a reward-model server)")

    async def check_scoring(self, need: str = "score", model: str = "", protocol: str = "vllm_score", probe: bool = True) -> None:
        """Raise :class:`ScoringUnsupported` unless this backend can do ``need`` (score | next_token | reward;
        ``model``: the upstream model name, ``protocol``: the reward protocol). ``probe=False``: answer from what
        the backend knows without a network call (an upstream that must be asked then raises nothing)."""
        ok = self.supports_reward if need == "reward" else self.supports_scoring
        if not ok:
            raise self._cannot({"score": "score text", "next_token": "return next-token log-probabilities", "reward": "compute rewards"}[need])


class Backend(ScoringMixin, abc.ABC):
    """A source of chat completions.

    ``supports_n``: k samples of one prompt may go as one request with ``n=k``
    (vLLM and the local engine share the prompt prefill across them).
    """

    name: str = "backend"
    supports_n: bool = True
    supports_logprobs: bool = True
    # OpenAI-style `tools` / `tool_choice` are honoured (the model may answer with tool_calls).
    supports_tools: bool = True
    # `response_format` json_object / json_schema constrains decoding (vLLM's structured outputs); without it the
    # server prompts for JSON and validates (see api/structured.py).
    supports_response_format: bool = True
    # The client's vLLM-style sampling extras (SAMPLING_EXTRAS) this backend honours; None: every one (the embedded
    # engine honours them all; an OpenAI-compatible upstream gets them passed on and decides). A final stage asked
    # for one it lacks is refused up front (a 400).
    sampling_extras: frozenset[str] | None = None
    # Honours ``extra[REFUSE_OVERFLOW]`` (the embedded engine); others never get it (an upstream would see an unknown field).
    refuses_overflow: bool = False
    # Its structured outputs are the embedded engine's grammars (engine/constrain.py): whether one compiles is known
    # here, before any call. A flag rather than an override, so a worker of ``--workers N`` (backends/shared.py) checks
    # a schema itself, as the engine in the backend host would, instead of learning it after the samples were paid for.
    compiles_response_format: bool = False

    def check_response_format(self, response_format: dict[str, Any]) -> None:
        """ValueError when this backend cannot constrain its decoding to ``response_format``, said before any call (the
        API's 400). Only a backend that compiles the engine's grammars can tell; an upstream decides for itself."""
        if response_format and self.compiles_response_format and self.supports_response_format:
            from ..engine.grammar import grammar_for  # no torch: a --workers process checks schemas too

            grammar_for(response_format)

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Called once before the first request (load a model, launch a process...)."""

    @property
    def start_status(self) -> str:
        """What :meth:`start` is doing while it runs (``/health`` shows it until the server is ready)."""
        return "starting"

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; must be idempotent."""

    @abc.abstractmethod
    async def chat(self, request: ChatRequest) -> ChatResult:
        """Non-streaming completion (all ``n`` choices)."""

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        """Streaming completion. Default: one chunk from :meth:`chat` (backends override to stream for real)."""
        t0 = time.perf_counter()
        res = await self.chat(request)
        for ch in res.choices:
            yield StreamChunk(index=ch.index, text=ch.text, logprobs=ch.logprobs)
        for ch in res.choices:
            yield StreamChunk(index=ch.index, finish_reason=ch.finish_reason)
        res.latency_s = res.latency_s or time.perf_counter() - t0
        yield StreamChunk(usage=res.usage, metrics=res.metrics)

    async def complete(self, request: CompletionRequest) -> ChatResult:
        """Raw text completion of ``request.prompt`` (POST /v1/completions on a backend alias)."""
        raise BackendError(f"backend {self.name} does not serve raw text completions", status=400, backend=self.name)

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        """Streaming raw completion. Default: one chunk from :meth:`complete`."""
        res = await self.complete(request)
        for ch in res.choices:
            yield StreamChunk(index=ch.index, text=ch.text, logprobs=ch.logprobs)
        for ch in res.choices:
            yield StreamChunk(index=ch.index, finish_reason=ch.finish_reason)
        yield StreamChunk(usage=res.usage, metrics=res.metrics)

    async def context_window(self) -> int | None:
        """The model's context in tokens (prompt and answer together); None: unknown. With it and :meth:`prompt_tokens`
        a fuser's or judge's candidates are cut to fit it (components/fit.py) instead of the call being refused."""
        return None

    async def prompt_tokens(self, request: ChatRequest) -> int | None:
        """The tokens ``request.messages`` take as this backend's prompt (chat template included); None: it cannot tell."""
        return None

    async def models(self) -> list[str]:
        return []

    async def health(self) -> bool:
        return True


class BackendWrapper(Backend):
    """A backend in front of another (a cache, a limit): everything not overridden goes to ``inner`` - lifecycle,
    every kind of call, models, health - and the capabilities are read from it, so a wrapper never claims what the
    backend behind it cannot do, and a method added to :class:`Backend` later is forwarded without touching wrappers."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.name = inner.name

    @property  # type: ignore[override]
    def supports_n(self) -> bool:
        return self.inner.supports_n

    @property  # type: ignore[override]
    def supports_logprobs(self) -> bool:
        return self.inner.supports_logprobs

    @property  # type: ignore[override]
    def supports_tools(self) -> bool:
        return self.inner.supports_tools

    @property  # type: ignore[override]
    def supports_response_format(self) -> bool:
        return self.inner.supports_response_format

    @property  # type: ignore[override]
    def sampling_extras(self) -> frozenset[str] | None:
        return self.inner.sampling_extras

    @property  # type: ignore[override]
    def refuses_overflow(self) -> bool:
        return self.inner.refuses_overflow

    @property  # type: ignore[override]
    def compiles_response_format(self) -> bool:
        return self.inner.compiles_response_format

    @property  # type: ignore[override]
    def supports_scoring(self) -> bool:
        return self.inner.supports_scoring

    @property  # type: ignore[override]
    def supports_reward(self) -> bool:
        return self.inner.supports_reward

    def check_response_format(self, response_format: dict[str, Any]) -> None:
        self.inner.check_response_format(response_format)

    def unwrap(self) -> Backend:
        """The backend at the bottom of a chain of wrappers."""
        b: Backend = self.inner
        while isinstance(b, BackendWrapper):
            b = b.inner
        return b

    async def start(self) -> None:
        await self.inner.start()

    @property
    def start_status(self) -> str:
        return self.inner.start_status

    async def close(self) -> None:
        await self.inner.close()

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await self.inner.chat(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamChunk]:
        async with contextlib.aclosing(self.inner.stream(request)) as chunks:  # an early close reaches inner now
            async for ch in chunks:
                yield ch

    async def complete(self, request: CompletionRequest) -> ChatResult:
        return await self.inner.complete(request)

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[StreamChunk]:
        async for ch in self.inner.stream_complete(request):
            yield ch

    async def score(self, request: ScoreRequest) -> ScoreResult:  # not cached by a cache: deterministic, cheap
        return await self.inner.score(request)

    async def next_token_logprobs(self, request: NextTokenRequest) -> NextTokenResult:
        return await self.inner.next_token_logprobs(request)

    async def reward(self, request: RewardRequest) -> RewardResult:
        return await self.inner.reward(request)

    async def check_scoring(self, need: str = "score", model: str = "", protocol: str = "vllm_score", probe: bool = True) -> None:
        await self.inner.check_scoring(need, model, protocol, probe)

    async def context_window(self) -> int | None:
        return await self.inner.context_window()

    async def prompt_tokens(self, request: ChatRequest) -> int | None:
        return await self.inner.prompt_tokens(request)

    async def models(self) -> list[str]:
        return await self.inner.models()

    async def health(self) -> bool:
        return await self.inner.health()
