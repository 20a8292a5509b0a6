"""Constrained decoding: a sequence whose output must match a grammar (JSON Schema, from OpenAI's `response_format`)
gets, before each draw, every token that would break the grammar masked out.

Built on llguidance (the library vLLM's `guidance` structured-output backend uses): it compiles the JSON Schema
to a grammar and computes the allowed tokens per step (a mask over SmolLM2's 49k vocabulary took 0.1-2 ms here).
Why not hand-written: a JSON Schema automaton over a BPE vocabulary (tokens that span several JSON tokens, escapes,
numbers) is exactly what such a library gets right and we would not.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from .grammar import grammar_for

try:  # optional: without it the server prompts for JSON and validates (api/structured.py)
    import llguidance
    import llguidance.hf  # not llguidance.torch: importing it pulls in torch._dynamo, 18 s here
except ImportError:  # pragma: no cover - depends on the environment
    llguidance = None


log = logging.getLogger("archon.engine.constrain")

__all__ = ["Constraints", "grammar_for"]


class Constraints:
    """Per-engine: the tokenizer converted once (about a second), then one matcher per constrained sequence."""

    def __init__(self, tokenizer: Any):
        self._hf = tokenizer
        self._tok: Any = None
        self._lock = threading.Lock()

    def matcher(self, grammar: str) -> TokenConstraint:
        with self._lock:
            if self._tok is None:
                self._tok = llguidance.hf.from_tokenizer(self._hf)
        m = llguidance.LLMatcher(self._tok, grammar)
        if m.is_error():
            raise ValueError(f"response_format: grammar rejected: {m.get_error()}")
        return TokenConstraint(m, self._tok.vocab_size)


class TokenConstraint:
    """One sequence's grammar state: :meth:`mask` the row's logits, then :meth:`accept` the token drawn."""

    _BITS = torch.arange(32, dtype=torch.int32)

    def __init__(self, matcher: Any, tok_vocab: int):
        self.matcher = matcher
        self.tok_vocab = tok_vocab

    def allowed(self) -> torch.Tensor:
        """The grammar's allowed tokens now, as a bool vector over the tokenizer's vocabulary (llguidance gives a
        bitmask of 32-bit words, token i at bit i % 32 of word i // 32)."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        return ((words.unsqueeze(-1) >> self._BITS) & 1).bool().flatten()[: self.tok_vocab]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of one row's logits [V] with every token the grammar forbids at -inf. A matcher in an error state
        constrains nothing more (the row is never failed for it: it runs in the batch's decode step, and the server
        validates the answer anyway)."""
        if self.matcher.is_error():
            return logits
        try:
            ok = self.allowed()
        except Exception:  # noqa: BLE001 - see above: never fail the batch's step
            log.warning("constrained decoding gave up: %s", self.matcher.get_error() or "mask failed")
            return logits
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(len(ok), logits.shape[-1])
        keep[:n] = ok[:n]  # rows past the tokenizer's vocabulary (embedding padding) are never tokens
        return logits.masked_fill(~keep.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.is_stopped() and not self.matcher.is_error():
            self.matcher.consume_token(token)
