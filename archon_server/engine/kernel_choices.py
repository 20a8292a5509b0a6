"""The engine's measured kernel choices, remembered per machine, model and torch build.

Why: :class:`~.runner.ModelRunner` measures at load which weight products are fastest on this CPU (oneDNN or MKL;
oneDNN's packed weights or not; up to how many token rows the small-batch copies win). On the 2-core AVX2 EPYC that
is ~2 s of a ~12 s warm start, and the same host gives the same answers each time. The first load measures and writes the
answers to ``$ARCHON_CACHE_DIR/kernel-choices.json``; a later load with the same fingerprint (CPU model and flags,
usable cores, torch threads, torch version, the model file, dtype and kind of small-batch weights) reads them. The
correctness probes still run at every load (``pack_fp16``, ``pack_for_decode``, ``onednn_faster``): only the timing is
skipped. Delete
the file to measure again (after a measurement under unusual load, say: the load average at the time is recorded
beside each entry).

A hand-written JSON file rather than a library: one small dict per fingerprint, written atomically (a temporary file
renamed over it); two processes racing write equally valid answers and the last one stays.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from . import model_store

T = TypeVar("T")


def path() -> Path:
    return model_store.cache_dir().parent / "kernel-choices.json"


@functools.cache
def cpu() -> tuple[str, frozenset[str]]:
    """The first processor's model name and flags (``/proc/cpuinfo``; the machine's name and no flags where there is
    none): what decides which kernels exist and how fast they run."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine, frozenset()
    block = text.split("\n\n", 1)[0]
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
    return fields.get("model name", ""), frozenset(fields.get("flags", "").split())


def machine_fingerprint() -> dict[str, Any]:
    """What a choice no model enters (the CPU dtype: ``runner.pick_dtype``) depends on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    model, flags = cpu()
    flags_id = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16]
    return {"cpu": f"{model} | {flags_id}", "cores": cores, "threads": torch.get_num_threads(), "torch": torch.__version__}


def fingerprint(model_file: Path, dtype: torch.dtype, small_kind: str) -> dict[str, Any]:
    """What a remembered choice depends on: a change in any of these measures again."""
    st = model_file.stat()
    return {**machine_fingerprint(), "model": f"{model_file.resolve()} {st.st_size} {st.st_mtime_ns}", "dtype": str(dtype),
            "small": small_kind}


class KernelChoices:
    """Choices for one fingerprint: :meth:`get` returns a remembered answer or measures it; :meth:`save` writes
    what was measured. A cache that cannot be read or written is measured around, never an error.

    ``before_measuring`` runs once, before the first measurement: a remembered answer outlives the load that
    measured it, so work running beside the load (the tokenizer, :func:`~.loader.load_model`) finishes first and
    the timings see the cores as decoding will."""

    def __init__(self, key: dict[str, Any], before_measuring: Callable[[], object] | None = None):
        self.key = key
        self._before_measuring = before_measuring
        self.id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.remembered: dict[str, Any] = self._read().get(self.id, {}).get("choices", {})
        self.measured: dict[str, Any] = {}

    @staticmethod
    def _read() -> dict[str, Any]:
        try:
            data = json.loads(path().read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, name: str, measure: Callable[[], T]) -> T:
        if name in self.remembered:
            return self.remembered[name]
        if self._before_measuring is not None:
            self._before_measuring()
            self._before_measuring = None
        value = self.measured[name] = measure()
        return value

    def save(self) -> None:
        if not self.measured:
            return
        data = self._read()
        entry = data.get(self.id, {})
        entry.update(key=self.key, choices={**entry.get("choices", {}), **self.remembered, **self.measured},
                     measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"), load_average=round(os.getloadavg()[0], 2))
        data[self.id] = entry
        target = path()
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, target)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
