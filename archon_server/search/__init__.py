"""Architecture search: Optuna studies over Archon / MoA / Self-MoA graphs.

Layers (each swappable): :mod:`.config` (search files), :mod:`.space` (define-by-run
sampling + validity rules), :mod:`.evaluator` (the Evaluator protocol, a scripted
evaluator), :mod:`.bench_eval` (the real evaluator on bench + graph runtime),
:mod:`.objective` (one trial: budget, duplicates, cheap-first stages),
:mod:`.samplers` (sampler/pruner factories), :mod:`.storage` (RDB + heartbeats),
:mod:`.runner` (worker loop, finalize), :mod:`.report` (export + report), :mod:`.cli`.
Nothing here imports the HTTP layer.
"""

from archon_server.search.config import SearchConfig, load_search_config, parse_search_config
from archon_server.search.evaluator import EvalResult, Evaluator, Landscape, ScriptedEvaluator
from archon_server.search.space import architecture_key, check_rules, sample_architecture

__all__ = [
    "EvalResult",
    "Evaluator",
    "Landscape",
    "ScriptedEvaluator",
    "SearchConfig",
    "architecture_key",
    "check_rules",
    "load_search_config",
    "parse_search_config",
    "sample_architecture",
]
