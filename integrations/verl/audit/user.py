"""The user's configuration (``kl-patches check --library verl --config x.yaml -- overrides``): composed as
``python -m verl.trainer.main_ppo`` composes it, checked by kl-patches' driver checks (the same refusals as a run),
then audited: a configuration with a kl-patches value through verl's whole step (``steps.py``) with the user's
settings (balancing, micro-batch sizes, dynamic batch sizes, loss_agg_mode, engine log-probs, truncation); one with
verl's own values through verl's loss (``cells.py``)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from kl_patches.audit import AuditRecord, PolicySpec
from kl_patches.audit.records import NOT_COVERED
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY

from kl_patches.integrations.verl.audit.cells import (
    GROUP_SIZE, KL_LOSS_TYPES, LOSS_FIX, OFF_TOKEN_RATIO, OFF_UNWEIGHTED, RTG_FIX, Cell, KLSettings, ProblemContext,
    run_cell, settings_from_config,
)
from kl_patches.integrations.verl.config import (
    LOSS_KEY, LOSS_OVERRIDES, LOSS_VALUE, REWARD_KEY, REWARD_VALUE, check_trainer_config, explicit_mode, lookup,
)


def verl_config_dir() -> str:
    import verl

    return os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def load_user_config(config: str | None = None, args: Sequence[str] = ()):
    """The trainer configuration ``python -m verl.trainer.main_ppo`` would compose: verl's ``ppo_trainer``
    defaults, then the YAML file ``config`` (a hydra config with a ``defaults`` list is composed from its own
    directory with verl's config directory on the search path; a plain / dumped config is merged over verl's
    defaults), then the hydra overrides ``args``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    args = [arg for arg in args if arg]
    for arg in args:
        if "=" not in arg:
            raise ValueError(f"expected hydra overrides key=value after --, got {arg!r}")
    GlobalHydra.instance().clear()
    if config is None:
        with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
            return compose(config_name="ppo_trainer", overrides=args)
    path = os.path.abspath(config)
    if not os.path.isfile(path):
        raise ValueError(f"--config {config}: no such file")
    user = OmegaConf.load(path)
    if "defaults" in user:
        name = os.path.splitext(os.path.basename(path))[0]
        search = f"hydra.searchpath=[file://{verl_config_dir()}]"
        with initialize_config_dir(config_dir=os.path.dirname(path), version_base=None):
            return compose(config_name=name, overrides=[search, *args])
    with initialize_config_dir(config_dir=verl_config_dir(), version_base=None):
        base = compose(config_name="ppo_trainer")
    OmegaConf.set_struct(base, False)
    merged = OmegaConf.merge(base, user)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(args):
        with open_dict(merged):
            OmegaConf.update(merged, override.key_or_group, override.value(), merge=True)
    return merged


