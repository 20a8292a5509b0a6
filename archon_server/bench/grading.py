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

from .datasets import Item, last_boxed
from ..sandbox import SandboxLimits, isolation_mode, run_python


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

# Whitespace runs are bounded ({0,8}, [ \t]) so that no pattern backtracks quadratically on
# long blank runs in model output.
_CHOICE_PATTERNS = [
    r"answer[ \t]{0,8}(?:is|:)?[ \t]{0,8}[:\-]?[ \t]{0,8}\(?\**[ \t]{0,8}([{L}])\b",
    r"\*\*\(?([{L}])\)?\*\*",
    r"^[ \t]{0,8}\(?([{L}])\)?[.)]?[ \t]{0,8}$",
    r"\(([{L}])\)",
    r"\b([{L}])[.)][ \t\n]",
]


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The chosen letter: an explicit "Answer: X" (last one) first, then weaker patterns, then a lone letter."""
    L = re.escape(letters)
    for pat in _CHOICE_PATTERNS:
        hits = re.findall(pat.replace("{L}", L), text, flags=re.IGNORECASE | re.MULTILINE)
        hits = [h.upper() for h in hits if h.upper() in letters]
        if hits:
            return hits[-1]
    stripped = text.strip().strip(".*() ").upper()
    return stripped if len(stripped) == 1 and stripped in letters else None


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


def cruxeval_program(ref: dict[str, Any], answer: str) -> str:
    if ref["mode"] == "output":
        return f"{ref['code']}\nassert f({ref['input']}) == {answer}\n"
    call = answer if answer.startswith("f(") else f"f({answer})"
    return f"{ref['code']}\nassert {call} == {ref['output']}\n"


def grade_cruxeval(response: str, ref: dict[str, Any], limits: SandboxLimits | None = None) -> Grade:
    ans = extract_crux_answer(response, ref["mode"])
    if ans is None:
        return _grade(False, None, reason="no answer found")
    r = run_python(cruxeval_program(ref, ans), limits=limits or SandboxLimits(timeout_s=10))
    return _grade(r.passed, ans, status=r.status, reason=r.reason)


# --------------------------------------------------------------------------- HumanEval


def humaneval_program(ref: dict[str, Any], response: str) -> str:
    """Program = (the response's function, or prompt + completion) + the tests + ``check(entry_point)``.

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
    return f"{solution}\n\n{ref['test']}\n\ncheck({entry})\n"


def grade_humaneval(response: str, ref: dict[str, Any], limits: SandboxLimits | None = None) -> Grade:
    r = run_python(humaneval_program(ref, response), limits=limits or SandboxLimits(timeout_s=10))
    return _grade(r.passed, None, status=r.status, reason=r.reason)


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
