"""Prompt sets: AlpacaEval instructions (split into train / held-out), HumanEval, MATH-500."""

from __future__ import annotations

import json
import os
from pathlib import Path

# AlpacaEval rows [0, TRAIN_END) train the draft and the head; rows >= TEST_START are held out.
TRAIN_END = 640
TEST_START = 640


def data_dir() -> Path:
    env = os.environ.get("ARCHON_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def alpaca_instructions() -> list[str]:
    rows = json.loads((data_dir() / "alpaca_eval/model_outputs/gpt4_1106_preview.json").read_text())
    return [r["instruction"] for r in rows]


def alpaca_split(split: str) -> list[str]:
    rows = alpaca_instructions()
    return rows[:TRAIN_END] if split == "train" else rows[TEST_START:]


# Prompt sets the target answers itself to make self-distillation data for the draft, with the
# offset added to each prompt's index to make its ``group`` (validation holds out every 10th
# group, so no prompt is both trained and validated on).  HumanEval and MATH stay out: they
# are the benchmark's out-of-distribution sets.
SELF_DISTILL_SETS = {"alpaca_train": 0, "arena_hard": 1000, "mt_bench": 3000}


def _jsonl(path: Path) -> list[dict]:
    # split on "\n" only: str.splitlines also breaks at U+2028 inside JSON strings (arena-hard has some)
    return [json.loads(ln) for ln in path.read_text().split("\n") if ln.strip()]


def self_distill_prompts(name: str) -> list[str]:
    """``alpaca_train`` (rows 0..639), ``arena_hard`` (v0.1 and v2.0 prompts), ``mt_bench`` (first turns)."""
    if name == "alpaca_train":
        return alpaca_split("train")
    if name == "arena_hard":
        out = []
        for version in ("arena-hard-v0.1", "arena-hard-v2.0"):
            out += [r["prompt"] for r in _jsonl(data_dir() / "arena_hard" / version / "question.jsonl")]
        return out
    if name == "mt_bench":
        return [r["turns"][0] for r in _jsonl(data_dir() / "mt_bench/question.jsonl")]
    raise ValueError(f"unknown prompt set {name!r}; known: {', '.join(SELF_DISTILL_SETS)}")


def humaneval_prompts() -> list[str]:
    return ["Complete this Python function.\n\n" + r["prompt"] for r in _jsonl(data_dir() / "humaneval/HumanEval.jsonl")]


def math_prompts() -> list[str]:
    return [r["problem"] + "\nPut the final answer in \\boxed{}." for r in _jsonl(data_dir() / "math/math500_prm800k_test.jsonl")]
