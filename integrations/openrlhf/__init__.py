"""kl-patches for OpenRLHF (``openrlhf.cli.train_ppo_ray``, 0.9.3 and 0.11.x).

Switch it on with the launcher (``kl-patches-openrlhf <train_ppo_ray args> --algo.kl.mode k1-rtg-loss``), which
starts Ray with a runtime environment that patches every Ray process, or with ``KL_PATCHES_MODE=<mode>`` in the
environment of every process (e.g. ``ray job submit --runtime-env-json '{"env_vars": {"KL_PATCHES_MODE": ...}}'``).
Importing this module imports neither torch nor OpenRLHF.
"""

from __future__ import annotations

__all__ = ["enable", "disable", "enabled_mode", "autoload", "SUPPORTED"]

#: What CI proves, one nox session per release line (``openrlhf`` runs 0.11.2, ``openrlhf-0.9`` runs 0.9.3); ``||``
#: joins release lines (kl_patches.patching.specifier_union). The per-release differences (flat 0.9 flags, the
#: training_step signature) are the table in :mod:`.compat`. Every other version is refused by name, with the closest
#: supported release. 0.10.x: nested flags like 0.11 but 0.9's per-micro-batch KL block; not run in CI, so refused.
SUPPORTED = "==0.9.3 || >=0.11.0,<0.12"


def _patches():
    from kl_patches.integrations.openrlhf import patches

    return patches


def enable(mode: str) -> bool:
    """Patch OpenRLHF in this process (imports ``openrlhf.models.utils``; ``training_step`` is patched when
    ``openrlhf.trainer.ray.ppo_actor`` is imported). False when already enabled with ``mode``."""
    return _patches().integration.enable(mode)


def disable() -> bool:
    """Restore every original object. False when nothing was patched."""
    return _patches().integration.disable()


def enabled_mode() -> str | None:
    import sys

    module = sys.modules.get("kl_patches.integrations.openrlhf.patches")
    return None if module is None else module.integration.enabled_mode()


def autoload(mode: str) -> None:
    """Called by kl-patches' post-import hook on ``openrlhf`` where ``KL_PATCHES_MODE`` is set, and by the Ray worker
    setup hook: patches as soon as OpenRLHF's KL code is imported. Raises on unsupported versions."""
    _patches().autoload(mode)
