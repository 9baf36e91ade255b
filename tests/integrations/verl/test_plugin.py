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

from kl_patches.integrations.verl import compat

VERL = importlib.metadata.version("verl")
ENTRY_POINTS = compat.loads_entry_points(VERL)
#: what makes verl load the plugin in a fresh process: nothing on 0.9 (entry point); the variable on 0.8
LOAD_ENV = {} if ENTRY_POINTS else {compat.PLUGIN_ENV: compat.PLUGIN_MODULE}

#: (module, attribute) -> defining module: every place verl binds a patched function, in every supported version
COMMON_BINDINGS = {
    ("verl.workers.utils.losses", "ppo_loss"): "verl.workers.utils.losses",
    ("verl.workers.engine_workers", "ppo_loss"): "verl.workers.utils.losses",
    ("verl.trainer.distillation.losses", "ppo_loss"): "verl.workers.utils.losses",
    ("verl.trainer.ppo.core_algos", "kl_penalty"): "verl.trainer.ppo.core_algos",
    ("verl.workers.utils.losses", "kl_penalty"): "verl.trainer.ppo.core_algos",
    ("verl.trainer.distillation.losses", "kl_penalty"): "verl.trainer.ppo.core_algos",
    ("verl.trainer.ppo.ray_trainer", "apply_kl_penalty"): "verl.trainer.ppo.ray_trainer",
    ("verl.experimental.separation.ray_trainer", "apply_kl_penalty"): "verl.trainer.ppo.ray_trainer",
    ("verl.trainer.ppo.ray_trainer", "compute_advantage"): "verl.trainer.ppo.ray_trainer",
    ("verl.experimental.separation.ray_trainer", "compute_advantage"): "verl.trainer.ppo.ray_trainer",
    ("verl.utils.config", "validate_config"): "verl.utils.config",
    ("verl.utils", "validate_config"): "verl.utils.config",
    ("verl.trainer.main_ppo", "validate_config"): "verl.utils.config",
    ("verl.experimental.one_step_off_policy.main_ppo", "validate_config"): "verl.utils.config",
}
#: the agent-session trainer: verl 0.9's V1 trainer, verl 0.8's main_ppo_sync
VERSION_BINDINGS = {
    "0.9": {
        ("verl.trainer.ppo.v1.trainer_base", "apply_kl_penalty"): "verl.trainer.ppo.ray_trainer",
        ("verl.trainer.ppo.v1.utils", "compute_advantage"): "verl.trainer.ppo.ray_trainer",
        ("verl.trainer.ppo.v1.utils", "compute_advantage_for_multi_trajectories"): "verl.trainer.ppo.v1.utils",
        ("verl.trainer.ppo.v1.trainer_base", "compute_advantage_for_multi_trajectories"): "verl.trainer.ppo.v1.utils",
        ("verl.trainer.main_ppo_v0", "validate_config"): "verl.utils.config",
    },
    "0.8": {
        ("verl.trainer.main_ppo_sync", "apply_kl_penalty"): "verl.trainer.ppo.ray_trainer",
        ("verl.trainer.main_ppo_sync", "compute_advantage"): "verl.trainer.ppo.ray_trainer",
        ("verl.trainer.main_ppo_sync", "compute_advantage_for_multi_trajectories"): "verl.trainer.main_ppo_sync",
        ("verl.trainer.main_ppo_sync", "validate_config"): "verl.utils.config",
    },
}
BINDINGS = {**COMMON_BINDINGS, **VERSION_BINDINGS[".".join(VERL.split(".")[:2])]}

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
    env = {key: value for key, value in os.environ.items() if key != compat.PLUGIN_ENV}
    env.update(env_extra or {})
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
    """0.9: the entry point alone; 0.8: verl's VERL_USE_EXTERNAL_MODULES naming the plugin (the documented way)."""
    report = run_probe(LOAD_ENV)
    assert report["enabled_mode"] == "library" and report["plugin_error"] is None
    assert report["bindings"] and all(patched and same for patched, same in report["bindings"].values()), report


