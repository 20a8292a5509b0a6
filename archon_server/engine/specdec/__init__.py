"""SpecDec++ adaptive speculative decoding for the local engine.

Seams: :mod:`.verify` (pure verification rules), :mod:`.policies` (stop rules),
:mod:`.draft` (EAGLE draft layer + acceptance head), :mod:`.generate` (the loop and its
model wrappers), :mod:`.serve` (the LocalBackend hook).  Training and the policy benchmark are
offline tooling outside the package: ``training/specdec/`` in a checkout.

Names are imported lazily: the `archon` CLI loads :mod:`.cli` at every start, and that must
not pull in torch (an HTTP-only server would carry ~200 MB for nothing).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EagleDrafter": ".generate", "SpecStats": ".generate", "TargetModel": ".generate",
    "autoregressive_generate": ".generate", "speculative_generate": ".generate",
    "StopPolicy": ".policies", "make_policy": ".policies", "SamplingConfig": ".sampling",
    "VerifyMode": ".verify", "verify": ".verify",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(name)
