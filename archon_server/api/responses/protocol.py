"""Wire types of POST /v1/responses (the subset of OpenAI's Responses API we honour, plus our extensions).

Input items are checked by hand (``input_messages``) rather than by a pydantic union of every item type OpenAI
has: what we serve is text messages and the function-call round trip, and anything else gets a 400 that names
the item (``input[2].type``) instead of a wall of union-validation errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from ...sampling_fields import MaxTokens, Temperature, TopLogprobs, TopP
from ..structured import chat_tools, check_response_format

_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
_ROLES = ("user", "assistant", "system", "developer")


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", name, schema, strict}


class ResponsesRequest(BaseModel):
    # Unknown OpenAI fields (reasoning, service_tier...) are ignored, as vLLM does.
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(default=None, min_length=1, max_length=256)  # None: server.default_architecture
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_logprobs: TopLogprobs | None = None
    # OpenAI's switch for the output text's logprobs: "message.output_text.logprobs" in `include`. Unlike chat's
    # `top_logprobs` without `logprobs: true` (a 400), `top_logprobs` alone is accepted here and answered with empty
    # `logprobs` lists, as OpenAI does (and vLLM: logprobs only when the include asks for them); other include values
    # (reasoning.encrypted_content, sources...) name outputs this server does not produce and are ignored.
    include: list[str] | None = None
    stream: bool = False
    previous_response_id: str | None = Field(default=None, max_length=256)
    store: bool = True
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    # "auto": a conversation past a model's context loses its oldest turns until it fits (components/fit.drop_oldest);
    # "disabled" (OpenAI's default): it is refused with a 400, context_length_exceeded.
    truncation: Literal["auto", "disabled"] | None = None
    # archon-server extensions (the openai SDK sends them with `extra_body=`)
    architecture: dict[str, Any] | None = Field(default=None, description="Overrides deep-merged into the architecture.")
    return_trace: bool = False

    @field_validator("input", mode="before")
    @classmethod
    def _input_type(cls, v: Any) -> Any:
        if not isinstance(v, (str, list)):
            raise PydanticCustomError("input_type", "Input should be a string or a list of input items")
        return v

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if not v:
            raise ValueError("input must not be empty")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if not v:
            return None
        for t in chat_tools(v):
            if not (t["function"].get("name") or "").strip():
                raise ValueError("every function tool needs a name")
        return v

    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())

    def response_format(self) -> dict[str, Any] | None:
        """`text.format` in Chat Completions' `response_format` shape (what backends and the validator read)."""
        fmt = self.text.format if self.text else None
        if not fmt or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_schema":
            inner = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            try:
                return check_response_format({"type": "json_schema", "json_schema": inner})
            except ValueError as e:  # name the field as this API spells it
                raise ValueError(str(e).replace("response_format.json_schema.schema", "text.format.schema")) from None
        if fmt.get("type") == "json_object":
            return {"type": "json_object"}
        raise ValueError(f"text.format.type: {fmt.get('type')!r} is not one of text, json_object, json_schema")


def _content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"{where}: a string or a list of content parts")  # noqa: TRY004 - pydantic turns ValueError into a 400
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind not in _TEXT_PARTS:
            raise ValueError(f"{where}[{j}].type: {kind!r} is not served (text parts only: {', '.join(_TEXT_PARTS)})")
        out.append(str(p.get("text", p.get("refusal", ""))))
    return "".join(out)


_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def input_items(inp: str | list[dict[str, Any]], new_id: Callable[[str], str]) -> list[dict[str, Any]]:
    """Responses `input` as the items GET /v1/responses/{id}/input_items lists, in OpenAI's shapes: each with an ``id``
    (the client's, else ``new_id(prefix)``) and a ``status``, a message's content as a list of parts (``input_text``;
    an assistant's ``output_text``, with ``annotations``). Called after :func:`input_messages` accepted ``inp``."""
    if isinstance(inp, str):
        inp = [{"type": "message", "role": "user", "content": inp}]
    out = []
    for item in inp:
        kind = item.get("type", "message")
        it = {**item, "type": kind, "id": item.get("id") or new_id(_ITEM_PREFIX[kind]), "status": item.get("status") or "completed"}
        if kind == "message":
            text_type = "output_text" if item.get("role") == "assistant" else "input_text"
            parts = item.get("content")
            parts = [{"type": text_type, "text": parts or ""}] if parts is None or isinstance(parts, str) else parts
            it["content"] = [{**p, "annotations": p.get("annotations", [])} if p.get("type") == "output_text" else p for p in parts]
        out.append(it)
    return out


def input_messages(inp: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses `input` as chat messages. A run of function_call items becomes one assistant turn with tool_calls;
    a function_call_output becomes a `tool` message; reasoning items are dropped (nothing here reads them)."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    msgs: list[dict[str, Any]] = []
    for i, item in enumerate(inp):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise ValueError(f"input[{i}].role: one of {', '.join(_ROLES)}, not {role!r}")
            msgs.append({"role": role, "content": _content(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id") or item.get("id") or ""), "type": "function",
                    "function": {"name": str(item.get("name") or ""), "arguments": str(item.get("arguments") or "")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") is not None and not msgs[-1]["content"]:
                msgs[-1]["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                         "content": out if isinstance(out, str) else _content(out, f"input[{i}].output")})
        elif kind == "reasoning":
            continue
        else:
            raise ValueError(f"input[{i}].type: {kind!r} is not served (message, function_call, function_call_output)")
    return msgs
