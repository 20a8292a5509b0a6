import pytest

from archon_server.components.base import ParseError
from archon_server.components.extractors import choice_letter, extract, last_boxed
from archon_server.components.parsers import parse_joint_critiques, parse_ranking, parse_test_results, parse_unit_tests, parse_verdict
from archon_server.components.vote import majority
from archon_server.spec import ExtractorSpec


@pytest.mark.parametrize(
    "text,n,expected",
    [
        ("[3] > [1] > [2]", 3, [2, 0, 1]),
        ("Ranking: [2]>[2]>[9] > [1]", 3, [1, 0, 2]),  # duplicates and out-of-range dropped, missing appended
        ("The best is [ 4 ], then [1].", 4, [3, 0, 1, 2]),
    ],
)
def test_ranking(text, n, expected):
    assert parse_ranking(text, n) == expected


def test_ranking_without_ids_fails_closed():
    with pytest.raises(ParseError):
        parse_ranking("I think the second one is best", 3)


def test_verdict_last_marker_wins_and_missing_fails():
    assert parse_verdict("It says [Correct] but the math is wrong.\n[Incorrect]") is False
    assert parse_verdict("reasoning...\n[correct]") is True
    with pytest.raises(ParseError):
        parse_verdict("looks fine")


def test_unit_tests_and_results():
    assert parse_unit_tests("Sure!\n- a\n* b\n3. c\nnot a test", 5) == ["a", "b", "c"]
    assert parse_test_results("Test 2: [Passed]\nTest 1: [Failed]", 3) == [False, True, False]  # unanswered fails
    assert parse_test_results("[Passed] [Passed]", 2) == [True, True]
    with pytest.raises(ParseError):
        parse_test_results("all good", 2)


def test_joint_critiques():
    out = parse_joint_critiques("[1]\nStrengths: x\n\n[3]\nWeaknesses: y", 3)
    assert out[0].startswith("Strengths") and out[1] is None and out[2].startswith("Weaknesses")


def test_extractors_and_vote():
    assert last_boxed(r"so \boxed{\frac{1}{2}} and finally \boxed{3}") == "3"
    assert last_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert choice_letter("The answer is (C).") == "C"
    assert extract("x = 1,000.", ExtractorSpec(kind="number")) == "1000"
    assert extract("answer: 42 apples", ExtractorSpec(kind="regex", pattern=r"answer: (\d+)")) == "42"
    assert majority(["1", None, "2", "2", "1"]) == "1"  # tie: first seen wins
    assert majority([None, None]) is None
