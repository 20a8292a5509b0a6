"""LLM judges over any :class:`Backend` (the caller resolves the judge alias to a backend + model name).

* :class:`AlpacaJudge` — AlpacaEval 2.0 pairwise judging against the baseline output.  As the
  official ``weighted_alpaca_eval_gpt4_turbo`` annotator does, the judge answers with one
  token (``m`` or ``M``) and the *probability* of the model's label, read from the
  logprobs, becomes the preference (1 + p).  Positions are randomised with a seeded,
  per-instruction coin; if the backend returns no logprobs the text is parsed instead
  and the judgement records ``method='text'``.
* :class:`MTBenchJudge` — FastChat single-answer grading with the shipped judge prompts
  (reference answers for math/reasoning/coding), ``[[x]]`` parsing, turn 1 and turn 2.
* :class:`ArenaHardJudge` — Arena-Hard v0.1 pairwise judging in both orders; win rate
  with a bootstrap confidence interval (:func:`arena_win_rate`).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..backends.base import (
    Backend,
    BackendError,
    ChatRequest,
    ChatResult,
    Choice,
    SamplingParams,
    Usage,
)
from .cache import STREAM_CUT
from .datasets import Item, load_mt_bench_judge_prompts

# --------------------------------------------------------------------------- early stop


async def chat_until(backend: Backend, request: ChatRequest, done: Callable[[str], bool]) -> ChatResult:
    """The judge's answer, streamed and cut as soon as ``done(text)`` says the verdict is complete.

    Why: FastChat allows a judge 2048 tokens (Arena-Hard 4096) and a small judge rambles to the
    limit after its verdict; the reference parsers read only the verdict, so the tokens after it
    cannot change the score (see each ``done``).  The prompts are untouched.  When the stream is
    cut, the engine drops the request; its usage is then the chunks received (prompt tokens
    unknown, ``metrics['usage_partial']``).
    """
    text, finish, usage, chunks, cut = "", "length", None, 0, False
    token = None
    try:
        async with contextlib.aclosing(backend.stream(request)) as stream:
            async for ch in stream:
                if ch.usage is not None:
                    usage = ch.usage
                if ch.index == 0:
                    if ch.finish_reason:
                        finish = ch.finish_reason
                    if ch.text:
                        text += ch.text
                        chunks += 1
                        if done(text):
                            finish, cut = "stop", True
                            token = STREAM_CUT.set(True)  # the sweep's cache keeps the cut answer
                            break
    finally:
        if token is not None:
            STREAM_CUT.reset(token)
    metrics = {"stopped_at_verdict": True, "usage_partial": True} if cut and usage is None else {}
    return ChatResult([Choice(text, finish)], usage or Usage(0, chunks), request.model, metrics=metrics)


# --------------------------------------------------------------------------- AlpacaEval 2.0

ALPACA_SYSTEM = (
    "You are a highly efficient assistant, who evaluates and selects the best large language model (LLMs) based on "
    "the quality of their responses to a given instruction. This process will be used to create a leaderboard "
    "reflecting the most accurate and human-preferred answers."
)

ALPACA_TEMPLATE = '''I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{{
    "instruction": """{instruction}""",
}}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{{
    {{
        "model_identifier": "m",
        "output": """{output_1}"""
    }},
    {{
        "model_identifier": "M",
        "output": """{output_2}"""
    }}
}}

## Task

Evaluate the models on the basis of the quality and relevance of their results, and select the model that generated the best output. Answer by providing the model identifier of the best model. We will use your output as the name of the best model, so make sure your output only contains one of the following model identifiers and nothing else (no quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier'''


@dataclass
class PairwiseJudgement:
    preference: float  # in [1, 2]: 1 = baseline better, 2 = model better (AlpacaEval convention)
    method: str  # "logprobs" | "text" | "unparsed" | "error"
    swapped: bool  # True when the model's output was shown first (as "m")
    raw: str = ""
    usage: Usage = field(default_factory=Usage)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coin(seed: int, key: str) -> bool:
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[0] & 1 == 1


def _label_probs(result: ChatResult) -> tuple[float, float] | None:
    """(P(m), P(M)) from the first generated token's top logprobs; None when absent."""
    ch = result.choices[0] if result.choices else None
    if ch is None or not ch.logprobs:
        return None
    first = ch.logprobs[0]
    cands = list(first.top) or [(first.token, first.logprob)]
    if (first.token, first.logprob) not in cands:
        cands.append((first.token, first.logprob))
    pm = pM = 0.0
    for tok, lp in cands:
        t = tok.strip()
        if t == "m":
            pm += math.exp(lp)
        elif t == "M":
            pM += math.exp(lp)
    if pm + pM <= 0:
        return None
    return pm, pM


