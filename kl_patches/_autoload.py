"""Arms ``KL_PATCHES_MODE`` in processes the user's script does not control (Ray workers, the ``trl`` CLI).

Imported by ``kl_patches_autoload.pth`` at interpreter start only when the variable is set. It registers
post-import hooks and imports nothing heavy: each adapter is patched the moment its library is imported.
A patch that fails raises from that import, so the process never trains on the biased path unknowingly.
"""

from __future__ import annotations

import importlib
import sys

import wrapt

from kl_patches.modes import KLModeError, mode_from_env

#: library -> (module whose import triggers the patch, adapter hook). Adapters own what the hook does.
HOOKS = {
    "trl": "trl",
    "openrlhf": "openrlhf",
}


def _hook_for(library: str):
    def hook(_module):
        mode = mode_from_env()
        if mode is None:
            return
        adapter = importlib.import_module(f"kl_patches.integrations.{library}")
        adapter.autoload(mode)

    return hook


def _refuse(error: Exception):
    def hook(_module):
        raise error

    return hook


def install() -> None:
    try:
        mode_from_env()
    except KLModeError as error:
        # An unknown value must not let the library train unpatched: say so now, and fail its import.
        sys.stderr.write(f"kl-patches: {error}; importing {', '.join(HOOKS)} will fail until it is fixed\n")
        for module in HOOKS.values():
            wrapt.register_post_import_hook(_refuse(error), module)
        return
    for library, module in HOOKS.items():
        wrapt.register_post_import_hook(_hook_for(library), module)


install()
