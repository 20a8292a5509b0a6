"""Code graders trust only the harness's own verdict: every way a candidate can fake a pass fails.

HumanEval/CRUXEval graders and the executed unit-test evaluator (sandbox.score_program) all go
through sandbox.harness.run_graded; each attack below used to pass a grader that read the exit
status of ``candidate + tests``.
"""

from __future__ import annotations

import asyncio

import pytest

from archon_server.bench import datasets as ds
from archon_server.bench import grading as gr
from archon_server.sandbox import run_graded, score_program

HE0 = {i.id: i for i in ds.load("humaneval")}["HumanEval/0"]  # has_close_elements(numbers, threshold)
SIG = "def has_close_elements(numbers, threshold):\n"

# Each attack defines the entry point wrongly (returns a constant) and tries to be graded correct anyway.
ATTACKS = {
    "os._exit(0) at import": "import os\nos._exit(0)\n" + SIG + "    return True\n",
    "sys.exit(0) at import": "import sys\nsys.exit(0)\n" + SIG + "    return True\n",
    "exit inside the function": SIG + "    import os\n    os._exit(0)\n",
    "SystemExit inside a test": SIG + "    raise SystemExit(0)\n",
    "KeyboardInterrupt": SIG + "    raise KeyboardInterrupt\n",
    "kill the parent": "import os, signal\n" + SIG + "    os.kill(os.getppid(), signal.SIGKILL)\n    return True\n",
    "kill the whole group": "import os, signal\n" + SIG + "    os.killpg(0, signal.SIGKILL)\n",
    "fake success marker": "print('ALL TESTS PASSED')\nimport sys\nprint('\\n' + 'a' * 32 + ' [[true, \"\"]]')\n"
                           + SIG + "    return True\n",
    "redefine check": SIG + "    return True\n\ndef check(candidate):\n    pass\n",
    "monkeypatch assert": "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n"
                          + SIG + "    return True\n",
    "always-equal object": "class Eq:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
                           + SIG + "    return Eq()\n",
    "always-equal bool subclass": "class T(int):\n    def __eq__(self, o):\n        return True\n"
                                  + SIG + "    return T(0)\n",
    "patch builtins via atexit": "import atexit, os\natexit.register(lambda: os._exit(0))\n" + SIG + "    return True\n",
    "read the tests from disk": "import os\nSRC = {n: open(n).read() for n in os.listdir('.') if os.path.isfile(n)}\n"
                                + SIG + "    assert 'check' not in ''.join(SRC.values()), 'tests were readable'\n"
                                        "    return True\n",
    "hang": SIG + "    while True:\n        pass\n",
    "settrace to skip asserts": "import sys\nsys.settrace(lambda *a: None)\n" + SIG + "    return True\n",
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_humaneval_attack_is_graded_as_failure(name):
    g = gr.grade(HE0, f"```python\n{ATTACKS[name]}```")
    assert not g.correct, (name, g.detail)


def test_humaneval_honest_solution_still_passes_next_to_the_attacks():
    body = SIG + HE0.reference["canonical_solution"]
    assert gr.grade(HE0, f"```python\n{body}```").correct


def test_a_forged_nonce_line_cannot_pass_because_the_nonce_is_per_run():
    # The candidate prints a well-formed verdict line for every hex nonce it could guess;
    # the real nonce is fresh for each run and never reachable from the candidate's process.
    forge = "import sys\nfor c in '0123456789abcdef':\n    print(c * 32 + ' [[true, \"\"]]')\ndef inc(x):\n    return 0\n"
    run = run_graded(forge, ["assert inc(1) == 2"])
    assert not run.passed and run.outcomes[0].error.startswith("AssertionError")


def test_the_harness_cannot_be_read_or_traced_by_the_candidate():
    spy = ("import os\nppid = os.getppid()\nseen = []\n"
           "for p in ('mem', 'fd/0', 'fd/1', 'environ'):\n"
           "    try:\n        open(f'/proc/{ppid}/{p}', 'rb').read(1)\n        seen.append(p)\n"
           "    except OSError:\n        pass\n"
           "def leaked():\n    return seen\n")
    run = run_graded(spy, ["assert leaked() == []"])
    assert run.passed, run.outcomes


def test_cruxeval_answers_are_evaluated_away_from_the_check():
    it = ds.load("cruxeval_o")[0]
    honest = gr.grade(it, f"[ANSWER]{it.reference['output']}[/ANSWER]")
    assert honest.correct, honest.detail
    for ans in ["__import__('os')._exit(0)", "__import__('sys').exit(0)",
                "type('E', (), {'__eq__': lambda s, o: True, '__hash__': None})()",
                f"f({it.reference['input']})"]:  # f is not in the answer's reach in output mode
        g = gr.grade(it, f"[ANSWER]{ans}[/ANSWER]")
        assert not g.correct, (ans, g.detail)
    ii = ds.load("cruxeval_i")[0]
    assert gr.grade(ii, f"[ANSWER]f({ii.reference['input']})[/ANSWER]").correct
    assert not gr.grade(ii, "[ANSWER]f(__import__('os')._exit(0))[/ANSWER]").correct


def test_unit_test_evaluator_scores_by_the_harness():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
    assert asyncio.run(score_program(good, tests)) == pytest.approx(2 / 3)
    for cheat in ["import os\nos._exit(0)\ndef add(a, b):\n    return 0",
                  "def add(a, b):\n    raise SystemExit(0)",
                  "class E:\n    def __eq__(s, o):\n        return True\ndef add(a, b):\n    return E()"]:
        assert asyncio.run(score_program(f"```python\n{cheat}\n```", tests)) == 0.0, cheat


def test_harness_supports_objects_iterators_and_exceptions():
    cand = ("class Stack:\n    def __init__(self):\n        self.v = []\n    def push(self, x):\n        self.v.append(x)\n"
            "    def pop(self):\n        return self.v.pop()\n    def __iter__(self):\n        return iter(list(self.v))\n"
            "    def __len__(self):\n        return len(self.v)\n")
    tests = ["s = Stack(); s.push(1); s.push(2)\nassert len(s) == 2 and list(s) == [1, 2] and s.pop() == 2",
             "s = Stack()\ntry:\n    s.pop()\nexcept IndexError:\n    pass\nelse:\n    raise AssertionError('no error')",
             "assert Stack() != Stack()",  # remote objects compare by identity only
             "while True:\n    pass"]  # a hanging test fails alone
    run = run_graded(cand, tests, per_test_timeout_s=3)
    assert [o.passed for o in run.outcomes] == [True, True, True, False], run.outcomes
