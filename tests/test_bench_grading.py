"""MMLU answer extraction: the cascade of issue #17 (last explicit statement wins, capitals only, boxed)."""

from __future__ import annotations

import pytest

from archon_server.bench import grading as gr


@pytest.mark.parametrize("text,want", [
    # the three examples
    ("A. 12\nB. 13\nThe correct choice is C.", "C"),  # an option listing is not an answer
    ("answer is a good one, so C", "C"),  # the article 'a' is not choice A
    ("\\boxed{C}", "C"),
    # explicit statements: the last one wins, wherever weaker marks are
    ("The final answer is $\\boxed{\\text{B}}$", "B"),
    ("Answer: A\nWait, actually the answer is D.", "D"),
    ("**A** looks tempting, but the answer is C", "C"),
    ("Let me think. B is wrong.\nAnswer: C", "C"),
    ("B is correct.", "B"),
    ("I think it is a trick. The answer: B", "B"),
    ("The answer is A because the others fail.", "A"),
    ("The answer is (d).", "D"),  # lowercase only inside brackets
    # weaker marks
    ("**B**", "B"),
    ("A", "A"),
    ("Answer:\n\nC", "C"),
    ("C. 13", "C"),
    # nothing to read
    ("A. 12\nB. 13", None),
    ("a", None),
    ("no idea", None),
    ("The answer is Cats", None),
])
def test_extract_choice_cascade(text, want):
    assert gr.extract_choice(text) == want
