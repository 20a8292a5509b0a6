"""Structured outputs and tools at the edge: what `response_format` and `tools` ask of the final stage, and the
check that the answer is what was asked for.

The final stage's backend gets `response_format` as is: vLLM (and OpenAI-compatible providers) constrain their
decoding to it, and so does the embedded engine (llguidance, engine/constrain.py; without it its final stage is told
in its prompt). Here every answer is validated against the schema (the `jsonschema` library) before it is returned;
an answer that fails is asked for once more (the whole graph runs again), then the request fails with a 422 naming
what did not validate. An answer cut by ``max_tokens`` is returned as it is (see :func:`conform_all`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

from ..components.state import Candidate
from ..exceptions import ArchonError

# One more run of the graph when the answer is not the JSON asked for (the embedded engine's only safeguard).
STRUCTURED_RETRIES = 1

_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


class StructuredOutputInvalid(ArchonError, ValueError):
    """The final answer is not the JSON that `response_format` asked for."""


def check_response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """Normalise OpenAI's `response_format`; ``{"type": "text"}`` means none. A bad schema is the client's error."""
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt.get("type") not in ("json_object", "json_schema"):  # else it would run the graph, then fail to parse
        raise ValueError(f"response_format.type: {fmt.get('type')!r} is not one of text, json_object, json_schema")
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema: a JSON Schema object is required")
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise ValueError(f"response_format.json_schema.schema: not a valid JSON Schema: {e.message}") from None
    return fmt


def _parse(text: str) -> tuple[Any, str]:
    s = text.strip()
    m = _FENCE.match(s)  # small models like to fence their JSON; the JSON inside is what counts
    if m:
        s = m.group(1).strip()
    return json.loads(s), s


def conform(text: str, fmt: dict[str, Any]) -> str:
    """The answer as the JSON text asked for (code fences around it dropped), or StructuredOutputInvalid."""
    try:
        value, clean = _parse(text)
    except ValueError as e:
        raise StructuredOutputInvalid(f"the answer is not valid JSON ({e.args[0] if e.args else e}): {text[:200]!r}") from None
    if fmt.get("type") == "json_object" and not isinstance(value, dict):
        raise StructuredOutputInvalid(f"the answer is JSON but not an object: {text[:200]!r}")
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema") or {}
        err = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(value))
        if err is not None:
            where = "/".join(str(p) for p in err.absolute_path) or "(root)"
            raise StructuredOutputInvalid(f"the answer does not match the JSON schema at {where}: {err.message}")
    return clean


def conform_all(cands: list[Candidate], fmt: dict[str, Any] | None) -> None:
    """Check (and clean) every final candidate in place; tool calls are answers of their own and pass as they are.

    An answer cut at ``max_tokens`` (finish_reason ``length``) passes as it is: its JSON is incomplete by the
    client's own limit, which running the graph again cannot change. OpenAI and vLLM return it so, and the
    finish reason tells the client (it had been refused with a 422 after a second full run)."""
    if fmt is None:
        return
    for c in cands:
        if c.meta.get("tool_calls") or c.finish_reason == "length":
            continue
        c.text = conform(c.text, fmt)


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses API tools (flat: {type, name, parameters...}) in Chat Completions' shape ({type, function: {...}})."""
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise ValueError(f"tools[{i}].type: only function tools are served here, not {t.get('type')!r}")
        if "function" in t:
            out.append(t)
            continue
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> Any:
    """Responses API `tool_choice` ({"type": "function", "name": ...}) in Chat Completions' shape; strings as they are."""
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice and "function" not in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice
