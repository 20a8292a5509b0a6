"""Build a ready :class:`Engine` from a model name or folder (pull + convert on first use)."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import model_store
from .runner import ModelRunner, default_threads
from .threads import in_fresh_thread
from .scheduler import Engine
from ..config import DEFAULT_PREFIX_CACHE_MB


TOKENIZER_MAX_LENGTH = 1 << 62  # the tokenizer never measures a prompt against the context (load_model)


@dataclass
class LoadedModel:
    name: str
    path: Path
    runner: ModelRunner
    tokenizer: Any
    eos_ids: set[int]
    load_s: float


def eos_token_ids(folder: Path, tokenizer: Any) -> set[int]:
    """Every token that ends a turn: generation_config's eos, the tokenizer's eos, and ``<|im_end|>``."""
    ids: set[int] = set()
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        ids.add(vocab["<|im_end|>"])
    return ids


def load_model(model: str = model_store.DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", progress: bool = True) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    folder = model_store.pull(model, progress=progress)
    if torch.get_num_threads() != default_threads():
        torch.set_num_threads(default_threads())
    # The tokenizer loads in a thread while the weight copies are packed: it is Python and JSON work (SmolLM2 ~1.6 s,
    # gemma3's 33 MB tokenizer.json ~4.5 s) and the packing runs in GIL-free kernels. Started at the very beginning
    # instead, its JSON parsing (which holds the GIL for a whole file) held up the weights' loading until it was done.
    # Kernel timings, when this machine has none remembered, wait for it (KernelChoices' before_measuring). The
    # thread ends with the load, so it leaves no OpenMP pool behind (.threads.in_fresh_thread).
    pool = ThreadPoolExecutor(1, thread_name_prefix="archon-tokenizer")
    pending: list[Future[Any]] = []

    def start_tokenizer() -> None:
        if not pending:
            pending.append(pool.submit(model_store.load_tokenizer, folder))

    def tokenizer_loaded() -> Any:
        start_tokenizer()
        return pending[0].result()

    try:
        runner = ModelRunner(folder, device=device, dtype=dtype, weights_loaded=start_tokenizer,
                             before_timing=tokenizer_loaded)
        tokenizer = tokenizer_loaded()
    finally:
        pool.shutdown()
    # The context is the engine's to enforce (a prompt past it is refused: a 400, exceptions.ContextOverflow); left at
    # the model's context, transformers logs "Token indices sequence length is longer than the specified maximum
    # sequence length ... will result in indexing errors" for such prompts, which are refused, never run.
    tokenizer.model_max_length = TOKENIZER_MAX_LENGTH
    return LoadedModel(model, folder, runner, tokenizer, eos_token_ids(folder, tokenizer), time.perf_counter() - t0)


def load_engine(
    model: str = model_store.DEFAULT_MODEL,
    device: str = "auto",
    dtype: str = "auto",
    max_batch: int = 16,
    progress: bool = True,
    threads: int | str = "auto",
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
    kv_cache_mb: float | str = "auto",
) -> tuple[Engine, LoadedModel]:
    """Load ``model`` and start its engine.  The loading's torch work runs in a thread that then ends, so the
    engine's worker is the only long-lived thread with an OpenMP pool (see :func:`.threads.in_fresh_thread`)."""
    def build() -> tuple[Engine, LoadedModel]:
        loaded = load_model(model, device, dtype, progress)
        engine = Engine(loaded.runner, loaded.tokenizer, loaded.eos_ids, max_batch=max_batch, threads=threads,
                        prefix_cache_mb=prefix_cache_mb, kv_cache_mb=kv_cache_mb)
        return engine, loaded

    engine, loaded = in_fresh_thread(build)
    engine.start()
    return engine, loaded
