"""The verl patches: value-dispatching replacements of verl's KL functions, applied by post-import hooks.

Every replacement delegates to verl's original for every verl value (bit-identical results) and only acts on
the two kl-patches values (``values.py``). Targets (verl 0.9.x), each patched in the module that defines it,
then every ``from x import f`` copy in ``sys.modules`` rebound:

* ``verl.workers.utils.losses.ppo_loss``  (copies: ``workers.engine_workers``, ``trainer.distillation.losses``)
  -- ``kl_loss_type=k1-rtg-loss``: verl's policy-gradient and entropy terms, plus the k1 reward-to-go surrogate
  (``kl.py``): no cross-row statistic, a normaliser fixed on the driver from the configuration, mu = the engine's
  ``rollout_log_probs`` when present.
* ``verl.trainer.ppo.ray_trainer.apply_kl_penalty``  (copies: ``ppo.v1.trainer_base``,
  ``experimental.separation.ray_trainer``) -- ``kl_penalty=k1-in-reward``: no per-token KL in the reward;
  the coefficient is handed to compute_advantage.
* ``verl.trainer.ppo.ray_trainer.compute_advantage``  (copies: ``ppo.v1.utils``,
  ``experimental.separation.ray_trainer``) -- adds -beta*(KL_i - b_i) to the advantage *after* verl's
  estimator (so never divided by a group std), b_i the leave-one-out mean over the whole ``uid`` group
  (``kl_patches.statistics.group_statistics`` on the driver, before any split).
* ``verl.trainer.ppo.v1.utils.compute_advantage_for_multi_trajectories``  (copy: ``ppo.v1.trainer_base``; in
  verl 0.8 the same function is defined in ``verl.trainer.main_ppo_sync``) -- the same for agent sessions with
  several outputs: the KL of the whole session, on each of its rows.
* ``verl.trainer.ppo.core_algos.kl_penalty``  (copies: ``workers.utils.losses``, ``trainer.distillation.losses``)
  -- a guard: a kl-patches value reaching verl's per-token estimator from a path kl-patches does not patch
  raises a clear error instead of verl's bare NotImplementedError.
* ``verl.utils.config.validate_config``  (copies: ``verl.utils``, ``trainer.main_ppo``, ``main_ppo_v0``,
  ``experimental.one_step_off_policy.main_ppo``) -- the driver-side checks of ``config.py`` before any Ray work
  starts, and the fixed settings the workers' k1-rtg-loss needs (``global_batch_info['kl_patches']``).

What differs between the supported versions is in ``compat.py``. The hooks fire when verl imports a target
module, in whatever process (driver, ``TaskRunner``, worker actors):
``plugin.py`` registers them during ``import verl``. Nothing here imports a verl module eagerly.
"""

from __future__ import annotations

import copy
import sys
from typing import Callable

import torch

from kl_patches.estimators import masked_log_ratio
from kl_patches.modes import LIBRARY, KLModeError
from kl_patches.patching import DeferredPatch, Integration, PatchError, Target

from kl_patches.integrations.verl import compat
from kl_patches.integrations.verl.compat import SUPPORTED  # noqa: F401  (re-exported: the union of release lines)
from kl_patches.integrations.verl.kl import (
    MU_ROLLOUT,
    SETTINGS_KEY,
    LossSettings,
    add_kl_advantage,
    choose_mu,
    fixed_normalizer,
    group_ids_from,
    loss_metrics,
    reward_side_kl_part,
    rtg_micro_batch_loss,
    session_kl_part,
)
from kl_patches.integrations.verl.config import (
    LOSS_KEY,
    LOSS_OVERRIDES,
    LOSS_VALUE,
    REWARD_KEY,
    REWARD_OVERRIDES,
    REWARD_VALUE,
    VALUES,
    check_loss_side,
    check_reward_side,
    check_trainer_config,
    uses_kl_patches,
)

Tensor = torch.Tensor


#: Column apply_kl_penalty adds for compute_advantage under k1-in-reward: the KL coefficient of each row.
BETA_KEY = "kl_patches_kl_beta"



# ---------------------------------------------------------------------------------------------- helpers