def test_without_verls_loading_mechanism_nothing_is_patched():
    """0.9: verl's own plugin switch turns it off; 0.8: without VERL_USE_EXTERNAL_MODULES verl never loads it."""
    report = run_probe({"VERL_USE_EXTERNAL_PLUGINS": "none"} if ENTRY_POINTS else {})
    assert report["enabled_mode"] is None
    assert not any(patched for patched, _ in report["bindings"].values())


def test_every_version_specific_target_module_is_patched_on_the_installed_version(patched):
    """The targets table holds both versions' agent-session trainer rows; only the installed verl's are armed."""
    from kl_patches.integrations.verl import TARGETS

    modules = patched.target_modules()
    absent = [target for target in TARGETS if target.module not in modules]
    for target in patched.targets:
        module = importlib.import_module(target.module)  # exists in this version
        assert getattr(vars(module)[target.attribute], "__kl_patches__", False), target.path
    # the other version's agent-session trainer module, which this verl does not have
    assert len(absent) == 1 and absent[0].attribute == "compute_advantage_for_multi_trajectories"
    with pytest.raises(ImportError):
        importlib.import_module(absent[0].module)


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
    with pytest.raises(PatchError, match=r"verl 0\.10\.0 is not supported .*verl >=0\.8\.0,<0\.8\.1 \|\| "
                                         r">=0\.9\.0,<0\.9\.2\); the closest supported version is verl 0\.9\.1"):
        patched.enable("library")
    assert patched.enabled_mode() is None


@pytest.mark.parametrize("version, closest, reason", [
    ("0.7.1", "0.8.0", "dp_actor.py::DataParallelPPOActor.update_policy"),
    ("0.6.0", "0.8.0", "dp_actor.py::DataParallelPPOActor.update_policy"),
    ("0.5.0", "0.8.0", "dp_actor.py::DataParallelPPOActor.update_policy"),
    ("0.8.1", "0.8.0", None),
    ("0.9.2", "0.9.1", None),
    ("0.9.0rc1", "0.9.1", None),
])
def test_every_other_version_is_refused_by_name_with_the_closest_supported_one(version, closest, reason):
    with pytest.raises(PatchError) as error:
        compat.check_version(version)
    message = str(error.value)
    assert message.startswith(f"verl {version} is not supported by kl-patches")
    assert f"the closest supported version is verl {closest} (pip install 'verl=={closest}')" in message
    assert (reason in message) if reason else ("update_policy" not in message)


def test_the_version_table_records_the_installed_verls_loss_agg_modes():
    assert compat.loss_agg_modes() == compat.LOSS_AGG_MODES[compat.line(VERL)]


@pytest.mark.parametrize("version", ["0.8.0", "0.9.0", "0.9.1"])
def test_supported_versions_pass_the_check(version):
    assert compat.check_version(version) == version


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
    # PEP 440 cannot say "0.8.0 or 0.9.x": the extra pins the hull of the supported lines, the adapter the union
    assert SUPPORTED == " || ".join(compat.SUPPORTED_RANGES) == ">=0.8.0,<0.8.1 || >=0.9.0,<0.9.2"
    assert len(verl) == 1 and verl[0].specifier == SpecifierSet(compat.EXTRA)
    assert SpecifierSet(compat.EXTRA) == SpecifierSet(">=0.8.0,<0.9.2")
    # every verl release in the hull is supported (PyPI: 0.8.0, 0.9.0, 0.9.1; nothing between 0.8.0 and 0.9.0)
    for release in ("0.8.0", "0.9.0", "0.9.1"):
        assert release in SpecifierSet(compat.EXTRA) and compat.is_supported(release)
    assert compat.is_supported(VERL) and VERL in compat.RELEASES  # the installed version is one CI installs
