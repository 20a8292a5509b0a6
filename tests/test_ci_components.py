"""A missing real component cannot hide behind a skip: under CI (CI=true) the tests that need it fail.

Runs pytest on the vLLM test modules in a subprocess with the vLLM interpreter pointed at nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("ci,outcome", [("true", "error"), ("", "skipped")])
def test_vllm_tests_fail_under_ci_when_vllm_is_missing(ci, outcome):
    env = {**os.environ, "ARCHON_VLLM_PYTHON": "/nonexistent/vllm-venv/bin/python", "CI": ci, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider",
                        "tests/test_vllm.py", "tests/test_vllm_server.py"],
                       cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=300, check=False)
    out = r.stdout + r.stderr
    summary = out.strip().splitlines()[-1]
    assert outcome in summary, out[-3000:]
    assert ("skipped" if outcome == "error" else "error") not in summary, summary
    if outcome == "error":  # a failure in setup: pytest says "N errors" and exits 1, as for a failed test
        assert r.returncode == 1 and "vLLM is required under CI" in out and "no vLLM interpreter at /nonexistent" in out
    else:
        assert r.returncode == 0
