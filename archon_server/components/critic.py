"""critic: strengths and weaknesses of every candidate (one joint call, or one concurrent call per candidate)."""

from __future__ import annotations

from . import prompts
from .base import Component, ComponentContext, numbered_texts, user_prompt
from .fit import fit_texts
from .parsers import parse_critique, parse_joint_critiques
from .state import State, Update


class Critic(Component):
    type = "critic"

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        params = ctx.sampling(self.spec, judge=True)
        n = len(state.candidates)
        if self.spec.per_candidate or n == 1:
            critiques = await ctx.judge_each(
                self.spec.model,
                [prompts.CRITIC.format(query=state.query, response=c.text) for c in state.candidates], params, parse_critique,
            )
        else:
            msgs, note = await fit_texts(
                ctx, self.spec.model, [c.text for c in state.candidates],
                lambda texts: user_prompt(prompts.CRITIC_JOINT.format(n=n, query=state.query, responses=numbered_texts(texts))),
                params.max_tokens,
            )
            parsed = await ctx.call_parsed(
                self.spec.model, msgs, params, lambda t: parse_joint_critiques(t, n), purpose=f"critique {n}" + (f", {note}" if note else ""),
            )
            critiques = parsed or [None] * n
        # Backend failures raised above; unparseable output degrades (README): the next stage goes on without.
        if n and all(c is None for c in critiques):
            ctx.layer.notes.append(f"{self.id}: no usable critique; going on without critiques")
        return Update(critiques=critiques)
