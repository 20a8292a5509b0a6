"""Verification of a drafted block against the target: pure functions, no model state.

Three rules (``VerifyMode``):

``sampled``     standard speculative sampling (Leviathan et al.; Chen et al.): candidate
                ``y ~ q`` is accepted with probability ``min(1, p(y)/q(y))``; on rejection
                the replacement is drawn from ``norm(max(0, p - q))``; if every candidate
                is accepted a bonus token is drawn from the target's next distribution.
``point_mass``  the rule for drafts without probabilities (vLLM's ngram / "q is a point
                mass"): accept ``y`` with probability ``p(y)``; on rejection draw from
                ``p`` with ``y`` removed and renormalised.  Also lossless:
                P(emit x) = p(y)[x=y] + (1-p(y)) p(x)/(1-p(y)) [x!=y] = p(x).
``greedy``      accept iff ``argmax p == y``; the replacement/bonus is ``argmax p``.

Each function returns ``(n_accepted, next_token)``: the first ``n_accepted`` candidates
are kept and ``next_token`` (correction or bonus) follows them, so every call emits
``n_accepted + 1`` tokens.
"""

from __future__ import annotations

from enum import Enum

import torch

from .sampling import sample


class VerifyMode(str, Enum):
    SAMPLED = "sampled"
    POINT_MASS = "point_mass"
    GREEDY = "greedy"


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator).item())


def verify_greedy(candidates: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """``target_logits``: [K+1, V], row j is the target's distribution for candidate j (row K: bonus)."""
    top = target_logits.argmax(-1).tolist()
    for j, y in enumerate(candidates):
        if top[j] != y:
            return j, top[j]
    return len(candidates), top[len(candidates)]


def verify_sampled(
    candidates: list[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """``target_probs`` [K+1, V], ``draft_probs`` [K, V] (the q each candidate was drawn from;
    None only when there are no candidates and the call just samples the next token)."""
    for j, y in enumerate(candidates):
        assert draft_probs is not None
        p_y = float(target_probs[j, y])
        q_y = float(draft_probs[j, y])
        # q_y > 0 because y was drawn from q; guard anyway so a caller bug cannot divide by zero
        if q_y > 0 and _uniform(generator) < min(1.0, p_y / q_y):
            continue
        residual = (target_probs[j] - draft_probs[j]).clamp_min(0)
        total = float(residual.sum())
        # p == q exactly leaves no residual mass; then rejection has probability 0 and
        # this branch is only reachable through float rounding: fall back to p.
        dist = residual / total if total > 1e-12 else target_probs[j]
        return j, sample(dist, generator)
    return len(candidates), sample(target_probs[len(candidates)], generator)


def verify_point_mass(
    candidates: list[int],
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Like :func:`verify_sampled` with ``q = one_hot(y)``: needs no draft probabilities."""
    for j, y in enumerate(candidates):
        p_y = float(target_probs[j, y])
        if _uniform(generator) < p_y:
            continue
        rest = target_probs[j].clone()
        rest[y] = 0.0
        total = float(rest.sum())
        dist = rest / total if total > 1e-12 else target_probs[j]
        return j, sample(dist, generator)
    return len(candidates), sample(target_probs[len(candidates)], generator)


def verify(
    mode: VerifyMode | str,
    candidates: list[int],
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Dispatch on ``mode``.  For ``greedy`` ``target_probs`` may be logits or probabilities."""
    mode = VerifyMode(mode)
    if mode is VerifyMode.GREEDY:
        return verify_greedy(candidates, target_probs)
    if mode is VerifyMode.POINT_MASS:
        return verify_point_mass(candidates, target_probs, generator)
    if draft_probs is None and candidates:
        raise ValueError("sampled verification needs the draft probabilities")
    return verify_sampled(candidates, target_probs, draft_probs, generator)
