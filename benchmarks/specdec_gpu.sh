#!/usr/bin/env bash
# The SpecDec++ benchmark on a CUDA machine: the same sweep as on the CPU, target in bf16 on
# the GPU, results next to the CPU ones.  Run from the repository root:
#
#   benchmarks/specdec_gpu.sh OUT_DIR [GGUF]
#
# GGUF: a copy of SmolLM2-135M-Instruct.Q4_1.gguf for a machine that cannot pip-install the
# model package (it is SHA256-checked and converted once).  Set ARCHON_DATA_DIR if the
# benchmark data is not at ../shared/data.  Writes OUT_DIR/results_{greedy,ngram_greedy}.json,
# the Pareto plots and OUT_DIR/log.txt; each stage has a time limit so one slow stage cannot
# eat the rest.
set -uo pipefail
OUT=${1:?usage: benchmarks/specdec_gpu.sh OUT_DIR [GGUF]}
GGUF=${2:-}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

python3 -m archon_server.engine.cli models pull smollm2-135m-instruct ${GGUF:+--gguf "$GGUF"} || exit 1

# the speculative loop on this device with a tiny random target (wrong-device tensors show up here)
[ -n "${SKIP_DEVICE_TESTS:-}" ] || timeout 180 python3 -m pytest --noconftest -q -p no:cacheprovider tests/test_specdec_devices.py || exit 1

# On a GPU a verification pass costs about the same for 1 or 20 tokens, so longer fixed K and
# the unbounded adaptive rules are the interesting part of the sweep (K 1..3 caps are CPU-specific).
CONFIGS=fixed:1,fixed:2,fixed:3,fixed:4,fixed:6,fixed:8,heuristic:5,confidence:0.4,cumprob:0.3,cumprob:0.5,cumprob:0.7,specdec_pp:0.3,specdec_pp:0.5,specdec_pp:0.7,specdec_pp:0.9,specdec_pp/proposer:0.3,specdec_pp/proposer:0.5,specdec_pp/proposer:0.7
timeout 300 python3 benchmarks/specdec.py --device cuda --n-alpaca 12 --n-ood 3 --max-new 96 --out "$OUT" \
  --configs "$CONFIGS"
timeout 120 python3 benchmarks/specdec.py --device cuda --n-alpaca 12 --n-ood 3 --max-new 96 --out "$OUT" \
  --drafter ngram --configs fixed:1,fixed:3,fixed:5,fixed:8,heuristic:5