def user_cell(settings: KLSettings) -> Cell | None:
    """The cell of the user's configuration, with the reasons and the override that fixes it."""
    loss_on = settings.use_kl_loss and settings.kl_loss_coef != 0
    reward_on = settings.use_kl_in_reward and settings.kl_coef != 0
    if not loss_on and not reward_on:
        return None
    parts, on, off = [], [], []
    placement = "reward+loss" if loss_on and reward_on else ("loss" if loss_on else "reward")
    if loss_on:
        parts.append(f"actor.kl_loss_type={settings.kl_loss_type} (kl_loss_coef={settings.kl_loss_coef})")
        if settings.kl_loss_type == LOSS_VALUE:
            on.append("loss side: k1-rtg-loss, exact")
            off.append("loss side: k1-rtg-loss with per-decision weights, exact")
        else:
            reason = KL_LOSS_TYPES.get(settings.kl_loss_type, ("", "verl's per-token estimator in the loss."))[1]
            on.append(f"loss side: {reason[:-1]}")
            off.append(f"loss side: {reason[:-1]}; {OFF_UNWEIGHTED}")
    if reward_on:
        parts.append(f"algorithm.kl_penalty={settings.kl_penalty} (kl_coef={settings.kl_coef}), "
                     f"adv_estimator={settings.adv_estimator}")
        if settings.kl_penalty == REWARD_VALUE:
            on.append("reward side: k1-in-reward, exact on-policy")
            off.append(f"reward side: k1-in-reward is exact on-policy only (PPO token ratio); for stale batches "
                       f"use {LOSS_VALUE}")
        else:
            on.append(f"reward side: verl's {settings.kl_penalty} in the reward through {settings.adv_estimator}")
            off.append(f"reward side: {OFF_TOKEN_RATIO}")
    if settings.loss_agg_mode == "seq-mean-token-mean":
        parts.append("loss_agg_mode=seq-mean-token-mean")
    if loss_on and reward_on:
        on.append("both KL terms are applied and their gradients add up")
        off.append("both KL terms are applied and their gradients add up")
    # The fix: the loss-side value is exact everywhere; the reward-side value on-policy with a batch-constant loss.
    fix_off = RTG_FIX if reward_on else LOSS_FIX
    stale = settings.ppo_epochs > 1 or settings.mini_batches > 1
    if reward_on and not loss_on and not stale:
        # k1-in-reward is exact through verl's step with a policy-loss normaliser fixed by the configuration
        # (token-mean divides by the realised token count); on stale mini-batches the driver refuses it
        fix_on = f"{REWARD_KEY}={REWARD_VALUE} actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum"
    else:
        fix_on = fix_off
    note = (f"this configuration updates on stale batches (ppo_epochs={settings.ppo_epochs}, "
            f"{settings.mini_batches} mini-batches per step): the off-policy record applies to every mini-batch "
            f"after the first" if stale else
            "one mini-batch and one epoch per step: the on-policy record applies (up to rollout/trainer mismatch)")
    estimator = "+".join(dict.fromkeys(
        ([LOSS_VALUE if settings.kl_loss_type == LOSS_VALUE else settings.kl_loss_type] if loss_on else [])
        + ([settings.kl_penalty] if reward_on else [])))
    return Cell("your configuration: " + "; ".join(parts), settings, estimator, placement,
                "; ".join(on) + ".", "; ".join(off) + ".", fix_on, fix_off,
                mode=LIBRARY, group_size=GROUP_SIZE, notes=(note,))


ENGINE_LOGP_FIX = "actor_rollout_ref.rollout.calculate_log_probs=True"


def with_engine_logp(records: list[AuditRecord], composed) -> list[AuditRecord]:
    """A fix that switches to k1-rtg-loss also asks for the engine's log-probs (mu = the sampler) when the
    configuration has none: verl 0.8's default (``rollout.calculate_log_probs=False``), or the user's choice."""
    if lookup(composed, "actor_rollout_ref.rollout.calculate_log_probs", True) is not False:
        return records
    switch = f"kl_loss_type={LOSS_VALUE}"
    for record in records:
        if record.fix and switch in record.fix and ENGINE_LOGP_FIX not in record.fix:
            record.fix = f"{record.fix} {ENGINE_LOGP_FIX}"
    return records


def audit_user_config(spec: PolicySpec, config: str | None, args: Sequence[str], version: str) -> list[AuditRecord]:
    composed = load_user_config(config, args)
    check_trainer_config(composed)  # the driver's refusals, exactly as a run would meet them
    return with_engine_logp(_audit_user_config(spec, config, args, version, composed), composed)


def _audit_user_config(spec: PolicySpec, config: str | None, args: Sequence[str], version: str,
                       composed) -> list[AuditRecord]:
    mode = explicit_mode(composed)
    if mode in (K1_RTG_LOSS, K1_IN_REWARD):
        return audit_user_step(spec, config, args, composed, mode, version)
    settings = settings_from_config(composed)
    cell = user_cell(settings)
    records = []
    for off_policy in (False, True):
        ctx = ProblemContext.build(spec, off_policy)
        if cell is None:
            records.append(AuditRecord(
                library="verl", library_version=version, configuration="your configuration: no KL term",
                mode=LIBRARY, estimator="-", placement="-", policy=ctx.problem.policy_label, rel_err=None,
                cosine=None, norm_ratio=None, verdict=NOT_COVERED,
                reason="no KL term is on (use_kl_loss / use_kl_in_reward false, or a zero coefficient): "
                       "nothing to audit.", fix=LOSS_OVERRIDES, spec=ctx.problem.spec.as_dict(), user_config=True,
            ))
        else:
            records.append(run_cell(cell, ctx, version, user_config=True))
    return records


