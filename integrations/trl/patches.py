"""``kl_patches.enable("trl", mode)``: patch ``trl.GRPOTrainer`` in place, for code that builds TRL's own class
(the ``trl grpo`` command line, scripts, ``accelerate launch`` ranks).

:data:`TARGETS` is the table of what is patched: one :class:`~kl_patches.patching.Patch` per method of
``trl.trainer.grpo_trainer.GRPOTrainer`` (the class ``trl.GRPOTrainer`` names), each replacement delegating to
:mod:`.kl` with TRL's original method. Subclasses inherit the patch; kl-patches' own subclass (which carries its
mode in its config) is left alone. ``RLOOTrainer`` is deliberately not a target: its KL is already k1 in the
reward with a leave-one-out baseline (exact on-policy); its constructor is wrapped only to say so, once per
process, when a mode is enabled.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

from kl_patches.integrations.trl import SUPPORTED, kl
from kl_patches.integrations.trl import config as trl_config
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS
from kl_patches.patching import AnyPatch, Integration, PatchError, Target

logger = logging.getLogger("kl_patches.trl")

GRPO_MODULE = "trl.trainer.grpo_trainer"
RLOO_MODULE = "trl.trainer.rloo_trainer"


NOT_LIBRARY = (K1_IN_REWARD, K1_RTG_LOSS)

#: What is patched: one row per object (``kl_patches.patching.Target``: module, owner, attribute, the
#: TRLIntegration method building the replacement from the original, what it answers, when it can go).
TARGETS: tuple[Target, ...] = (
    Target(GRPO_MODULE, "GRPOTrainer", "_generate_and_score_completions", "_score_replacement",
           "k1-in-reward needs every group member's sequence KL before TRL shuffles and splits the batch",
           "TRL offers a KL-in-reward option with a whole-batch baseline"),
    Target(GRPO_MODULE, "GRPOTrainer", "_compute_loss", "_loss_replacement",
           "TRL's k3-in-loss (x token ratio) is not the gradient of the sequence KL (kl-gradients.md section 3)",
           "TRL's loss offers the reward-to-go k1 surrogate with a fixed normaliser"),
    Target(GRPO_MODULE, "GRPOTrainer", "compute_loss", "_compute_loss_replacement",
           "a subclass overriding _compute_loss (e.g. GMPOTrainer) would bypass the patch silently",
           "never: it is the guard"),
    # RLOOTrainer is not patched: its constructor only says so, once (behaviour unchanged).
    Target(RLOO_MODULE, "RLOOTrainer", "__init__", "_rloo_init_replacement",
           "RLOOTrainer's KL is already k1 in the reward with a leave-one-out baseline: say it is left alone",
           "never: it only warns", deferred=True, modes=NOT_LIBRARY),
)

_RLOO_SAID: set[str] = set()


def say_rloo_not_patched(mode: str) -> None:
    """Once per process and mode: RLOOTrainer is left as TRL ships it."""
    if mode in _RLOO_SAID:
        return
    _RLOO_SAID.add(mode)
    message = (f"kl-patches mode {mode!r} does NOT patch trl.RLOOTrainer: its KL is already k1 summed over the "
               f"response in the reward with a leave-one-out baseline, exact on-policy. Off-policy "
               f"(num_iterations > 1, steps_per_generation > gradient_accumulation_steps, vLLM) it is biased: use "
               f"GRPOTrainer with kl_mode='k1-rtg-loss' there.")
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=2)


class TRLIntegration(Integration):
    library = "trl"
    distribution = "trl"
    supported = SUPPORTED
    targets = TARGETS

    def build_patches(self, mode: str) -> list[AnyPatch]:
        if mode != "library" and trl_config.unsloth_installed():
            raise PatchError(
                f"trl {kl.trl_version()}: Unsloth is installed in this environment; it replaces GRPOTrainer's loss "
                f"with its own compiled copy, which kl-patches mode {mode!r} cannot reach (kl-patches issue 14). "
                f"Run without Unsloth, or use kl_mode='library'.")
        return super().build_patches(mode)

    # Each replacement reads ``self.mode`` when called, so one set serves every mode; an instance of kl-patches'
    # own GRPOTrainer subclass applies its config's mode itself and passes straight through here.

    def _rloo_init_replacement(self, original: Callable[..., Any]) -> Callable[..., Any]:
        integration = self

        def __init__(trainer, *args, **kwargs):
            if integration.mode not in (None, "library"):
                say_rloo_not_patched(integration.mode)
            return original(trainer, *args, **kwargs)

        return __init__

    def _stand_aside(self, trainer) -> bool:
        return getattr(trainer, kl.OWNER_FLAG, False) or self.mode is None

    def _score_replacement(self, original: Callable[..., Any]) -> Callable[..., Any]:
        integration = self

        def _generate_and_score_completions(trainer, inputs):
            if integration._stand_aside(trainer):
                return original(trainer, inputs)
            return kl.score(trainer, original, inputs, integration.mode)

        return _generate_and_score_completions

    def _loss_replacement(self, original: Callable[..., Any]) -> Callable[..., Any]:
        integration = self

        def _compute_loss(trainer, model, inputs):
            if integration._stand_aside(trainer):
                return original(trainer, model, inputs)
            return kl.loss(trainer, original, model, inputs, integration.mode)

        return _compute_loss

    def _compute_loss_replacement(self, original: Callable[..., Any]) -> Callable[..., Any]:
        integration = self

        def compute_loss(trainer, model, inputs, *args, **kwargs):
            if integration._stand_aside(trainer):
                return original(trainer, model, inputs, *args, **kwargs)
            return kl.compute_loss(trainer, original, integration.mode, model, inputs, *args, **kwargs)

        return compute_loss


INTEGRATION = TRLIntegration()
