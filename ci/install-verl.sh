#!/usr/bin/env bash
# verl for the `verl` nox session, CPU only; runs inside the session's virtualenv (torch 2.13.0 CPU already there).
#
# verl installs normally on CPU: its base requirements (ray[default], transformers<5.11, tensordict, hydra, ...)
# are all pure-Python or ship CPU wheels, and the constraints file keeps torch at the local CPU build.
# Beyond them, the modules kl-patches patches import:
#   cachetools, uvicorn, fastapi   verl/trainer/ppo/ray_trainer.py (legacy trainer, apply_kl_penalty, compute_advantage)
#   TransferQueue                  verl/trainer/ppo/v1/* (the V1 trainer: trainer_base, utils)
# (all declared by verl's own `verl-core` extra, which also pulls CUDA-only packages, hence listed here).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --disable-pip-version-check -c ci/constraints.txt \
    "verl==0.9.1" "transformers<5.11" "TransferQueue>=0.1.10" cachetools uvicorn fastapi
python - <<'PY'
import importlib
for module in ("verl.workers.utils.losses", "verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.trainer_base",
               "verl.workers.engine_workers", "verl.trainer.main_ppo"):
    importlib.import_module(module)
import verl, torch
print(f"verl {verl.__version__} with torch {torch.__version__}: the modules kl-patches patches import")
PY
