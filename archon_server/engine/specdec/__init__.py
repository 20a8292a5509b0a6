"""SpecDec++ adaptive speculative decoding for the local engine.

Seams: :mod:`.verify` (pure verification rules), :mod:`.policies` (stop rules),
:mod:`.draft` (EAGLE draft layer + acceptance head), :mod:`.generate` (the loop and its
model wrappers), :mod:`.serve` (the LocalBackend hook), :mod:`.train` / :mod:`.bench`.
"""

from .generate import EagleDrafter, SpecStats, TargetModel, autoregressive_generate, speculative_generate
from .policies import StopPolicy, make_policy
from .sampling import SamplingConfig
from .verify import VerifyMode, verify

__all__ = ["EagleDrafter", "SamplingConfig", "SpecStats", "StopPolicy", "TargetModel", "VerifyMode",
           "autoregressive_generate", "make_policy", "speculative_generate", "verify"]
