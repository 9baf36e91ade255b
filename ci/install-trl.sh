#!/usr/bin/env bash
# CPU install of TRL for the `trl` nox session (run inside the session's virtual environment, torch already there).
# TRL 1.16 brings transformers, accelerate and datasets; nothing CUDA-only is imported on the paths kl-patches uses.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -c ci/constraints.txt "trl==1.16.0"
python -c "import trl, transformers, accelerate, datasets; print('trl', trl.__version__, 'transformers', transformers.__version__)"
