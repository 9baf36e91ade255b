"""Any import order arms the mode: each order runs in a fresh interpreter with KL_PATCHES_MODE set (the .pth
autoloader patches on import, as in a Ray worker)."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import importlib, json, sys
from kl_patches.integrations.openrlhf.placeholders import install_placeholders
install_placeholders()
for name in sys.argv[1:]:
    importlib.import_module(name)
from kl_patches.integrations.openrlhf.patches import patched_targets, integration
import openrlhf.trainer.ray.ppo_actor as actor
print(json.dumps({"targets": patched_targets(), "mode": integration.mode,
                  "watch_gone": type(sys.modules["openrlhf.trainer.ray"]).__name__ == "module"}))
"""

ORDERS = [
    ["openrlhf.trainer.ray.ppo_actor"],  # the first OpenRLHF import is the actor module (failed before)
    ["openrlhf.models.utils", "openrlhf.trainer.ray.ppo_actor"],
    ["openrlhf.trainer.ppo_utils.experience_maker", "openrlhf.trainer.ray.ppo_actor"],
]


@pytest.mark.parametrize("order", ORDERS, ids=lambda order: " then ".join(order))
def test_any_import_order_patches_training_step_after_the_module_loaded(order):
    env = {**os.environ, "KL_PATCHES_MODE": "k1-rtg-loss"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *order], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mode"] == "k1-rtg-loss" and result["watch_gone"]
    targets = result["targets"]
    assert targets["openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer.training_step"], targets
    assert all(targets.values()), targets
