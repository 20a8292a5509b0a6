"""verifier: reasoning then [Correct]/[Incorrect] per candidate; keeps the passing ones."""

from __future__ import annotations

from dataclasses import replace

from . import prompts
from .base import Component, ComponentContext, ComponentFailed, gather_tolerant, user_prompt
from .parsers import parse_verdict
from .state import State, Update


class Verifier(Component):
    type = "verifier"

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        params = ctx.sampling(self.spec, judge=True)
        results = await gather_tolerant(
            [
                ctx.call_parsed(
                    self.id, self.type, self.spec.model,
                    user_prompt(prompts.VERIFIER.format(query=state.query, response=c.text)),
                    params, parse_verdict, purpose=f"candidate {i + 1}",
                )
                for i, c in enumerate(state.candidates)
            ]
        )
        if state.candidates and all(isinstance(r, BaseException) for r in results):
            raise ComponentFailed(f"{self.id}: every verification call failed")
        # Fail closed: a failed or unparseable verification does not pass.
        passed = [replace(c, score=1.0) for c, r in zip(state.candidates, results) if r is True]
        if not passed:
            ctx.layer.notes.append(f"{self.id}: no candidate passed verification; kept all {len(state.candidates)}")
            return Update(selected=list(state.candidates))
        return Update(selected=passed)
