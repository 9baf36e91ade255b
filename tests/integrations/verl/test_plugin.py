"""The ``verl.plugins`` entry point: declared, discovered by verl itself on ``import verl``, patching every
module that binds verl's KL functions, reversible, idempotent and version-guarded."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys

import pytest

from kl_patches.modes import KLModeError
from kl_patches.patching import PatchError

#: (module, attribute) -> (defining module, attribute): every place verl 0.9 binds a patched function.
BINDINGS = {
    ("verl.workers.utils.losses", "ppo_loss"): "verl.workers.utils.losses",
    ("verl.workers.engine_workers", "ppo_loss"): "verl.workers.utils.losses",
    ("verl.trainer.distillation.losses", "ppo_loss"): "verl.workers.utils.losses",
    ("verl.trainer.ppo.core_algos", "kl_penalty"): "verl.trainer.ppo.core_algos",
    ("verl.workers.utils.losses", "kl_penalty"): "verl.trainer.ppo.core_algos",
    ("verl.trainer.distillation.losses", "kl_penalty"): "verl.trainer.ppo.core_algos",
    ("verl.trainer.ppo.ray_trainer", "apply_kl_penalty"): "verl.trainer.ppo.ray_trainer",
    ("verl.trainer.ppo.v1.trainer_base", "apply_kl_penalty"): "verl.trainer.ppo.ray_trainer",
    ("verl.experimental.separation.ray_trainer", "apply_kl_penalty"): "verl.trainer.ppo.ray_trainer",
    ("verl.trainer.ppo.ray_trainer", "compute_advantage"): "verl.trainer.ppo.ray_trainer",
    ("verl.trainer.ppo.v1.utils", "compute_advantage"): "verl.trainer.ppo.ray_trainer",
    ("verl.experimental.separation.ray_trainer", "compute_advantage"): "verl.trainer.ppo.ray_trainer",
    ("verl.trainer.ppo.v1.utils", "compute_advantage_for_multi_trajectories"): "verl.trainer.ppo.v1.utils",
    ("verl.trainer.ppo.v1.trainer_base", "compute_advantage_for_multi_trajectories"): "verl.trainer.ppo.v1.utils",
    ("verl.utils.config", "validate_config"): "verl.utils.config",
    ("verl.utils", "validate_config"): "verl.utils.config",
    ("verl.trainer.main_ppo", "validate_config"): "verl.utils.config",
    ("verl.trainer.main_ppo_v0", "validate_config"): "verl.utils.config",
    ("verl.experimental.one_step_off_policy.main_ppo", "validate_config"): "verl.utils.config",
}

#: A fresh interpreter: import verl's trainer and worker modules in the order ``python -m
#: verl.trainer.main_ppo`` and a worker actor do, then report where every binding points.
PROBE = """
import importlib, json, sys
import verl.trainer.main_ppo, verl.workers.engine_workers
bindings = json.loads(sys.argv[1])
import kl_patches.integrations.verl as adapter
report = {"enabled_mode": adapter.enabled_mode(), "plugin_error": adapter.plugin_error(), "bindings": {}}
for key, owner in bindings.items():
    module, attribute = key.split(":")
    value = getattr(importlib.import_module(module), attribute)
    defining = vars(importlib.import_module(owner))[attribute]
    report["bindings"][key] = [bool(getattr(value, "__kl_patches__", False)), value is defining]
