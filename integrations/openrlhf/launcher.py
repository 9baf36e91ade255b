"""``kl-patches-openrlhf``: OpenRLHF's ``train_ppo_ray`` with a kl-patches mode active in every Ray process.

    kl-patches-openrlhf <every train_ppo_ray argument> --algo.kl.mode k1-rtg-loss

1. parse with OpenRLHF's own parser (plus ``--algo.kl.mode``) and run OpenRLHF's own argument checks, then the
   mode's (``config.plan``), before anything starts;
2. patch this process, and start Ray with a runtime environment that sets ``KL_PATCHES_MODE`` and a
   ``worker_process_setup_hook`` arming the patch in every worker (``PPOTrainer``, ``PolicyModelActor``, ...);
3. run ``openrlhf.cli.train_ppo_ray`` as ``__main__`` with the user's arguments (``train`` skips its own
   ``ray.init`` because Ray is already up; the runtime environment carries the variables it would have set).

``--algo.kl.mode library`` (the default) starts nothing itself: OpenRLHF runs exactly as ``python -m
openrlhf.cli.train_ppo_ray`` would.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Mapping, Sequence

from kl_patches.modes import ENV_VAR, LIBRARY, KLModeError

SETUP_HOOK = "kl_patches.integrations.openrlhf.ray_hooks.setup_worker"
SETUP_HOOK_WITH_PLACEHOLDERS = "kl_patches.integrations.openrlhf.ray_hooks.setup_worker_with_placeholders"

#: The variables OpenRLHF's own ``ray.init`` sets (respecting the caller's values), so starting Ray here changes
#: nothing else about the job.
OPENRLHF_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "true",
    "NCCL_DEBUG": "WARN",
    "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1",
}


def build_runtime_env(mode: str, environ: Mapping[str, str] | None = None, *, placeholders: bool = False,
                      truncation: float | None = None) -> dict:
    """The Ray runtime environment for ``mode``: OpenRLHF's variables, ``KL_PATCHES_MODE``, the truncation and the
    worker setup hook (none of those for ``library``). ``placeholders=True`` (CPU test clusters only) makes the hook
    install flash_attn / vLLM placeholders first, where those packages are missing."""
    from kl_patches.integrations.openrlhf.kl import TRUNCATION_ENV

    environ = os.environ if environ is None else environ
    env_vars = {name: environ.get(name, default) for name, default in OPENRLHF_ENV_DEFAULTS.items()}
    runtime_env: dict = {"env_vars": env_vars}
    if mode != LIBRARY:
        env_vars[ENV_VAR] = mode
        if truncation is not None:
            env_vars[TRUNCATION_ENV] = repr(float(truncation))
        runtime_env["worker_process_setup_hook"] = SETUP_HOOK_WITH_PLACEHOLDERS if placeholders else SETUP_HOOK
    return runtime_env


def settle_environment(argv: Sequence[str], environ=None) -> str:
    """Apply the one precedence rule before OpenRLHF is imported: an explicit ``--algo.kl.mode`` beats an inherited
    ``KL_PATCHES_MODE`` (said once), and the variable is rewritten (or removed, for ``library``) so this process'
    post-import autoloader and every process it starts see the mode that won. Returns that mode."""
    from kl_patches.integrations.openrlhf import config
    from kl_patches.integrations.openrlhf.kl import TRUNCATION_ENV
    from kl_patches.modes import resolve_mode

    environ = os.environ if environ is None else environ
    flag = config.mode_flag()
    mode, origin = resolve_mode(config.explicit_mode(argv), flag, default=LIBRARY, environ=environ)
    if origin == flag:
        if mode == LIBRARY:
            environ.pop(ENV_VAR, None)
        else:
            environ[ENV_VAR] = mode
    if mode == LIBRARY:
        environ.pop(TRUNCATION_ENV, None)
    return mode


def _say(message: str) -> None:
    print(f"[kl-patches] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    from kl_patches.integrations.openrlhf import config, enable
    from kl_patches.integrations.openrlhf.patches import integration

    from kl_patches.integrations.openrlhf import disable
    from kl_patches.integrations.openrlhf.kl import TRUNCATION_ENV

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        integration.check_version()
        settle_environment(argv)
        plan = config.plan(argv)
    except KLModeError as error:
        _say(f"error: {error}")
        return 2
    for note in plan.notes:
        _say(note)
    if plan.mode == LIBRARY:
        disable()  # an inherited KL_PATCHES_MODE may have armed the autoloader before the flag was read
    else:
        import ray

        os.environ[ENV_VAR] = plan.mode  # processes this one starts (and the .pth autoloader) see the mode too
        if plan.truncation is not None:
            os.environ[TRUNCATION_ENV] = repr(plan.truncation)
        enable(plan.mode)  # fails here, before Ray starts, if the installed OpenRLHF moved its KL code
        if ray.is_initialized():
            raise KLModeError("Ray is already initialised in this process: kl-patches-openrlhf must start it to "
                              "install the worker setup hook")
        ray.init(runtime_env=build_runtime_env(plan.mode, truncation=plan.truncation))
        _say(f"{config.mode_flag()} {plan.mode} (from {plan.origin}): active in this process and in every Ray worker "
             f"of this job; mu = {plan.mu_source or 'n/a'}")
    run_openrlhf_main(plan.argv)
    return 0


def run_openrlhf_main(argv: Sequence[str]) -> None:
    """``python -m openrlhf.cli.train_ppo_ray <argv>``, in this process."""
    from kl_patches.integrations.openrlhf.config import CLI_MODULE

    saved = sys.argv
    sys.argv = ["train_ppo_ray", *argv]
    try:
        runpy.run_module(CLI_MODULE, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = saved


if __name__ == "__main__":
    raise SystemExit(main())
