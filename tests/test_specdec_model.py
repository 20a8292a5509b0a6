"""Speculative decoding on the real SmolLM2-135M target with the shipped EAGLE draft.

- greedy speculative output equals greedy target-only output, token for token, for
  several stop policies;
- after rounds with rejections, the target's and the draft's caches equal a fresh run's
  (next-step logits / draft hidden states match a fresh prefill);
- a sampled run emits tokens and its counters add up.
"""

from __future__ import annotations

import pytest
import torch

from archon_server.engine.specdec import loading
from archon_server.engine.specdec.draft import AcceptHead
from archon_server.engine.specdec.generate import (EagleDrafter, LMDrafter, TargetModel, autoregressive_generate,
                                                   speculative_generate)
from archon_server.engine.specdec.policies import FixedK, SpecDecPP, make_policy
from archon_server.engine.specdec.sampling import SamplingConfig

pytestmark = pytest.mark.skipif(not (loading.ARTIFACTS / "draft" / "draft.json").exists(), reason="no shipped draft")

PROMPT = "Explain why the sky is blue in two sentences."


@pytest.fixture(scope="module")
def env():
    loading.set_threads()
    runner = loading.load_runner()
    tok = loading.load_tokenizer()
    draft = loading.load_draft(runner)
    head, _ = loading.load_head()
    return runner, tok, draft, head


def test_greedy_speculative_equals_target_only(env) -> None:
    runner, tok, draft, head = env
    ids = loading.chat_ids(tok, PROMPT)
    target = TargetModel(runner)
    ref, _ = autoregressive_generate(ids, target, max_new_tokens=24)
    proposer = AcceptHead(draft.cfg.hidden, reads="proposer")  # untrained: the output must not depend on it
    for policy, h in ((FixedK(4), head), (SpecDecPP(0.5), head), (make_policy("confidence"), head),
                      (SpecDecPP(0.5, min_k=1, max_k=3), proposer)):
        out, stats = speculative_generate(ids, target, EagleDrafter(draft, h), policy, "greedy",
                                          max_new_tokens=24)
        assert out == ref, policy.describe()
        assert stats.num_accepted_draft_tokens > 0  # the draft is doing something
        assert stats.target_forward_passes < 24


def test_caches_match_fresh_run_after_rejections(env) -> None:
    runner, tok, draft, _ = env
    ids = loading.chat_ids(tok, "List three uses of copper.")
    target = TargetModel(runner)
    drafter = EagleDrafter(draft)
    out, stats = speculative_generate(ids, target, drafter, FixedK(6), "greedy", max_new_tokens=24)
    assert stats.discarded_draft_tokens > 0 and stats.num_accepted_draft_tokens > 0
    seq = ids + out
    assert target.length == len(seq) - 1  # the newest token is not in the cache yet
    # target: next-step logits from the rolled-back cache vs a fresh prefill of the same text
    logits, _ = target.forward([seq[-1]])
    fresh = TargetModel(runner, slot=0, cache=runner.new_cache(1, 256))
    ref_logits, ref_hidden = fresh.forward(seq)
    assert torch.allclose(logits[-1], ref_logits[-1], atol=1e-3, rtol=1e-3)
    # draft: its next round (after catching up) vs a fresh drafter on the fresh features
    target.crop(len(seq) - 1)
    step = drafter.start_round()
    ref_drafter = EagleDrafter(draft)
    ref_drafter.reset(seq, ref_hidden[:-1])
    ref_step = ref_drafter.start_round()
    assert torch.allclose(step.hidden, ref_step.hidden, atol=1e-3, rtol=1e-3)


def test_sampled_run_counters(env) -> None:
    runner, tok, draft, head = env
    ids = loading.chat_ids(tok, PROMPT)
    out, stats = speculative_generate(ids, TargetModel(runner), EagleDrafter(draft, head), SpecDecPP(0.5), "sampled",
                                      SamplingConfig(temperature=1.0), max_new_tokens=24, seed=3)
    assert len(out) == stats.emitted_tokens <= 24
    m = stats.metrics()
    assert 0.0 <= m["draft_acceptance_rate"] <= 1.0
    # every round emits accepted + 1 tokens; prefill emits the first
    assert stats.emitted_tokens <= 1 + stats.num_accepted_draft_tokens + stats.target_forward_passes - 1
    # K stays within 2..20 except in the last round, which the max_new_tokens budget may shorten
    assert all(2 <= k <= 20 for k in stats.k_per_round[:-1])


def test_serving_hook_returns_vllm_metric_names(env) -> None:
    from archon_server.engine.specdec.serve import speculative_generate_for_request

    runner, tok, _, _ = env
    ids = loading.chat_ids(tok, PROMPT)
    ref, _ = autoregressive_generate(ids, TargetModel(runner), max_new_tokens=16)
    out, metrics = speculative_generate_for_request(runner, ids, {"method": "cumprob", "threshold": 0.5},
                                                    temperature=0.0, max_tokens=16)
    assert out == ref
    for name in ("mean_acceptance_length", "draft_acceptance_rate", "num_draft_tokens", "num_accepted_draft_tokens"):
        assert name in metrics
    out, metrics = speculative_generate_for_request(runner, ids, {"method": "fixed", "k": 4, "draft": "ngram"},
                                                    temperature=0.0, max_tokens=16)
    assert out == ref


