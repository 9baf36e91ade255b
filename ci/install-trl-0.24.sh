#!/usr/bin/env bash
# CPU install of TRL 0.24 for the `trl-0.24` nox session (inside the session's virtual environment, torch already
# there). TRL 0.24 needs transformers >= 4.56 and predates transformers 5: 4.57.6 is the newest 4.x, and one that
# Unsloth also accepts (it excludes 4.57.4/4.57.5). TRL 0.24 computes log-probs with the model's own forward (no
# fused Triton kernel), so it trains on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet -c ci/constraints.txt "trl==0.24.0" "transformers==4.57.6"
python -c "import trl, transformers, accelerate, datasets; print('trl', trl.__version__, 'transformers', transformers.__version__)"
