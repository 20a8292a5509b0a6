"""OpenAI's `response_format` as an llguidance grammar, compiled and checked: the one step of constrained decoding
that needs no model. Apart from :mod:`.constrain` (the per-step token masks, which need torch and the tokenizer) so
that a ``--workers N`` server process can refuse a schema the engine in its backend host could not enforce (a 400
before any call) without loading torch: llguidance's core imports neither torch nor transformers.
"""

from __future__ import annotations

import json
from typing import Any

try:  # optional: without it the server prompts for JSON and validates (api/structured.py)
    import llguidance
except ImportError:  # pragma: no cover - depends on the environment
    llguidance = None


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar of OpenAI's `response_format` (json_object: any object; json_schema: its schema)."""
    if not response_format or llguidance is None:
        return None
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
    elif response_format.get("type") == "json_object":
        schema = {"type": "object"}
    else:
        return None
    # Compact JSON: a small model given room for free whitespace tends to spend its tokens on newlines.
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})
    # A schema llguidance cannot compile (a keyword it does not implement, a regex with look-around, an unsatisfiable
    # schema) is the client's to change: refused here, when the request is taken (the caller's 400, as vLLM refuses a
    # schema its guided decoding cannot honour), not when the sequence is admitted (that failed the run as a 502,
    # which SDKs send again).
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(error)
    return grammar
