"""Loading the target (the engine's runner), the shipped draft and head."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .draft import AcceptHead, EagleDraft

ARTIFACTS = Path(__file__).parent / "artifacts"
DEFAULT_TARGET = "smollm2-135m-instruct"


def set_threads() -> None:
    from archon_server.engine.runner import default_threads

    torch.set_num_threads(int(os.environ.get("ARCHON_THREADS", default_threads())))


def load_runner(name: str = DEFAULT_TARGET, dtype: str = "float32", device: str = "cpu"):
    """``dtype="auto"`` is the engine as served (bf16 with int8 small-batch weights on
    AVX512-BF16 CPUs: ~4x faster decode steps here; bf16 on a GPU); ``"float32"`` is
    bit-stable across batch shapes, which the token-for-token greedy tests rely on.
    ``device``: ``cpu``, ``cuda`` or ``auto`` (a GPU when there is one)."""
    from archon_server.engine.model_store import pull
    from archon_server.engine.runner import ModelRunner

    return ModelRunner(pull(name), device=device, dtype=dtype)


def target_state_dict(name: str = DEFAULT_TARGET) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from archon_server.engine.model_store import pull

    return load_file(str(pull(name) / "model.safetensors"))


def load_draft(runner, folder: Path | str | None = None) -> EagleDraft:
    """The draft shares the runner's embedding matrix (its tied LM head) and computes in the
    runner's dtype (bf16 halves a draft step on AVX512-BF16 CPUs: 1.1 vs 2.5 ms)."""
    folder = Path(folder) if folder else ARTIFACTS / "draft"
    draft = EagleDraft.load(folder, runner.lm_head.float()).to(device=runner.device, dtype=runner.dtype)
    return draft.quantize_int8() if getattr(runner, "small_kind", "") == "int8" else draft


def head_dir(mode: str = "greedy", reads: str = "candidate") -> Path:
    """The shipped head for a verify mode (``greedy`` / ``sampled``) and :attr:`AcceptHead.reads`."""
    return ARTIFACTS / (f"head_{mode}" if reads == "candidate" else f"head_{mode}_{reads}")


def load_head(folder: Path | str | None = None, device: torch.device | str = "cpu") -> tuple[AcceptHead, dict]:
    """A head (ours or the authors' format) in float32 on ``device`` (the draft's: it reads the
    draft's hidden states)."""
    folder = Path(folder) if folder else head_dir()
    head, meta = AcceptHead.load(folder)
    return head.to(device), meta


def load_tokenizer(name: str = DEFAULT_TARGET):
    from archon_server.engine.model_store import load_tokenizer, pull

    return load_tokenizer(pull(name))


def chat_ids(tok, text: str) -> list[int]:
    enc = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True)
    return list(enc["input_ids"])


def stop_ids(tok) -> set[int]:
    ids = {tok.eos_token_id}
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end >= 0:
        ids.add(im_end)
    return {i for i in ids if i is not None}


_INT8: dict[str, object] = {}


def load_int8_draft(name: str = DEFAULT_TARGET):
    """An int8 dynamically quantized copy of the target (HF model, quantized nn.Linear layers),
    usable with :class:`LMDrafter`.  Built at load time (no artifact).

    Measured here and *not* recommended: greedy acceptance only ~0.2-0.27 (per-tensor and
    per-channel, with or without the LM head quantized) at 0.5-1.0x a target step, so it
    loses to target-only decoding.  Kept to reproduce that measurement.
    """
    if name not in _INT8:
        import warnings

        from transformers import AutoModelForCausalLM

        from archon_server.engine.model_store import pull

        model = AutoModelForCausalLM.from_pretrained(str(pull(name)), dtype=torch.float32).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
            _INT8[name] = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return _INT8[name]