class AlpacaJudge:
    def __init__(self, backend: Backend, model: str, *, seed: int = 0, randomize: bool = True, top_logprobs: int = 5):
        self.backend = backend
        self.model = model
        self.seed = seed
        self.randomize = randomize
        self.top_logprobs = top_logprobs

    def messages(self, instruction: str, output_1: str, output_2: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": ALPACA_SYSTEM},
            {"role": "user", "content": ALPACA_TEMPLATE.format(instruction=instruction, output_1=output_1, output_2=output_2)},
        ]

    async def judge(self, instruction: str, baseline: str, output: str) -> PairwiseJudgement:
        swapped = self.randomize and _coin(self.seed, instruction)
        first, second = (output, baseline) if swapped else (baseline, output)
        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs, seed=self.seed)
        try:
            res = await self.backend.chat(ChatRequest(self.model, self.messages(instruction, first, second), params))
        except BackendError as e:
            return PairwiseJudgement(1.5, "error", swapped, str(e))
        text = res.choices[0].text if res.choices else ""
        probs = _label_probs(res)
        if probs is not None:
            pm, pM = probs
            p_second = pM / (pm + pM)  # probability that the output shown second ("M") is better
            method = "logprobs"
        else:
            t = text.strip()
            if t.startswith("M"):
                p_second, method = 1.0, "text"
            elif t.startswith("m"):
                p_second, method = 0.0, "text"
            else:
                p_second, method = 0.5, "unparsed"
        p_model = 1.0 - p_second if swapped else p_second
        return PairwiseJudgement(1.0 + p_model, method, swapped, text, res.usage)


# --------------------------------------------------------------------------- MT-Bench

NEED_REF_CATS = ("math", "reasoning", "coding")
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(text: str) -> float | None:
    """FastChat's rule: the first ``[[x]]`` (else the first ``[x]``), read with ``ast.literal_eval``.

    None where FastChat records -1 (no match) and where its ``literal_eval`` raises: ``[[08]]``
    is not a Python literal (leading zero), FastChat's judging thread dies on it and the rating
    never reaches its tables, so it is an invalid rating here, not 8.  No fallback to ``[x]``
    after a ``[[x]]`` match, as in FastChat.
    """
    m = _RATING.search(text) or _RATING_BACKUP.search(text)
    if not m:
        return None
    try:
        v = ast.literal_eval(m.group(1))
    except (ValueError, SyntaxError):
        return None
    return float(v) if isinstance(v, (int, float)) else None


def rating_complete(text: str) -> bool:
    """FastChat reads the *first* ``[[x]]`` (the ``[x]`` backup only when no ``[[x]]`` exists at all), so
    once one ``[[x]]`` is in the text no later token can change the rating; a ``[x]`` alone can."""
    return _RATING.search(text) is not None


@dataclass
class MTBenchScore:
    question_id: str
    turn: int  # 1 or 2
    score: float | None  # 1..10, None when the judge gave no parsable rating
    judge_prompt: str
    raw: str = ""
    usage: Usage = field(default_factory=Usage)


