"""Fit the candidates a fuser or judge reads into its model's context: cut the longest ones, not fail after the work.

Why: a fuser's prompt is the client's conversation plus every candidate. With a long question (7,000 words to the
default self-moa), its six samples took 73 s and then the fuser's prompt (8,673 tokens) did not fit SmolLM2's
8,192: the request failed with a 400 and the samples were lost. Now, when the backend knows its context
(``Backend.context_window()``) and can count a prompt (``Backend.prompt_tokens()``), the candidate texts are cut to what
fits, the longest first (water-filling: a text shorter than its share stays whole), leaving the call's ``max_tokens``
(at most a quarter of the context) for the answer; the call's trace ``purpose`` says so. When the rest of the prompt
alone leaves too little room, or the backend cannot count, the prompt goes as it is and the backend refuses it (400).

Cheap when it fits, which is nearly always: a token covers at least one UTF-8 byte (byte-level BPE, and SentencePiece
with byte fallback), so a prompt whose bytes plus an allowance for the chat template fit is sent without counting.
Counting (the engine's chat template and tokenizer: 10-50 ms for 8K tokens, off the event loop) happens only near
the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends.base import ChatRequest
from ..backends.registry import UnknownModel
from .state import message_text

# Allowances for what a chat template adds: role markers and separators per message, and a default system prompt
# (SmolLM2's adds 25 tokens to a conversation without one).
TEMPLATE_TOKENS = 128
TEMPLATE_TOKENS_PER_MESSAGE = 16
# A prompt that fits this many tokens with its answer fits any model's context without asking the backend (an
# OpenAI-compatible upstream is asked its context once, by a /tokenize probe). Models with less are not fitted.
MIN_CONTEXT = 2048
MIN_SHARE = 32  # tokens each text keeps at least; with less room the prompt is sent as it is (and refused)
ROUNDS = 4  # counts after the first; each cut aims 5% under the room measured so far, so one or two usually do
ELLIPSIS = " [...]"

Build = Callable[[list[str]], list[dict[str, Any]]]


def cap_lengths(lengths: list[int], total: int) -> int:
    """The largest cap ``c`` with ``sum(min(n, c) for n in lengths) <= total``: texts shorter than ``c`` stay whole,
    longer ones are cut to ``c`` (water-filling). ``max(lengths)`` when all fit."""
    if sum(lengths) <= total:
        return max(lengths, default=0)
    left, k = total, len(lengths)
    for n in sorted(lengths):
        if n * k > left:  # this text and every longer one get an equal share of what is left
            return max(0, left // k)
        left -= n
        k -= 1
    return max(lengths)  # unreachable: the sum exceeded total


def cut(text: str, chars: int) -> str:
    """``text`` within ``chars`` characters, ending at a word boundary when one is near, marked as cut."""
    if len(text) <= chars:
        return text
    keep = max(0, chars - len(ELLIPSIS))
    head = text[:keep]
    space = head.rfind(" ", int(keep * 0.9))
    return (head[:space] if space > 0 else head) + ELLIPSIS


def _bytes(messages: list[dict[str, Any]]) -> int:
    return sum(len(message_text(m).encode()) for m in messages)


async def fit_texts(ctx: Any, alias: str, texts: list[str], build: Build, reply_tokens: int) -> tuple[list[dict[str, Any]], str | None]:
    """``build(texts)``, with the texts cut so the prompt leaves ``reply_tokens`` (at most a quarter of the context) in
    the context of ``alias``'s model; and a note for the call's trace purpose when they were cut (else None).

    ``ctx``: the component's ComponentContext (its registry).
    """
    messages = build(texts)
    try:
        backend, model = ctx.registry.get(alias), ctx.registry.model_name(alias)
    except UnknownModel:
        return messages, None  # the call itself reports it
    at_most = _bytes(messages) + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)  # tokens, by the byte rule
    if not texts or at_most + max(1, reply_tokens) <= MIN_CONTEXT:
        return messages, None
    window = await backend.context_window()
    if not window:
        return messages, None
    limit = window - max(1, min(reply_tokens, window // 4))
    if at_most <= limit:
        return messages, None
    total = await backend.prompt_tokens(ChatRequest(model, messages))
    if total is None or total <= limit:
        return messages, None
    fixed = await backend.prompt_tokens(ChatRequest(model, build([""] * len(texts))))
    if fixed is None or limit - fixed < MIN_SHARE * len(texts):
        return messages, None
    room, current = limit - fixed, texts
    for _ in range(ROUNDS):
        used = max(total - fixed, 1)  # tokens the texts take now
        chars = sum(len(t) for t in current)
        current = [cut(t, cap_lengths([len(t) for t in texts], int(chars * room / used * 0.95))) for t in texts]
        messages = build(current)
        total = await backend.prompt_tokens(ChatRequest(model, messages))
        if total is None or total <= limit:
            break
    return messages, f"cut to fit {window} tokens"


def _starts(messages: list[dict[str, Any]]) -> tuple[int, list[int]]:
    """Where a conversation may start once its oldest turns are dropped: after its leading system/developer messages
    (the instructions, always kept), at any message but a tool result (whose call would be gone) and not past the last
    message (the turn being answered)."""
    head = 0
    while head < len(messages) - 1 and messages[head].get("role") in ("system", "developer"):
        head += 1
    return head, [k for k in range(head, len(messages)) if messages[k].get("role") != "tool"]


async def drop_oldest(registry: Any, aliases: list[str], messages: list[dict[str, Any]],
                      reply_tokens: int | None, share: float = 1.0) -> tuple[list[dict[str, Any]], int]:
    """The conversation with as few of its oldest turns dropped as make it fit, with room for the answer, in the
    context of every model in ``aliases`` that reads it; and how many messages were dropped. The Responses API's
    ``truncation: "auto"`` (OpenAI: "dropping items from the beginning of the conversation"); the room kept is
    ``reply_tokens`` (the request's ``max_output_tokens``; as OpenAI, trimming counts it even when the answer would
    be shorter) or, without one, a quarter of the context. ``share``: the part of the rest the conversation may take;
    an ensemble passes 0.5, since its fusers and judges read the conversation with the candidates beside it (which
    :func:`fit_texts` cuts to what is left, down to ``MIN_SHARE`` tokens each).

    Unchanged when it fits (by the byte rule, without counting, or counted), when a model cannot tell its context or
    count a prompt, or when even the last turn alone does not fit: the backend then refuses it as without truncation.
    The cut point is found by bisection (the count only falls as turns are dropped): a few counts, not one per turn.

    ``registry``: the BackendRegistry the aliases are bound in.
    """
    head, starts = _starts(messages)
    at_most = _bytes(messages) + TEMPLATE_TOKENS + TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
    if len(starts) < 2 or at_most <= (MIN_CONTEXT - (MIN_CONTEXT // 4 if reply_tokens is None else reply_tokens)) * share:
        return messages, 0
    judges: list[tuple[Any, str, int]] = []  # (backend, model, tokens the prompt may take)
    for alias in dict.fromkeys(aliases):
        try:
            backend, model = registry.get(alias), registry.model_name(alias)
        except UnknownModel:
            continue  # the call itself reports it
        window = await backend.context_window()
        if window:
            judges.append((backend, model, int((window - (reply_tokens if reply_tokens is not None else window // 4)) * share)))

    def at(k: int) -> list[dict[str, Any]]:
        return [*messages[:head], *messages[k:]]

    async def fits(k: int) -> bool | None:
        for backend, model, limit in judges:
            n = await backend.prompt_tokens(ChatRequest(model, at(k)))
            if n is None:
                return None
            if n > limit:
                return False
        return True

    if not judges or await fits(starts[0]) in (True, None) or not await fits(starts[-1]):
        return messages, 0
    lo, hi = 0, len(starts) - 1  # starts[lo] does not fit, starts[hi] does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if await fits(starts[mid]):
            hi = mid
        else:
            lo = mid
    return at(starts[hi]), starts[hi] - head
