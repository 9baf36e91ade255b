"""kl-patches for verl: two new values of verl's own configuration, active in every Ray process.

    actor_rollout_ref.actor.use_kl_loss=True  actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss
    algorithm.use_kl_in_reward=True           algorithm.kl_penalty=k1-in-reward

``pip install kl-patches[verl]`` is enough on verl 0.9: verl imports the ``verl.plugins`` entry point
(``plugin.py``) on ``import verl`` in the driver, the ``TaskRunner`` actor and every worker actor, and the plugin
patches verl's KL functions as their modules are imported. verl 0.8 has no entry-point discovery: export
``VERL_USE_EXTERNAL_MODULES=kl_patches.integrations.verl.plugin`` (``compat.py`` holds every version
difference). The patches act only on the two values above. Importing this package imports no verl module.
"""

from __future__ import annotations

import logging

from kl_patches.modes import LIBRARY
from kl_patches.patching import Patch

from kl_patches.integrations.verl.patches import SUPPORTED, TARGETS, VerlIntegration, make_refusal_guard
from kl_patches.integrations.verl.config import (
    LOSS_KEY,
    LOSS_OVERRIDES,
    LOSS_VALUE,
    REWARD_KEY,
    REWARD_OVERRIDES,
    REWARD_VALUE,
    VALUE_DOCS,
    VALUES,
)

__all__ = [
    "INTEGRATION", "SUPPORTED", "TARGETS", "LOSS_KEY", "LOSS_VALUE", "LOSS_OVERRIDES", "REWARD_KEY",
    "REWARD_VALUE", "REWARD_OVERRIDES", "VALUES", "VALUE_DOCS", "enable", "disable", "enabled_mode",
    "install_plugin", "plugin_error",
]

logger = logging.getLogger("kl_patches.verl")

INTEGRATION = VerlIntegration()

_plugin_state: dict = {"error": None, "guard": None}  # guard: (Patch, Rebind) on validate_config


def enable(mode: str = LIBRARY) -> bool:
    """Install the patches in this process (the plugin does it on ``import verl``). Only ``library`` is
    accepted: the kl-patches term is selected by the configuration values above. PatchError names the
    installed verl version when it is outside the supported range."""
    return INTEGRATION.enable(mode)


def disable() -> bool:
    """Restore verl's original functions (by identity)."""
    return INTEGRATION.disable()


def enabled_mode() -> str | None:
    """``library`` while the patches are installed (verl values unchanged, kl-patches values accepted)."""
    return INTEGRATION.enabled_mode()


def plugin_error() -> str | None:
    """Why the plugin could not install the patches in this process, or None."""
    return _plugin_state["error"]


def install_plugin() -> None:
    """What the ``verl.plugins`` entry point runs during ``import verl``.

    verl swallows exceptions raised by plugins (it logs them at DEBUG), so a failure cannot stop the import:
    it is logged at ERROR level, and ``validate_config`` is guarded so that a run configured with a kl-patches
    value fails on the driver before any Ray work, with the error (a PatchError names the version).
    verl's own values keep working unpatched.
    """
    try:
        INTEGRATION.enable(LIBRARY)
    except Exception as error:  # noqa: BLE001 - reported, and turned into an error where it matters
        message = f"{error}"
        _plugin_state["error"] = message
        logger.error("kl-patches could not patch verl in this process: %s", message)
        # any failure (an unsupported version, a changed verl module): a run configured with a kl-patches value
        # stops at the driver with this message instead of a late, bare NotImplementedError
        _install_refusal_guard(message)


def _install_refusal_guard(message: str) -> None:
    import sys

    from kl_patches.patching import Rebind

    module = sys.modules.get("verl.utils.config")  # imported by verl/__init__ before the plugins run
    if module is None or "validate_config" not in vars(module) or _plugin_state["guard"] is not None:
        return
    guard = Patch(module, "validate_config", make_refusal_guard(message), "verl", INTEGRATION.version)
    guard.apply()
    rebind = Rebind("verl", guard.original, guard.replacement)
    rebind.apply()
    _plugin_state["guard"] = (guard, rebind)


def remove_refusal_guard() -> bool:
    """Undo what an unsupported-version plugin load installed (tests; a process that upgrades in place)."""
    if _plugin_state["guard"] is None:
        return False
    guard, rebind = _plugin_state["guard"]
    rebind.revert()
    guard.revert()
    _plugin_state["guard"] = None
    return True
