"""Benchmarks: datasets, faithful metrics, a sandbox for generated code, judges, and sweeps.

Modules (dependencies point downwards only; nothing here imports ``archon_server.api``):

* ``alpaca_eval`` — AlpacaEval 2.0 raw and length-controlled win rates (pure functions);
* ``datasets`` / ``paths`` — benchmark items from the read-only data folder, splits, subsets;
* ``grading`` — MATH (math-verify), MMLU, CRUXEval and HumanEval (sandboxed) graders;
* ``sandbox`` — run untrusted Python with namespaces/rlimits (``run_python``, ``run_tests``);
* ``judges`` — AlpacaEval / MT-Bench / Arena-Hard judges over any Backend;
* ``cache`` / ``sweep`` / ``report`` / ``cli`` — cached, resumable sweeps and their reports.
* ``definition`` — the version stored with a sweep's and a search study's definition (resume across upgrades).
"""
