"""unit_test_generator and unit_test_evaluator (LLM-judged, as in Archon; `executed` runs code in the sandbox)."""

from __future__ import annotations

from dataclasses import replace

from . import prompts
from .base import Component, ComponentContext, gather_tolerant, user_prompt
from .parsers import parse_test_results, parse_unit_tests
from .state import State, Update


class UnitTestGenerator(Component):
    type = "unit_test_generator"

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        k = self.spec.num_tests
        template = prompts.UNIT_TEST_GENERATOR_ASSERT if self.spec.style == "assert" else prompts.UNIT_TEST_GENERATOR
        tests = await ctx.call_parsed(
            self.spec.model,
            user_prompt(template.format(query=state.query, k=k)),
            ctx.sampling(self.spec, judge=True), lambda t: parse_unit_tests(t, k), purpose=f"{k} tests",
        )
        if not tests:
            # A backend failure raised above; unparseable output degrades (README) instead of failing the request:
            # the evaluator then finds no tests and keeps every candidate, both recorded in the trace.
            ctx.layer.notes.append(f"{self.id}: no unit tests obtained; evaluation will be skipped")
            return Update(unit_tests=[])
        return Update(unit_tests=tests)


class UnitTestEvaluator(Component):
    type = "unit_test_evaluator"

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        tests = state.unit_tests
        if not tests:
            ctx.layer.notes.append(f"{self.id}: no unit tests in the state; kept all candidates")
            return Update(selected=list(state.candidates))
        if self.spec.mode == "executed":
            scores = await self._executed(ctx, state)
        else:
            scores = await self._judged(ctx, state)
        ranked = sorted(range(len(state.candidates)), key=lambda i: -scores[i])  # stable: ties keep order
        return Update(selected=[replace(state.candidates[i], score=scores[i]) for i in ranked[: self.spec.top_k]])

    async def _judged(self, ctx: ComponentContext, state: State) -> list[float]:
        tests = state.unit_tests
        listing = "\n".join(f"Test {i + 1}: {t}" for i, t in enumerate(tests))
        params = ctx.sampling(self.spec, judge=True)
        results = await ctx.judge_each(
            self.spec.model,
            [prompts.UNIT_TEST_EVALUATOR.format(query=state.query, response=c.text, tests=listing) for c in state.candidates],
            params, lambda t: parse_test_results(t, len(tests)),
        )
        # Fail closed: an unanswered evaluation scores 0.
        return [sum(r) / len(tests) if isinstance(r, list) else 0.0 for r in results]

    async def _executed(self, ctx: ComponentContext, state: State) -> list[float]:
        """Run each candidate's code against the tests in the sandbox (separate process, limits, no network)."""
        from ..sandbox import is_python, score_program

        skipped = sum(not is_python(t) for t in state.unit_tests)
        if skipped:
            ctx.layer.notes.append(f"{self.id}: {skipped} test(s) are not Python and were not executed")
        scores = await gather_tolerant([score_program(c.text, state.unit_tests) for c in state.candidates])
        return [s if isinstance(s, float) else 0.0 for s in scores]
