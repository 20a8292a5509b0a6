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


def humaneval_prompts() -> list[str]:
    lines = (data_dir() / "humaneval/HumanEval.jsonl").read_text().splitlines()
    return ["Complete this Python function.\n\n" + json.loads(ln)["prompt"] for ln in lines if ln.strip()]


def math_prompts() -> list[str]:
    lines = (data_dir() / "math/math500_prm800k_test.jsonl").read_text().splitlines()
    return [json.loads(ln)["problem"] + "\nPut the final answer in \\boxed{}." for ln in lines if ln.strip()]
