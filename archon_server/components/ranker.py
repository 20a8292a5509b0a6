"""ranker: listwise LLM ranking of the candidates, keeps top_k."""

from __future__ import annotations

from dataclasses import replace

from . import prompts
from .base import Component, ComponentContext, numbered_texts, user_prompt
from .fit import fit_texts
from .parsers import parse_ranking
from .state import State, Update


class Ranker(Component):
    type = "ranker"

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        cands = state.candidates
        n = len(cands)
        if n <= 1:
            ctx.layer.notes.append(f"{self.id}: {n} candidate(s), nothing to rank")
            return Update(selected=[replace(c, score=1.0) for c in cands])
        params = ctx.sampling(self.spec, judge=True)
        msgs, note = await fit_texts(
            ctx, self.spec.model, [c.text for c in cands],
            lambda texts: user_prompt(prompts.RANKER.format(n=n, query=state.query, responses=numbered_texts(texts))), params.max_tokens,
        )
        order = await ctx.call_parsed(
            self.spec.model, msgs, params, lambda t: parse_ranking(t, n), purpose=f"rank {n}" + (f", {note}" if note else ""),
        )
        if order is None:
            ctx.layer.notes.append(f"{self.id}: ranking unparseable; kept the incoming order")
            order = list(range(n))
        keep = order[: self.spec.top_k]
        # Score = n - position, so the final rule `top_ranked` picks the ranker's first choice.
        return Update(selected=[replace(cands[i], score=float(n - pos)) for pos, i in enumerate(keep)])
