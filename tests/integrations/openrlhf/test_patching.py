import os
import subprocess
import sys
import textwrap

import pytest

import kl_patches
import openrlhf.models.utils as utils
import openrlhf.trainer.ppo_utils.experience_maker as experience_maker
import openrlhf.trainer.ray.ppo_actor as ppo_actor
from kl_patches.integrations import openrlhf as adapter
from kl_patches.integrations.openrlhf import patches
from kl_patches.modes import MODES, KLModeError
from kl_patches.patching import MARKER, PatchError

ORIGINAL_KL = utils.compute_approx_kl
ORIGINAL_STEP = vars(ppo_actor.ActorPPOTrainer)["training_step"]
ORIGINAL_REWARD = utils.compute_reward


def test_originals_are_unpatched_at_start():
    assert not getattr(ORIGINAL_KL, MARKER, False) and not getattr(ORIGINAL_STEP, MARKER, False)
    assert experience_maker.compute_approx_kl is ORIGINAL_KL and ppo_actor.compute_approx_kl is ORIGINAL_KL


@pytest.mark.parametrize("mode", ["k1-in-reward", "k1-rtg-loss"])
def test_enable_patches_every_copy_and_disable_restores_the_exact_objects(mode):
    assert adapter.enable(mode) is True
    assert adapter.enabled_mode() == mode
    replacement = utils.compute_approx_kl
    assert getattr(replacement, MARKER) and replacement.__wrapped__ is ORIGINAL_KL
    assert experience_maker.compute_approx_kl is replacement and ppo_actor.compute_approx_kl is replacement
    step = vars(ppo_actor.ActorPPOTrainer)["training_step"]
    assert getattr(step, MARKER) and step.__wrapped__ is ORIGINAL_STEP
    assert all(patches.patched_targets().values())
    assert utils.compute_reward is ORIGINAL_REWARD  # its KL handling is already exact: left alone

    assert adapter.enable(mode) is False  # idempotent
    assert adapter.disable() is True
    assert adapter.disable() is False
    assert utils.compute_approx_kl is ORIGINAL_KL
    assert experience_maker.compute_approx_kl is ORIGINAL_KL and ppo_actor.compute_approx_kl is ORIGINAL_KL
    assert vars(ppo_actor.ActorPPOTrainer)["training_step"] is ORIGINAL_STEP
    assert not any(patches.patched_targets().values())


def test_switching_modes_and_the_library_mode_patch_nothing_else():
    adapter.enable("k1-in-reward")
    adapter.enable("k1-rtg-loss")
    assert adapter.enabled_mode() == "k1-rtg-loss"
    assert utils.compute_approx_kl.__wrapped__ is ORIGINAL_KL  # no replacement wrapped around a replacement
    adapter.enable("library")
    assert adapter.enabled_mode() == "library"
    assert utils.compute_approx_kl is ORIGINAL_KL and vars(ppo_actor.ActorPPOTrainer)["training_step"] is ORIGINAL_STEP


def test_top_level_api_and_unknown_mode():
    assert kl_patches.enable("openrlhf", "k1-rtg-loss") is True
    assert kl_patches.is_enabled("openrlhf") == "k1-rtg-loss"
    assert kl_patches.disable("openrlhf") is True
    with pytest.raises(KLModeError, match="unknown KL mode"):
        adapter.enable("k3-in-reward")
    assert utils.compute_approx_kl is ORIGINAL_KL


def test_copy_bound_while_enabled_is_restored_on_disable():
    adapter.enable("k1-rtg-loss")
    late = type(sys)("openrlhf._kl_patches_test_late_importer")
    late.compute_approx_kl = utils.compute_approx_kl  # what `from openrlhf.models.utils import ...` binds now
    sys.modules[late.__name__] = late
    try:
        adapter.disable()
        assert late.compute_approx_kl is ORIGINAL_KL
    finally:
        del sys.modules[late.__name__]


