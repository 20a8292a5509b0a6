"""Token log-probabilities in the wire shapes: chat's (``choices[].logprobs.content``), text_completion's legacy one
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), for whole answers and for streamed pieces, and the
Responses API's (an ``output_text`` part's ``logprobs``).

``bytes`` is the token's text as UTF-8, as OpenAI sends it and as vLLM fills it (from the token's text: a token that
is part of a multi-byte character reads as U+FFFD, whose bytes it then carries).
"""

from __future__ import annotations

from typing import Any

from ..backends.base import TokenLogprob


def utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", "replace"))


def chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """``{"content": [...]}`` of a chat choice or of one streamed chunk; None when there are none."""
    if not lps:
        return None
    return {
        "content": [
            {"token": t.token, "logprob": t.logprob, "bytes": utf8(t.token),
             "top_logprobs": [{"token": a, "logprob": b, "bytes": utf8(a)} for a, b in t.top or ()]}
            for t in lps
        ]
    }


def responses_logprobs(lps: list[TokenLogprob] | None) -> list[dict[str, Any]]:
    """An ``output_text`` part's ``logprobs`` (the final stage's, asked for with ``top_logprobs``): a list, empty when
    there are none."""
    return [{"token": t.token, "bytes": utf8(t.token), "logprob": t.logprob,
             "top_logprobs": [{"token": a, "bytes": utf8(a), "logprob": v} for a, v in t.top or ()]} for t in lps or ()]


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