class MTBenchJudge:
    def __init__(self, backend: Backend, model: str, *, prompts: dict[str, dict[str, Any]] | None = None, max_tokens: int = 2048):
        self.backend = backend
        self.model = model
        self.prompts = prompts or load_mt_bench_judge_prompts()
        self.max_tokens = max_tokens

    def build(self, item: Item, answers: Sequence[str], turn: int) -> tuple[str, list[dict[str, str]]]:
        """The judge prompt name and messages for ``turn`` (1 or 2) of ``item`` answered with ``answers``."""
        ref = item.meta.get("category") in NEED_REF_CATS and bool(item.reference)
        name = ("single-math-v1" if ref else "single-v1") + ("-multi-turn" if turn == 2 else "")
        p = self.prompts[name]
        kw: dict[str, str] = {}
        if turn == 1:
            kw.update(question=item.turns[0], answer=answers[0])
            if ref:
                kw["ref_answer_1"] = item.reference[0]
        else:
            kw.update(question_1=item.turns[0], question_2=item.turns[1], answer_1=answers[0], answer_2=answers[1])
            if ref:
                kw.update(ref_answer_1=item.reference[0], ref_answer_2=item.reference[1])
        return name, [{"role": "system", "content": p["system_prompt"]},
                      {"role": "user", "content": p["prompt_template"].format(**kw)}]

    async def score(self, item: Item, answers: Sequence[str], turn: int) -> MTBenchScore:
        name, msgs = self.build(item, answers, turn)
        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens)
        try:
            res = await chat_until(self.backend, ChatRequest(self.model, msgs, params), rating_complete)
        except BackendError as e:
            return MTBenchScore(item.id, turn, None, name, f"error: {e}")
        text = res.choices[0].text if res.choices else ""
        return MTBenchScore(item.id, turn, parse_rating(text), name, text, res.usage)

    async def score_both(self, item: Item, answers: Sequence[str]) -> list[MTBenchScore]:
        return list(await asyncio.gather(self.score(item, answers, 1), self.score(item, answers, 2)))


def mt_bench_summary(scores: Sequence[MTBenchScore]) -> dict[str, float | int]:
    """Mean score for turn 1, turn 2 and overall = the mean over every valid turn score, as FastChat's
    ``show_result`` (unparsable ratings dropped; not a mean of per-question means)."""
    def mean(xs: list[float]) -> float:
        return float(np.mean(xs)) if xs else float("nan")

    t1 = [s.score for s in scores if s.turn == 1 and s.score is not None]
    t2 = [s.score for s in scores if s.turn == 2 and s.score is not None]
    return {"turn1": mean(t1), "turn2": mean(t2), "overall": mean(t1 + t2),
            "n_unparsed": sum(1 for s in scores if s.score is None)}


# --------------------------------------------------------------------------- Arena-Hard

ARENA_SYSTEM = """Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your job is to evaluate which assistant's answer is better.

Begin your evaluation by generating your own answer to the prompt. You must provide your answers before judging any answers.

When evaluating the assistants' answers, compare both assistants' answers with your answer. You must identify and correct any mistakes or inaccurate information.

Then consider if the assistant's answers are helpful, relevant, and concise. Helpful means the answer correctly responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or more than one interpretation, it is more helpful and appropriate to ask for clarifications or more information from the user than providing an answer based on assumptions. Relevant means all parts of the response closely connect or are appropriate to what is being asked. Concise means the response is clear and not verbose or excessive.

Then consider the creativity and novelty of the assistant's answers when needed. Finally, identify any missing important information in the assistants' answers that would be beneficial to include when responding to the user prompt.

After providing your explanation, you must output only one of the following choices as your final verdict with a label:

1. Assistant A is significantly better: [[A>>B]]
2. Assistant A is slightly better: [[A>B]]
3. Tie, relatively the same: [[A=B]]
4. Assistant B is slightly better: [[B>A]]
5. Assistant B is significantly better: [[B>>A]]

Example output: "My final verdict is tie: [[A=B]]"."""

ARENA_TEMPLATE = """<|User Prompt|>
{question}

<|The Start of Assistant A's Answer|>
{answer_a}
<|The End of Assistant A's Answer|>

<|The Start of Assistant B's Answer|>
{answer_b}
<|The End of Assistant B's Answer|>"""

_VERDICT = re.compile(r"\[\[([AB<>=]+)\]\]")
VERDICTS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
STRONG_WEIGHT = 3  # Arena-Hard counts a decisive verdict three times


def parse_verdict(text: str) -> str | None:
    """Arena-Hard's ``get_score``: every ``[[...]]`` match of the official regex; exactly one distinct
    label is the verdict, none or several is no verdict.  Labels outside the five (``A<B``...) are not
    normalised: upstream's battle builder gives them weight 0, so they are no verdict here too."""
    found = {m.strip("\n") for m in _VERDICT.findall(text) if m != ""}
    if len(found) != 1:
        return None
    v = found.pop()
    return v if v in VERDICTS else None