def test_unsupported_version_is_refused_naming_the_version(monkeypatch):
    import kl_patches.patching as patching

    monkeypatch.setattr(patching, "installed_version", lambda distribution: "0.10.4")
    with pytest.raises(PatchError, match=r"openrlhf 0\.10\.4 is not supported .*closest supported release is "
                                         r"openrlhf>=0\.11\.0,<0\.12"):
        adapter.enable("k1-rtg-loss")
    with pytest.raises(PatchError, match="0.10.4"):
        adapter.autoload("k1-in-reward")
    assert utils.compute_approx_kl is ORIGINAL_KL


@pytest.mark.parametrize("version,closest", [
    ("0.9.0", "==0.9.3"), ("0.9.10", "==0.9.3"), ("0.8.11", "==0.9.3"), ("0.10.0", ">=0.11.0,<0.12"),
    ("0.12.0", ">=0.11.0,<0.12"), ("1.0.0", ">=0.11.0,<0.12"),
])
def test_every_other_release_is_refused_with_the_closest_supported_one(monkeypatch, version, closest):
    import re

    import kl_patches.patching as patching

    monkeypatch.setattr(patching, "installed_version", lambda distribution: version)
    with pytest.raises(PatchError, match=re.escape(f"openrlhf {version} is not supported") + ".*" +
                       re.escape(f"the closest supported release is openrlhf{closest}")):
        adapter.enable("k1-rtg-loss")
    assert utils.compute_approx_kl is ORIGINAL_KL


def test_a_moved_target_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.delattr(ppo_actor, "ActorPPOTrainer")
    with pytest.raises(PatchError, match="ActorPPOTrainer; it is missing"):
        adapter.enable("k1-rtg-loss")
    assert utils.compute_approx_kl is ORIGINAL_KL  # all-or-nothing


CHILD = textwrap.dedent("""
    import json, sys
    from kl_patches.integrations.openrlhf.placeholders import install_placeholders
    install_placeholders()
    import openrlhf.models.utils                       # the .pth autoloader's hook patches here ...
    import openrlhf.trainer.ppo_utils.experience_maker
    import openrlhf.trainer.ray.ppo_actor              # ... and training_step when its module appears
    from kl_patches.integrations.openrlhf import enabled_mode
    from kl_patches.integrations.openrlhf.patches import patched_targets
    print(json.dumps({"mode": enabled_mode(), "targets": patched_targets()}))
""")


def _child(env_mode, cwd):
    env = {k: v for k, v in os.environ.items() if k != "KL_PATCHES_MODE"}
    if env_mode is not None:
        env["KL_PATCHES_MODE"] = env_mode
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=240,
                          cwd=cwd)  # not the checkout: its kl_patches/ would shadow the installed package


def test_kl_patches_mode_variable_patches_a_fresh_process_and_its_absence_does_not(tmp_path):
    import json

    on = _child("k1-rtg-loss", tmp_path)
    assert on.returncode == 0, on.stderr[-3000:]
    state = json.loads(on.stdout.strip().splitlines()[-1])
    assert state["mode"] == "k1-rtg-loss"
    assert len(state["targets"]) == 4 and all(state["targets"].values()), state
    off = _child(None, tmp_path)
    assert off.returncode == 0, off.stderr[-3000:]
    state = json.loads(off.stdout.strip().splitlines()[-1])
    assert state["mode"] is None and not any(state["targets"].values())


def test_ray_setup_hook_refuses_an_unknown_or_missing_mode(monkeypatch):
    from kl_patches.integrations.openrlhf import ray_hooks

    monkeypatch.setenv("KL_PATCHES_MODE", "k3")
    with pytest.raises(KLModeError, match="KL_PATCHES_MODE='k3'"):
        ray_hooks.setup_worker()
    monkeypatch.delenv("KL_PATCHES_MODE")
    with pytest.raises(RuntimeError, match="without KL_PATCHES_MODE"):
        ray_hooks.setup_worker()
    monkeypatch.setenv("KL_PATCHES_MODE", "k1-in-reward")
    ray_hooks.setup_worker()  # openrlhf.models.utils is loaded: the hook patches at once
    assert adapter.enabled_mode() == "k1-in-reward"


def test_modes_are_the_core_vocabulary():
    assert MODES == ("library", "k1-in-reward", "k1-rtg-loss")
