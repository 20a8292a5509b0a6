"""fuser: Mixture-of-Agents aggregate-and-synthesize over the current candidates."""

from __future__ import annotations

from typing import Any

from . import prompts
from .base import Component, ComponentContext, ComponentFailed
from .fit import fit_texts
from .generator import with_system
from .state import Candidate, State, Update, candidate_meta


def fusion_messages(
    state: State, texts: list[str], header: str, critiques: list[str | None] | None = None, words: int | None = None
) -> list[dict[str, Any]]:
    """The client's conversation with the aggregation instructions and numbered responses (the candidates' texts, as
    components/fit.py may have cut them) as the system message, after the client's own (with_system)."""
    parts = []
    for i, text in enumerate(texts):
        s = f"{i + 1}. {text}"
        if critiques and i < len(critiques) and critiques[i]:
            s += prompts.FUSER_CRITIQUE.format(critique=critiques[i])
        parts.append(s)
    system = header + "\n" + "\n\n".join(parts)
    if words:
        system += prompts.FUSER_LENGTH.format(words=words)
    return with_system(state.messages, system)


class Fuser(Component):
    type = "fuser"
    produces = True
    streamable = True

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        if not state.candidates:
            raise ComponentFailed(f"{self.id}: no candidates to fuse")
        cands = state.candidates[: self.spec.max_candidates]
        crit = state.critiques if self.spec.use_critiques else None
        header = self.spec.system_prompt or prompts.FUSER_SYSTEM
        if ctx.final is not None and ctx.final.extra.get("response_format"):  # the synthesis must be the JSON asked for
            header = prompts.json_instruction(ctx.final.extra["response_format"]) + "\n\n" + header
        params = ctx.sampling(self.spec)
        msgs, note = await fit_texts(
            ctx, self.spec.model, [c.text for c in cands],
            lambda texts: fusion_messages(state, texts, header, crit, self.spec.length_control),
            params.max_tokens,
        )
        n = ctx.final.n if ctx.final is not None and ctx.final.sets_samples else self.spec.samples
        purpose = f"fuse {len(cands)}" + (f", {note}" if note else "")
        res = await ctx.call(self.spec.model, msgs, params, n=n, purpose=purpose, stream=True)
        return Update(candidates=[Candidate(c.text, source=self.spec.model, finish_reason=c.finish_reason, meta=candidate_meta(c)) for c in res.choices])
