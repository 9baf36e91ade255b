#!/usr/bin/env bash
# OpenRLHF 0.11.2 on a CPU-only machine, into the current Python environment (the nox session's venv).
#
# OpenRLHF's declared dependencies include flash-attn and vLLM, which need CUDA to build/install. Its KL code does
# not use them, so OpenRLHF is installed with --no-deps, followed by the pure-Python packages its modules import and
# DeepSpeed (built against the torch already installed, hence --no-build-isolation). The tests then call
# kl_patches.integrations.openrlhf.placeholders.install_placeholders(), which stands in for flash_attn / vllm only
# where they are missing. torch must already be installed (pinned by ci/constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

# --no-warn-conflicts: pip would list every declared dependency left out on purpose (flash-attn, vllm, wandb, ...).
PIP=(python -m pip install --quiet --disable-pip-version-check --no-warn-conflicts -c ci/constraints.txt)

python -c "import torch" || { echo "install torch first (pip install -c ci/constraints.txt torch==2.13.0)" >&2; exit 1; }

"${PIP[@]}" --no-deps "openrlhf==0.11.2"
# What openrlhf.cli.train_ppo_ray, openrlhf.trainer.ray.ppo_actor and openrlhf.trainer.ppo_utils.experience_maker
# import, at OpenRLHF 0.11.2's pins where it has them.
"${PIP[@]}" "transformers==5.15.0" "ray==2.55.0" "huggingface-hub>=1.0.0" "optree>=0.15.0" \
    peft accelerate torchdata einops jsonlines sympy pylatexenc tqdm aiohttp pillow packaging
# DeepSpeed compiles nothing at install time on CPU (ops are JIT), but its setup.py imports torch.
"${PIP[@]}" --no-build-isolation "deepspeed==0.19.6"

python - <<'PY'
import importlib.metadata as m
print("openrlhf", m.version("openrlhf"), "| deepspeed", m.version("deepspeed"), "| transformers",
      m.version("transformers"), "| ray", m.version("ray"), "| torch", m.version("torch"))
PY
