"""Grading whose verdict the candidate cannot forge (see :mod:`._harness` for how).

``run_graded(candidate, tests)`` runs, inside one sandbox, a trusted harness that executes
each test itself against a fresh process holding the candidate, and reports through the one
channel only it holds: a line carrying a per-run random nonce, printed after every test has
run.  The exit status, anything the candidate prints, and any line without the nonce are
ignored; no nonce line means every test failed.

Remaining trust: the tests and the prelude are trusted (they run in the harness with the
nonce in reach); in the rlimits fallback mode (not root) the caller's own processes share
the sandbox's uid, so the isolation — not this protocol — is the weaker part there.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .core import SandboxLimits, SandboxResult, run_python

_HARNESS = Path(__file__).with_name("_harness.py")


@dataclass
class TestOutcome:
    passed: bool
    error: str = ""


@dataclass
class GradedRun:
    outcomes: list[TestOutcome]
    sandbox: SandboxResult
    reason: str = ""  # set when the harness gave no verdict (then every outcome failed)
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.outcomes) and all(o.passed for o in self.outcomes)

    @property
    def fraction(self) -> float:
        return sum(o.passed for o in self.outcomes) / len(self.outcomes) if self.outcomes else 0.0


def run_graded(
    candidate: str,
    tests: Sequence[str],
    *,
    prelude: str = "",
    bind: Sequence[str] | str = "*",
    per_test_timeout_s: float = 5.0,
    limits: SandboxLimits | None = None,
) -> GradedRun:
    """Run each of ``tests`` (trusted Python) against ``candidate`` (untrusted Python source).

    ``prelude`` is trusted code run in each test's namespace first (HumanEval's prompt with its
    helper functions, CRUXEval's ``f``); ``bind`` names the candidate's globals the tests see
    ("*": every global without a leading ``__``), bound after the prelude so they override it.
    Every test gets a fresh candidate process and ``per_test_timeout_s``.
    """
    nonce = secrets.token_hex(16)
    job = {"nonce": nonce, "tests": list(tests), "prelude": prelude,
           "bind": bind if isinstance(bind, str) else list(bind), "per_test_timeout_s": per_test_timeout_s}
    budget = per_test_timeout_s * max(1, len(job["tests"])) + 5.0
    lim = limits or SandboxLimits()
    lim = replace(lim, timeout_s=max(lim.timeout_s, budget), tail_chars=max(lim.tail_chars, 1_000_000))
    result = run_python(_HARNESS.read_text(), stdin=json.dumps(job), files={"candidate.py": candidate}, limits=lim)
    verdict = _verdict(result.stdout, nonce, len(job["tests"]))
    if verdict is None:
        why = result.reason or f"harness gave no verdict (status {result.status})"
        return GradedRun([TestOutcome(False, why) for _ in job["tests"]], result, why)
    return GradedRun(verdict, result)


def _verdict(stdout: str, nonce: str, n: int) -> list[TestOutcome] | None:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(nonce + " ")]
    if len(lines) != 1:
        return None
    try:
        data = json.loads(lines[0][len(nonce) + 1:])
    except ValueError:
        return None
    if not (isinstance(data, list) and len(data) == n):
        return None
    out = []
    for row in data:
        if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], bool)):
            return None
        out.append(TestOutcome(row[0], str(row[1])))
    return out