def test_ngram_drafter_greedy_equals_target_only(env) -> None:
    from archon_server.engine.specdec.generate import NgramDrafter

    runner, tok, _, _ = env
    ids = loading.chat_ids(tok, "Repeat exactly: the cat sat on the mat, the cat sat on the mat.")
    ref, _ = autoregressive_generate(ids, TargetModel(runner), max_new_tokens=20)
    out, stats = speculative_generate(ids, TargetModel(runner), NgramDrafter(runner.dims.vocab), FixedK(4), "greedy",
                                      max_new_tokens=20)
    assert out == ref
    assert stats.draft_forward_passes == 0


def test_lm_drafter_keeps_its_cache(env) -> None:
    """A separate Hugging Face causal LM as the draft.  Given the target's own weights it must
    agree with the target nearly always, so the drafter keeps and crops its KV cache correctly
    (a drafter that lost its cache between calls would see only the newest tokens)."""
    from transformers import AutoModelForCausalLM

    from archon_server.engine.model_store import pull

    runner, tok, _, _ = env
    model = AutoModelForCausalLM.from_pretrained(str(pull(loading.DEFAULT_TARGET)), dtype=torch.float32).eval()
    ids = loading.chat_ids(tok, PROMPT)
    target = TargetModel(runner)
    ref, _ = autoregressive_generate(ids, target, max_new_tokens=24)
    out, stats = speculative_generate(ids, target, LMDrafter(model), FixedK(3), "greedy", max_new_tokens=24)
    assert out == ref
    assert stats.draft_acceptance_rate > 0.9


def test_engine_as_served_runs_every_drafter_and_policy(env) -> None:
    """The runner as the local backend builds it (dtype auto: bf16 + int8 GEMV on AVX512-BF16 CPUs,
    float32 elsewhere): the draft and its int8 copies follow the runner's dtype, the head stays
    float32, and greedy and sampled requests run with every drafter."""
    from archon_server.engine.specdec.serve import speculative_generate_for_request

    _, tok, _, _ = env
    runner = loading.load_runner(dtype="auto")
    ids = loading.chat_ids(tok, PROMPT)
    specs = ({"method": "specdec_pp", "threshold": 0.7}, {"method": "cumprob", "min_k": 1, "max_k": 3},
             {"method": "specdec_pp", "threshold": 0.5, "head": "proposer", "min_k": 1, "max_k": 3},
             {"method": "fixed", "k": 3, "draft": "ngram"})
    for spec in specs:
        for temperature in (0.0, 1.0):
            out, m = speculative_generate_for_request(runner, ids, spec, temperature=temperature, max_tokens=16, seed=1)
            assert 1 <= len(out) <= 16 and m["emitted_tokens"] == len(out), spec
            assert m["num_drafts"] > 0 or spec.get("draft") == "ngram", spec


def test_training_pipeline_end_to_end(tmp_path) -> None:
    """`build-data` (other systems' answers and the target's own), `merge-data`, `train-draft`,
    `train-head` on a tiny slice: each step writes what the next reads, and the artifacts record
    what they were trained on."""
    import json

    from training.specdec.train import build_data, merge_data, train_draft, train_head

    assert build_data(tmp_path, n_prompts=32, max_new=6, systems=1, name="corpus").name == "corpus.pt"
    build_data(tmp_path, n_prompts=16, max_new=6, source="target", name="target",
               prompt_sets=("alpaca_train", "arena_hard"), samples=1, temperature=0.7)
    merge_data(tmp_path, ["corpus", "target"])
    blob = torch.load(tmp_path / "data.pt")
    # 32 corpus answers + (16 alpaca + 16 arena-hard prompts) x (greedy + 1 sample)
    assert len(blob["seqs"]) == 32 + 64
    assert blob["systems"] == ["gpt4_1106_preview", "target (alpaca_train, arena_hard; greedy + 1 sampled at T=0.7)"]
    target_seqs = blob["seqs"][32:]
    assert {s["group"] >= 1000 for s in target_seqs} == {True, False}  # arena-hard prompts keep their own groups
    greedy, sampled = target_seqs[:32], target_seqs[32:]
    assert [s["group"] for s in greedy] == [s["group"] for s in sampled]
    assert any(a["tokens"].tolist() != b["tokens"].tolist() for a, b in zip(greedy, sampled))
    draft_dir = train_draft(tmp_path, tmp_path / "draft", epochs=1, batch=16, vocab=512)
    meta = json.loads((draft_dir / "draft.json").read_text())
    assert meta["epochs_done"] == 1 and 0.0 <= meta["val"]["top1_agreement"] <= 1.0
    head_dir = train_head(tmp_path, draft_dir, tmp_path / "head", mode="greedy", temperature=0.0, epochs=1)
    head_meta = json.loads((head_dir / "head.json").read_text())
    assert head_meta["verify_mode"] == "greedy" and "val_auc_draft_probability" in head_meta
    assert head_meta["reads"] == "candidate"
    head_dir = train_head(tmp_path, draft_dir, tmp_path / "head_p", mode="sampled", temperature=1.0, epochs=1,
                          reads="proposer")
    head, head_meta = AcceptHead.load(head_dir)
    assert head.reads == "proposer" and head.inp.in_features == 2 * meta["hidden"] + 6