def worker_settings(config) -> LossSettings:
    """The fixed settings the driver's validate_config put in ``global_batch_info['kl_patches']``."""
    info = getattr(config, "global_batch_info", None) or {}
    values = info.get(SETTINGS_KEY)
    if values is None:
        raise KLModeError(
            f"{LOSS_KEY}={LOSS_VALUE}: the worker has no fixed normaliser length. kl-patches computes it on the driver "
            f"from data.max_response_length in verl's validate_config (python -m verl.trainer.main_ppo does this); "
            f"an entry point that skips validate_config must call "
            f"kl_patches.integrations.verl.config.check_trainer_config(config) before building the workers"
        )
    return LossSettings.from_mapping(values)


def loss_side_kl(config, settings: LossSettings, model_output, data) -> tuple[Tensor, Tensor, dict]:
    """(k1-rtg-loss term, k1 KL value for verl's ``kl_loss`` metric, kl_patches/* metrics) of one micro-batch,
    read as verl's ``ppo_loss`` reads it (no-padding log-probs, padded fields, global batch information)."""
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.workers.utils.padding import no_padding_2_padding

    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    names = ["response_mask", "old_log_probs", "ref_log_prob"]
    if MU_ROLLOUT in data.keys():
        names.append(MU_ROLLOUT)
    padded = data.select(*names).to_padded_tensor()
    mask = padded["response_mask"].to(torch.bool)
    mu, source = choose_mu(padded)
    num_sequences = data["global_batch_size"]
    if num_sequences is None:
        raise KLModeError(f"{LOSS_KEY}={LOSS_VALUE}: verl passed no global_batch_size (the mini-batch size from the "
                          f"configuration), so the normaliser cannot be fixed before sampling")
    normalizer = fixed_normalizer(config.loss_agg_mode, int(num_sequences), settings.length, config.loss_scale_factor)
    dp_size = data["dp_size"]
    loss = rtg_micro_batch_loss(log_prob, padded["ref_log_prob"], mu.to(log_prob.dtype), mask,
                                normalizer=normalizer, dp_size=dp_size, truncation=settings.truncation)
    # verl's "kl_loss" metric keeps its meaning: the k1 KL value aggregated as verl aggregates its own.
    k1 = masked_log_ratio(log_prob.detach(), padded["ref_log_prob"], mask)
    value = agg_loss(loss_mat=k1, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, dp_size=dp_size,
                     batch_num_tokens=data["batch_num_tokens"], global_batch_size=num_sequences,
                     loss_scale_factor=config.loss_scale_factor)
    metrics = loss_metrics(log_prob, padded["ref_log_prob"], mu.to(log_prob.dtype), mask, settings.truncation, source)
    return loss, value, metrics


def _uid(data) -> Tensor | None:
    uid = data.non_tensor_batch.get("uid") if hasattr(data, "non_tensor_batch") else None
    return group_ids_from(uid)


# ----------------------------------------------------------------------------------------- replacements


