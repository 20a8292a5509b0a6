"""Wire types of POST /v1/chat/completions (the subset of OpenAI's schema we honour, plus our extensions)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from ...backends.base import SAMPLING_EXTRAS, content_text
from ...sampling_fields import (
    Bias,
    MaxTokens,
    MinP,
    MinTokens,
    N,
    Penalty,
    RepetitionPenalty,
    Seed,
    Stop,
    Temperature,
    TopK,
    TopLogprobs,
    TopP,
    check_stream_options,
    check_top_logprobs,
)
from ..structured import check_response_format


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


_JSON_KIND = {str: "string", int: "number", float: "number", bool: "boolean", list: "array", type(None): "null"}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = Field(default=None, max_length=256)  # a tool's result

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        """An image, audio or file part gets a 400 saying so: the prompts are built from text (one content flattener,
        ``content_text``), so such a part would be dropped without a word; pydantic's own error for it named a
        union branch (``content.str: Input should be a valid string``). Content of another JSON type gets a 400
        saying what content may be."""
        if v is not None and not isinstance(v, (str, list)):
            raise PydanticCustomError("content_type", "Input should be a string or a list of content parts, not a JSON {kind}",
                                      {"kind": _JSON_KIND.get(type(v), "object")})
        if isinstance(v, list):
            for j, part in enumerate(v):
                if not isinstance(part, dict):
                    raise PydanticCustomError("invalid_part", "part {j} is a JSON {kind}, not an object with a \"type\" (text parts only)",
                                              {"j": j, "kind": _JSON_KIND.get(type(part), type(part).__name__)})
                kind = part.get("type")
                if kind != "text":
                    raise PydanticCustomError("unsupported_part", "part {j} is of type {kind}, which is not served (text parts only)",
                                              {"j": j, "kind": repr(kind)})
        return v

    def to_dict(self) -> dict[str, Any]:
        content = content_text([p.model_dump() for p in self.content]) if isinstance(self.content, list) else self.content
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingExtras(BaseModel):
    """OpenAI's penalties and vLLM's extra sampling params (``extra_body=`` in the SDK), for the final stage.

    vLLM's names, ranges and meanings (``top_k`` 0 or -1: off). Chat and completions take the same set
    (``backends.base.SAMPLING_EXTRAS``); a final-stage backend that cannot honour one is refused with a 400 naming it.
    """

    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    min_tokens: MinTokens | None = None
    ignore_eos: bool | None = None
    # {token id (a string, as JSON keys are): bias added to its logit before sampling}, clamped to [-100, 100] as vLLM
    # does; an id past the model's vocabulary is the backend's 400.
    logit_bias: dict[str, Bias] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return None
        out = {}
        for k, bias in v.items():
            try:
                tid = int(k)
            except ValueError:
                raise ValueError(f"token id {k!r} is not an integer (keys are token ids as strings)") from None
            if tid < 0:
                raise ValueError(f"token id {tid} is negative")
            out[str(tid)] = min(100.0, max(-100.0, float(bias)))
        return out

    def sampling_extra(self) -> dict[str, Any]:
        """The ones the client set and that change something (vLLM's neutral values dropped)."""
        if self.model_fields_set.isdisjoint(SAMPLING_EXTRAS):  # the usual request: nothing to look at
            return {}
        out = {k: getattr(self, k) for k in SAMPLING_EXTRAS if getattr(self, k) is not None}
        if out.get("top_k", 1) <= 0:
            del out["top_k"]
        for k in ("min_p", "min_tokens"):
            if out.get(k) == 0:
                del out[k]
        if out.get("ignore_eos") is False:
            del out["ignore_eos"]
        return out


class ChatCompletionRequest(SamplingExtras):
    # Unknown OpenAI fields are ignored (as vLLM does) rather than rejected, so SDK upgrades do not break clients.
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, min_length=1, max_length=256)  # None: server.default_architecture
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: N = 1
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: Stop | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    user: str | None = None
    # Structured outputs and tools: passed to the final stage (see api/structured.py)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat-template switches (`extra_body=`): continue the conversation's final assistant message (a prefilled
    # answer) instead of answering it with a new turn. None: vLLM's default (a generation prompt, unless continuing).
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    # archon-server extensions (the openai SDK sends them with `extra_body=`)
    architecture: dict[str, Any] | None = Field(default=None, description="Overrides deep-merged into the architecture.")
    return_trace: bool = False
    stream_trace: bool = Field(default=False, description="With stream: true, add the graph's progress (trace events) as chunks.")

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_response_format(v)

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for t in v or []:
            fn = t.get("function")
            if t.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                raise ValueError("every tool must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": {...}}}")
        return v or None

    @field_validator("stream_options", mode="before")
    @classmethod
    def _stream_options(cls, v: Any, info: ValidationInfo) -> Any:
        return check_stream_options(v, info.data.get("stream"))

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        """OpenAI and vLLM answer 400 to ``top_logprobs`` without ``logprobs: true`` (it was silently ignored here).
        ``logprobs`` is declared before ``top_logprobs``, so it is in ``info.data`` once it validated."""
        return check_top_logprobs(v, info.data.get("logprobs"))

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role in ("user", "system", "developer") and m.content for m in v):
            raise ValueError("at least one non-empty user or system message is required")
        return v

    @field_validator("continue_final_message")
    @classmethod
    def _continue_final_message(cls, v: bool, info: ValidationInfo) -> bool:
        """vLLM's rule (both switches on is a 400) and ours: only an assistant message can be continued (vLLM would
        continue a final user message as if the model had written it; the embedded engine opened a new turn)."""
        if not v:
            return v
        if info.data.get("add_generation_prompt"):
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        messages = info.data.get("messages")
        if messages and messages[-1].role != "assistant":
            raise ValueError(f"the last message must be the assistant's answer to continue; it is a {messages[-1].role!r} message")
        return v

    def template_extra(self) -> dict[str, Any]:
        """The chat-template switches the final stage's calls get (FinalOverrides.extra), as vLLM takes them; nothing
        for the default (a new assistant turn)."""
        if self.continue_final_message:
            return {"continue_final_message": True, "add_generation_prompt": False}
        return {"add_generation_prompt": False} if self.add_generation_prompt is False else {}


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageInfo
    system_fingerprint: str | None = None
    trace: dict[str, Any] | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class StreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: UsageInfo | None = None
    trace: dict[str, Any] | None = None
    trace_event: dict[str, Any] | None = None  # stream_trace: one event of the graph's progress (choices is empty)
