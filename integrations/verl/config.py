"""The two values kl-patches adds to verl's own configuration, and the driver-side checks that guard them.

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

import difflib
import warnings

from kl_patches.modes import DESCRIPTIONS, K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, KLModeError, mode_from_env, resolve_mode

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


#: verl 0.9's values of kl_loss_type / kl_penalty (core_algos.kl_penalty_forward; a trailing "+" is verl's
#: straight-through variant)
VERL_KL_VALUES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "full")

#: policy_loss.loss_mode values under which k1-in-reward's advantage is measured biased (issue 11: geo_mean and sapo
#: 0.63, clip_cov 0.25 relative error): the advantage is not used as a plain per-token score-function weight
BIASED_REWARD_LOSS_MODES = ("geo_mean", "sapo", "clip_cov")

TRUNCATION_KEY = "actor_rollout_ref.actor.kl_patches_truncation"
ROLLOUT = "actor_rollout_ref.rollout"


def _is_verl_value(value: Any) -> bool:
    return isinstance(value, str) and (value[:-1] if value.endswith("+") else value) in VERL_KL_VALUES


def check_value(key: str, value: Any, flag_on: bool, ours: str) -> None:
    """A value of ``key`` that is neither verl's nor kl-patches': a near-miss of a kl-patches value is refused with
    a did-you-mean whatever the flag (it can only be a typo); any other unknown value is refused when its flag is
    on (verl would raise a bare NotImplementedError at the first actor update, after the rollout)."""
    if value is None or value in VALUES or _is_verl_value(value):
        return
    text = str(value)
    normalised = text.strip().lower().replace("_", "-").replace(" ", "-")
    candidates = [*VALUES, *VERL_KL_VALUES]
    close = difflib.get_close_matches(normalised, candidates, n=1, cutoff=0.6)
    near_ours = normalised in VALUES or normalised.startswith(("k1-rtg", "k1-in", "k1-reward", "rtg")) or (
        close and close[0] in VALUES)
    if not near_ours and not flag_on:
        return
    suggestion = close[0] if close else ours
    if near_ours and suggestion not in VALUES:
        suggestion = ours
    raise KLModeError(
        f"{key}={text!r} is not a value verl or kl-patches knows; did you mean {key}={suggestion}? "
        f"(kl-patches values: {LOSS_KEY}={LOSS_VALUE}, {REWARD_KEY}={REWARD_VALUE}; "
        f"verl's: {', '.join(VERL_KL_VALUES)})"
    )


def explicit_mode(config: Any) -> str | None:
    """The mode the configuration itself selects: a kl-patches value with its flag on, ``library`` for a verl
    KL term, None when no KL term is on."""
    loss_on, reward_on = bool(lookup(config, LOSS_FLAG, False)), bool(lookup(config, REWARD_FLAG, False))
    if loss_on and lookup(config, LOSS_KEY) == LOSS_VALUE:
        return LOSS_VALUE
    if reward_on and lookup(config, REWARD_KEY) == REWARD_VALUE:
        return REWARD_VALUE
    return LIBRARY if loss_on or reward_on else None


def check_mode_env(config: Any) -> str | None:
    """``KL_PATCHES_MODE`` in a verl process, by the one precedence rule (``resolve_mode``): the hydra values are the
    explicit configuration and win (a conflict is warned once). With no KL term configured, a kl-patches mode in
    the environment cannot pick a coefficient for the user: refused, naming the overrides."""
    env = mode_from_env()
    explicit = explicit_mode(config)
    if env is None:
        return explicit
    if explicit is None:
        if env == LIBRARY:
            return None
        overrides = LOSS_OVERRIDES if env == LOSS_VALUE else REWARD_OVERRIDES
        raise KLModeError(
            f"KL_PATCHES_MODE={env} is set, but verl selects its KL term from its own configuration and this one "
            f"turns no KL term on; set {overrides} (with its coefficient) or unset KL_PATCHES_MODE"
        )
    where = {LOSS_VALUE: LOSS_KEY, REWARD_VALUE: REWARD_KEY}.get(explicit, "the verl KL configuration")
    mode, _ = resolve_mode(explicit, where)
    return mode


def check_reward_refusals(config: Any) -> None:
    """k1-in-reward is exact on-policy with a plain per-token policy-gradient loss and a batch-constant normaliser:
    configurations outside that are refused at the driver with the fix (the loss-side value is exact there)."""
    fix = f"use the loss-side value instead: {LOSS_OVERRIDES} {REWARD_FLAG}=False"
    actor = "actor_rollout_ref.actor"
    loss_mode = lookup(config, f"{actor}.policy_loss.loss_mode", "vanilla")
    if loss_mode in BIASED_REWARD_LOSS_MODES:
        raise KLModeError(
            f"{REWARD_KEY}={REWARD_VALUE} with {actor}.policy_loss.loss_mode={loss_mode}: that policy loss does not "
            f"apply the advantage as a per-token score-function weight, so the KL part is biased (measured); {fix}"
        )
    if lookup(config, f"{actor}.loss_agg_mode", "token-mean") == "seq-mean-token-mean":
        raise KLModeError(
            f"{REWARD_KEY}={REWARD_VALUE} with {actor}.loss_agg_mode=seq-mean-token-mean: verl's policy loss weights "
            f"response i by 1/|y_i| (a length-weighted objective), so the KL part is biased; set "
            f"{actor}.loss_agg_mode=token-mean, or {fix}"
        )
    epochs = int(lookup(config, f"{actor}.ppo_epochs", 1) or 1)
    train = lookup(config, "data.train_batch_size")
    mini = lookup(config, f"{actor}.ppo_mini_batch_size")
    mini_batches = int(train) // int(mini) if train and mini else 1
    if epochs > 1 or mini_batches > 1:
        raise KLModeError(
            f"{REWARD_KEY}={REWARD_VALUE} is exact on-policy only, and this configuration updates on stale "
            f"mini-batches (ppo_epochs={epochs}, data.train_batch_size/ppo_mini_batch_size={mini_batches}): the PPO "
            f"token ratio corrects each action but not the prefix distribution; {fix} (its per-decision weights "
            f"make every mini-batch exact)"
        )


def check_sampler(config: Any, mode: str) -> None:
    """mu must be the distribution that sampled the tokens. Truncated support (top_p < 1, top_k > 0) cannot be
    corrected by any weight: refused. Without the engine's log-probs the trainer's recomputation stands in for
    mu: warned (engine/trainer mismatch uncorrected)."""
    top_p = lookup(config, f"{ROLLOUT}.top_p", 1.0)
    top_k = lookup(config, f"{ROLLOUT}.top_k", -1)
    key = LOSS_KEY if mode == LOSS_VALUE else REWARD_KEY
    if (top_p is not None and float(top_p) < 1.0) or (top_k is not None and int(top_k) > 0):
        raise KLModeError(
            f"{key}={mode} with {ROLLOUT}.top_p={top_p} top_k={top_k}: the sampler's support is truncated, so "
            f"responses outside it are never drawn and no importance weight can correct the KL gradient; set "
            f"{ROLLOUT}.top_p=1.0 {ROLLOUT}.top_k=-1 for training rollouts (val_kwargs may keep their own)"
        )
    if mode == LOSS_VALUE and lookup(config, f"{ROLLOUT}.calculate_log_probs", True) is False:
        message = (f"kl-patches: {LOSS_KEY}={LOSS_VALUE} without the inference engine's log-probs "
                   f"({ROLLOUT}.calculate_log_probs=False): mu falls back to the trainer's old_log_probs, so an "
                   f"engine/trainer mismatch is left uncorrected; set {ROLLOUT}.calculate_log_probs=True")
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def loss_settings(config: Any, truncation: Any = None):
    """The worker's fixed settings for k1-rtg-loss (length L, truncation), read from the full configuration."""
    from kl_patches import terms
    from kl_patches.integrations.verl.kl import LossSettings

    length = lookup(config, "data.max_response_length") or lookup(config, f"{ROLLOUT}.response_length")
    if length is None or int(length) <= 0:
        raise KLModeError(f"{LOSS_KEY}={LOSS_VALUE} needs data.max_response_length (the fixed length of its "
                          f"normaliser); got {length!r}")
    truncation = terms.check_truncation(None if truncation is None else float(truncation))
    return LossSettings(int(length), truncation)


