"""kl-patches: exact sequence-level KL gradients for TRL, verl and OpenRLHF.

Importing this package is cheap: it imports neither torch nor any RL library until a function that needs
them is used (the ``.pth`` autoloader imports it in every Python process where ``KL_PATCHES_MODE`` is set).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from kl_patches.modes import ENV_VAR, MODES, KLModeError, validate_mode

# The wheel installs integrations/ as kl_patches/integrations. From a source checkout (tests run from the
# repository root, Ray workers that put the driver's working directory on sys.path) the same name must
# resolve to the top-level integrations/ folder beside this package, not fail or shadow the installed one.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "integrations")) and os.path.isfile(
    os.path.join(_checkout, "integrations", "__init__.py")
):
    __path__.append(_checkout)

__version__ = "0.1.0"

__all__ = [
    "ENV_VAR",
    "MODES",
    "KLModeError",
    "validate_mode",
    "enable",
    "disable",
    "is_enabled",
    "status",
    "k1",
    "k2",
    "k3",
    "masked_log_ratio",
    "sequence_kl",
    "leave_one_out_baseline",
    "kl_advantage",
    "kl_rtg_loss",
]

_LAZY = {
    "k1": "kl_patches.estimators",
    "k2": "kl_patches.estimators",
    "k3": "kl_patches.estimators",
    "masked_log_ratio": "kl_patches.estimators",
    "sequence_kl": "kl_patches.terms",
    "leave_one_out_baseline": "kl_patches.terms",
    "kl_advantage": "kl_patches.terms",
    "kl_rtg_loss": "kl_patches.terms",
}

LIBRARIES = ("trl", "verl", "openrlhf")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kl_patches' has no attribute {name!r}")


def _adapter(library: str):
    if library not in LIBRARIES:
        raise ValueError(f"unknown library {library!r}; kl-patches has adapters for {', '.join(LIBRARIES)}")
    return importlib.import_module(f"kl_patches.integrations.{library}")


def enable(library: str, mode: str = "k1-rtg-loss") -> bool:
    """Patch ``library`` in place so its trainers use ``mode``. Returns False when it was already enabled
    with that mode (idempotent). Raises ``kl_patches.patching.PatchError`` naming the library version when the
    patch cannot be applied; never falls back to the library's own KL silently."""
    return _adapter(library).enable(validate_mode(mode))


def disable(library: str) -> bool:
    """Restore the library's original objects (by identity). Returns False when nothing was patched."""
    return _adapter(library).disable()


def status() -> list[dict]:
    """What kl-patches does in this process, per library: installed and supported versions, the mode in effect,
    where it came from, the patched targets and the adapter's declared target table (``kl-patches status``
    prints it; the table is known once the adapter's Integration is loaded)."""
    import sys

    from kl_patches.modes import mode_from_env
    from kl_patches.patching import INTEGRATIONS, installed_version

    try:
        env_mode = mode_from_env()
    except KLModeError as error:
        env_mode = f"invalid ({error})"
    rows = []
    for library in LIBRARIES:
        adapter = _adapter(library)
        mine = [i for i in INTEGRATIONS if i.library == library]
        mode = next((i.enabled_mode() for i in mine if i.enabled_mode()), None)
        rows.append({
            "library": library,
            "installed": installed_version(library),
            "supported": getattr(adapter, "SUPPORTED", None),
            "imported": library in sys.modules,
            "mode": mode,
            "environment": env_mode,
            "targets": [target for i in mine for target in i.applied_targets()],
            # the adapter's declared table (module.owner.attribute, what it answers, when it can go)
            "table": [row for i in mine for row in i.target_table()],
        })
    return rows


def is_enabled(library: str) -> str | None:
    """The mode ``library`` is patched with, or None."""
    return _adapter(library).enabled_mode()
