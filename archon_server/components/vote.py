"""vote: majority / self-consistency over extracted answers (no backend call)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from .base import Component, ComponentContext
from .extractors import extract
from .state import State, Update


def majority(answers: list[str | None]) -> str | None:
    """The most frequent non-empty answer; ties go to the one seen first (deterministic)."""
    counts = Counter(a for a in answers if a)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a and counts[a] == best)


class Vote(Component):
    type = "vote"

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        answers = [extract(c.text, self.spec.extractor) for c in state.candidates]
        counts = Counter(a for a in answers if a)
        win = majority(answers)
        if win is None:
            ctx.layer.notes.append(f"{self.id}: no answer could be extracted; kept all candidates")
            return Update(selected=list(state.candidates), votes={})
        kept = [replace(c, score=float(counts[win]), meta={**c.meta, "answer": win}) for c, a in zip(state.candidates, answers) if a == win]
        return Update(selected=kept, votes=dict(counts))
