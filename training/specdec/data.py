"""Prompt sets: AlpacaEval instructions (split into train / held-out), HumanEval, MATH-500.

The rows come from :mod:`archon_server.bench.datasets` (one reader of the benchmark data);
only the prompt wording is SpecDec's own, so the trained artifacts and the benchmark keep the
prompts they were measured on.
"""

from __future__ import annotations

from archon_server.bench.datasets import _jsonl, load_alpaca_eval, load_humaneval, load_math500, load_mt_bench
from archon_server.bench.paths import data_dir, data_file

__all__ = ["SELF_DISTILL_SETS", "TEST_START", "TRAIN_END", "alpaca_instructions", "alpaca_split", "data_dir",
           "humaneval_prompts", "math_prompts", "self_distill_prompts"]

# AlpacaEval rows [0, TRAIN_END) train the draft and the head; rows >= TEST_START are held out.
TRAIN_END = 640
TEST_START = 640


def alpaca_instructions() -> list[str]:
    return [it.prompt for it in load_alpaca_eval()]


def alpaca_split(split: str) -> list[str]:
    rows = alpaca_instructions()
    return rows[:TRAIN_END] if split == "train" else rows[TEST_START:]


# Prompt sets the target answers itself to make self-distillation data for the draft, with the
# offset added to each prompt's index to make its ``group`` (validation holds out every 10th
# group, so no prompt is both trained and validated on).  HumanEval and MATH stay out: they
# are the benchmark's out-of-distribution sets.
SELF_DISTILL_SETS = {"alpaca_train": 0, "arena_hard": 1000, "mt_bench": 3000}


def self_distill_prompts(name: str) -> list[str]:
    """``alpaca_train`` (rows 0..639), ``arena_hard`` (v0.1 and v2.0 prompts), ``mt_bench`` (first turns)."""
    if name == "alpaca_train":
        return alpaca_split("train")
    if name == "arena_hard":
        # bench's load_arena_hard is v0.1 only (and joins a baseline's answers): read both versions' questions here
        out = []
        for version in ("arena-hard-v0.1", "arena-hard-v2.0"):
            out += [r["prompt"] for r in _jsonl(data_file(f"arena_hard/{version}/question.jsonl"))]
        return out
    if name == "mt_bench":
        return [it.turns[0] for it in load_mt_bench()]
    raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(SELF_DISTILL_SETS)}")


def humaneval_prompts() -> list[str]:
    return ["Complete this Python function.\n\n" + it.reference["prompt"] for it in load_humaneval()]


def math_prompts() -> list[str]:
    return [it.meta["problem"] + "\nPut the final answer in \\boxed{}." for it in load_math500()]