def _pop_truncation(config: Any) -> Any:
    """Remove ``kl_patches_truncation`` from the actor node (verl's ActorConfig dataclass rejects unknown keys);
    its value travels in ``global_batch_info``."""
    actor = lookup(config, "actor_rollout_ref.actor")
    if actor is None or "kl_patches_truncation" not in actor:
        return None
    from omegaconf import DictConfig, open_dict

    if isinstance(actor, DictConfig):
        with open_dict(actor):
            return actor.pop("kl_patches_truncation")
    return actor.pop("kl_patches_truncation")


def install_loss_settings(config: Any, truncation: Any = None) -> None:
    """Hand the worker its fixed settings: ``actor_rollout_ref.actor.global_batch_info['kl_patches']`` (a dict
    field of verl's ActorConfig, so it reaches every worker with the config; kl-patches' ppo_loss removes it
    before verl's own code sees global_batch_info)."""
    from kl_patches.integrations.verl.kl import SETTINGS_KEY

    actor = lookup(config, "actor_rollout_ref.actor")
    if truncation is None:  # validate_config may run twice: keep what an earlier call moved out of the actor node
        truncation = lookup(actor, f"global_batch_info.{SETTINGS_KEY}.truncation")
    settings = loss_settings(config, truncation)
    from omegaconf import DictConfig, open_dict

    if isinstance(actor, DictConfig):
        with open_dict(actor):
            info = actor.get("global_batch_info") or {}
            actor["global_batch_info"] = {**dict(info), SETTINGS_KEY: settings.as_dict()}
    elif isinstance(actor, dict):
        actor["global_batch_info"] = {**dict(actor.get("global_batch_info") or {}), SETTINGS_KEY: settings.as_dict()}


