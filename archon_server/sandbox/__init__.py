"""Sandboxed execution of model-written programs (see :mod:`.core` for what is guaranteed).

A leaf module: the executed unit-test evaluator (components) and the code benchmarks
(bench) both use it.
"""

from __future__ import annotations

import asyncio
import re

from .core import (
    SandboxLimits,
    SandboxResult,
    arun_python,
    isolation_mode,
    run_many,
    run_python,
    run_tests,
)

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The program in a model's answer: the longest fenced block, else the whole text."""
    blocks = _FENCE.findall(text)
    return max(blocks, key=len) if blocks else text


def is_python(test: str) -> bool:
    try:
        compile(test, "<test>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


async def score_program(text: str, tests: list[str], timeout_s: float = 10.0) -> float:
    """Fraction of ``tests`` (Python source, e.g. asserts) that pass against the code in ``text``.

    Tests that are not Python (natural-language checks) are left out; none left scores 0.
    The tests run in the grading harness (:mod:`.harness`): the candidate cannot forge a pass.
    """
    from .harness import run_graded

    runnable = [t for t in tests if is_python(t)]
    if not runnable:
        return 0.0
    run = await asyncio.to_thread(run_graded, extract_code(text), runnable, per_test_timeout_s=timeout_s)
    return run.fraction


from .harness import GradedRun, run_graded

__all__ = [
    "GradedRun",
    "SandboxLimits",
    "SandboxResult",
    "arun_python",
    "extract_code",
    "isolation_mode",
    "run_graded",
    "run_many",
    "run_python",
    "run_tests",
    "score_program",
]
