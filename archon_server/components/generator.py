"""generator: k samples from one or more models (k samples of one model = one n=k request)."""

from __future__ import annotations

from typing import Any

from . import prompts
from .base import Component, ComponentContext, ComponentFailed, gather_tolerant
from .state import Candidate, State, Update, candidate_meta, message_text


def with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The component's system prompt as the one system message, after the client's own system and developer
    instructions (kept: a generator dropped them, and a client's "answer in French" with them). The fuser and
    self_moa_seq build their aggregation prompt with it too (fuser.fusion_messages)."""
    if not system:
        return messages
    client = "\n".join(message_text(m) for m in messages if m.get("role") in ("system", "developer"))
    rest = [m for m in messages if m.get("role") not in ("system", "developer")]
    return [{"role": "system", "content": f"{client}\n\n{system}" if client else system}, *rest]


def with_note(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    """``note`` added to the conversation's system message (one is made when there is none)."""
    if messages and messages[0].get("role") == "system":
        return [{"role": "system", "content": f"{message_text(messages[0])}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


class Generator(Component):
    type = "generator"
    produces = True
    streamable = True

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        models = self.spec.models_used()
        # On the final stage the client's n is the number of samples (one model) — see README.
        k = ctx.final.n if (ctx.final is not None and ctx.final.sets_samples and len(models) == 1) else self.spec.samples
        params = ctx.sampling(self.spec)
        messages = with_system(state.messages, self.spec.system_prompt)
        stream = ctx.sink is not None and len(models) == 1
        results = await gather_tolerant(
            [ctx.call(m, self._json_asked(ctx, m, messages), params, n=k, purpose=f"{k} sample(s)", stream=stream) for m in models]
        )
        cands: list[Candidate] = []
        for model, res in zip(models, results):
            if isinstance(res, BaseException):
                continue
            for ch in res.choices:
                cands.append(Candidate(ch.text, source=model, finish_reason=ch.finish_reason, meta=candidate_meta(ch)))
        if not cands:
            raise ComponentFailed(f"{self.id}: every call failed")
        return Update(candidates=cands)

    @staticmethod
    def _json_asked(ctx: ComponentContext, model: str, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A final stage asked for JSON on a backend that cannot constrain its decoding is told so in its prompt."""
        fmt = ctx.final.extra.get("response_format") if ctx.final is not None else None
        if not fmt or model not in ctx.registry or ctx.registry.get(model).supports_response_format:
            return messages
        return with_note(messages, prompts.json_instruction(fmt))
