"""Graders for the automatically scored benchmarks: MATH (math-verify), MMLU (letter),
CRUXEval and HumanEval (executed in the sandbox).  Judged benchmarks live in ``judges.py``.

Each grader returns a :class:`Grade`; nothing raises on a malformed response — a response
without an extractable answer is simply wrong, with the reason recorded.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..sandbox import SandboxLimits, isolation_mode
from ..sandbox.harness import run_graded
from .datasets import Item, last_boxed


@dataclass
class Grade:
    correct: bool
    score: float  # 1.0 / 0.0 for these benchmarks
    extracted: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _grade(ok: bool, extracted: str | None, **detail: Any) -> Grade:
    return Grade(bool(ok), 1.0 if ok else 0.0, extracted, detail)


# --------------------------------------------------------------------------- MATH


class _DropTimeoutDisabled(logging.Filter):
    """math-verify warns on every call made without SIGALRM timeouts (any thread but the main one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabled())


def grade_math(response: str, answer: str) -> Grade:
    """Is the response's final answer mathematically equal to ``answer``? (math-verify)

    The gold answer is parsed as ``\\boxed{answer}``; the response is parsed by
    math-verify's own extraction (which prefers the last ``\\boxed{}``).  math-verify's
    timeouts use SIGALRM, which only works in the main thread: elsewhere they are off.
    """
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    to = 5 if main else None
    try:
        gold = parse(f"\\boxed{{{answer}}}", parsing_timeout=to)  # type: ignore[arg-type]
        pred = parse(response, parsing_timeout=to)  # type: ignore[arg-type]
        ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=to)
    except Exception as e:  # noqa: BLE001 - sympy can fail in many ways; that is a wrong answer
        return _grade(False, last_boxed(response), error=f"{type(e).__name__}: {e}")
    return _grade(ok, last_boxed(response) or (str(pred[-1]) if pred else None))


# --------------------------------------------------------------------------- MMLU

# The cascade, strongest first; inside a level the *last* match in the text wins.  Letters are
# capitals only (the article "a" is not choice A), except inside parentheses/brackets.  Keywords
# are case-insensitive.  Whitespace runs are bounded ({0,8}, [ \t]) so that no pattern
# backtracks quadratically on long blank runs in model output.
_EXPLICIT = [
    # \boxed{C}, \boxed{\text{C}}, \boxed{(C)}
    r"\\boxed\{[ \t]{0,4}(?:\\text(?:bf)?\{)?[ \t]{0,4}\(?([{L}])\)?[ \t]{0,4}\}?[ \t]{0,4}\}",
    # "answer is C", "Answer: (C)", "the correct choice is **C**", "option: C", "answer would be C"
    (r"(?i:answer|choice|option)[ \t]{0,8}(?i:is|:|=|would[ \t]{1,4}be|will[ \t]{1,4}be)?[ \t]{0,8}"
     r"(?i:option|choice|letter)?[ \t]{0,8}[:\-]?[ \t]{0,8}[(\[]?\**[ \t]{0,4}([{L}])\b(?!['’-]\w)"),
    r"(?i:answer|choice|option)[ \t]{0,8}(?i:is|:)?[ \t]{0,8}[(\[]([{l}])[)\]]",
    # "C is correct", "(C) is the right answer"
    r"(?<![\w'])\(?([{L}])\)?[ \t]{0,4}(?i:is|would[ \t]{1,4}be)[ \t]{1,4}(?i:the[ \t]{1,4})?(?i:correct|right|best)\b",
]
_WEAK = [
    r"\*\*\(?([{L}])\)?\*\*",  # **C**
    r"^[ \t]{0,8}\(?([{L}])\)?[.)]?[ \t]{0,8}$",  # a line that is only the letter
    r"\(([{L}])\)",  # (C)
    r"(?<![\w'])([{L}])[ \t]{0,4}[.)!]?[ \t*]{0,8}\Z",  # "... so C" at the very end
]