def verdict_complete(text: str) -> bool:
    """A valid label is in the text.  The official prompt asks for the verdict last; upstream would void
    the game if the judge wrote a *different* label afterwards, which a cut stream cannot see (documented
    deviation, the price of not paying for up to 4096 tokens of rambling)."""
    return any(m in VERDICTS for m in _VERDICT.findall(text[-4096:]))


@dataclass
class ArenaGame:
    question_id: str
    model_first: bool  # True: the model was assistant A
    verdict: str | None  # label as the judge wrote it (A/B positions)
    raw: str = ""
    usage: Usage = field(default_factory=Usage)

    def model_outcome(self) -> tuple[float, int] | None:
        """(score for the model: 1 win / 0.5 tie / 0 loss, weight) or None when unparsed."""
        if self.verdict is None:
            return None
        v = self.verdict
        if not self.model_first:  # model is B: mirror the label
            v = {"A>>B": "B>>A", "A>B": "B>A", "A=B": "A=B", "B>A": "A>B", "B>>A": "A>>B"}[v]
        return {"A>>B": (1.0, STRONG_WEIGHT), "A>B": (1.0, 1), "A=B": (0.5, 1), "B>A": (0.0, 1), "B>>A": (0.0, STRONG_WEIGHT)}[v]


class ArenaHardJudge:
    def __init__(self, backend: Backend, model: str, *, max_tokens: int = 4096):
        self.backend = backend
        self.model = model
        self.max_tokens = max_tokens

    async def game(self, item: Item, answer: str, model_first: bool) -> ArenaGame:
        a, b = (answer, item.reference) if model_first else (item.reference, answer)
        msgs = [{"role": "system", "content": ARENA_SYSTEM},
                {"role": "user", "content": ARENA_TEMPLATE.format(question=item.prompt, answer_a=a, answer_b=b)}]
        try:
            res = await chat_until(self.backend, ChatRequest(self.model, msgs, SamplingParams(temperature=0.0, max_tokens=self.max_tokens)),
                                   verdict_complete)
        except BackendError as e:
            return ArenaGame(item.id, model_first, None, f"error: {e}")
        text = res.choices[0].text if res.choices else ""
        return ArenaGame(item.id, model_first, parse_verdict(text), text, res.usage)

    async def both_orders(self, item: Item, answer: str) -> list[ArenaGame]:
        """Game 1: baseline as A; game 2: model as A (position bias cancels)."""
        return list(await asyncio.gather(self.game(item, answer, False), self.game(item, answer, True)))


def arena_battles(games: Sequence[ArenaGame]) -> np.ndarray:
    """The model's outcome (1 win, 0.5 tie, 0 loss) in each battle, a decisive verdict repeated
    ``STRONG_WEIGHT`` times, unparsed games left out — upstream's ``get_battles_from_judgment`` rows."""
    out: list[float] = []
    for g in games:
        o = g.model_outcome()
        if o is not None:
            out += [o[0]] * o[1]
    return np.array(out, dtype=float)


def arena_win_rate(games: Sequence[ArenaGame], *, n_boot: int = 100, seed: int = 0, alpha: float = 0.05) -> dict[str, float | int]:
    """Win rate of the model vs the baseline (points) with upstream's bootstrap CI.

    Upstream fits a Bradley-Terry model to the battles and bootstraps by resampling *battle rows*
    (``--num-rounds 100``).  With one model against the anchored baseline the BT win probability is
    the battles' mean outcome (ties count half, as upstream's tie duplication does), so the score and
    each bootstrap round reduce to a mean over (resampled) battles.
    """
    battles = arena_battles(games)
    n_q = len({g.question_id for g in games if g.model_outcome() is not None})
    if not len(battles):
        return {"win_rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_questions": 0, "n_games": 0}
    rate = float(battles.mean() * 100)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(battles), size=(n_boot, len(battles)))
    boots = battles[idx].mean(axis=1) * 100
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"win_rate": rate, "ci_low": float(lo), "ci_high": float(hi), "n_questions": n_q,
            "n_games": sum(g.model_outcome() is not None for g in games), "n_battles": len(battles)}


# --------------------------------------------------------------------------- null model

NULL_OUTPUT = "I'm sorry, but I can't help with that."


def null_model_outputs(items: Sequence[Item], text: str = NULL_OUTPUT) -> list[str]:
    """A constant-output system: a sound judge harness must give it a low score (sanity line in reports)."""
    return [text for _ in items]
