"""kl-patches for TRL (``trl`` 0.24.x and 1.15-1.16): the exact gradient of beta * KL(pi || pi_ref) over whole
responses in ``GRPOTrainer``. Three ways in, all reversible:

* ``from kl_patches.integrations.trl import GRPOConfig, GRPOTrainer``: drop-in subclasses; ``GRPOConfig`` gains
  ``kl_mode`` (``library``, ``k1-in-reward``, ``k1-rtg-loss`` -- the default, exact on- and off-policy),
  ``kl_truncation`` and ``kl_rtg_baseline``, parsed by TRL's own ``TrlParser``. An explicit ``kl_mode`` beats
  ``KL_PATCHES_MODE`` (:func:`kl_patches.modes.resolve_mode`).
* ``kl_patches.enable("trl", mode=...)`` / ``kl_patches.disable("trl")``: patch ``trl.GRPOTrainer`` in place.
* ``KL_PATCHES_MODE=<mode>`` in the environment: the same patch in every Python process that imports TRL.

Importing this module imports neither TRL nor torch; ``GRPOConfig``/``GRPOTrainer`` are loaded on first access.
"""

from __future__ import annotations

from typing import Any

from kl_patches.modes import LIBRARY, validate_mode

#: The TRL lines this adapter was verified on (its tests and the exact step audit pass there, one nox session per
#: line: ``trl-0.24`` and ``trl``); declared once here. What differs between them is in :mod:`.compat`.
SUPPORTED_LINES = (">=0.24,<0.25", ">=1.15,<1.17")
#: The union, in the notation every adapter uses (``" || "`` joins lines; kl_patches.patching.version_supported)
SUPPORTED = " || ".join(SUPPORTED_LINES)
#: The same union as one PEP 440 specifier (a requirement cannot say "or"): pip's ``[trl]`` extra carries exactly
#: this string, and ``tests/integrations/trl/test_config.py`` checks it admits the same releases on every release.
EXTRA = (">=0.24,<1.17,!=0.25.*,!=0.26.*,!=0.27.*,!=0.28.*,!=0.29.*,"
         + ",".join(f"!=1.{minor}.*" for minor in range(15)))

__all__ = ["SUPPORTED", "SUPPORTED_LINES", "EXTRA", "GRPOConfig", "GRPOTrainer", "enable", "disable", "enabled_mode",
           "autoload"]


def _integration():
    from kl_patches.integrations.trl.patches import INTEGRATION

    return INTEGRATION


def enable(mode: str = "k1-rtg-loss") -> bool:
    """Patch ``trl.GRPOTrainer`` in place with ``mode``; False when already enabled with it. PatchError (naming
    the TRL version) when TRL is outside :data:`SUPPORTED` or its methods moved."""
    return _integration().enable(validate_mode(mode))


def disable() -> bool:
    """Restore TRL's original methods (the same objects). False when nothing was patched."""
    return _integration().disable()


def enabled_mode() -> str | None:
    return _integration().enabled_mode()


def autoload(mode: str) -> None:
    """Called by ``kl_patches/_autoload.py`` when ``trl`` is imported in a process with ``KL_PATCHES_MODE`` set.

    ``import trl`` is lazy (it does not load the trainers), so the version is checked now -- an unsupported TRL
    fails at that import, before any training -- and the patch is applied when ``trl.trainer.grpo_trainer`` is
    imported (at once if it already is)."""
    validate_mode(mode)
    if mode == LIBRARY:
        return
    _integration().check_version()
    import wrapt

    wrapt.register_post_import_hook(lambda _module: enable(mode), "trl.trainer.grpo_trainer")


def __getattr__(name: str) -> Any:
    if name in ("GRPOConfig", "GRPOTrainer"):
        from kl_patches.integrations.trl import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