def _last(patterns: list[str], text: str, letters: str) -> str | None:
    upper, lower = re.escape(letters.upper()), re.escape(letters.lower() + letters.upper())
    best: tuple[int, str] | None = None
    for pat in patterns:
        for m in re.finditer(pat.replace("{L}", upper).replace("{l}", lower), text, flags=re.MULTILINE):
            if best is None or m.start() >= best[0]:
                best = (m.start(), m.group(1).upper())
    return best[1] if best else None


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The chosen letter.  Cascade: the last explicit choice statement (``\\boxed{C}``, "the answer
    is C", "C is correct"), else the last weaker mark (bold letter, a letter alone on a line,
    "(C)", a letter ending the text), else a single distinct "C." / "C)" marker (several
    distinct ones are an option listing, not an answer).
    """
    for level in (_EXPLICIT, _WEAK):
        got = _last(level, text, letters)
        if got is not None:
            return got
    marks = set(re.findall(rf"(?<![\w'])([{re.escape(letters.upper())}])[.)](?:[ \t\n]|\Z)", text))
    return marks.pop() if len(marks) == 1 else None


async def grade_mmlu_logprob(backend: Any, model: str, item: Item, letters: str = "ABCD") -> Grade:
    """MMLU as lm-evaluation-harness scores it: no generation; the answer is the letter with the highest
    log-probability as the continuation of ``Answer:`` after the prompt (here the assistant's turn, so
    chat models see their own template).  Uses the backend's scoring call (``Backend.score``); a backend
    without one raises ``ScoringUnsupported``.  Reported separately from the generative mode."""
    from ..backends.base import ScoreRequest

    msgs = [*item.messages(0, []), {"role": "assistant", "content": "Answer:"}]
    res = await backend.score(ScoreRequest(model, msgs, [f" {c}" for c in letters]))
    lps = [sc.logprob for sc in res.scores]
    got = letters[int(np.argmax(lps))]
    return _grade(got == item.reference, got, logprobs=dict(zip(letters, (round(x, 4) for x in lps))),
                  prompt_tokens=res.usage.prompt_tokens)


def grade_mmlu(response: str, answer: str) -> Grade:
    got = extract_choice(response)
    return _grade(got == answer, got)


# --------------------------------------------------------------------------- code blocks

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def code_blocks(text: str) -> list[str]:
    """Fenced code blocks, python-tagged ones first (in order), then untagged ones."""
    py, other = [], []
    for lang, body in _FENCE.findall(text):
        (py if lang.lower() in ("python", "py", "python3") else other).append(body)
    return py + other


# --------------------------------------------------------------------------- CRUXEval

_ANSWER = re.compile(r"\[ANSWER\](.*?)\[/ANSWER\]", re.DOTALL)


def extract_crux_answer(response: str, mode: str) -> str | None:
    """Output mode: the predicted literal.  Input mode: the call ``f(...)`` (or its arguments).

    The answer is the last ``[ANSWER]...[/ANSWER]`` block, else the last code block, else
    the last line; an ``assert f(x) == y`` is cut to ``y`` (output mode) or ``f(x)`` (input
    mode) so the check always compares against the *given* data.
    """
    m = _ANSWER.findall(response)
    text = m[-1].strip() if m else None
    if text is None:
        blocks = code_blocks(response)
        if blocks:
            text = blocks[-1].strip()
        elif response.strip():
            text = response.strip().splitlines()[-1].strip()
    if not text:
        return None
    text = text.strip().strip("`").strip()
    if text.startswith("assert") and "==" in text:
        left, right = text[len("assert"):].split("==", 1)
        return right.strip() if mode == "output" else left.strip()
    return text


def cruxeval_check(ref: dict[str, Any], answer: str) -> tuple[str, str, str]:
    """(candidate, prelude, test) for :func:`run_graded`: the model's answer is evaluated in the
    candidate process and comes back as plain data; ``f`` (the dataset's code) runs in the harness.

    Output mode: the answer is the predicted value.  Input mode: the answer is a call
    ``f(...)`` (or its arguments), evaluated after the dataset's code (inputs may name its
    globals) with ``f`` replaced by one that only records its arguments, which the harness then
    passes to the real ``f``.  Output mode leaves ``f`` out of the candidate's reach (an answer
    ``f(x)`` would otherwise grade itself).
    """
    if ref["mode"] == "output":
        return f"__answer__ = (\n{answer}\n)\n", ref["code"], f"assert f({ref['input']}) == __answer__\n"
    call = answer if answer.startswith("f(") else f"f({answer})"
    candidate = f"{ref['code']}\n\ndef f(*args, **kwargs):\n    return (args, kwargs)\n\n__answer__ = (\n{call}\n)\n"
    return candidate, ref["code"], f"assert f(*__answer__[0], **__answer__[1]) == {ref['output']}\n"


def grade_cruxeval(response: str, ref: dict[str, Any], limits: SandboxLimits | None = None) -> Grade:
    ans = extract_crux_answer(response, ref["mode"])
    if ans is None:
        return _grade(False, None, reason="no answer found")
    candidate, prelude, test = cruxeval_check(ref, ans)
    run = run_graded(candidate, [test], prelude=prelude, bind=["__answer__"], per_test_timeout_s=10, limits=limits)
    return _grade(run.passed, ans, status=run.sandbox.status, reason=run.reason or run.outcomes[0].error)


# --------------------------------------------------------------------------- HumanEval


def humaneval_solution(ref: dict[str, Any], response: str) -> str:
    """The candidate program: the response's function after the prompt, or prompt + completion.

    If a code block defines the entry point, the block is the solution, placed after the
    whole prompt: the prompt's imports and helper functions (HumanEval/10 completes
    ``make_palindrome`` next to a given ``is_palindrome``) stay defined, and its
    docstring-only stub is simply redefined by the block.  Otherwise the response is
    treated as a raw completion of the prompt.
    """
    entry = ref["entry_point"]
    blocks = code_blocks(response)
    body = None
    for b in blocks:
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", b, re.MULTILINE):
            body = b
            break
    if body is not None:
        solution = f"{ref['prompt']}\n\n{body}"
    else:
        completion = blocks[0] if blocks else response
        solution = ref["prompt"] + completion
    return solution


def grade_humaneval(response: str, ref: dict[str, Any], limits: SandboxLimits | None = None) -> Grade:
    """Upstream's check (``ref['test']`` + ``check(entry_point)``), run by the harness against the
    candidate's entry point in its own process; the prompt (trusted helpers such as ``poly``) is the
    harness-side prelude.  Only the harness's nonce-signed verdict counts (see sandbox.harness)."""
    entry = ref["entry_point"]
    run = run_graded(humaneval_solution(ref, response), [f"{ref['test']}\n\ncheck({entry})\n"],
                     prelude=ref["prompt"], bind=[entry], per_test_timeout_s=10, limits=limits)
    return _grade(run.passed, None, status=run.sandbox.status, reason=run.reason or run.outcomes[0].error)


# --------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """The Codex paper's unbiased estimator 1 - C(n-c, k) / C(n, k), in its numerically stable
    product form (n samples of which c are correct; k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# --------------------------------------------------------------------------- dispatch

AUTO_GRADED = ("math500", "math", "mmlu", "mmlu_5shot", "cruxeval_o", "cruxeval_i", "humaneval")


def grade(item: Item, response: str) -> Grade:
    b = item.benchmark
    if b in ("math500", "math"):
        return grade_math(response, item.reference)
    if b.startswith("mmlu"):
        return grade_mmlu(response, item.reference)
    if b.startswith("cruxeval"):
        return grade_cruxeval(response, item.reference)
    if b == "humaneval":
        return grade_humaneval(response, item.reference)
    raise ValueError(f"{b} is not automatically graded (use a judge)")


def grade_many(items: Sequence[Item], responses: Sequence[str], max_workers: int | None = None) -> list[Grade]:
    """Grade in parallel threads (sandboxed runs are separate processes; MATH runs without SIGALRM timeouts there)."""
    import os

    isolation_mode()
    workers = max_workers or max(1, min(len(items), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(grade, items, responses))
