"""Teacher-forced scoring on the model runner: log-probabilities of given text, no sampling.

Rankers that score candidates (density ratio, logprob judges) need ``log p(y | x)`` for several
``y`` after one ``x``.  :func:`score_continuations` prefills ``x`` once, copies its K/V to one cache
slot per candidate and runs the candidates batched; the LM head is applied in chunks of positions, so a
long candidate never materialises a ``[T, vocab]`` float32 block at once.

These functions run on the engine's worker thread (:meth:`Engine.run_job`): the runner is not
thread-safe, and its own forward runs under ``torch.inference_mode`` (so does everything here).  The ``*_steps``
forms are step-wise jobs: one forward of a prefill-sized chunk per step, which the engine runs taking turns with
its decode steps (as a long prompt's prefill chunks do) and drops between two steps once its caller is gone.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import torch

from ..exceptions import ContextOverflow
from .runner import PREFILL_GRID, ModelRunner, run_steps

# Most positions per LM-head chunk: 256 x 49k vocab x 4 bytes = 50 MB of float32 logits at a time (SmolLM2; gemma3's 262k: 268 MB).
HEAD_CHUNK = 256
# Candidate tokens per batched forward (rows x longest row): bounds attention scores and activations.
MAX_BATCH_TOKENS = 4096


@dataclass
class ForcedScore:
    token_ids: list[int]
    logprobs: list[float]  # one per token of the continuation
    # With ``top`` > 0: the ``top`` most likely tokens (id, logprob) at each of those positions, best first.
    top: list[list[tuple[int, float]]] | None = None


def _head_logprobs(runner: ModelRunner, hidden: torch.Tensor, targets: torch.Tensor, top: int = 0) -> tuple[torch.Tensor, list[list[tuple[int, float]]]]:
    """log softmax(lm_head(hidden))[targets] for hidden [T, H], targets [T] (float32, chunked), and with ``top`` > 0
    the ``top`` best (id, logprob) of each position."""
    out, best = [], []
    # In chunks the runner's packed oneDNN weights take, where this machine measured those faster than MKL's product:
    # gemma3-270m's head over 132 positions 483 ms with MKL, 399 in chunks of 64.
    chunk = min(HEAD_CHUNK, runner.packed_max_rows) if runner.packed else HEAD_CHUNK
    for i in range(0, hidden.shape[0], chunk):
        logits = runner.head_logits(hidden[i : i + chunk])
        lse = torch.logsumexp(logits, dim=-1)
        out.append(logits.gather(-1, targets[i : i + chunk, None])[:, 0] - lse)
        if top > 0:
            vals, ids = torch.topk(logits, min(top, logits.shape[-1]), dim=-1)
            best.extend(list(zip(r_ids, r_vals)) for r_ids, r_vals in zip(ids.tolist(), (vals - lse[:, None]).tolist()))
    return (torch.cat(out) if out else torch.zeros(0)), best


def score_continuations(runner: ModelRunner, prompt: list[int], continuations: list[list[int]], chunk: int = 512,
                        top: int = 0) -> list[ForcedScore]:
    """:func:`score_steps` run to its end at once, in forwards of ``chunk`` tokens (a caller with nothing to
    interleave; the engine runs the steps as a job taking turns with its decode steps)."""
    return run_steps(score_steps(runner, prompt, continuations, chunk, top))


# A step-wise job's protocol (Engine.run_job): the generator yields, before each forward, the tokens the forward before it
# ran (0 at the first yield, before any); the value sent back is the most tokens the next forward may run (None: as
# before); its return value is the job's result.
Steps = Generator[int, "int | None", Any]


def _prefill(runner: ModelRunner, ids: list[int], cache: Any, budget: int, pending: int,
             logits: str = "last") -> Generator[int, int | None, tuple[Any, int, int]]:
    """``ids`` into slot 0 from position 0, one chunk of at most ``budget`` tokens per step (whole blocks of the
    prefill grid, with the engine's prefill numerics, as ``ModelRunner.prefill_steps``); returns (the last chunk's
    output, its tokens not yet reported, the budget). ``logits="none"``: hidden states only (the prefill's head runs
    through the row-exact product, 16 rows for one position: 0.23 s of gemma3-270m's 262k-token head)."""
    i, out = 0, None
    while i < len(ids):
        budget = (yield pending) or budget
        c = max(PREFILL_GRID, budget // PREFILL_GRID * PREFILL_GRID)
        part = ids[i : i + c]
        out = runner.forward(torch.tensor([part], device=runner.device), cache, 0, [i], logits=logits, small_weights=False, kv_grid=PREFILL_GRID)
        pending, i = len(part), i + len(part)
    return out, pending, budget


@torch.inference_mode()
def score_steps(runner: ModelRunner, prompt: list[int], continuations: list[list[int]], chunk: int = 512,
                top: int = 0) -> Steps:
    """``log p(c_t | prompt, c_<t)`` for every token of every continuation (``top`` > 0: with the ``top`` most likely
    tokens at each position: an echoed prompt's log-probs in legacy completions are this with the prompt's first token
    as ``prompt``), as a step-wise job: one forward of at most ``chunk`` tokens (or what the engine sends) per step,
    so a long prompt or continuation does not hold the worker for its whole pass (see ``Steps``).

    The first token of each continuation is predicted by the prompt's last position, token ``t`` by
    the continuation's position ``t-1``.  Rows are right-padded to the longest in their group; causal
    attention keeps padding from touching earlier positions, and padded positions are not read.  A group's rows run
    together, ``budget // rows`` positions per forward: position ``s + w - 1``'s hidden state carries over to predict
    the next forward's first token.
    """
    if not prompt:
        raise ValueError("empty prompt")
    limit = runner.dims.max_positions
    longest = max((len(c) for c in continuations), default=0)
    if len(prompt) + longest > limit:
        raise ValueError(f"prompt ({len(prompt)} tokens) + longest candidate ({longest}) exceed the model's context of {limit}")
    results: list[ForcedScore | None] = [None] * len(continuations)
    todo = [i for i, c in enumerate(continuations) if c]
    for i, c in enumerate(continuations):
        if not c:
            results[i] = ForcedScore([], [], [] if top > 0 else None)
    if not todo:
        return [r for r in results if r is not None]
    dev = runner.device
    # Prompt prefill once; its last position's hidden state predicts every candidate's first token.
    cache = runner.new_cache(slots=1, capacity=len(prompt) + longest)
    pre, pending, budget = yield from _prefill(runner, prompt, cache, chunk, 0, logits="none")
    last_hidden = pre.hidden[0, -1:]  # [1, H]
    todo.sort(key=lambda i: len(continuations[i]))
    groups: list[list[int]] = []
    for i in todo:  # similar lengths together: little padding
        if groups and (len(groups[-1]) + 1) * len(continuations[i]) <= MAX_BATCH_TOKENS:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        rows = [continuations[i] for i in group]
        width = max(len(r) for r in rows)
        cache.reserve(len(rows), len(prompt) + width)
        for s in range(1, len(rows)):
            cache.copy_slot(0, s, length=len(prompt))
        cache.lengths[0] = len(prompt)
        tokens = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows], device=dev)
        prev = [last_hidden] * len(rows)  # [1, H] each: the hidden state that predicts the row's next token
        lps: list[list[torch.Tensor]] = [[] for _ in rows]
        best: list[list[list[tuple[int, float]]]] = [[] for _ in rows]
        s = 0
        while s < width:
            budget = (yield pending) or budget
            w = max(1, min(width - s, budget // len(rows)))
            out = runner.forward(tokens[:, s : s + w], cache, 0, [len(prompt) + s] * len(rows), logits="none")
            # Every row's positions through the LM head in one product: it reads the head's weights once, not once
            # per row (gemma3-270m's 262k x 640 float32 head is 671 MB: 8 candidates took 2.2 s, all but 0.2 of it
            # in per-row products).
            hiddens, targets, counts = [], [], []
            for b, c in enumerate(rows):
                k = max(0, min(w, len(c) - s))  # this row's real tokens in the slice (padding is not read)
                if k > 0:
                    hiddens.append(torch.cat([prev[b], out.hidden[b, : k - 1]]))  # position t-1 predicts token t
                    targets.append(tokens[b, s : s + k])
                counts.append(k)
                prev[b] = out.hidden[b, w - 1 : w]
            if hiddens:
                lp, top_all = _head_logprobs(runner, torch.cat(hiddens), torch.cat(targets), top)
                at = 0
                for b, k in enumerate(counts):
                    if k > 0:
                        lps[b].append(lp[at : at + k])
                        best[b].extend(top_all[at : at + k])
                        at += k
            pending, s = len(rows) * w, s + w
        for b, i in enumerate(group):
            results[i] = ForcedScore(list(rows[b]), torch.cat(lps[b]).tolist(), best[b] if top > 0 else None)
        cache.lengths[0] = len(prompt)  # slot 0 is the prompt again for the next group
    return [r for r in results if r is not None]


def next_token_top(runner: ModelRunner, prompt: list[int], k: int, chunk: int = 512) -> list[tuple[int, float]]:
    """:func:`next_token_top_steps` run to its end at once."""
    return run_steps(next_token_top_steps(runner, prompt, k, chunk))


@torch.inference_mode()
def next_token_top_steps(runner: ModelRunner, prompt: list[int], k: int, chunk: int = 512) -> Steps:
    """The ``k`` most likely next tokens after ``prompt`` with their log-probabilities (best first); a step-wise job
    (``Steps``)."""
    if not prompt:
        raise ValueError("empty prompt")
    if len(prompt) >= runner.dims.max_positions:
        raise ContextOverflow(runner.dims.max_positions, len(prompt))
    cache = runner.new_cache(slots=1, capacity=len(prompt))
    out, _, _ = yield from _prefill(runner, prompt, cache, chunk, 0)
    lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    vals, ids = torch.topk(lp, min(max(1, k), lp.shape[-1]))
    return list(zip(ids.tolist(), vals.tolist()))
