"""Answer extractors for voting: last \\boxed{}, a multiple-choice letter, a regex, a number, the text."""

from __future__ import annotations

import re

from ..spec import ExtractorSpec


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces; None if absent."""
    best = None
    for key in ("\\boxed", "\\fbox"):
        i = text.rfind(key)
        if i >= 0 and (best is None or i > best[0]):
            best = (i, key)
    if best is None:
        return None
    i = best[0] + len(best[1])
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # "\boxed 5" form
        j = i
        while j < len(text) and text[j] not in "$ \n":
            j += 1
        return text[i:j] or None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


def choice_letter(text: str, letters: str = "ABCD") -> str | None:
    cls = re.escape(letters)
    pats = [
        # Linear-time on any input (candidates are untrusted): one unbounded `\s*` per gap, and the line pattern
        # does not let whitespace run across lines (`^\s*` under MULTILINE backtracks quadratically on blank lines).
        rf"(?i)answer\s*(?:(?:is|:)\s*)?\(?\b([{cls}])\b\)?",
        rf"\(([{cls}])\)",
        rf"^[^\S\n]*([{cls}])[.):]?[^\S\n]*$",
        rf"\b([{cls}])\b",
    ]
    for p in pats:
        found = re.findall(p, text, flags=re.MULTILINE)
        if found:
            return found[-1].upper()
    return None


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    found = _NUM.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "")
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f.is_integer() else str(f)


def normalize(answer: str) -> str:
    return re.sub(r"\s+", " ", answer.strip().strip(".").strip("$")).lower()


def extract(text: str, spec: ExtractorSpec) -> str | None:
    if spec.kind == "boxed":
        a = last_boxed(text)
    elif spec.kind == "choice":
        a = choice_letter(text, spec.choices)
    elif spec.kind == "number":
        a = last_number(text)
    elif spec.kind == "regex":
        found = list(re.finditer(spec.pattern or "", text))
        a = (found[-1].group(1) if found[-1].groups() else found[-1].group(0)) if found else None
    else:
        a = text
    return normalize(a) if a is not None else None
