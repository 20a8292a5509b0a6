"""Benchmark items loaded from the read-only data folder (see :mod:`archon_server.bench.paths`).

Every benchmark becomes a list of :class:`Item`: an id unique within the benchmark, the
user turns to send (MT-Bench has two; everything else one), what grading needs
(``reference``), and metadata (category/subject/level used for stratified splits).

Prompts for the automatically graded tasks are built here, so a sweep and a grader agree
on the expected answer format (``\\boxed{}`` for MATH, a letter for MMLU, an
``[ANSWER]`` block for CRUXEval, a Python code block for HumanEval).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..components.extractors import last_boxed
from .paths import data_dir, data_file

Root = str | os.PathLike[str] | None


@dataclass
class Item:
    id: str
    benchmark: str
    turns: list[str]
    reference: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.turns[0]

    def messages(self, turn: int = 0, previous_answers: Sequence[str] = ()) -> list[dict[str, str]]:
        """Chat messages for ``turn`` (0-based), with earlier turns answered by ``previous_answers``."""
        msgs: list[dict[str, str]] = []
        for i in range(turn):
            msgs.append({"role": "user", "content": self.turns[i]})
            msgs.append({"role": "assistant", "content": previous_answers[i]})
        msgs.append({"role": "user", "content": self.turns[turn]})
        return msgs


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- open-ended (judged) benchmarks


def load_alpaca_eval(root: Root = None) -> list[Item]:
    """805 instructions; ``reference`` is the GPT-4-Turbo (1106-preview) baseline output."""
    with open(data_file("alpaca_eval/model_outputs/gpt4_1106_preview.json", root), encoding="utf-8") as f:
        rows = json.load(f)
    return [
        Item(id=str(i), benchmark="alpaca_eval", turns=[r["instruction"]], reference=r["output"],
             meta={"dataset": r.get("dataset"), "baseline": r.get("generator")})
        for i, r in enumerate(rows)
    ]


def load_mt_bench(root: Root = None) -> list[Item]:
    """80 two-turn questions; ``reference`` holds GPT-4's reference turns where FastChat uses them."""
    refs = {r["question_id"]: r["choices"][0]["turns"] for r in _jsonl(data_file("mt_bench/reference_answer_gpt-4.jsonl", root))}
    items = []
    for q in _jsonl(data_file("mt_bench/question.jsonl", root)):
        qid = q["question_id"]
        items.append(Item(id=str(qid), benchmark="mt_bench", turns=list(q["turns"]),
                          reference=refs.get(qid) or q.get("reference"), meta={"category": q["category"]}))
    return items


def load_mt_bench_judge_prompts(root: Root = None) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in _jsonl(data_file("mt_bench/judge_prompts.jsonl", root))}


def _arena_answer_text(row: dict[str, Any]) -> str:
    content = row["messages"][-1]["content"]
    return content["answer"] if isinstance(content, dict) else str(content)


def load_arena_hard(root: Root = None, baseline: str = "gpt-4-0314") -> list[Item]:
    """Arena-Hard-Auto v0.1: 500 prompts; ``reference`` is the baseline's answer (gpt-4-0314 in v0.1)."""
    base = {r["uid"]: _arena_answer_text(r) for r in _jsonl(data_file(f"arena_hard/arena-hard-v0.1/model_answer/{baseline}.jsonl", root))}
    return [
        Item(id=q["uid"], benchmark="arena_hard", turns=[q["prompt"]], reference=base.get(q["uid"]),
             meta={"cluster": q.get("cluster"), "category": q.get("category"), "baseline": baseline})
        for q in _jsonl(data_file("arena_hard/arena-hard-v0.1/question.jsonl", root))
    ]


# --------------------------------------------------------------------------- automatically graded benchmarks

MATH_INSTRUCTION = "Solve the following math problem. Reason step by step, and put your final answer within \\boxed{}."




def load_math500(root: Root = None) -> list[Item]:
    return [
        Item(id=r["unique_id"], benchmark="math500", turns=[f"{MATH_INSTRUCTION}\n\n{r['problem']}"], reference=r["answer"],
             meta={"subject": r["subject"], "level": r["level"], "problem": r["problem"], "solution": r["solution"]})
        for r in _jsonl(data_file("math/math500_prm800k_test.jsonl", root))
    ]


