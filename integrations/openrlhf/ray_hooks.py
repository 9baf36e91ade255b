"""Ray ``worker_process_setup_hook`` targets: run at the start of every Ray worker process of the job.

OpenRLHF computes rewards and advantages in the ``PPOTrainer`` actor and the loss in ``PolicyModelActor`` actors;
a patch applied in the launching process reaches neither. The hook arms the mode named by ``KL_PATCHES_MODE``
(set in the same runtime environment) so the patch lands the moment the worker imports OpenRLHF's KL code.
It imports nothing heavy itself: vLLM engine workers, which never import that code, stay untouched.
"""

from __future__ import annotations

from kl_patches.modes import ENV_VAR, mode_from_env


def setup_worker() -> None:
    mode = mode_from_env()
    if mode is None:
        raise RuntimeError(f"kl-patches Ray setup hook ran without {ENV_VAR} in the worker's environment; "
                           f"build the runtime env with kl_patches.integrations.openrlhf.launcher.build_runtime_env")
    from kl_patches.integrations.openrlhf import autoload

    autoload(mode)


def setup_worker_with_placeholders() -> None:
    """For machines without flash_attn / vLLM (CPU test clusters): placeholders first (only for packages that are
    not installed), then :func:`setup_worker`. Never used by the launcher."""
    from kl_patches.integrations.openrlhf.placeholders import install_placeholders

    install_placeholders()
    setup_worker()
