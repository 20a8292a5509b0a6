"""scorer: rank candidates by log-probability scores instead of generated verdicts, keep ``top_k``.

Why: a listwise LLM ranker writes a ranking that must be parsed, costs a generation and is position-
biased.  These methods read numbers the model already computes (see ``ScorerSpec`` for the four methods):
no parsing, no sampling, and the judge methods control position bias by asking in both orders.  Every
candidate's score lands on ``Candidate.score`` (so ``final: top_ranked`` takes the best), its parts in
``Candidate.meta["scorer"]`` and a one-line summary in the layer's notes (both are in the trace).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from ..backends.base import NextTokenRequest, RewardRequest, ScoreRequest
from . import prompts
from .base import Component, ComponentContext, user_prompt
from .scoring_math import (
    bradley_terry,
    expected_rating,
    knockout_round,
    round_robin,
    sigmoid,
    swapped_preference,
)
from .state import State, Update


def strong_messages(messages: list[dict[str, Any]], criteria: str | None, exemplars: list[Any]) -> list[dict[str, Any]]:
    """The conversation as the strong model sees it in CDR: criteria as (or before) the system message, then
    the exemplars as earlier turns, then the client's conversation."""
    msgs = [dict(m) for m in messages]
    turns: list[dict[str, Any]] = []
    for ex in exemplars:
        turns += [{"role": "user", "content": ex.query}, {"role": "assistant", "content": ex.response}]
    system: list[dict[str, Any]] = []
    if msgs and msgs[0].get("role") == "system":
        system = [msgs.pop(0)]
    if criteria:
        if system:
            system[0]["content"] = f"{criteria}\n\n{system[0].get('content') or ''}"
        else:
            system = [{"role": "system", "content": criteria}]
    return system + turns + msgs