print("REPORT" + json.dumps(report))
"""


def run_probe(env_extra: dict | None = None) -> dict:
    env = {**os.environ, **(env_extra or {})}
    bindings = {f"{module}:{attribute}": owner for (module, attribute), owner in BINDINGS.items()}
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(bindings)], capture_output=True, text=True,
                            env=env, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [line for line in result.stdout.splitlines() if line.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


def test_entry_point_is_declared_in_verls_plugin_group():
    points = [ep for ep in importlib.metadata.entry_points(group="verl.plugins") if ep.name == "kl_patches"]
    assert len(points) == 1
    assert points[0].value == "kl_patches.integrations.verl.plugin"
    assert points[0].load().__name__ == "kl_patches.integrations.verl.plugin"


def test_verl_loads_the_plugin_on_import_and_every_binding_is_patched():
    report = run_probe()
    assert report["enabled_mode"] == "library" and report["plugin_error"] is None
    assert report["bindings"] and all(patched and same for patched, same in report["bindings"].values()), report


def test_verls_own_plugin_switch_turns_it_off():
    report = run_probe({"VERL_USE_EXTERNAL_PLUGINS": "none"})
    assert report["enabled_mode"] is None
    assert not any(patched for patched, _ in report["bindings"].values())


def test_in_process_every_binding_points_to_the_patched_function(patched):
    for (module, attribute), owner in BINDINGS.items():
        value = getattr(importlib.import_module(module), attribute)
        assert getattr(value, "__kl_patches__", False), f"{module}.{attribute}"
        assert value is vars(importlib.import_module(owner))[attribute], f"{module}.{attribute}"


def test_disable_restores_every_original_by_identity_and_enable_is_idempotent(patched):
    originals = {}
    for (module, attribute) in BINDINGS:
        originals[(module, attribute)] = getattr(importlib.import_module(module), attribute).__wrapped__
    try:
        assert patched.disable() is True
        assert patched.disable() is False
        for (module, attribute), original in originals.items():
            assert getattr(importlib.import_module(module), attribute) is original
            assert not getattr(original, "__kl_patches__", False)
    finally:
        assert patched.enable("library") is True
    assert patched.enable("library") is False
    for (module, attribute), original in originals.items():
        value = getattr(importlib.import_module(module), attribute)
        assert value.__wrapped__ is original and value.__kl_patches__


def test_enable_with_a_mode_points_to_the_configuration_values(patched):
    import kl_patches

    with pytest.raises(KLModeError, match="kl_loss_type=k1-rtg-loss"):
        kl_patches.enable("verl", "k1-rtg-loss")
    with pytest.raises(KLModeError, match="unknown KL mode"):
        patched.enable("k5")
    assert kl_patches.is_enabled("verl") == "library"


@pytest.fixture
def unsupported_version(monkeypatch, patched):
    """verl reports 0.10.0: outside the verified range."""
    import kl_patches.patching

    patched.disable()
    monkeypatch.setattr(kl_patches.patching, "installed_version", lambda name: "0.10.0")
    yield
    monkeypatch.undo()
    patched.enable("library")


def test_unsupported_verl_version_is_refused_naming_it(unsupported_version, patched):
    with pytest.raises(PatchError, match=r"verl 0\.10\.0 is not supported .*verl>=0\.9\.0,<0\.9\.2"):
        patched.enable("library")
    assert patched.enabled_mode() is None


def test_plugin_on_unsupported_version_logs_and_refuses_kl_patches_values(unsupported_version, monkeypatch, caplog):
    """verl swallows plugin exceptions, so the plugin logs the PatchError and guards validate_config: a run that
    names a kl-patches value stops before any Ray work; verl's own values go to verl untouched."""
    import verl.utils.config

    import kl_patches.integrations.verl as adapter
    from omegaconf import OmegaConf

    calls = []
    monkeypatch.setattr(verl.utils.config, "validate_config", lambda config, *a, **k: calls.append(config))
    monkeypatch.setitem(adapter._plugin_state, "guard", None)
    monkeypatch.setitem(adapter._plugin_state, "error", None)
    with caplog.at_level(logging.ERROR, logger="kl_patches.verl"):
        adapter.install_plugin()
    try:
        assert adapter._plugin_state["guard"] is not None
        assert "verl 0.10.0" in adapter.plugin_error() and "verl 0.10.0" in caplog.text
        ours = OmegaConf.create({"actor_rollout_ref": {"actor": {"use_kl_loss": True, "kl_loss_type": "k1-rtg-loss"}},
                                 "algorithm": {"use_kl_in_reward": False, "kl_penalty": "kl"}})
        theirs = OmegaConf.create({"actor_rollout_ref": {"actor": {"use_kl_loss": True, "kl_loss_type": "low_var_kl"}},
                                   "algorithm": {"use_kl_in_reward": True, "kl_penalty": "kl"}})
        with pytest.raises(PatchError, match="verl 0.10.0"):
            verl.utils.config.validate_config(ours, use_reference_policy=True, use_critic=False)
        assert calls == []
        verl.utils.config.validate_config(theirs, use_reference_policy=True, use_critic=False)
        assert calls == [theirs]
    finally:
        assert adapter.remove_refusal_guard() is True


def test_the_verl_extra_installs_only_supported_versions():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from kl_patches.integrations.verl import SUPPORTED

    requirements = [Requirement(text) for text in importlib.metadata.requires("kl-patches") or []]
    verl = [r for r in requirements if r.name == "verl" and r.marker and r.marker.evaluate({"extra": "verl"})]
    assert len(verl) == 1 and verl[0].specifier == SpecifierSet(SUPPORTED)
    assert importlib.metadata.version("verl") in SpecifierSet(SUPPORTED)
