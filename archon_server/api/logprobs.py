"""Token log-probabilities in the wire shapes: chat's (``choices[].logprobs.content``), text_completion's legacy one
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), for whole answers and for streamed pieces, and the
Responses API's (an ``output_text`` part's ``logprobs``).

``bytes`` is the token's raw bytes where the backend gives them (the embedded engine: a token that is part of a
multi-byte character carries its own bytes, OpenAI's meaning, so the bytes of a character's tokens put together are
the character), else the token's text as UTF-8, as vLLM fills it.
"""

from __future__ import annotations

from typing import Any

from ..backends.base import TokenLogprob


def utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", "replace"))


def _bytes(t: TokenLogprob) -> list[int]:
    return t.bytes if t.bytes is not None else utf8(t.token)


def _top(t: TokenLogprob) -> list[dict[str, Any]]:
    raw = t.top_bytes if t.top_bytes is not None and len(t.top_bytes) == len(t.top or ()) else None
    return [{"token": a, "logprob": v, "bytes": raw[i] if raw is not None else utf8(a)} for i, (a, v) in enumerate(t.top or ())]


def chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """``{"content": [...]}`` of a chat choice or of one streamed chunk; None when there are none."""
    if not lps:
        return None
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t), "top_logprobs": _top(t)} for t in lps]}


def responses_logprobs(lps: list[TokenLogprob] | None) -> list[dict[str, Any]]:
    """An ``output_text`` part's ``logprobs`` (the final stage's, asked for with ``include``): a list, empty when
    there are none."""
    return [{"token": t.token, "bytes": _bytes(t), "logprob": t.logprob, "top_logprobs": _top(t)} for t in lps or ()]


def legacy_logprobs(lps: list[TokenLogprob] | None, offset: int) -> dict[str, Any] | None:
    """text_completion's shape; ``offset``: where the first token's text starts in the choice's text (0 for a whole
    answer whose tokens cover its text from the start, an echoed prompt's included; in a stream, the length of the
    choice's text sent before this piece, as vLLM counts it). An echoed prompt's first token keeps its nulls.
    A position's ``top_logprobs`` always holds the chosen token too (OpenAI: "up to logprobs+1 elements"; vLLM alike)."""
    if not lps:
        return None
    offsets, pos = [], offset
    for t in lps:
        offsets.append(pos)
        pos += len(t.token)
    return {"tokens": [t.token for t in lps], "token_logprobs": [t.logprob for t in lps],
            "top_logprobs": [_top_with_chosen(t) for t in lps], "text_offset": offsets}


def _top_with_chosen(t: TokenLogprob) -> dict[str, float | None] | None:
    if t.top is None:
        return None
    top: dict[str, float | None] = dict(t.top)
    top.setdefault(t.token, t.logprob)
    return top
