"""Teacher-forced scoring on the model runner: log-probabilities of given text, no sampling.

Rankers that score candidates (density ratio, logprob judges) need ``log p(y | x)`` for several
``y`` after one ``x``.  :func:`score_continuations` prefills ``x`` once, copies its K/V to one cache
slot per candidate and runs every candidate in one batched forward pass; the LM head is applied in
chunks of positions, so a long candidate never materialises a ``[T, vocab]`` float32 block at once.

These functions run on the engine's worker thread (:meth:`Engine.run_job`): the runner is not
thread-safe, and its own forward runs under ``torch.inference_mode`` (so does everything here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .runner import ModelRunner

# Positions per LM-head chunk: 256 x 49k vocab x 4 bytes = 50 MB of float32 logits at a time.
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
    for i in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = F.linear(hidden[i : i + HEAD_CHUNK], runner.lm_head).float()
        lse = torch.logsumexp(logits, dim=-1)
        out.append(logits.gather(-1, targets[i : i + HEAD_CHUNK, None])[:, 0] - lse)
        if top > 0:
            vals, ids = torch.topk(logits, min(top, logits.shape[-1]), dim=-1)
            best.extend(list(zip(r_ids, r_vals)) for r_ids, r_vals in zip(ids.tolist(), (vals - lse[:, None]).tolist()))
    return (torch.cat(out) if out else torch.zeros(0)), best


@torch.inference_mode()
def score_continuations(runner: ModelRunner, prompt: list[int], continuations: list[list[int]], chunk: int = 512,
                        top: int = 0) -> list[ForcedScore]:
    """``log p(c_t | prompt, c_<t)`` for every token of every continuation (``top`` > 0: with the ``top`` most likely
    tokens at each position: an echoed prompt's log-probs in legacy completions are this with the prompt's first token
    as ``prompt``).

    The first token of each continuation is predicted by the prompt's last position, token ``t`` by
    the continuation's position ``t-1``.  Rows are right-padded to the longest in their group; causal
    attention keeps padding from touching earlier positions, and padded positions are not read.
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
    pre = runner.prefill(prompt, cache, 0, chunk=chunk)
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
        out = runner.forward(tokens, cache, 0, [len(prompt)] * len(rows), logits="last")
        for b, i in enumerate(group):
            c = rows[b]
            hidden = torch.cat([last_hidden, out.hidden[b, : len(c) - 1]])  # position t-1 predicts token t
            lps, best = _head_logprobs(runner, hidden, torch.tensor(c, device=dev), top)
            results[i] = ForcedScore(list(c), lps.tolist(), best if top > 0 else None)
        cache.lengths[0] = len(prompt)  # slot 0 is the prompt again for the next group
    return [r for r in results if r is not None]


@torch.inference_mode()
def next_token_top(runner: ModelRunner, prompt: list[int], k: int, chunk: int = 512) -> list[tuple[int, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their log-probabilities (best first)."""
    if not prompt:
        raise ValueError("empty prompt")
    if len(prompt) >= runner.dims.max_positions:
        raise ValueError(f"prompt has {len(prompt)} tokens; the model's context is {runner.dims.max_positions}")
    cache = runner.new_cache(slots=1, capacity=len(prompt))
    out = runner.prefill(prompt, cache, 0, chunk=chunk)
    lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    vals, ids = torch.topk(lp, min(max(1, k), lp.shape[-1]))
    return list(zip(ids.tolist(), vals.tolist()))
