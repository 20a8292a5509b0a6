"""Fast GGUF -> Hugging Face folder for llama-architecture GGUFs (the default SmolLM2), in one streaming pass.

Why not transformers' GGUF loading (still used for other architectures, see ``model_store._convert``):
it parses the file three times (config, weights, tokenizer) with ``gguf.GGUFReader``, which builds a
numpy view per element of every metadata array - ~17 s per parse for SmolLM2's 100k-entry vocabulary
and merges on these 2 cores - then builds a model object only to save it.  Here the metadata is read
once with ``struct`` from a memory map (milliseconds), each tensor is dequantized with ``gguf``'s numpy
kernels straight from the map and written to safetensors, and the tokenizer is assembled with the
``tokenizers`` library from the GGUF's vocabulary and merges.  ``tests/test_model_store.py`` checks the
result equals transformers' conversion tensor for tensor and token for token.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata value types (gguf-py's GGUFValueType): fixed-size ones by struct format; 8 string, 9 array.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# llama.cpp tensor names -> Hugging Face Llama names ("{}" = layer index)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFFile:
    """Metadata and tensor table of a GGUF file, tensors read lazily from a memory map."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self.map
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        self.pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._value(vtype)
        self.tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}  # name -> (torch shape, ggml type, offset)
        for _ in range(n_tensors):
            name = self._string()
            (ndim,) = self._unpack("<I")
            dims = self._unpack(f"<{ndim}Q")
            ggml_type, offset = self._unpack("<IQ")
            self.tensors[name] = (tuple(reversed(dims)), ggml_type, offset)
        align = int(self.metadata.get("general.alignment", 32))
        self.data_start = -(-self.pos // align) * align

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        out = struct.unpack_from(fmt, self.map, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = struct.unpack_from("<Q", self.map, self.pos)
        s = self.map[self.pos + 8 : self.pos + 8 + n].decode("utf-8", errors="replace")
        self.pos += 8 + n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            item, count = self._unpack("<IQ")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            fmt = _SCALAR[item]
            values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.map, self.pos))
            self.pos += count * struct.calcsize(fmt)
            return values
        return self._unpack(_SCALAR[vtype])[0]

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in torch layout (``[out, in]`` for a matrix)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        shape, ggml_type, offset = self.tensors[name]
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        row_bytes = shape[-1] // block * type_size
        raw = np.frombuffer(self.map, dtype=np.uint8, count=rows * row_bytes, offset=self.data_start + offset)
        return dequantize(raw.reshape(rows, row_bytes), qtype).reshape(shape).astype(np.float32, copy=False)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its convert script interleaves RoPE halves per head)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    return None  # e.g. rope_freqs: recomputed from the config


def supports(gguf: Path) -> bool:
    """Whether this converter handles the file (a plain llama-architecture GGUF with a BPE vocabulary)."""
    try:
        f = GGUFFile(gguf)
    except (OSError, ValueError, KeyError):
        return False
    md = f.metadata
    return md.get("general.architecture") == "llama" and md.get("tokenizer.ggml.model") == "gpt2" and "rope_scaling" not in str(md)


def config_dict(f: GGUFFile, eos_id: int) -> dict[str, Any]:
    md = f.metadata
    a = "llama."
    heads = int(md[a + "attention.head_count"])
    hidden = int(md[a + "embedding_length"])
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": int(md[a + "feed_forward_length"]),
        "num_hidden_layers": int(md[a + "block_count"]), "num_attention_heads": heads,
        "num_key_value_heads": int(md.get(a + "attention.head_count_kv", heads)),
        "head_dim": int(md.get(a + "rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(md[a + "context_length"]), "rms_norm_eps": float(md[a + "attention.layer_norm_rms_epsilon"]),
        "rope_parameters": {"rope_theta": float(md.get(a + "rope.freq_base", 10000.0)), "rope_type": "default"},
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "vocab_size": int(md.get(a + "vocab_size", len(md["tokenizer.ggml.tokens"]))),
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"), "eos_token_id": eos_id,
        "pad_token_id": md.get("tokenizer.ggml.padding_token_id", eos_id), "unk_token_id": md.get("tokenizer.ggml.unknown_token_id"),
        "dtype": "float32", "use_cache": True, "initializer_range": 0.02, "pretraining_tp": 1,
    }


def write_weights(f: GGUFFile, out: Path, progress: Callable[[str], None]) -> int:
    """Dequantize every tensor into ``out/model.safetensors``; returns how many were written."""
    import torch
    from safetensors.torch import save_file

    md = f.metadata
    heads = int(md["llama.attention.head_count"])
    kv_heads = int(md.get("llama.attention.head_count_kv", heads))
    state: dict[str, Any] = {}
    names = [n for n in f.tensors if hf_name(n)]
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        w = f.dequantized(name)
        if ".attn_q." in name:
            w = _unpermute(w, heads)
        elif ".attn_k." in name:
            w = _unpermute(w, kv_heads)
        state[hf_name(name)] = torch.from_numpy(np.array(w, copy=not w.flags.writeable, order="C"))  # type: ignore[index]
        if i % 45 == 0 or i == len(names):
            progress(f"dequantized {i}/{len(names)} tensors ({time.perf_counter() - t0:.1f}s)")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return len(state)


def write_tokenizer(f: GGUFFile, out: Path, eos_token: str | None) -> tuple[Any, int]:
    """``tokenizer.json`` + ``tokenizer_config.json`` from the GGUF's byte-level BPE vocabulary;
    returns (the tokenizer, eos id)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    md = f.metadata
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types: list[int] = md.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1", special_tokens=[])
    control = [t for t, ty in zip(tokens, types) if ty in (3, 4)]  # CONTROL / USER_DEFINED tokens
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(out / "tokenizer.json"))

    def named(key: str) -> str | None:
        i = md.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None else None

    eos_id = tokens.index(eos_token) if eos_token else int(md["tokenizer.ggml.eos_token_id"])
    cfg: dict[str, Any] = {
        "tokenizer_class": "GPT2Tokenizer", "bos_token": named("bos_token_id"), "eos_token": tokens[eos_id],
        "unk_token": named("unknown_token_id"), "pad_token": named("padding_token_id") or tokens[eos_id],
        "model_max_length": int(md["llama.context_length"]), "add_bos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in md:
        cfg["chat_template"] = md["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return tok, eos_id


def convert(gguf: Path, out: Path, eos_token: str | None, progress: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> int:
    """Write the HF folder (config, generation config, safetensors, tokenizer) into ``out``; returns eos id."""
    out.mkdir(parents=True)
    f = GGUFFile(gguf)
    _, eos_id = write_tokenizer(f, out, eos_token)
    cfg = config_dict(f, eos_id)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos_id, "pad_token_id": cfg["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_weights(f, out, progress)
    return eos_id
