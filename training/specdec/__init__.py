"""SpecDec++ offline tooling: data building, draft/head training, the policy benchmark.

``python -m training.specdec build-data | merge-data | train-draft | train-head | bench`` from a
checkout (it reads the benchmark data beside it).  The serving side lives in
:mod:`archon_server.engine.specdec`; what is trained here lands in its ``artifacts/``.
"""