def make_ppo_loss(original: Callable) -> Callable:
    def ppo_loss(config, model_output, data, dp_group=None):
        kl_loss_type = getattr(config, "kl_loss_type", None)
        if kl_loss_type not in VALUES:
            return original(config, model_output, data, dp_group)
        check_loss_side(kl_loss_type, config.use_kl_loss)
        from verl.utils.metric import AggregationType, Metric

        settings = worker_settings(config)
        # verl's own policy-gradient and entropy terms, from verl's code, with only its KL block switched off and
        # kl-patches' settings out of the global_batch_info verl splats into agg_loss.
        info = dict(getattr(config, "global_batch_info", None) or {})
        info.pop(SETTINGS_KEY, None)
        without_kl = copy.copy(config)
        object.__setattr__(without_kl, "use_kl_loss", False)
        object.__setattr__(without_kl, "global_batch_info", info)
        policy_loss, metrics = original(without_kl, model_output, data, dp_group)
        kl_loss, kl_value, kl_metrics = loss_side_kl(config, settings, model_output, data)
        pg_metric = metrics.get("actor/pg_loss")
        aggregation = getattr(pg_metric, "aggregation", AggregationType.MEAN)
        metrics["kl_loss"] = Metric(value=kl_value, aggregation=aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
        for name, value in kl_metrics.items():  # per micro-batch; averaged over micro-batches and ranks
            metrics[name] = Metric(value=value, aggregation=AggregationType.MEAN)
        return policy_loss + kl_loss * config.kl_loss_coef, metrics

    return ppo_loss


def make_apply_kl_penalty(original: Callable) -> Callable:
    def apply_kl_penalty(data, kl_ctrl, kl_penalty="kl"):
        if kl_penalty not in VALUES:
            return original(data, kl_ctrl, kl_penalty)
        check_reward_side(kl_penalty, True)  # only the loss-side value is wrong here
        from verl.utils.torch_functional import masked_mean

        batch = data.batch
        mask = batch["response_mask"]
        k1 = masked_log_ratio(batch["old_log_probs"], batch["ref_log_prob"], mask.to(torch.bool))
        beta = kl_ctrl.value
        # No per-token KL in the reward: the estimator would normalise it with the task reward. The sequence KL
        # goes into the advantage after the estimator (compute_advantage), with this coefficient.
        batch["token_level_rewards"] = batch["token_level_scores"].clone()
        batch[BETA_KEY] = torch.full((batch.batch_size[0],), float(beta), dtype=torch.float64)
        current_kl = torch.mean(masked_mean(k1, mask=mask, axis=-1), dim=0).item()  # verl's metric, for k1
        kl_ctrl.update(current_kl=current_kl, n_steps=batch.batch_size[0])
        return data, {"actor/reward_kl_penalty": current_kl, "actor/reward_kl_penalty_coeff": beta}

    return apply_kl_penalty


def _pop_beta(data) -> Tensor | None:
    batch = getattr(data, "batch", None)
    if batch is None or BETA_KEY not in batch.keys():
        return None
    return batch.pop(BETA_KEY)


def make_compute_advantage(original: Callable) -> Callable:
    def compute_advantage(data, *args, **kwargs):
        beta = _pop_beta(data)
        if beta is None:
            return original(data, *args, **kwargs)
        data = original(data, *args, **kwargs)
        batch = data.batch
        mask = batch["response_mask"].to(torch.bool)
        # group statistics over whole uid groups of the whole generation batch (this runs on the driver)
        kl_part = reward_side_kl_part(batch["old_log_probs"], batch["ref_log_prob"], mask, beta, _uid(data))
        batch["advantages"] = add_kl_advantage(batch["advantages"], kl_part, batch["response_mask"].to(torch.bool))
        return data

    return compute_advantage


def make_multi_trajectory_advantage(original: Callable) -> Callable:
    def compute_advantage_for_multi_trajectories(data, batch_keys, adv_estimator, *args, **kwargs):
        beta = _pop_beta(data)  # popped, so the compute_advantage verl calls inside leaves the KL to us
        if beta is None:
            return original(data, batch_keys, adv_estimator, *args, **kwargs)
        data = original(data, batch_keys, adv_estimator, *args, **kwargs)
        batch = data.batch
        mask = batch["response_mask"].to(torch.bool)
        if adv_estimator == "grpo":  # verl scores whole sessions for GRPO: so is their KL
            kl_part = session_kl_part(batch["old_log_probs"], batch["ref_log_prob"], mask, batch_keys, beta)
        else:  # verl treats every output as its own trajectory for the other estimators
            kl_part = reward_side_kl_part(batch["old_log_probs"], batch["ref_log_prob"], mask, beta, _uid(data))
        batch["advantages"] = add_kl_advantage(batch["advantages"], kl_part, mask)
        return data

    return compute_advantage_for_multi_trajectories


def make_kl_penalty_guard(original: Callable) -> Callable:
    def kl_penalty(logprob, ref_logprob, kl_penalty):
        if kl_penalty in VALUES:
            caller = sys._getframe(1)
            raise KLModeError(
                f"'{kl_penalty}' is a kl-patches value, a sequence-level term that verl's per-token kl_penalty() "
                f"cannot compute; it reached kl_penalty() from {caller.f_globals.get('__name__')}."
                f"{caller.f_code.co_name}, a code path kl-patches does not patch. kl-patches handles "
                f"{LOSS_KEY}={LOSS_VALUE} in verl.workers.utils.losses.ppo_loss and {REWARD_KEY}={REWARD_VALUE} in "
                f"verl.trainer.ppo.ray_trainer.apply_kl_penalty / compute_advantage"
            )
        return original(logprob, ref_logprob, kl_penalty)

    return kl_penalty


def make_validate_config(original: Callable) -> Callable:
    def validate_config(config, *args, **kwargs):
        check_trainer_config(config)
        return original(config, *args, **kwargs)

    return validate_config


KL_GRADIENTS = "docs/kl-gradients.md"
REMOVE = "verl offers a sequence-level KL value (or kl-patches drops this verl version)"

#: What is patched (verl 0.9.x): each row's module is the one that defines the attribute; every ``from x import f``
#: copy under ``verl`` is rebound. Patched when the module is imported (post-import hooks), in every process.
TARGETS: tuple[Target, ...] = (
    Target("verl.utils.config", None, "validate_config", make_validate_config,
           "driver-side checks of the kl-patches values before any Ray work; fixed settings for the workers",
           REMOVE, rebind="verl", deferred=True),
    Target("verl.trainer.ppo.core_algos", None, "kl_penalty", make_kl_penalty_guard,
           "a kl-patches value reaching verl's per-token kl_penalty() raises a clear error (guard)",
           "never: it is the guard", rebind="verl", deferred=True),
    Target("verl.workers.utils.losses", None, "ppo_loss", make_ppo_loss,
           f"kl_loss_type=k1-rtg-loss: verl's per-token KL losses are biased ({KL_GRADIENTS} section 3)",
           REMOVE, rebind="verl", deferred=True),
    Target("verl.trainer.ppo.ray_trainer", None, "apply_kl_penalty", make_apply_kl_penalty,
           "kl_penalty=k1-in-reward: no per-token KL in the reward (the estimator would normalise it)",
           REMOVE, rebind="verl", deferred=True),
    Target("verl.trainer.ppo.ray_trainer", None, "compute_advantage", make_compute_advantage,
           "kl_penalty=k1-in-reward: -beta*(KL_i - b_i) added after the estimator, b_i over whole uid groups",
           REMOVE, rebind="verl", deferred=True),
    Target("verl.trainer.ppo.v1.utils", None, "compute_advantage_for_multi_trajectories",
           make_multi_trajectory_advantage, "kl_penalty=k1-in-reward for agent sessions with several outputs",
           REMOVE, rebind="verl", deferred=True),
    # verl 0.8: the same function, defined in its agent-session trainer (compat.VERSION_MODULES picks the row)
    Target("verl.trainer.main_ppo_sync", None, "compute_advantage_for_multi_trajectories",
           make_multi_trajectory_advantage, "kl_penalty=k1-in-reward for agent sessions with several outputs (0.8)",
           "kl-patches drops verl 0.8", rebind="verl", deferred=True),
)


# ------------------------------------------------------------------------------------------ integration


class VerlIntegration(Integration):
    """verl's adapter. ``enable()`` arms every :data:`TARGETS` row: patched at once for a module already
    imported, else by a post-import hook when verl imports it; each patch rebinds its copies. Idempotent;
    ``disable()`` restores every original by identity. The patches act only on the kl-patches values, so the one
    mode ``enable`` accepts is ``library``: the kl-patches term is chosen per run by verl's own configuration."""

    library = "verl"
    distribution = "verl"
    supported = SUPPORTED
    accepted_modes = (LIBRARY,)

    def check_version(self) -> str:  # a union of release lines: one SpecifierSet cannot hold it
        return compat.check_version()

    @property
    def targets(self) -> tuple[Target, ...]:  # type: ignore[override]
        """The :data:`TARGETS` rows whose module exists in the installed verl (``compat.VERSION_MODULES``)."""
        version = self.version
        return tuple(target for target in TARGETS if compat.has_module(target.module, version))

    def target_modules(self) -> list[str]:
        """The target modules of the installed verl version."""
        return list(dict.fromkeys(target.module for target in self.targets))

    def mode_refusal(self, mode: str) -> str:
        return (f"verl selects the KL term per run from its own configuration, not with enable({mode!r}): "
                f"set {LOSS_OVERRIDES} (loss side) or {REWARD_OVERRIDES} (reward side). "
                f"The plugin (installed with kl-patches) already patched verl in every process.")

    def patched_targets(self) -> list[str]:
        return [item.patch.target for item in self._applied
                if isinstance(item, DeferredPatch) and item.patch is not None and item.patch.applied]


def make_refusal_guard(message: str) -> Callable[[Callable], Callable]:
    """For a verl version outside the supported range: validate_config raises ``message`` when a kl-patches
    value is configured, instead of letting verl fail later with a bare NotImplementedError."""

    def factory(original: Callable) -> Callable:
        def validate_config(config, *args, **kwargs):
            if uses_kl_patches(config):
                raise PatchError(message)
            return original(config, *args, **kwargs)

        return validate_config

    return factory
