"""self_moa_seq: sequential Self-MoA over many samples with a sliding window.

Defaults (window 6, repeat_best 1, 12 samples) follow Self-MoA-Seq's setting of
aggregating six responses at a time: each window holds the best synthesis so far
plus ``window - repeat_best`` fresh samples, so the aggregator's prompt stays
bounded however many samples there are.  Repeating the best synthesis (r > 1)
biases the aggregator towards it, which the paper found helps for long runs.

With ``proposer`` set, samples are requested in chunks of one window's worth (one
``n=chunk`` request each, all in flight at once) and each chunk is aggregated as
soon as it and the previous synthesis are ready: the samples are consumed as they
arrive.
"""

from __future__ import annotations

import asyncio

from . import prompts
from ..backends.base import SamplingParams
from .base import Component, ComponentContext, ComponentFailed
from .fit import fit_texts
from .fuser import fusion_messages
from .state import Candidate, State, Update, candidate_meta


def sample_chunks(samples: int, window: int, fresh: int) -> list[int]:
    """Request sizes: a full window first (no synthesis yet), then `fresh` per later window."""
    chunks = [min(window, samples)]
    left = samples - chunks[0]
    while left > 0:
        chunks.append(min(fresh, left))
        left -= chunks[-1]
    return chunks


class SelfMoASeq(Component):
    type = "self_moa_seq"
    produces = True
    streamable = False

    async def run(self, ctx: ComponentContext, state: State) -> Update:
        spec = self.spec
        fresh = spec.window - spec.repeat_best
        queue: asyncio.Queue[list[Candidate] | None] = asyncio.Queue()
        producers: list[asyncio.Task] = []
        if spec.proposer:
            # Client parameters apply to the final synthesis, not to the proposals.
            params = ctx.sampling(spec, apply_final=False)
            if spec.proposer_temperature is not None:
                params.temperature = spec.proposer_temperature
            chunks = sample_chunks(spec.samples, spec.window, fresh)

            async def produce(k: int, idx: int) -> list[Candidate]:
                try:
                    res = await ctx.call(spec.proposer, state.messages, params, n=k, purpose=f"samples chunk {idx}", ctype="generator")
                    return [Candidate(c.text, source=spec.proposer, finish_reason=c.finish_reason) for c in res.choices]
                except Exception:  # noqa: BLE001 - recorded in the trace by ctx.call; the run goes on
                    return []

            producers = [asyncio.ensure_future(produce(k, i)) for i, k in enumerate(chunks)]

            async def feed(futs: list[asyncio.Future]) -> None:
                for fut in asyncio.as_completed(futs):
                    await queue.put(await fut)
                await queue.put(None)

            producers.append(asyncio.ensure_future(feed(list(producers))))
        else:
            await queue.put(list(state.candidates))
            await queue.put(None)
        try:
            return await self._aggregate(ctx, state, queue)
        finally:
            for t in producers:  # a cancelled request cancels the outstanding samples too
                t.cancel()

    async def _aggregate(self, ctx: ComponentContext, state: State, arrivals: "asyncio.Queue[list[Candidate] | None]") -> Update:
        spec = self.spec
        fresh = spec.window - spec.repeat_best

        best: Candidate | None = None
        others: list[Candidate] = []  # the last window's further syntheses, for a final stage's client n
        pending: list[Candidate] = []
        rounds = 0
        agg_params = ctx.sampling(spec)
        # On the final stage the client's n is the number of syntheses of the last window (as a final fuser writes n).
        final_n = ctx.final.n if ctx.final is not None and ctx.final.sets_samples else 1
        expected = spec.samples if spec.proposer else len(state.candidates)
        consumed = 0
        done = False
        last_window: tuple[list[dict], str | None, list[Candidate], list[Candidate]] | None = None  # the last aggregation's prompt, fit note, shown, window
        last_k = 0  # and the n it asked for
        while not done or pending:
            if not done:
                item = await arrivals.get()
                if item is None:
                    done = True
                else:
                    pending.extend(item)
            need = spec.window if best is None else fresh
            if len(pending) >= need or (done and pending):
                window, pending = pending[:need], pending[need:]
                consumed += len(window)
                # The last window: every sample asked for is in it or before it, or the queue has ended and it takes
                # what was left. A failed (or short) chunk leaves consumed below expected for good, so a window run
                # before the queue's end cannot know it is the last: it asks for n=1, and if it was the last, the
                # client's n is asked for again below.
                last = consumed >= expected or (done and not pending)
                shown = ([best] * spec.repeat_best if best else []) + window
                if len(shown) == 1:
                    best = shown[0]
                    continue
                header = spec.system_prompt or prompts.SELF_MOA_SEQ_SYSTEM
                msgs, note = await fit_texts(
                    ctx, spec.model, [c.text for c in shown],
                    lambda texts, header=header: fusion_messages(state, texts, header),
                    agg_params.max_tokens,
                )
                k = final_n if last else 1
                purpose = f"window {rounds + 1}" + (f", {note}" if note else "")
                best, others = await self._window(ctx, msgs, agg_params, k, purpose, shown, window, best, rounds + 1)
                last_window, last_k = (msgs, note, shown, window), k
                rounds += 1
        if last_window is not None and last_k < final_n:
            # Fewer samples came than asked (a failed or short chunk answered after the last window ran): that window
            # asked for n=1, so on a final stage whose client asked for more it is aggregated again with the client's n.
            msgs, note, shown, window = last_window
            purpose = f"window {rounds} again with n={final_n}: fewer samples came than asked, so it was the last" + (f", {note}" if note else "")
            best, others = await self._window(ctx, msgs, agg_params, final_n, purpose, shown, window, best, rounds)
        if best is None:
            raise ComponentFailed(f"{self.id}: no samples to aggregate")
        ctx.layer.notes.append(f"{self.id}: {rounds} aggregation round(s)")
        return Update(candidates=[best, *(c for c in others if not c.empty)][: max(final_n, 1)])

    async def _window(
        self, ctx: ComponentContext, msgs: list[dict], params: SamplingParams, k: int, purpose: str,
        shown: list[Candidate], window: list[Candidate], best: Candidate | None, round_no: int,
    ) -> tuple[Candidate, list[Candidate]]:
        """One aggregation of ``shown`` (``k`` syntheses): the new best and the further syntheses. A failed call or an
        empty synthesis keeps the best so far (else the first of ``shown`` with an answer, else the window's first)."""
        spec = self.spec
        try:
            res = await ctx.call(spec.model, msgs, params, n=k, purpose=purpose)
            synths = [Candidate(c.text, source=spec.model, finish_reason=c.finish_reason, meta=candidate_meta(c)) for c in res.choices]
            synths = [c for c in synths if not c.empty] + [c for c in synths if c.empty]
            synth, others = synths[0], synths[1:]
        except Exception:  # noqa: BLE001 - keep the previous synthesis, recorded in the trace
            synth, others = None, []
        if synth is not None and synth.empty and any(not c.empty for c in shown):
            # An empty synthesis is no answer: the best so far stays (the carried synthesis, else a sample).
            ctx.layer.notes.append(f"{self.id}: window {round_no}: empty synthesis; kept the best so far")
            synth = None
        if synth is not None:
            return synth, others
        if best is None or best.empty:
            best = next((c for c in shown if not c.empty), window[0])
        return best, others