def check_trainer_config(config: Any) -> list[str]:
    """Validate a full trainer configuration (what ``python -m verl.trainer.main_ppo`` composes) on the driver,
    before any Ray work starts: near-miss values, a kl-patches value with its flag off or on the wrong side,
    ``KL_PATCHES_MODE``, the configurations k1-in-reward cannot make exact, a truncated sampler. For k1-rtg-loss it
    then hands the workers their fixed settings (in ``global_batch_info``). Returns the KL terms it applies; says
    which when both paths are on."""
    from kl_patches.integrations.verl import plugin_error

    loss_on, reward_on = bool(lookup(config, LOSS_FLAG, False)), bool(lookup(config, REWARD_FLAG, False))
    check_value(LOSS_KEY, lookup(config, LOSS_KEY), loss_on, LOSS_VALUE)
    check_value(REWARD_KEY, lookup(config, REWARD_KEY), reward_on, REWARD_VALUE)
    check_loss_side(lookup(config, LOSS_KEY), loss_on)
    check_reward_side(lookup(config, REWARD_KEY), reward_on)
    truncation = _pop_truncation(config)
    rtg = loss_on and lookup(config, LOSS_KEY) == LOSS_VALUE
    in_reward = reward_on and lookup(config, REWARD_KEY) == REWARD_VALUE
    if truncation is not None and not rtg:
        raise KLModeError(f"{TRUNCATION_KEY}={truncation} acts on {LOSS_KEY}={LOSS_VALUE} only; set {LOSS_OVERRIDES} "
                          f"or remove it")
    if (rtg or in_reward) and plugin_error() is not None:
        raise KLModeError(f"kl-patches could not patch verl in this process, so {LOSS_KEY if rtg else REWARD_KEY} "
                          f"cannot be applied: {plugin_error()}")
    check_mode_env(config)
    if in_reward:
        check_reward_refusals(config)
        check_sampler(config, REWARD_VALUE)
    if rtg:
        check_sampler(config, LOSS_VALUE)
        if lookup(config, "data.max_response_length") is not None or lookup(config, f"{ROLLOUT}.response_length"):
            install_loss_settings(config, truncation)
    terms = describe_terms(config)
    if len(terms) == 2 and uses_kl_patches(config):
        # Both paths act on the same KL: the gradients add up, so the total coefficient is the sum.
        logger.warning(
            "kl-patches: both KL paths are on, both terms are applied and their gradients add up: %s",
            "; ".join(terms),
        )
    return terms

