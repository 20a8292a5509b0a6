"""verifier: reasoning then [Correct]/[Incorrect] per candidate; keeps the passing ones."""

from __future__ import annotations

from dataclasses import replace

from . import prompts
from .base import Component, ComponentContext
from .parsers import parse_verdict
from .state import State, Update


class Verifier(Component):
    type = "verifier"

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        params = ctx.sampling(self.spec, judge=True)
        results = await ctx.judge_each(
            self.spec.model,
            [prompts.VERIFIER.format(query=state.query, response=c.text) for c in state.candidates], params, parse_verdict,
        )
        # Fail closed: a failed or unparseable verification does not pass.
        passed = [replace(c, score=1.0) for c, r in zip(state.candidates, results) if r is True]
        if not passed:
            ctx.layer.notes.append(f"{self.id}: no candidate passed verification; kept all {len(state.candidates)}")
            return Update(selected=list(state.candidates))
        return Update(selected=passed)