def load_math(root: Root = None) -> list[Item]:
    """The full MATH test split (5000); the answer is the last ``\\boxed{}`` of the solution."""
    items = []
    for i, r in enumerate(_jsonl(data_file("math/math_test_5000.jsonl", root))):
        rid = r.get("idx") or r.get("unique_id") or f"math-{i}"
        items.append(Item(id=str(rid), benchmark="math", turns=[f"{MATH_INSTRUCTION}\n\n{r['problem']}"],
                          reference=last_boxed(r["solution"]),
                          meta={"subject": r.get("type"), "level": r.get("level"), "problem": r["problem"], "solution": r["solution"]}))
    return items


LETTERS = "ABCD"


def _mmlu_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _mmlu_question(r: dict[str, str]) -> str:
    lines = [r["question"].strip()]
    lines += [f"{LETTERS[k]}. {r[f'choice{k}']}" for k in range(4)]
    return "\n".join(lines)


def load_mmlu(root: Root = None, shots: int = 0, subjects: Iterable[str] | None = None) -> list[Item]:
    """MMLU (57 subjects); ``shots`` (0–5) examples from the subject's dev split precede the question."""
    if not 0 <= shots <= 5:
        raise ValueError("shots must be 0..5")
    base = data_dir(root) / "mmlu"
    wanted = set(subjects) if subjects else None
    items = []
    for test in sorted((base / "test").glob("*_test.csv")):
        subject = test.name[: -len("_test.csv")]
        if wanted is not None and subject not in wanted:
            continue
        pretty = subject.replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {pretty}.\n\n"
        examples = ""
        if shots:
            dev = _mmlu_rows(base / "dev" / f"{subject}_dev.csv")[:shots]
            examples = "".join(f"{_mmlu_question(r)}\nAnswer: {LETTERS[int(r['answer'])]}\n\n" for r in dev)
        for k, r in enumerate(_mmlu_rows(test)):
            prompt = (header + examples + _mmlu_question(r)
                      + "\n\nAnswer with the letter of the correct choice, as 'Answer: X'.")
            items.append(Item(id=f"{subject}/{k}", benchmark=f"mmlu_{shots}shot" if shots else "mmlu", turns=[prompt],
                              reference=LETTERS[int(r["answer"])], meta={"subject": subject}))
    return items


CRUX_OUTPUT_PROMPT = """You are given a Python function and an assertion containing an input to the function. Complete the assertion with a literal (no unsimplified expressions, no function calls) containing the output when executing the provided code on the given input, even if the function is incorrect or incomplete. Think step by step if needed, then give the full assertion in [ANSWER] and [/ANSWER] tags.

```python
{code}
assert f({input}) == ??
```"""

CRUX_INPUT_PROMPT = """You are given a Python function and an output. Find any input such that executing f on the input leads to the given output. There may be multiple answers; give only one. Think step by step if needed, then give a passing assertion in [ANSWER] and [/ANSWER] tags.

```python
{code}
assert f(??) == {output}
```"""


def load_cruxeval(root: Root = None, mode: str = "output") -> list[Item]:
    """CRUXEval (800): ``mode='output'`` asks for f(input), ``'input'`` for an input giving the output."""
    if mode not in ("output", "input"):
        raise ValueError("mode must be 'output' or 'input'")
    tmpl = CRUX_OUTPUT_PROMPT if mode == "output" else CRUX_INPUT_PROMPT
    return [
        Item(id=r["id"], benchmark=f"cruxeval_{mode[0]}", turns=[tmpl.format(**r)],
             reference={"code": r["code"], "input": r["input"], "output": r["output"], "mode": mode}, meta={})
        for r in _jsonl(data_file("cruxeval/cruxeval.jsonl", root))
    ]


HUMANEVAL_PROMPT = """Complete the following Python function. Return the whole function (with the imports it needs) in one ```python code block.

```python
{prompt}
```"""


def load_humaneval(root: Root = None) -> list[Item]:
    return [
        Item(id=r["task_id"], benchmark="humaneval", turns=[HUMANEVAL_PROMPT.format(prompt=r["prompt"].rstrip())],
             reference={"prompt": r["prompt"], "entry_point": r["entry_point"], "test": r["test"],
                        "canonical_solution": r["canonical_solution"]}, meta={})
        for r in _jsonl(data_file("humaneval/HumanEval.jsonl", root))
    ]


# --------------------------------------------------------------------------- registry, subsets, splits

