#!/usr/bin/env bash
# OpenRLHF on a CPU-only machine, into the current Python environment (the nox session's venv).
#
#     bash ci/install-openrlhf.sh [VERSION]      # 0.11.2 (default: the `openrlhf` session) or 0.9.3 (`openrlhf-0.9`)
#
# OpenRLHF's declared dependencies include flash-attn and vLLM, which need CUDA to build/install. Its KL code does
# not use them, so OpenRLHF is installed with --no-deps, followed by the pure-Python packages its modules import and
# DeepSpeed (built against the torch already installed, hence --no-build-isolation), at the versions that release
# pins. The tests then call kl_patches.integrations.openrlhf.placeholders.install_placeholders(), which stands in for
# flash_attn / vllm only where they are missing. torch must already be installed (pinned by ci/constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="${1:-0.11.2}"
# What openrlhf.cli.train_ppo_ray, openrlhf.trainer.ray.ppo_actor and openrlhf.trainer.ppo_utils.experience_maker
# import, at each release's own pins (its wheel's Requires-Dist) where it has them.
case "$VERSION" in
    0.11.2) PINS=("transformers==5.15.0" "ray==2.55.0" "huggingface-hub>=1.0.0"); DEEPSPEED="deepspeed==0.19.6" ;;
    0.9.3) PINS=("transformers==4.57.6" "ray==2.48.0"); DEEPSPEED="deepspeed==0.18.5" ;;
    *) echo "ci/install-openrlhf.sh: no recipe for openrlhf $VERSION (known: 0.11.2, 0.9.3)" >&2; exit 2 ;;
esac

# --no-warn-conflicts: pip would list every declared dependency left out on purpose (flash-attn, vllm, wandb, ...).
PIP=(python -m pip install --quiet --disable-pip-version-check --no-warn-conflicts -c ci/constraints.txt)

python -c "import torch" || { echo "install torch first (pip install -c ci/constraints.txt torch==2.13.0)" >&2; exit 1; }

"${PIP[@]}" --no-deps "openrlhf==$VERSION"
"${PIP[@]}" "${PINS[@]}" "optree>=0.15.0" peft accelerate torchdata einops jsonlines sympy pylatexenc tqdm aiohttp \
    pillow packaging
# DeepSpeed compiles nothing at install time on CPU (ops are JIT), but its setup.py imports torch.
"${PIP[@]}" --no-build-isolation "$DEEPSPEED"

python - "$VERSION" <<'PY'
import importlib.metadata as m
import sys

installed = m.version("openrlhf")
assert installed == sys.argv[1], f"openrlhf {installed} installed, {sys.argv[1]} asked for"
print("openrlhf", installed, "| deepspeed", m.version("deepspeed"), "| transformers",
      m.version("transformers"), "| ray", m.version("ray"), "| torch", m.version("torch"))
PY
