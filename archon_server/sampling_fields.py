"""The constraints of the client's sampling fields, in one place: the HTTP requests (chat, completions, responses)
and a sweep's ``params`` (``archon bench``, ``archon run``) declare their fields with these types, so the same value
is accepted or refused alike, with the same words, wherever it is given.

An architecture's sampling (``spec.Sampling``: a component's or the ``defaults``' temperature, top_p, max_tokens, seed,
stop) is declared with them too, so a value an architecture file may hold is one a request may send.

This module is a leaf: it imports nothing from the package, so the API, the bench and ``spec`` (a leaf that imports
only leaves) may all use it.

Usage: ``temperature: Temperature | None = None`` (pydantic applies the bounds to a value that is not None).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

# The most tokens a request may ask for (max_tokens, max_completion_tokens, max_output_tokens).
MAX_TOKENS_LIMIT = 131072
# OpenAI's limit on the number of stop strings (chat and completions alike).
MAX_STOP = 4

# Every float field refuses NaN and the infinities (a raw JSON body may carry them: Python's parser reads them) with
# "Input should be a finite number", rather than a bound's words ("less than or equal to 2") or a silent clamp.
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
# OpenAI's penalties and vLLM's extra sampling floats (their ranges)
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)]
MinP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
# A logit_bias value (clamped to [-100, 100] as vLLM does, where it is read)
Bias = Annotated[float, Field(allow_inf_nan=False)]
N = Annotated[int, Field(ge=1)]
MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)]
# vLLM's min_tokens: 0 is off.
MinTokens = Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
# vLLM's top_k: 0 or -1 is off.
TopK = Annotated[int, Field(ge=-1)]


def stop_list(v: str | list[str] | None) -> list[str] | None:
    """OpenAI's `stop`: a string or up to 4 non-empty strings (chat and completions alike); a string becomes a
    one-element list."""
    if v is None:
        return None
    v = [v] if isinstance(v, str) else v
    if len(v) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences")
    if any(not s for s in v):
        raise ValueError("stop sequences must be non-empty")
    return v


def _stop_type(v: Any) -> Any:
    if v is not None and not isinstance(v, (str, list)):
        raise PydanticCustomError("stop_type", "Input should be a string or a list of strings")
    return v


# `stop` as declared: a string or a list of strings, validated to a list by stop_list.
Stop = Annotated[str | list[str], BeforeValidator(_stop_type), AfterValidator(stop_list)]

STREAM_OPTIONS_NEED_STREAM = "Stream options can only be defined when `stream=True`."


def check_stream_options(stream_options: Any, stream: bool | None) -> Any:
    """vLLM (``validate_stream_options``) and OpenAI answer 400 to a ``stream_options`` (one that sets something) without
    ``stream: true`` (chat and completions alike)."""
    if stream_options and not stream:
        raise PydanticCustomError("stream_options_without_stream", STREAM_OPTIONS_NEED_STREAM)
    return stream_options

TOP_LOGPROBS_NEEDS_LOGPROBS = "logprobs must be set to true when top_logprobs is used"


def check_top_logprobs(top_logprobs: int | None, logprobs: bool | None) -> int | None:
    """OpenAI and vLLM answer 400 to ``top_logprobs`` without ``logprobs: true`` (chat completions)."""
    if top_logprobs is not None and not logprobs:
        raise ValueError(TOP_LOGPROBS_NEEDS_LOGPROBS)
    return top_logprobs