LOADERS: dict[str, Callable[..., list[Item]]] = {
    "alpaca_eval": load_alpaca_eval,
    "mt_bench": load_mt_bench,
    "arena_hard": load_arena_hard,
    "math500": load_math500,
    "math": load_math,
    "mmlu": lambda root=None: load_mmlu(root, shots=0),
    "mmlu_5shot": lambda root=None: load_mmlu(root, shots=5),
    "cruxeval": lambda root=None: load_cruxeval(root, mode="output"),
    "cruxeval_o": lambda root=None: load_cruxeval(root, mode="output"),
    "cruxeval_i": lambda root=None: load_cruxeval(root, mode="input"),
    "humaneval": load_humaneval,
}

STRATIFY_KEY = {"mt_bench": "category", "math500": "subject", "math": "subject", "mmlu": "subject",
                "mmlu_5shot": "subject", "arena_hard": "cluster", "alpaca_eval": "dataset"}


def load(name: str, root: Root = None) -> list[Item]:
    try:
        loader = LOADERS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(sorted(LOADERS))}") from None
    return loader(root)


def _rank(seed: int | str, key: str) -> str:
    # A hash rank instead of random.shuffle: an item's place does not depend on which other
    # items exist, so subsets and splits stay stable when a benchmark grows or is filtered.
    return hashlib.sha256(f"{seed}\x00{key}".encode()).hexdigest()


SPLIT_SEED = 0  # the one dev/test split of every benchmark: never a sweep's or a search's sampling seed


def split(items: Sequence[Item], dev_frac: float = 0.2, seed: int = SPLIT_SEED, stratify: str | None = "auto") -> tuple[list[Item], list[Item]]:
    """Deterministic stratified dev/test split (Archon uses 20% dev / 80% test).

    :func:`select` always uses :data:`SPLIT_SEED`, so a question is dev or test whatever seed a sweep or a search
    samples with: tuning on dev can never see a test question.

    ``stratify='auto'`` uses the benchmark's natural category (subject, category, ...).
    Allocation is proportional with an exact total of ``round(dev_frac · n)``: items are
    ranked by their hash-ordered position within their stratum, relative to its size,
    so tiny strata (Arena-Hard has 250 clusters of 2) still contribute.  Order is kept.
    """
    if not items:
        return [], []
    key = STRATIFY_KEY.get(items[0].benchmark) if stratify == "auto" else stratify
    strata: dict[Any, list[Item]] = defaultdict(list)
    for it in items:
        strata[it.meta.get(key) if key else None].append(it)
    keyed: list[tuple[float, str, str]] = []
    for s, group in strata.items():
        ranked = sorted(group, key=lambda it: _rank(seed, f"{s}\x00{it.id}"))
        for k, it in enumerate(ranked):
            keyed.append(((k + 0.5) / len(ranked), _rank(seed, f"tie\x00{s}"), it.id))
    keyed.sort()
    dev_ids = {iid for _, _, iid in keyed[: round(dev_frac * len(items))]}
    return [it for it in items if it.id in dev_ids], [it for it in items if it.id not in dev_ids]


def subset(items: Sequence[Item], n: int | None = None, seed: int = 0, ids: Iterable[str] | None = None) -> list[Item]:
    """``ids`` (in that order) or a seeded sample of ``n`` items (kept in benchmark order); all when both are None."""
    if ids is not None:
        by_id = {it.id: it for it in items}
        missing = [i for i in ids if str(i) not in by_id]
        if missing:
            raise KeyError(f"unknown item ids: {missing[:5]}")
        return [by_id[str(i)] for i in ids]
    if n is None or n >= len(items):
        return list(items)
    chosen = {it.id for it in sorted(items, key=lambda it: _rank(seed, it.id))[:n]}
    return [it for it in items if it.id in chosen]


def select(name: str, *, split_name: str | None = None, n: int | None = None, seed: int = 0,
           dev_frac: float = 0.2, ids: Iterable[str] | None = None, root: Root = None) -> list[Item]:
    """Load ``name``, optionally take the ``dev``/``test`` split, then a subset.

    ``seed`` picks the subset only: the split is the fixed one (:data:`SPLIT_SEED`), the same for every seed."""
    items = load(name, root)
    if split_name:
        dev, test = split(items, dev_frac=dev_frac, seed=SPLIT_SEED)
        items = {"dev": dev, "test": test}[split_name]
    return subset(items, n=n, seed=seed, ids=ids)


def shuffled(items: Sequence[Item], seed: int) -> list[Item]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