class Scorer(Component):
    type = "scorer"

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        # num[i]: candidate i's number ([1]...) among the ones the layer got, which the notes use.
        state, num = self._set_aside_cut(ctx, state) if self.spec.prefer_complete else (state, range(1, len(state.candidates) + 1))
        cands = state.candidates
        if len(cands) <= 1:
            ctx.layer.notes.append(f"{self.id}: {len(cands)} candidate(s), nothing to score")
            return Update(selected=[replace(c, score=c.score if c.score is not None else 0.0) for c in cands])
        method = self.spec.method
        if method == "density_ratio":
            scores, parts = await self._density_ratio(ctx, state)
        elif method == "logprob_judge":
            scores, parts = await self._pointwise(ctx, state)
        elif method == "reward_model":
            rewards = await self._rewards(ctx, state)
            scores, parts = rewards, [{"reward": r} for r in rewards]
        else:
            scores, parts = await self._tournament(ctx, state)
        order = sorted(range(len(cands)), key=lambda i: -scores[i])  # stable: ties keep the incoming order
        keep = order[: self.spec.top_k]
        ctx.layer.notes.append(
            f"{self.id}: {method} scores " + ", ".join(f"[{num[i]}] {scores[i]:.4g}" for i in range(len(cands)))
            + f"; kept {', '.join(f'[{num[i]}]' for i in keep)}"
        )
        return Update(selected=[replace(cands[i], score=float(scores[i]), meta={**cands[i].meta, "scorer": {"method": method, **parts[i]}})
                                for i in keep])

    def _set_aside_cut(self, ctx: ComponentContext, state: State) -> tuple[State, list[int]]:
        """The state with only the complete candidates when one is complete and another was cut at the length limit
        (finish_reason ``length``): a cut answer never beats a complete one. The raw density ratio sums a log-ratio
        over the tokens, so at a small max_tokens the answers cut at the limit (the longest) won; the paper's reward
        (Dr.SoW/CDR: log p_strong(y|x) - log p_weak(y|x) of a whole answer) stays as it is. With the state, the
        numbers ([1]...) of the candidates it keeps among those the layer got."""
        cands = state.candidates
        cut = [i for i, c in enumerate(cands) if c.finish_reason == "length"]
        if not cut or len(cut) == len(cands):
            return state, list(range(1, len(cands) + 1))
        ctx.layer.notes.append(f"{self.id}: {len(cut)} of {len(cands)} candidate(s) cut at the length limit set aside "
                               f"({', '.join(f'[{i + 1}]' for i in cut)}): scored among the {len(cands) - len(cut)} complete")
        keep = [i for i in range(len(cands)) if i not in cut]
        return replace(state, candidates=[cands[i] for i in keep], critiques=[]), [i + 1 for i in keep]

    # ------------------------------------------------------------------ density ratio (CDR)
    async def _density_ratio(self, ctx: ComponentContext, state: State) -> tuple[list[float], list[dict[str, Any]]]:
        texts = [c.text for c in state.candidates]
        strong_msgs = strong_messages(state.messages, self.spec.criteria, self.spec.exemplars)
        strong, weak = await asyncio.gather(
            ctx.scored(self.spec.model, lambda b, m: b.score(ScoreRequest(m, strong_msgs, texts)), n=len(texts), purpose="log p strong"),
            ctx.scored(self.spec.weak, lambda b, m: b.score(ScoreRequest(m, state.messages, texts)), n=len(texts), purpose="log p weak"),
        )
        scores, parts = [], []
        for s, w in zip(strong.scores, weak.scores):
            if self.spec.length_normalize:
                score = s.mean_logprob - w.mean_logprob
            else:
                score = s.logprob - w.logprob
            scores.append(score)
            parts.append({"logp_strong": s.logprob, "logp_weak": w.logprob, "tokens_strong": s.num_tokens, "tokens_weak": w.num_tokens})
        return scores, parts

    # ------------------------------------------------------------------ logprob judges
    async def _next_token(self, ctx: ComponentContext, prompt: str, prefix: str, purpose: str) -> Any:
        msgs = user_prompt(prompt) + [{"role": "assistant", "content": prefix}]
        return await ctx.scored(self.spec.model, lambda b, m: b.next_token_logprobs(NextTokenRequest(m, msgs, self.spec.top_logprobs)), purpose=purpose)

    async def _pointwise(self, ctx: ComponentContext, state: State) -> tuple[list[float], list[dict[str, Any]]]:
        results = await asyncio.gather(*(
            self._next_token(ctx, prompts.POINTWISE_JUDGE.format(query=state.query, response=c.text), prompts.POINTWISE_PREFIX, f"rate {i + 1}")
            for i, c in enumerate(state.candidates)
        ))
        ratings = [expected_rating(r.top) for r in results]
        if any(r is None for r in ratings):
            ctx.layer.notes.append(f"{self.id}: no rating token among the judge's top next tokens for "
                                   + ", ".join(f"[{i + 1}]" for i, r in enumerate(ratings) if r is None) + "; scored 0")
        return [r if r is not None else 0.0 for r in ratings], [{"rating": r} for r in ratings]

    async def judge_pair(self, ctx: ComponentContext, query: str, x: str, y: str, label: str = "") -> tuple[float, dict[str, Any]]:
        """P(x better than y): the judge asked twice, x as (a) then x as (b), the two preferences averaged."""
        first, second = await asyncio.gather(
            self._next_token(ctx, prompts.PAIRWISE_JUDGE.format(query=query, a=x, b=y), prompts.PAIRWISE_PREFIX, f"{label} (a)/(b)".strip()),
            self._next_token(ctx, prompts.PAIRWISE_JUDGE.format(query=query, a=y, b=x), prompts.PAIRWISE_PREFIX, f"{label} swapped".strip()),
        )
        p1 = (first.prob_of("a"), first.prob_of("b"))
        p2 = (second.prob_of("a"), second.prob_of("b"))
        return swapped_preference(p1, p2), {"x_as_a": p1, "x_as_b": p2}

    async def _rewards(self, ctx: ComponentContext, state: State) -> list[float]:
        texts = [c.text for c in state.candidates]
        res = await ctx.scored(
            self.spec.model, lambda b, m: b.reward(RewardRequest(m, state.query, texts, self.spec.reward_protocol)), n=len(texts), purpose="reward"
        )
        return list(res.rewards)

    # ------------------------------------------------------------------ tournament
    async def _tournament(self, ctx: ComponentContext, state: State) -> tuple[list[float], list[dict[str, Any]]]:
        k = len(state.candidates)
        texts = [c.text for c in state.candidates]
        rewards = await self._rewards(ctx, state) if self.spec.pair_scorer == "reward_model" else None
        matches: list[tuple[int, int, float]] = []

        async def play(pairs: list[tuple[int, int]]) -> list[float]:
            if rewards is not None:  # a reward model compares two candidates by their reward difference
                return [sigmoid(rewards[i] - rewards[j]) for i, j in pairs]
            out = await asyncio.gather(*(self.judge_pair(ctx, state.query, texts[i], texts[j], f"[{i + 1}] vs [{j + 1}]") for i, j in pairs))
            return [p for p, _ in out]

        if k <= self.spec.round_robin_max:
            pairs = round_robin(k)
            matches = [(i, j, p) for (i, j), p in zip(pairs, await play(pairs))]
            prior = 0.05  # soft results keep the maximum finite; a little prior guards a judge that is sure (p = 1)
            style = "round-robin"
        else:
            alive = list(range(k))
            while len(alive) > 1:  # bounded: halves every round
                pairs, byes = knockout_round(alive)
                prefs = await play(pairs)
                matches += [(i, j, p) for (i, j), p in zip(pairs, prefs)]
                alive = [i if p >= 0.5 else j for (i, j), p in zip(pairs, prefs)] + byes
            prior = 0.5  # a knockout's winner lost nothing: the prior keeps its strength finite
            style = "knockout"
        strengths = bradley_terry(k, matches, prior=prior)
        wins = [0.0] * k
        for i, j, p in matches:
            wins[i] += p
            wins[j] += 1 - p
        ctx.layer.notes.append(f"{self.id}: {style} of {len(matches)} match(es)")
        return strengths, [{"bt_strength": s, "soft_wins": w, "tournament": style} for s, w in zip(strengths, wins)]

