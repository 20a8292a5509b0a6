"""Datasets load from shared/data; graders agree with the shipped references."""

from __future__ import annotations

import collections
import random

import pytest

from archon_server.bench import datasets as ds
from archon_server.bench import grading as gr
from archon_server.bench.paths import DataNotFound, data_dir

try:
    data_dir()
except DataNotFound:  # pragma: no cover
    pytest.skip("benchmark data not available", allow_module_level=True)


@pytest.mark.parametrize("name,count", [("alpaca_eval", 805), ("mt_bench", 80), ("arena_hard", 500), ("math500", 500),
                                        ("math", 5000), ("mmlu", 14042), ("cruxeval_o", 800), ("humaneval", 164)])
def test_counts_and_unique_ids(name, count):
    items = ds.load(name)
    assert len(items) == count
    assert len({it.id for it in items}) == count


def test_benchmark_contents():
    mt = ds.load("mt_bench")
    assert all(len(it.turns) == 2 for it in mt)
    assert len(collections.Counter(it.meta["category"] for it in mt)) == 8
    assert all(it.reference for it in mt if it.meta["category"] in ("math", "reasoning", "coding"))
    assert sum(1 for it in ds.load("arena_hard") if it.reference) == 500
    mmlu = ds.load("mmlu")
    assert len({it.meta["subject"] for it in mmlu}) == 57
    five = ds.load_mmlu(shots=5, subjects=["anatomy"])
    assert five[0].prompt.count("Answer: ") == 5 + 1  # five solved examples + the instruction line
    assert all(it.reference is not None for it in ds.load("math"))


def test_last_boxed_nested_and_fbox():
    assert ds.last_boxed(r"so \boxed{1} then \boxed{\frac{a}{b_{2}}}.") == r"\frac{a}{b_{2}}"
    assert ds.last_boxed(r"\fbox{7}") == "7"
    assert ds.last_boxed("no box") is None
    assert ds.last_boxed(r"\boxed{unclosed") is None


def test_math500_answers_are_the_last_box():
    items = ds.load("math500")
    agree = sum(ds.last_boxed(it.meta["solution"]) == it.reference for it in items)
    assert agree / len(items) > 0.9


def test_split_is_deterministic_stratified_and_partitions():
    items = ds.load("math500")
    dev, test = ds.split(items, seed=3)
    dev2, _ = ds.split(items, seed=3)
    dev3, _ = ds.split(items, seed=4)
    assert [i.id for i in dev] == [i.id for i in dev2]
    assert {i.id for i in dev} != {i.id for i in dev3}
    assert len(dev) == 100 and len(test) == 400
    assert {i.id for i in dev}.isdisjoint({i.id for i in test})
    by_subject = collections.Counter(i.meta["subject"] for i in items)
    dev_subject = collections.Counter(i.meta["subject"] for i in dev)
    for s, n in by_subject.items():
        assert abs(dev_subject[s] - 0.2 * n) <= 1.0


def test_subset_is_stable():
    items = ds.load("humaneval")
    a = ds.subset(items, n=10, seed=1)
    # the same items are chosen from a filtered list (hash ranks, not positions)
    b = ds.subset([it for it in items if it.id in {x.id for x in a} or random.Random(0).random() < 0.5], n=10, seed=1)
    assert [x.id for x in a] == [x.id for x in b]
    assert [x.id for x in ds.subset(items, ids=["HumanEval/3", "HumanEval/0"])] == ["HumanEval/3", "HumanEval/0"]


def test_math_grading_agrees_with_math_verify_on_references():
    items = ds.subset(ds.load("math500"), n=100, seed=0)
    right = sum(gr.grade_math(it.meta["solution"], it.reference).correct for it in items)
    assert right >= 97
    # another problem's answer is wrong almost always (a few answers coincide, e.g. "2")
    shifted = [gr.grade_math(a.meta["solution"], b.reference).correct for a, b in zip(items, items[1:] + items[:1])]
    assert sum(shifted) <= 10
    assert gr.grade_math(r"The answer is $\boxed{0.5}$", r"\frac{1}{2}").correct
    assert not gr.grade_math("I don't know", "3").correct


