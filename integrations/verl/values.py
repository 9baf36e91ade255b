"""The two values kl-patches adds to verl's own configuration, and the checks that guard them.

A verl user selects KL handling with overrides they already know; kl-patches only adds accepted values:

    actor_rollout_ref.actor.use_kl_loss=True  actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss
    algorithm.use_kl_in_reward=True           algorithm.kl_penalty=k1-in-reward

Every other value is verl's and goes to verl's own code unchanged. This module imports nothing from verl:
it reads configurations through ``get`` / attribute access, so it serves OmegaConf DictConfigs, verl's
dataclass configs and plain dicts alike.
"""

from __future__ import annotations

import logging
from typing import Any

from kl_patches.modes import DESCRIPTIONS, K1_IN_REWARD, K1_RTG_LOSS, KLModeError

logger = logging.getLogger("kl_patches.verl")

#: the value of ``actor_rollout_ref.actor.kl_loss_type`` that selects kl-patches' loss-side term
LOSS_VALUE = K1_RTG_LOSS
#: the value of ``algorithm.kl_penalty`` that selects kl-patches' reward-side term
REWARD_VALUE = K1_IN_REWARD
VALUES = (LOSS_VALUE, REWARD_VALUE)

LOSS_KEY = "actor_rollout_ref.actor.kl_loss_type"
LOSS_FLAG = "actor_rollout_ref.actor.use_kl_loss"
LOSS_COEF = "actor_rollout_ref.actor.kl_loss_coef"
REWARD_KEY = "algorithm.kl_penalty"
REWARD_FLAG = "algorithm.use_kl_in_reward"
REWARD_COEF = "algorithm.kl_ctrl.kl_coef"

#: the overrides that switch each value on, as a user types them
LOSS_OVERRIDES = f"{LOSS_FLAG}=True {LOSS_KEY}={LOSS_VALUE}"
REWARD_OVERRIDES = f"{REWARD_FLAG}=True {REWARD_KEY}={REWARD_VALUE}"

VALUE_DOCS = {
    LOSS_KEY: (LOSS_VALUE, DESCRIPTIONS[LOSS_VALUE]),
    REWARD_KEY: (REWARD_VALUE, DESCRIPTIONS[REWARD_VALUE]),
}


def lookup(config: Any, dotted: str, default: Any = None) -> Any:
    """``config.a.b.c`` for a DictConfig, a verl dataclass config or a dict; ``default`` when absent."""
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        if isinstance(node, dict) or hasattr(node, "get"):
            node = node.get(part, None)
        else:
            node = getattr(node, part, None)
    return default if node is None else node


def check_loss_side(kl_loss_type: Any, use_kl_loss: Any) -> None:
    """The actor's KL settings (``ActorConfig``): a kl-patches value needs ``use_kl_loss=True`` and must be the
    loss-side value. verl's own values pass untouched (an unknown one keeps verl's own error)."""
    if kl_loss_type == REWARD_VALUE:
        raise KLModeError(
            f"{LOSS_KEY}={REWARD_VALUE} is not a loss-side value: {REWARD_VALUE} is a value of {REWARD_KEY} "
            f"(set {REWARD_OVERRIDES}); the loss-side kl-patches value is {LOSS_KEY}={LOSS_VALUE}"
        )
    if kl_loss_type == LOSS_VALUE and not use_kl_loss:
        raise KLModeError(
            f"{LOSS_KEY}={LOSS_VALUE} needs {LOSS_FLAG}=True: with use_kl_loss=False verl computes no KL loss "
            f"at all, so the value would be silently ignored"
        )


def check_reward_side(kl_penalty: Any, use_kl_in_reward: Any) -> None:
    """The algorithm's KL settings (``AlgoConfig``), as :func:`check_loss_side`."""
    if kl_penalty == LOSS_VALUE:
        raise KLModeError(
            f"{REWARD_KEY}={LOSS_VALUE} is not a reward-side value: {LOSS_VALUE} is a value of {LOSS_KEY} "
            f"(set {LOSS_OVERRIDES}); the reward-side kl-patches value is {REWARD_KEY}={REWARD_VALUE}"
        )
    if kl_penalty == REWARD_VALUE and not use_kl_in_reward:
        raise KLModeError(
            f"{REWARD_KEY}={REWARD_VALUE} needs {REWARD_FLAG}=True: with use_kl_in_reward=False verl applies no "
            f"KL penalty at all, so the value would be silently ignored"
        )


def uses_kl_patches(config: Any) -> bool:
    """Whether a full trainer configuration names a kl-patches value on either side."""
    return lookup(config, LOSS_KEY) in VALUES or lookup(config, REWARD_KEY) in VALUES


def describe_terms(config: Any) -> list[str]:
    """One line per KL term the configuration applies, with its coefficient."""
    terms = []
    if lookup(config, LOSS_FLAG, False):
        kind = lookup(config, LOSS_KEY, "low_var_kl")
        coef = lookup(config, LOSS_COEF, 0.001)
        owner = "kl-patches" if kind == LOSS_VALUE else "verl"
        terms.append(f"loss: {LOSS_KEY}={kind} ({owner}), beta={coef}")
    if lookup(config, REWARD_FLAG, False):
        kind = lookup(config, REWARD_KEY, "kl")
        coef = lookup(config, REWARD_COEF, 0.001)
        owner = "kl-patches" if kind == REWARD_VALUE else "verl"
        terms.append(f"reward: {REWARD_KEY}={kind} ({owner}), beta={coef}")
    return terms


def check_trainer_config(config: Any) -> list[str]:
    """Validate a full trainer configuration (what ``python -m verl.trainer.main_ppo`` composes) before any
    Ray work starts. Returns the KL terms it applies; says which when both paths are on."""
    check_loss_side(lookup(config, LOSS_KEY), lookup(config, LOSS_FLAG, False))
    check_reward_side(lookup(config, REWARD_KEY), lookup(config, REWARD_FLAG, False))
    terms = describe_terms(config)
    if len(terms) == 2 and uses_kl_patches(config):
        # Both paths act on the same KL: the gradients add up, so the total coefficient is the sum.
        logger.warning(
            "kl-patches: both KL paths are on, both terms are applied and their gradients add up: %s",
            "; ".join(terms),
        )
    return terms
