"""The speculative loop on every device this machine has (CPU always; CUDA where present).

A tiny random Llama (saved the way HF saves one, loaded by the engine's runner) is the
target; drafts are an EAGLE layer initialised from the target's last layer and the
prompt-lookup drafter.  Greedy speculative output must equal target-only greedy output
token for token (float32), sampled decoding must run with the CPU generator whatever the
device, and the benchmark's calibration must time the device.  On a GPU box this is the
first thing to run (``pytest --noconftest tests/test_specdec_devices.py``): it catches
tensors left on the wrong device before a long benchmark does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from archon_server.engine.runner import ModelRunner
from training.specdec.bench import calibrate
from archon_server.engine.specdec.draft import AcceptHead, DraftConfig, EagleDraft
from archon_server.engine.specdec.generate import (EagleDrafter, NgramDrafter, TargetModel, autoregressive_generate,
                                                   speculative_generate)
from archon_server.engine.specdec.policies import make_policy
from archon_server.engine.specdec.sampling import SamplingConfig

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB, HIDDEN = 512, 64


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than HF's init: fewer near-ties, a peakier target
        model.model.embed_tokens.weight.normal_(0, 1.0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _draft(runner: ModelRunner, folder: Path) -> EagleDraft:
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    cfg = DraftConfig(hidden=HIDDEN, heads=4, kv_heads=2, head_dim=16, intermediate=128, rope_theta=10000.0,
                      vocab_size=VOCAB, draft_vocab=256, target_id="tiny")
    draft = EagleDraft.init_from_target(cfg, sd, torch.arange(0, VOCAB, 2), layer=1).eval()
    return draft.to(device=runner.device, dtype=runner.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_speculative_equals_target_only_on_device(tiny_folder: Path, device: str) -> None:
    runner = ModelRunner(tiny_folder, device=device, dtype="float32")
    draft = _draft(runner, tiny_folder)
    head = AcceptHead(HIDDEN).to(runner.device)
    proposer = AcceptHead(HIDDEN, reads="proposer").to(runner.device)
    target = TargetModel(runner)
    prompt = [5, 9, 17, 33, 9, 17, 33, 9, 17, 60, 61, 62, 5, 9, 17]  # repeats give the n-gram drafter matches
    ref, _ = autoregressive_generate(prompt, target, max_new_tokens=40)
    drafters = {"eagle": lambda: EagleDrafter(draft, head), "eagle+proposer head": lambda: EagleDrafter(draft, proposer),
                "ngram": lambda: NgramDrafter(VOCAB)}
    for name, make in drafters.items():
        for method, arg in (("fixed", 3), ("cumprob", 0.5), ("specdec_pp", 0.5)):
            if name == "ngram" and method == "specdec_pp":
                continue
            policy = make_policy(method, threshold=arg if method != "fixed" else None,
                                 k=arg if method == "fixed" else None)
            out, stats = speculative_generate(prompt, target, make(), policy, "greedy", max_new_tokens=40)
            assert out == ref, (device, name, method)
            assert stats.num_draft_tokens > 0 and stats.emitted_tokens == len(ref)


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_speculative_runs_on_device(tiny_folder: Path, device: str) -> None:
    runner = ModelRunner(tiny_folder, device=device, dtype="float32")
    draft = _draft(runner, tiny_folder)
    target = TargetModel(runner)
    sampling = SamplingConfig(temperature=1.0, top_p=0.9)
    prompt = [5, 9, 17, 33]
    runs = [speculative_generate(prompt, target, EagleDrafter(draft), make_policy("fixed", k=3), "sampled",
                                 sampling, max_new_tokens=30, seed=7) for _ in range(2)]
    assert runs[0][0] == runs[1][0]  # same seed, same draws
    proposer = AcceptHead(HIDDEN, reads="proposer").to(runner.device)  # its inputs come from both devices
    out, stats = speculative_generate(prompt, target, EagleDrafter(draft, proposer), make_policy("specdec_pp", 0.5),
                                      "sampled", sampling, max_new_tokens=30, seed=7)
    assert len(out) == 30 and stats.head_calls > 0
    assert all(0 <= t < VOCAB for t in runs[0][0])
    out, _ = speculative_generate(prompt, target, NgramDrafter(VOCAB), make_policy("fixed", k=3), "point_mass",
                                  sampling, max_new_tokens=30, seed=7)
    assert len(out) == 30


@pytest.mark.parametrize("device", DEVICES)
def test_calibration_times_the_device(tiny_folder: Path, device: str) -> None:
    runner = ModelRunner(tiny_folder, device=device, dtype="float32")
    draft = _draft(runner, tiny_folder)
    heads = {reads: AcceptHead(HIDDEN, reads=reads).to(runner.device) for reads in ("candidate", "proposer")}
    table = calibrate(runner, draft, heads, reps=2)
    assert all(v > 0 for v in table.values())
    assert {"target_1", "target_21", "draft_step", "head_candidate", "head_proposer"} <= set(table)


def test_round_callbacks_stream_and_stop(tiny_folder: Path) -> None:
    """``on_tokens`` sees every committed token once, in order, and returning True ends the
    generation after that round; ``max_new_tokens=0`` generates nothing (not even the first token)."""
    runner = ModelRunner(tiny_folder, device="cpu", dtype="float32")
    target = TargetModel(runner)
    prompt = [5, 9, 17, 33, 9, 17, 33, 9, 17, 60, 61, 62, 5, 9, 17]
    seen: list[list[int]] = []
    out, _ = speculative_generate(prompt, target, NgramDrafter(VOCAB), make_policy("fixed", k=3), "greedy",
                                  max_new_tokens=30, on_tokens=lambda t: seen.append(list(t)) or False)
    assert [t for r in seen for t in r] == out and len(seen) > 1
    rounds: list[list[int]] = []
    out2, _ = speculative_generate(prompt, target, NgramDrafter(VOCAB), make_policy("fixed", k=3), "greedy",
                                   max_new_tokens=30, on_tokens=lambda t: rounds.append(list(t)) or len(rounds) == 3)
    assert len(rounds) == 3 and out2 == [t for r in rounds for t in r] and out[: len(out2)] == out2
    empty, stats = speculative_generate(prompt, target, NgramDrafter(VOCAB), make_policy("fixed", k=3), "greedy",
                                        max_new_tokens=0)
    assert empty == [] and stats.target_forward_passes == 0