def test_choice_extraction():
    assert gr.extract_choice("Let me think. B is wrong.\nAnswer: C") == "C"
    assert gr.extract_choice("The answer is (d).") == "D"
    assert gr.extract_choice("**B**") == "B"
    assert gr.extract_choice("A") == "A"
    assert gr.extract_choice("no idea") is None
    it = ds.load_mmlu(subjects=["anatomy"])[0]
    assert gr.grade(it, f"Answer: {it.reference}").correct
    assert not gr.grade(it, "Answer: " + ("A" if it.reference != "A" else "B")).correct


def test_humaneval_canonical_pass_and_corrupted_fail():
    items = ds.subset(ds.load("humaneval"), n=20, seed=0)
    canonical = [f"```python\n{it.reference['prompt']}{it.reference['canonical_solution']}```" for it in items]
    raw_completion = [it.reference["canonical_solution"] for it in items[:5]]
    corrupted = [f"```python\n{it.reference['prompt']}    return None\n```" for it in items]
    grades = gr.grade_many(items + items[:5] + items, canonical + raw_completion + corrupted)
    assert all(g.correct for g in grades[:25]), [g.detail for g in grades[:25] if not g.correct]
    assert not any(g.correct for g in grades[25:])


def test_cruxeval_given_outputs_pass_and_wrong_fail():
    items = ds.subset(ds.load("cruxeval_o"), n=20, seed=0)
    good = [f"Reasoning...\n[ANSWER]assert f({it.reference['input']}) == {it.reference['output']}[/ANSWER]" for it in items]
    bad = ["[ANSWER]'definitely not this'[/ANSWER]" for _ in items[:5]]
    inputs = [f"[ANSWER]assert f({it.reference['input']}) == 12345[/ANSWER]" for it in ds.subset(ds.load("cruxeval_i"), n=5, seed=0)]
    grades = gr.grade_many(items + items[:5] + ds.subset(ds.load("cruxeval_i"), n=5, seed=0), good + bad + inputs)
    assert all(g.correct for g in grades[:20]), [g.detail for g in grades[:20] if not g.correct]
    assert not any(g.correct for g in grades[20:25])
    # input mode checks against the *given* output, whatever the model wrote on the right
    assert all(g.correct for g in grades[25:])


def test_humaneval_block_with_only_the_entry_point_keeps_prompt_helpers():
    it = {i.id: i for i in ds.load("humaneval")}["HumanEval/10"]  # make_palindrome uses the prompt's is_palindrome
    body = "def make_palindrome(string: str) -> str:\n" + it.reference["canonical_solution"]
    assert gr.grade(it, f"Here you go:\n```python\n{body}```").correct
    assert not gr.grade(it, "```python\ndef make_palindrome(string: str) -> str:\n    return string\n```").correct


def test_dev_and_test_do_not_depend_on_the_sampling_seed():
    """A sweep's or a search's seed picks the subset, never the split: no seed's test question is another seed's dev."""
    dev0 = {it.id for it in ds.select("math500", split_name="dev", seed=0)}
    for seed in (1, 2, 7):
        assert {it.id for it in ds.select("math500", split_name="dev", seed=seed)} == dev0
        assert dev0.isdisjoint({it.id for it in ds.select("math500", split_name="test", seed=seed)})
    assert dev0 == {it.id for it in ds.split(ds.load("math500"))[0]}  # the fixed split: SPLIT_SEED
    assert {it.id for it in ds.select("math500", split_name="dev", n=10, seed=1)} <= dev0
    assert ds.select("math500", split_name="dev", n=10, seed=1) != ds.select("math500", split_name="dev", n=10, seed=2)
