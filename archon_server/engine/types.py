"""What the engine takes and gives: generation parameters, the events a request's sink receives, counters.

A leaf module (no torch): the local backend and the scoring code import it without loading the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenParams:
    """What one generation asks for (the engine's own view of ``SamplingParams``)."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0
    # vLLM's min_tokens: no EOS is drawn and no stop string ends a sample before it has this many tokens.
    min_tokens: int = 0
    # Speculative decoding config (engine/specdec/serve.py); used for n == 1 requests, which then run alone.
    speculative: dict[str, Any] | None = None
    # An llguidance grammar (engine/constrain.py) every sample's tokens must follow: structured outputs.
    grammar: str | None = None
    # OpenAI's / vLLM's logit_bias: {token id: bias} added to the logits before sampling (reported logprobs stay the
    # model's own, as vLLM reports them by default).
    logit_bias: dict[int, float] | None = None
    # A prompt and max_tokens past the context: refused (ContextOverflow, OpenAI's and older vLLM's 400 for an explicit max_tokens)
    # rather than cut at the context's end (the default: an architecture's inner calls rely on it).
    refuse_overflow: bool = False

    @property
    def speculable(self) -> bool:
        """Speculative decoding applies: a config is set, one sample, and nothing its rounds do not apply (they sample
        by temperature and top_p only; a grammar, top_k, min_p, min_tokens, a penalty, a logit bias or logprobs send the
        request through the batch)."""
        return bool(self.speculative) and self.n == 1 and not self.grammar and not self.top_k and not self.min_p \
            and not self.min_tokens and self.repetition_penalty == 1.0 and not self.presence_penalty and not self.frequency_penalty \
            and not self.logit_bias and not self.logprobs


# ---- events handed to the sink (lists of these, one list per request per step)
@dataclass
class LogprobEntry:
    """``token``: the sampled token's text as vLLM names it (decoded alone; a byte-fallback piece, which alone is
    U+FFFD, by the text it adds after the tokens before it: "" or the character it completes); ``bytes``: its raw
    bytes; ``top``/``top_bytes``: the alternatives alike."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    bytes: list[int] | None = None
    top_bytes: list[list[int]] | None = None


@dataclass
class TokenEvent:
    index: int
    text: str  # newly released text (may be "" while a stop string is undecided)
    logprobs: list[LogprobEntry] | None = None


@dataclass
class FinishEvent:
    index: int
    reason: str  # "stop" | "length"
    text: str  # the choice's full text
    completion_tokens: int


@dataclass
class DoneEvent:
    prompt_tokens: int
    completion_tokens: int
    metrics: dict[str, Any]


@dataclass
class ErrorEvent:
    error: BaseException


Sink = Callable[[list[Any]], None]


@dataclass
class EngineStats:
    """Counters since start (read from any thread; written by the worker only)."""

    requests: int = 0
    prefills: int = 0  # one per request, whatever its n
    prefill_tokens: int = 0
    prefill_chunks_interleaved: int = 0  # prompt chunks run between decode steps of other sequences
    overtakes: int = 0  # short prompts prefilled ahead of a long staged one (Engine._overtake)
    job_steps: int = 0  # steps of step-wise jobs (teacher-forced scoring: a forward of a prefill-sized chunk each)
    job_steps_interleaved: int = 0  # ... run between decode steps of other sequences
    decode_steps: int = 0
    decode_tokens: int = 0
    max_batch_seen: int = 0  # most sequences decoded together in one step
    threads: int = 0  # intra-op threads the worker uses now for decode steps
    prefill_threads: int = 0  # ... and for prefill chunks (tuned apart: see Engine.prefill_tuner)
    cancelled: int = 0
    errors: int = 0
    kv_waits: int = 0  # requests that waited for room in the KV cache's budget (kv_cache_mb) before starting
    kv_cuts: int = 0  # sequences ended with 'length' because the KV cache could not grow within its budget
