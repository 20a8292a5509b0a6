"""The speculative decoding loop, its model wrappers and counters.

``TargetModel`` wraps the engine's :class:`~archon_server.engine.runner.ModelRunner`
(one cache slot); ``EagleDrafter`` wraps an :class:`EagleDraft` with its own KV cache.
Both roll back by cropping: the target to the accepted prefix, the draft to the
positions it computed from *true* target features (EAGLE recomputes the accepted
positions from the target's features, which are better than its own predictions).

Token bookkeeping (n = number of committed tokens, x_{n-1} the newest, which the target
has not seen yet): a round drafts y_1..y_K, the target runs ``[x_{n-1}, y_1..y_K]`` in one
pass, giving K+1 distributions and K+1 features; with k accepted the target cache is
cropped to n+k and k+1 tokens are committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..runner import run_steps
from .draft import AcceptHead, DraftKV, EagleDraft, proposal_stats
from .policies import DraftState, StopPolicy
from .sampling import SamplingConfig, entropy, probs_from_logits, sample
from .verify import VerifyMode, verify


class TargetModel:
    """One sequence on the engine's runner: forward appends, crop rolls back."""

    def __init__(self, runner: Any, slot: int = 0, cache: Any = None, prefill_chunk: int = 512, prefix: Any = None):
        self.runner = runner
        self.slot = slot
        self.cache = cache if cache is not None else runner.new_cache(slot + 1, 512)
        self.prefill_chunk = prefill_chunk
        self.prefix = prefix  # the engine's PrefixCache, or None; see prefill_steps
        self.forward_passes = 0

    @property
    def length(self) -> int:
        return self.cache.lengths[self.slot]

    def reset(self) -> None:
        self.cache.crop(self.slot, 0)

    def forward(self, tokens: list[int], all_logits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``tokens`` after the current prefix -> (logits [T or 1, V], hidden [T, H])."""
        self.forward_passes += 1
        ids = torch.tensor([tokens], device=self.runner.device)
        out = self.runner.forward(ids, self.cache, self.slot, [self.length],
                                  logits="all" if all_logits else "last")
        return out.logits[0], out.hidden[0].float()

    def prefill(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return run_steps(self.prefill_steps(tokens))

    def prefill_steps(self, tokens: list[int]) -> Generator[None, None, tuple[torch.Tensor, torch.Tensor]]:
        """The prompt from position 0, one ``prefill_chunk`` per ``next`` (the runner's prefill: the engine's
        numerics) -> (last-position logits [1, V], hidden [T', H]).  With a ``prefix`` cache the longest cached
        prefix is copied in first and hidden covers only the T' positions computed (drafters that read the
        target's features must not be given one), and the completed prompt is stored for later requests."""
        self.reset()
        self.forward_passes += 1
        start = self.prefix.load(tokens, self.cache, self.slot) if self.prefix is not None else 0
        out = yield from self.runner.prefill_steps(tokens, self.cache, self.slot, self.prefill_chunk, start)
        if self.prefix is not None:
            self.prefix.store(tokens, self.cache, self.slot)
        return out.logits[0], out.hidden[0].float()

    def crop(self, length: int) -> None:
        self.cache.crop(self.slot, length)


@dataclass
class DraftStep:
    hidden: torch.Tensor  # [H] draft hidden at the position whose input is the last token fed
    logits: torch.Tensor  # [V] full-vocabulary logits for the next candidate (-inf outside the draft vocab)


class EagleDrafter:
    """Keeps the draft's KV cache aligned with the committed sequence.

    ``feats`` holds the target's features f_0..f_{m-1} of the committed tokens it has
    seen; the draft cache holds pairs (f_i, x_{i+1}) for i < ``self.true_len``.
    """

    def __init__(self, draft: EagleDraft, head: AcceptHead | None = None):
        self.draft = draft
        self.head = head
        self.kv = DraftKV()
        self.true_len = 0
        self.feats: torch.Tensor | None = None
        self.tokens: list[int] = []
        self._last_hidden: torch.Tensor | None = None
        self.forward_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.draft.fc.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.draft.fc.weight.device

    def reset(self, tokens: list[int], feats: torch.Tensor) -> None:
        self.kv = DraftKV()
        self.true_len = 0
        self.tokens = list(tokens)
        self.feats = feats.to(self.device, self.dtype)

    def commit(self, new_tokens: list[int], new_feats: torch.Tensor) -> None:
        """Append committed tokens and the target features that are now known (for every
        committed token but the newest)."""
        self.tokens.extend(new_tokens)
        new_feats = new_feats.to(self.device, self.dtype)
        self.feats = new_feats if self.feats is None else torch.cat([self.feats, new_feats])

    @torch.inference_mode()
    def start_round(self) -> DraftStep:
        """Catch up on committed tokens with true features; return the step for candidate 1."""
        assert self.feats is not None
        n = len(self.tokens)
        assert self.feats.shape[0] == n - 1, (self.feats.shape, n)
        i0 = self.true_len
        f = self.feats[i0 : n - 1][None]
        x = torch.tensor([self.tokens[i0 + 1 : n]], device=self.device)
        h = self.draft(f, x, kv=self.kv, start=i0)[0]
        self.forward_calls += 1
        self.true_len = n - 1
        self._last_hidden = h[-1]
        return DraftStep(h[-1], self.draft.full_logits(h[-1]))

    @torch.inference_mode()
    def step(self, token: int) -> DraftStep:
        """Feed a candidate (paired with the draft's own predicted feature)."""
        assert self._last_hidden is not None
        start = self.kv.length
        h = self.draft(self._last_hidden[None, None], torch.tensor([[token]], device=self.device), kv=self.kv,
                       start=start)[0, 0]
        self.forward_calls += 1
        self._last_hidden = h
        return DraftStep(h, self.draft.full_logits(h))

    @torch.inference_mode()
    def accept_prob(self, hidden: torch.Tensor) -> float:
        assert self.head is not None, "specdec_pp needs an acceptance head"
        return float(self.head.accept_prob(hidden.float()))

    @torch.inference_mode()
    def proposal_accept_prob(self, step: DraftStep, y: int, q: torch.Tensor, first: bool) -> float:
        """A ``proposer`` head's P_acc of candidate ``y`` drawn from ``step`` with distribution ``q``
        (the full vocabulary; q is zero outside the draft's, so its statistics are taken there)."""
        ids = self.draft.vocab_ids.to(q.device)
        return _proposal_accept_prob(self.head, step, self.draft.embed[y], q[ids], q[y], first)


def _proposal_accept_prob(head: AcceptHead | None, step: DraftStep, embed_row: torch.Tensor, q: torch.Tensor,
                          q_y: torch.Tensor, first: bool) -> float:
    assert head is not None, "specdec_pp needs an acceptance head"
    dev = head.out.weight.device  # q is on the CPU when sampling (draws use the CPU generator), h on the model's device
    stats = proposal_stats(q, q_y, float(first)).to(dev)
    return float(head.accept_prob(AcceptHead.proposer_input(step.hidden.to(dev), embed_row.to(dev), stats)))


class LMDrafter:
    """A separate causal LM with the target's vocabulary as the draft (here: an int8
    dynamically quantized copy of the target, see :func:`loading.load_int8_draft`).

    It keeps its own HF ``DynamicCache``; at each round start the cache is cropped to the
    longest prefix shared with the committed sequence (accepted candidates stay cached)
    and the remaining committed tokens are fed in one pass.  Target features are ignored.
    """

    def __init__(self, model: Any, head: AcceptHead | None = None):
        self.model = model
        self.head = head
        self.tokens: list[int] = []
        self.cache_tokens: list[int] = []
        self.cache: Any = None
        self.forward_calls = 0

    def reset(self, tokens: list[int], feats: torch.Tensor | None = None) -> None:
        from transformers import DynamicCache

        self.tokens = list(tokens)
        self.cache = DynamicCache(config=self.model.config)
        self.cache_tokens = []

    def commit(self, new_tokens: list[int], new_feats: torch.Tensor | None = None) -> None:
        self.tokens.extend(new_tokens)

    def _run(self, toks: list[int]) -> DraftStep:
        ids = torch.tensor([toks], device=self.model.device)
        out = self.model.model(input_ids=ids, cache=self.cache, use_cache=True)
        self.forward_calls += 1
        self.cache_tokens.extend(toks)
        h = out.last_hidden_state[0, -1]
        return DraftStep(h.float(), self.model.lm_head(h[None])[0].float())

    @torch.inference_mode()
    def start_round(self) -> DraftStep:
        lcp = 0
        limit = min(len(self.cache_tokens), len(self.tokens) - 1)  # always feed at least the newest token
        while lcp < limit and self.cache_tokens[lcp] == self.tokens[lcp]:
            lcp += 1
        drop = len(self.cache_tokens) - lcp
        if drop:
            self.cache.crop(-drop)
            del self.cache_tokens[lcp:]
        return self._run(self.tokens[lcp:])

    @torch.inference_mode()
    def step(self, token: int) -> DraftStep:
        return self._run([token])

    @torch.inference_mode()
    def accept_prob(self, hidden: torch.Tensor) -> float:
        assert self.head is not None, "specdec_pp needs an acceptance head"
        return float(self.head.accept_prob(hidden.float()))

    @torch.inference_mode()
    def proposal_accept_prob(self, step: DraftStep, y: int, q: torch.Tensor, first: bool) -> float:
        return _proposal_accept_prob(self.head, step, self.model.get_input_embeddings().weight[y], q, q[y], first)


class NgramDrafter:
    """Prompt-lookup drafting (no model): find the most recent earlier occurrence of the
    last ``n`` committed tokens (n = max_ngram..min_ngram) and propose what followed it.

    The draft "distribution" is a point mass on each proposed token, so sampled decoding
    must verify with ``point_mass`` (identical to ``sampled`` with a one-hot q).  A step
    returns None when the copied continuation runs out, which ends the round.
    """

    head = None

    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1, max_copy: int = 20):
        self.vocab_size = vocab_size
        self.max_ngram, self.min_ngram, self.max_copy = max_ngram, min_ngram, max_copy
        self.tokens: list[int] = []
        self._cont: list[int] = []
        self._i = 0
        self.forward_calls = 0

    def reset(self, tokens: list[int], feats: torch.Tensor | None = None) -> None:
        self.tokens = list(tokens)

    def commit(self, new_tokens: list[int], new_feats: torch.Tensor | None = None) -> None:
        self.tokens.extend(new_tokens)

    def _lookup(self) -> list[int]:
        t = self.tokens
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(t) <= n:
                continue
            suffix = t[-n:]
            for i in range(len(t) - n - 1, -1, -1):
                if t[i : i + n] == suffix:
                    return t[i + n : i + n + self.max_copy]
        return []

    def _emit(self) -> DraftStep | None:
        if self._i >= len(self._cont):
            return None
        logits = torch.full((self.vocab_size,), float("-inf"))
        logits[self._cont[self._i]] = 0.0
        self._i += 1
        return DraftStep(torch.zeros(1), logits)

    def start_round(self) -> DraftStep | None:
        self._cont, self._i = self._lookup(), 0
        return self._emit()

    def step(self, token: int) -> DraftStep | None:
        return self._emit()

    def accept_prob(self, hidden: torch.Tensor) -> float:
        raise ValueError("the n-gram drafter has no acceptance head")

    def proposal_accept_prob(self, step: DraftStep, y: int, q: torch.Tensor, first: bool) -> float:
        return self.accept_prob(step.hidden)


@dataclass
class SpecStats:
    num_drafts: int = 0  # rounds
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    target_forward_passes: int = 0
    draft_forward_passes: int = 0
    emitted_tokens: int = 0
    wall_s: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)
    k_per_round: list[int] = field(default_factory=list)
    head_calls: int = 0

    @property
    def discarded_draft_tokens(self) -> int:
        return self.num_draft_tokens - self.num_accepted_draft_tokens

    @property
    def mean_k(self) -> float:
        return self.num_draft_tokens / max(1, self.num_drafts)

    @property
    def draft_acceptance_rate(self) -> float:
        return self.num_accepted_draft_tokens / max(1, self.num_draft_tokens)

    @property
    def mean_acceptance_length(self) -> float:
        """vLLM's definition: tokens emitted per verification round (accepted + 1)."""
        return 1.0 + self.num_accepted_draft_tokens / max(1, self.num_drafts)

    def add(self, o: "SpecStats") -> None:
        for k in ("num_drafts", "num_draft_tokens", "num_accepted_draft_tokens", "target_forward_passes",
                  "draft_forward_passes", "emitted_tokens", "wall_s"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.accepted_per_round.extend(o.accepted_per_round)
        self.k_per_round.extend(o.k_per_round)
        self.head_calls += o.head_calls

    def metrics(self) -> dict[str, float | int]:
        """Counters under vLLM's names (plus ours)."""
        n = max(1, self.emitted_tokens)
        return {
            "mean_acceptance_length": self.mean_acceptance_length,
            "draft_acceptance_rate": self.draft_acceptance_rate,
            "num_drafts": self.num_drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_draft_tokens": self.num_accepted_draft_tokens,
            "target_forward_passes": self.target_forward_passes,
            "target_passes_per_token": self.target_forward_passes / n,
            "discarded_per_token": self.discarded_draft_tokens / n,
            "mean_k": self.mean_k,
            "emitted_tokens": self.emitted_tokens,
        }


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(0 if seed is None else seed)
    return g


def _draw(logits: torch.Tensor, sampling: SamplingConfig, g: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """Next token and the distribution it was drawn from (None for greedy: an argmax, no
    one-hot vector and no softmax over the vocabulary).
    Sampling happens on the CPU with the CPU generator ``g`` whatever the model's device,
    so a seed gives the same draws on a GPU as here."""
    if sampling.greedy:
        return int(logits.argmax()), None
    q = probs_from_logits(logits.cpu(), sampling)
    return sample(q, g), q


def _is_stop(tok: int, stop_ids: set[int]) -> bool:
    return tok in stop_ids


@torch.inference_mode()
def autoregressive_generate(
    prompt_ids: list[int],
    target: TargetModel,
    sampling: SamplingConfig = SamplingConfig(),
    max_new_tokens: int = 64,
    seed: int | None = 0,
    stop_ids: set[int] | frozenset[int] = frozenset(),
) -> tuple[list[int], SpecStats]:
    """Target-only decoding with the same sampling code: the baseline and the reference."""
    g = _generator(seed)
    stats = SpecStats()
    t0 = time.perf_counter()
    passes0 = target.forward_passes
    logits, _ = target.prefill(prompt_ids)
    out: list[int] = []
    while True:
        tok, _ = _draw(logits[-1], sampling, g)
        out.append(tok)
        if len(out) >= max_new_tokens or _is_stop(tok, set(stop_ids)):
            break
        logits, _ = target.forward([tok], all_logits=False)
    stats.target_forward_passes = target.forward_passes - passes0
    stats.emitted_tokens = len(out)
    stats.wall_s = time.perf_counter() - t0
    return out, stats


Rounds = Generator[list[int], "bool | None", Any]


def drive(rounds: Rounds, on_tokens: Callable[[list[int]], bool] | None = None) -> Any:
    """Run a round generator (:func:`speculative_rounds`) to the end; ``on_tokens`` sees each
    round's tokens and may end the generation by returning True.  Returns the generator's value."""
    try:
        tokens = next(rounds)
        while True:
            tokens = rounds.send(bool(on_tokens(tokens)) if on_tokens is not None and tokens else False)
    except StopIteration as done:
        return done.value


def speculative_generate(*args: Any, on_tokens: Callable[[list[int]], bool] | None = None,
                         **kwargs: Any) -> tuple[list[int], SpecStats]:
    """Draft with ``drafter`` until ``policy`` stops, verify in one target pass, repeat; the
    arguments are :func:`speculative_rounds`'s, which this runs to the end.

    Output follows the target's sampling distribution exactly for ``sampled`` and
    ``point_mass`` and equals target-only greedy output for ``greedy`` (tests check both).
    ``on_tokens``: called with the tokens each round commits (the first token alone, then
    ``k + 1`` per round), so a server can stream them; returning True ends the generation
    there (a stop string matched, the client went away).
    """
    return drive(speculative_rounds(*args, **kwargs), on_tokens)


@torch.inference_mode()
def speculative_rounds(
    prompt_ids: list[int],
    target: TargetModel,
    drafter: "EagleDrafter | LMDrafter | NgramDrafter",
    policy: StopPolicy,
    verify_mode: VerifyMode | str = VerifyMode.GREEDY,
    sampling: SamplingConfig = SamplingConfig(),
    max_new_tokens: int = 64,
    seed: int | None = 0,
    stop_ids: set[int] | frozenset[int] = frozenset(),
) -> Generator[list[int], "bool | None", tuple[list[int], SpecStats]]:
    """The speculative loop one round at a time: yields the tokens each round commits (``[]`` after
    each prompt chunk but the last) and receives True to stop there (``send``); returns ``(tokens,
    stats)``.  A server interleaves the rounds of several requests with its batched decode steps
    this way; see :func:`speculative_generate` for the guarantees."""
    mode = VerifyMode(verify_mode)
    if mode is VerifyMode.GREEDY and not sampling.greedy:
        raise ValueError("greedy verification needs temperature 0")
    g = _generator(seed)
    stops = set(stop_ids)
    stats = SpecStats()
    t0 = time.perf_counter()
    passes0, dpasses0 = target.forward_passes, drafter.forward_calls
    if max_new_tokens <= 0:
        return [], stats
    # a "candidate" head (the authors') reads the step after a candidate; a "proposer" head does not
    lookahead = policy.needs_head and getattr(drafter.head, "reads", "candidate") == "candidate"

    prefill = target.prefill_steps(prompt_ids)
    while True:  # a long prompt goes in chunks, each a round without tokens: a server's other sequences step between
        try:
            next(prefill)
        except StopIteration as done:
            logits, hidden = done.value
            break
        yield []
    first, _ = _draw(logits[-1], sampling, g)
    out = [first]
    halted = yield [first]
    drafter.reset(list(prompt_ids) + [first], hidden)
    while not halted and len(out) < max_new_tokens and not _is_stop(out[-1], stops):
        budget = max_new_tokens - len(out)  # emitting k+1 <= budget keeps us within max_new_tokens
        max_k = min(policy.begin_round(), max(budget - 1, 0))
        cands: list[int] = []
        qs: list[torch.Tensor] = []
        state = DraftState()
        step = drafter.start_round() if max_k > 0 else None
        if lookahead and step is not None:
            state.accept_probs.append(1.0)  # the head's first input is the committed token: counts as accepted
        while step is not None:
            y, q = _draw(step.logits, sampling, g)
            cands.append(y)
            if q is not None:
                qs.append(q)
            state.k = len(cands)
            if len(cands) >= max_k or _is_stop(y, stops):
                break  # the round ends here whatever a rule would say
            if policy.name in ("cumprob", "confidence", "entropy") or (policy.needs_head and not lookahead):
                soft = torch.softmax(step.logits.float(), -1)  # the draft's own distribution (q is one-hot when greedy)
                state.token_probs.append(float(q[y]) if q is not None else float(soft[y]))
                state.max_probs.append(float(soft.max()))
                if policy.name == "entropy":
                    state.entropies.append(entropy(soft))
                if policy.needs_head:  # a proposer head: judged from what drew y, no extra draft step
                    state.accept_probs.append(drafter.proposal_accept_prob(step, y, q if q is not None else soft,
                                                                           len(cands) == 1))
                    stats.head_calls += 1
            if not lookahead and len(cands) >= policy.min_k and policy.should_stop(state):
                break
            step = drafter.step(y)
            if lookahead and step is not None:
                # SpecDec++ as the authors run it: the head judges y from the hidden state of the step
                # whose input is y, so the rule sees P_acc(y_1..y_k) before drafting y_{k+1}; when it
                # stops, that one draft forward was spent only on the head.
                state.accept_probs.append(drafter.accept_prob(step.hidden))
                stats.head_calls += 1
                if len(cands) >= policy.min_k and policy.should_stop(state):
                    break

        n = target.length + 1  # committed tokens (the newest one is not in the target cache yet)
        t_logits, t_hidden = target.forward([out[-1]] + cands, all_logits=True)
        if mode is VerifyMode.GREEDY:
            k, nxt = verify(mode, cands, t_logits)
        else:
            t_probs = probs_from_logits(t_logits.cpu(), sampling)
            d_probs = torch.stack(qs) if qs else None
            k, nxt = verify(mode, cands, t_probs, d_probs, g)
        # stop tokens inside the accepted prefix end the output there
        emitted = cands[:k] + [nxt]
        for i, tok in enumerate(emitted):
            if _is_stop(tok, stops):
                emitted = emitted[: i + 1]
                break
        target.crop(n - 1 + k + 1)  # keep x_{n-1} and the k accepted candidates
        drafter.commit(emitted, t_hidden[: k + 1])
        out.extend(emitted)
        halted = yield emitted
        policy.end_round(len(cands), k)
        if cands:
            stats.num_drafts += 1
            stats.num_draft_tokens += len(cands)
            stats.num_accepted_draft_tokens += k
            stats.accepted_per_round.append(k)
            stats.k_per_round.append(len(cands))
    out = out[:max_new_tokens]
    stats.target_forward_passes = target.forward_passes - passes0
    stats.draft_forward_passes = drafter.forward_calls - dpasses0
    stats.emitted_tokens = len(out)
    stats.wall_s = time.perf_counter() - t0
    return out, stats
