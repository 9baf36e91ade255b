#!/usr/bin/env bash
# CPU install of TRL into the current Python environment (a nox session's venv; torch already there).
#
#     bash ci/install-trl.sh [VERSION]     # 1.16.0 (default: the `trl` session) or 0.24.0 (`trl-0.24`)
#
# TRL brings transformers, accelerate and datasets; nothing CUDA-only is imported on the paths kl-patches uses.
# TRL 0.24 needs transformers >= 4.56 and predates transformers 5: 4.57.6 is the newest 4.x, and one that Unsloth
# also accepts (it excludes 4.57.4/4.57.5). TRL 0.24 computes log-probs with the model's own forward (no fused
# Triton kernel), so it trains on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${1:-1.16.0}"
case "$VERSION" in
    1.16.0) PINS=() ;;
    0.24.0) PINS=("transformers==4.57.6") ;;
    *) echo "ci/install-trl.sh: no recipe for trl $VERSION (known: 1.16.0, 0.24.0)" >&2; exit 2 ;;
esac
python -m pip install --quiet -c ci/constraints.txt "trl==$VERSION" ${PINS[@]+"${PINS[@]}"}
python -c "import trl, transformers, accelerate, datasets; print('trl', trl.__version__, 'transformers', transformers.__version__)"
