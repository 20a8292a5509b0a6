"""Wire types of POST /v1/completions (OpenAI's legacy text completions, as evaluation harnesses call them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ...sampling_fields import MAX_TOKENS_LIMIT, N, Seed, Stop, Temperature, TopLogprobs, TopP, check_stream_options
from ..chat.protocol import SamplingExtras, StreamOptions, UsageInfo

MAX_PROMPTS = 64  # prompts in one request (each runs the whole architecture)


class CompletionRequest(SamplingExtras):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0, le=MAX_TOKENS_LIMIT)  # OpenAI's and vLLM's default; 0 only with echo (the service says)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: N = 1
    best_of: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: TopLogprobs | None = None  # legacy completions: the number of top logprobs
    echo: bool = False
    stop: Stop | None = None
    seed: Seed | None = None
    suffix: str | None = None
    user: str | None = None
    # archon-server extensions (the openai SDK sends them with `extra_body=`)
    architecture: dict[str, Any] | None = Field(default=None, description="Overrides deep-merged into the architecture.")
    return_trace: bool = False

    @field_validator("stream_options", mode="before")
    @classmethod
    def _stream_options(cls, v: Any, info: ValidationInfo) -> Any:
        return check_stream_options(v, info.data.get("stream"))

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("at least one prompt is required")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("token-id prompts are not served; send the text")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request")
        if any(not p for p in prompts):
            raise ValueError("prompts must be non-empty")
        return prompts

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not served")


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    trace: dict[str, Any] | list[dict[str, Any]] | None = None