def audit_user_step(spec: PolicySpec, config: str | None, args: Sequence[str], composed, mode: str,
                    version: str) -> list[AuditRecord]:
    """The user's kl-patches configuration through verl's step, with the user's settings on the audit's batch
    (one prompt x 2 responses, one mini-batch, one epoch: the off-policy record stands for every stale mini-batch)."""
    from kl_patches.integrations.verl.audit.steps import BASE, STEP_GROUP_SIZE, StepCell, run_step_cell, step_spec

    spec = step_spec(spec)
    actor = composed.actor_rollout_ref.actor
    gpus = int(lookup(composed, "trainer.n_gpus_per_node", 1) or 1) * int(lookup(composed, "trainer.nnodes", 1) or 1)
    dp = 2 if gpus >= 2 else 1
    micro = actor.get("ppo_micro_batch_size_per_gpu") or 1
    sizing = [item for item in BASE if "micro_batch_size_per_gpu" not in item and "adv_estimator" not in item]
    sizing += [f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={min(int(micro), STEP_GROUP_SIZE // dp)}",
               "actor_rollout_ref.actor.ppo_epochs=1", f"data.max_response_length={spec.horizon}"]
    audited = load_user_config(config, [*args, *sizing])
    check_trainer_config(audited)
    engine = bool(lookup(audited, "actor_rollout_ref.rollout.calculate_log_probs", True))
    label = "your configuration: " + " ".join(
        f"{key}={lookup(composed, key)}" for key in (
            (LOSS_KEY, "actor_rollout_ref.actor.loss_agg_mode", "actor_rollout_ref.actor.use_dynamic_bsz",
             "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", "trainer.balance_batch")
            if mode == K1_RTG_LOSS else (REWARD_KEY, "algorithm.adv_estimator", "actor_rollout_ref.actor.loss_agg_mode")))
    notes = (f"audited on one prompt x {STEP_GROUP_SIZE} responses, one mini-batch, one epoch, dp {dp} simulated, "
             f"data.max_response_length = the audit's horizon (the normaliser's length only scales beta); the "
             f"off-policy record stands for every stale mini-batch / epoch",)
    if mode == K1_RTG_LOSS:
        on = "k1-rtg-loss through verl's step with your settings: exact."
        off = "per-decision prefix weights from the sampler's log-probs: exact on stale batches, through verl's step."
        fix = LOSS_OVERRIDES
        fix_off = fix
    else:
        on = "k1-in-reward through verl's step with your settings."
        off = ("exact on-policy only: the PPO token ratio corrects each action but not the prefix distribution.")
        fix = f"actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum (or {LOSS_OVERRIDES})"
        fix_off = f"{LOSS_OVERRIDES} algorithm.use_kl_in_reward=False"
    cell = StepCell(label, (), mode, on, off, fix, fix_off, dp_size=dp, notes=notes)
    records = [run_step_cell(cell, spec, off_policy, version, config=audited, user_config=True)
               for off_policy in (False, True)]
    if mode == K1_RTG_LOSS and not engine:
        mismatch = StepCell(label + " (engine/trainer mismatch 0.1 emulated)", (), mode,
                            "without the engine's log-probs (rollout.calculate_log_probs=False) mu is the trainer's "
                            "recomputation: an engine/trainer mismatch is left uncorrected.",
                            "mu is the trainer's recomputation: the mismatch is left uncorrected.",
                            "actor_rollout_ref.rollout.calculate_log_probs=True",
                            "actor_rollout_ref.rollout.calculate_log_probs=True", dp_size=dp, mismatch=0.1, notes=notes)
        records += [run_step_cell(mismatch, spec, off_policy, version, config=audited, user_config=True)
                    for off_policy in (False, True)]
    return records
