"""KL_PATCHES_MODE in the environment patches TRL in any fresh Python process that imports it (the .pth
autoloader -> kl_patches._autoload -> kl_patches.integrations.trl.autoload); unset, nothing happens."""

import os
import subprocess
import sys

import pytest

OUTSIDE = os.path.dirname(sys.executable)

PROBE = """
import sys, trl
deferred = 'trl.trainer.grpo_trainer' not in sys.modules   # `import trl` is lazy: the patch waits for the trainer
from kl_patches.patching import is_patched
import kl_patches
cls = trl.GRPOTrainer
print(deferred, all(is_patched(cls, n) for n in ('_generate_and_score_completions', '_compute_loss', 'compute_loss')),
      kl_patches.is_enabled('trl'))
"""


def run(code, mode=None):
    env = {k: v for k, v in os.environ.items() if k != "KL_PATCHES_MODE"}
    if mode is not None:
        env["KL_PATCHES_MODE"] = mode
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=OUTSIDE)


@pytest.mark.parametrize("mode", ["k1-in-reward", "k1-rtg-loss"])
def test_fresh_process_with_the_variable_finds_grpo_trainer_patched(mode):
    result = run(PROBE, mode)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", mode]


def test_fresh_process_without_the_variable_is_untouched():
    result = run(PROBE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "None"]


def test_library_mode_in_the_environment_is_inert():
    result = run(PROBE, "library")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "None"]


def test_an_unknown_value_is_reported_at_start_up_and_trl_refuses_to_import():
    started = run("print('started')", "k3-in-loss")
    assert started.returncode == 0 and "started" in started.stdout
    assert "KL_PATCHES_MODE='k3-in-loss'" in started.stderr and "unknown KL mode" in started.stderr
    refused = run("import trl", "k3-in-loss")
    assert refused.returncode != 0 and "KLModeError" in refused.stderr


def test_patched_when_the_trainer_was_imported_directly():
    result = run("from trl.trainer.grpo_trainer import GRPOTrainer as G; from kl_patches.patching import "
                 "is_patched; print(is_patched(G, '_compute_loss'))", "k1-rtg-loss")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]
