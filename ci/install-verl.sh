#!/usr/bin/env bash
# verl for the `verl` nox sessions, CPU only; runs inside the session's virtualenv (torch 2.13.0 CPU already there).
#
#   bash ci/install-verl.sh           verl 0.9.1 (session `verl`)
#   bash ci/install-verl.sh 0.8.0     verl 0.8.0 (session `verl-0.8`)
#
# verl installs normally on CPU: its base requirements (ray[default], transformers, tensordict, hydra, ...) are all
# pure-Python or ship CPU wheels, and the constraints file keeps torch at the local CPU build.
# Beyond them, the modules kl-patches patches import:
#   cachetools, uvicorn, fastapi   verl/trainer/ppo/ray_trainer.py (legacy trainer, apply_kl_penalty, compute_advantage)
#   TransferQueue                  0.9: verl/trainer/ppo/v1/* (the V1 trainer: trainer_base, utils); 0.8's
#                                  main_ppo_sync falls back to verl's own stub without it
# (all declared by verl's own `verl-core` extra, which also pulls CUDA-only packages, hence listed here).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-0.9.1}"
case "$VERSION" in
    0.9.*) EXTRA=("transformers<5.11" "TransferQueue>=0.1.10")
           MODULES='"verl.trainer.ppo.v1.trainer_base", "verl.trainer.main_ppo_v0"' ;;
    0.8.*) EXTRA=("transformers<5.11" "pyarrow<26")  # verl 0.8 pins numpy<2; pyarrow 26 needs numpy 2
           MODULES='"verl.trainer.main_ppo_sync"' ;;
    *) echo "ci/install-verl.sh: no recipe for verl $VERSION (kl-patches supports 0.8.0 and 0.9.0-0.9.1)" >&2; exit 2 ;;
esac
python -m pip install --disable-pip-version-check -c ci/constraints.txt \
    "verl==$VERSION" "${EXTRA[@]}" cachetools uvicorn fastapi
python - <<PY
import importlib
for module in ("verl.workers.utils.losses", "verl.trainer.ppo.ray_trainer", "verl.workers.engine_workers",
               "verl.trainer.main_ppo", $MODULES):
    importlib.import_module(module)
import verl, torch
assert verl.__version__ == "$VERSION", verl.__version__
print(f"verl {verl.__version__} with torch {torch.__version__}: the modules kl-patches patches import")
PY
