"""Arms ``KL_PATCHES_MODE`` in processes the user's script does not control (Ray workers, the ``trl`` CLI).

Imported by ``kl_patches_autoload.pth`` at interpreter start only when the variable is set. It registers
post-import hooks and imports nothing heavy: each adapter is patched the moment its library is imported.
A patch that fails raises from that import, so the process never trains on the biased path unknowingly.
"""

from __future__ import annotations

import importlib

import wrapt

from kl_patches.modes import mode_from_env

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


def install() -> None:
    mode_from_env()  # an unknown value fails here, at start-up, not at the first training step
    for library, module in HOOKS.items():
        wrapt.register_post_import_hook(_hook_for(library), module)


install()
