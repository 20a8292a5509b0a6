"""Robust parsers of model output. Pure functions; a failure raises ParseError (never guesses silently).

They fail closed against injected text: the verdict is taken from the judge's own
output only, the last well-formed marker wins, and ids out of range are dropped.
"""

from __future__ import annotations

import re

from .base import ParseError

_ID = re.compile(r"\[\s*(\d{1,4})\s*\]")
_CHAIN = re.compile(r"\[\s*\d{1,4}\s*\](?:\s*>\s*\[\s*\d{1,4}\s*\])+")


def parse_ranking(text: str, n: int) -> list[int]:
    """"[3] > [1] > [2]" → [2, 0, 1] (0-based); missing ids are appended in their original order.

    When the output holds several "[a] > [b]" chains (a judge quoting a candidate that itself contains one), the
    last chain is the judge's conclusion, as with verdicts; with no chain at all, the ids in order of appearance.
    """
    chains = list(_CHAIN.finditer(text))
    if chains:
        text = chains[-1].group(0)
    seen: list[int] = []
    for m in _ID.finditer(text):
        i = int(m.group(1)) - 1
        if 0 <= i < n and i not in seen:
            seen.append(i)
    if not seen:
        raise ParseError("no [id] found in the ranking")
    return seen + [i for i in range(n) if i not in seen]


_VERDICT = re.compile(r"\[\s*(correct|incorrect)\s*\]", re.IGNORECASE)


def parse_verdict(text: str) -> bool:
    """True for [Correct]; the last marker counts (the judge reasons first, then concludes)."""
    found = _VERDICT.findall(text)
    if not found:
        raise ParseError("no [Correct]/[Incorrect] verdict")
    return found[-1].lower() == "correct"


def parse_critique(text: str) -> str:
    t = text.strip()
    if not t:
        raise ParseError("empty critique")
    return t


# Patterns here run on untrusted model output on the event loop: every one is written to match in linear
# time (no two adjacent unbounded quantifiers over the same characters, no `^\s*` spanning lines), since a
# quadratic backtrack on a long run of blanks would stall the whole server (tests/test_fuzz.py checks it).
_TEST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(\S.*)$")


def parse_unit_tests(text: str, k: int) -> list[str]:
    tests = [m.group(1).rstrip() for line in text.splitlines() if (m := _TEST_LINE.match(line))]
    if not tests:
        raise ParseError("no unit tests in the list format")
    return tests[:k]


_TEST_RESULT = re.compile(r"test\s*(\d{1,3})\s*(?:[:.)-]\s*)?\[\s*(passed|failed)\s*\]", re.IGNORECASE)
_BARE_RESULT = re.compile(r"\[\s*(passed|failed)\s*\]", re.IGNORECASE)


def parse_test_results(text: str, k: int) -> list[bool]:
    """Per test, True if passed. Numbered lines first; else bare markers in order. Unanswered tests fail (closed)."""
    res: dict[int, bool] = {}
    for m in _TEST_RESULT.finditer(text):
        i = int(m.group(1)) - 1
        if 0 <= i < k:
            res[i] = m.group(2).lower() == "passed"
    if not res:
        bare = _BARE_RESULT.findall(text)
        if not bare:
            raise ParseError("no [Passed]/[Failed] results")
        res = {i: v.lower() == "passed" for i, v in enumerate(bare[:k])}
    return [res.get(i, False) for i in range(k)]


_SECTION = re.compile(r"^[^\S\n]*(?:\*\*)?\[\s*(\d{1,4})\s*\](?:\*\*)?", re.MULTILINE)


def parse_joint_critiques(text: str, n: int) -> list[str | None]:
    """Split '[1] ... [2] ...' sections; a response left without a section gets None."""
    marks = [(int(m.group(1)) - 1, m.start(), m.end()) for m in _SECTION.finditer(text)]
    out: list[str | None] = [None] * n
    for k, (i, _start, end) in enumerate(marks):
        stop = marks[k + 1][1] if k + 1 < len(marks) else len(text)
        body = text[end:stop].strip()
        if 0 <= i < n and body and out[i] is None:
            out[i] = body
    if all(c is None for c in out):
        raise ParseError("no [id] sections in the critique")
    return out
