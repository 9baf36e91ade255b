"""Loss-level audit cells of verl's own KL values (and k1-in-reward's advantage), through verl's own functions.

The kl-patches values are audited through verl's whole step in ``steps.py``; these cells show what verl's own
values give.

Each cell feeds the core's tiny enumerable policy (``kl_patches.audit``) to verl:

* loss side: ``verl.workers.utils.losses.ppo_loss`` with a real ``ActorConfig`` and a micro-batch
  ``TensorDict`` laid out as verl's engine hands it over (one-token prompts, log-probs in the no-padding layout
  of the model output, padded response fields, ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size``);
* reward side: ``verl.trainer.ppo.ray_trainer.apply_kl_penalty`` and ``compute_advantage`` on a ``DataProto``
  (``uid`` = group), then the policy-gradient loss of the same ``ppo_loss``.

The functions are looked up on their modules at call time, so kl-patches' patches (installed by the plugin on
``import verl``; they delegate to verl's original for every verl value) are what runs. ``audit()`` is what
``kl-patches check --library verl`` prints; ``verl_actor_loss`` / ``make_verl_loss`` compute verl's loss for
any batch with the AuditBatch fields (tokens, mask, logp, ref_logp, behaviour_logp, group_ids), for benchmarks.

Conventions, recorded on every record: the KL coefficient is 1 on the side audited; task rewards are zero (the
gradient audited is the KL term's); a token-mean normaliser (``batch_num_tokens``) is fixed at the expected
global token count of the batch, as in a large batch where it does not depend on any one sample (with this
batch's own count the loss is a ratio estimator, biased by O(1/batch) whatever the KL term);
``global_batch_size`` is the number of responses. The declared ``scale`` is the constant that normaliser
(and GRPO's mean baseline, (G-1)/G) multiplies the KL gradient by.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from kl_patches.audit import AuditBatch, AuditProblem, AuditRecord, PolicySpec, audit_record, build_problem
from kl_patches.audit import GROUP_SIZE, exact_kl_gradient, per_group
from kl_patches.audit.cells import Cell as CellBase
from kl_patches.audit.records import NOT_COVERED
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY
from kl_patches.patching import installed_version

from kl_patches.integrations.verl.config import (
    LOSS_FLAG,
    LOSS_KEY,
    LOSS_OVERRIDES,
    LOSS_VALUE,
    REWARD_FLAG,
    REWARD_KEY,
    REWARD_VALUE,
    check_trainer_config,
)
from kl_patches.integrations.verl.compat import loss_agg_modes  # the values the installed verl accepts

Tensor = torch.Tensor

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


# ------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class KLSettings:
    """The verl settings that decide the KL gradient; defaults are verl 0.9's."""

    use_kl_loss: bool = False
    kl_loss_type: str = "low_var_kl"
    kl_loss_coef: float = 0.001
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: int | None = None
    use_kl_in_reward: bool = False
    kl_penalty: str = "kl"
    kl_coef: float = 0.001
    adv_estimator: str = "gae"
    norm_adv_by_std_in_grpo: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    #: data.max_response_length: the fixed length of k1-rtg-loss' normaliser (handed to the worker by the driver)
    max_response_length: int | None = None
    truncation: float | None = None
    #: the user's actor config node (policy-loss mode, clip ratios, ...) when audited from a configuration
    actor_node: Any = field(default=None, compare=False, repr=False)


#: hydra override key -> KLSettings field
OVERRIDE_KEYS = {
    LOSS_FLAG: "use_kl_loss",
    LOSS_KEY: "kl_loss_type",
    "actor_rollout_ref.actor.kl_loss_coef": "kl_loss_coef",
    "actor_rollout_ref.actor.loss_agg_mode": "loss_agg_mode",
    "actor_rollout_ref.actor.loss_scale_factor": "loss_scale_factor",
    "actor_rollout_ref.actor.ppo_epochs": "ppo_epochs",
    REWARD_FLAG: "use_kl_in_reward",
    REWARD_KEY: "kl_penalty",
    "algorithm.kl_ctrl.kl_coef": "kl_coef",
    "algorithm.adv_estimator": "adv_estimator",
    "algorithm.norm_adv_by_std_in_grpo": "norm_adv_by_std_in_grpo",
    "algorithm.gamma": "gamma",
    "algorithm.lam": "lam",
}


def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def settings_from_overrides(overrides: Mapping[str, Any] | Sequence[str] = (), base: KLSettings | None = None) -> KLSettings:
    """KLSettings from hydra-style overrides (``key=value`` strings) or a ``{dotted key: value}`` mapping.
    Only the keys of :data:`OVERRIDE_KEYS` are accepted here (use ``settings_from_config`` for a full config)."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            if "=" not in text:
                raise ValueError(f"expected a hydra override key=value, got {text!r}")
            key, value = text.split("=", 1)
            items.append((key.lstrip("+"), _parse_value(value)))
    changes = {}
    for key, value in items:
        if key not in OVERRIDE_KEYS:
            raise ValueError(f"unsupported key {key!r}; accepted: {', '.join(OVERRIDE_KEYS)}")
        changes[OVERRIDE_KEYS[key]] = value
    return replace(base or KLSettings(), **changes)


def settings_from_config(config: Any) -> KLSettings:
    """KLSettings from a full trainer configuration (a composed hydra DictConfig)."""
    from omegaconf import OmegaConf

    values = {name: OmegaConf.select(config, key) for key, name in OVERRIDE_KEYS.items()}
    values = {name: value for name, value in values.items() if value is not None or name == "loss_scale_factor"}
    train = OmegaConf.select(config, "data.train_batch_size")
    mini = OmegaConf.select(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
    mini_batches = max(1, int(train) // int(mini)) if train and mini else 1
    return KLSettings(**values, mini_batches=mini_batches, actor_node=OmegaConf.select(config, "actor_rollout_ref.actor"))


def describe(settings: KLSettings) -> str:
    """The settings as the overrides a user would type (the non-default KL ones)."""
    default = KLSettings()
    names = {name: key for key, name in OVERRIDE_KEYS.items()}
    parts = []
    for item in fields(KLSettings):
        if item.name in names and getattr(settings, item.name) != getattr(default, item.name):
            key = names[item.name].replace("actor_rollout_ref.", "")
            parts.append(f"{key}={getattr(settings, item.name)}")
    return " ".join(parts) or "(verl defaults: no KL term)"


# --------------------------------------------------------------------------------- verl's own objects


def ensure_patched() -> None:
    """The plugin patches verl on ``import verl``; a process that disabled plugins
    (``VERL_USE_EXTERNAL_PLUGINS=none``) gets the same patches here. Idempotent."""
    import verl  # noqa: F401  (runs the plugin)

    from kl_patches.integrations.verl import INTEGRATION

    if INTEGRATION.enabled_mode() is None:
        INTEGRATION.enable(LIBRARY)


def actor_config(settings: KLSettings):
    """A real verl ``ActorConfig`` (the user's actor node when audited from a configuration)."""
    if settings.actor_node is not None:
        from omegaconf import OmegaConf

        from verl.utils.config import omega_conf_to_dataclass

        node = OmegaConf.create(OmegaConf.to_container(settings.actor_node, resolve=True))
        # micro-batch sizes decide how verl splits the batch, not the loss formula; the audit's batch is one group
        if node.get("ppo_micro_batch_size") is None and node.get("ppo_micro_batch_size_per_gpu") is None:
            node.ppo_micro_batch_size_per_gpu = 1
        return omega_conf_to_dataclass(node)
    from verl.workers.config import ActorConfig

    from kl_patches.integrations.verl.kl import SETTINGS_KEY, LossSettings

    info = {}
    if settings.kl_loss_type == LOSS_VALUE and settings.max_response_length is not None:
        # what the driver's validate_config hands every worker (config.install_loss_settings)
        info[SETTINGS_KEY] = LossSettings(settings.max_response_length, settings.truncation).as_dict()
    return ActorConfig(
        strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, use_kl_loss=settings.use_kl_loss,
        kl_loss_type=settings.kl_loss_type, kl_loss_coef=settings.kl_loss_coef, loss_agg_mode=settings.loss_agg_mode,
        loss_scale_factor=settings.loss_scale_factor, ppo_epochs=settings.ppo_epochs, global_batch_info=info,
    )


def algo_config(settings: KLSettings):
    from verl.trainer.config import AlgoConfig, KLControlConfig

    return AlgoConfig(
        gamma=settings.gamma, lam=settings.lam, adv_estimator=settings.adv_estimator,
        norm_adv_by_std_in_grpo=settings.norm_adv_by_std_in_grpo, use_kl_in_reward=settings.use_kl_in_reward,
        kl_penalty=settings.kl_penalty, kl_ctrl=KLControlConfig(kl_coef=settings.kl_coef),
    )


def _check_right_padded(mask: Tensor) -> Tensor:
    lengths = mask.sum(dim=-1)
    if not torch.equal(mask, torch.arange(mask.shape[1])[None, :] < lengths[:, None]):
        raise ValueError("verl's micro-batches hold right-padded responses: every mask row must be 1...1 0...0")
    return lengths


def uid_strings(group_ids: Tensor) -> list[str]:
    return [f"group-{int(g)}" for g in group_ids]


def micro_batch(batch, *, advantages: Tensor | None = None, dp_size: int = 1, batch_num_tokens: Any = None,
                global_batch_size: Any = None, with_uid: bool = True, rollout_logp: Tensor | None = None):
    """(model_output, data): verl's actor micro-batch for ``batch``'s responses, as the engine hands it to
    ``ppo_loss``. Prompts are one token; ``model_output["log_probs"]`` holds ``batch.logp`` (attached) in the
    no-padding layout of a model output (each sequence's log-probs shifted by one token)."""
    from verl.utils import tensordict_utils as tu

    mask = batch.mask
    lengths = _check_right_padded(mask)
    n, horizon = mask.shape
    logp = batch.logp
    filler = torch.zeros(1, dtype=logp.dtype)
    pieces = []
    for row in range(n):
        pieces += [logp[row, : int(lengths[row])], filler]  # position p predicts token p + 1
    log_probs = torch.cat(pieces)
    ones = torch.ones(n, 1, dtype=torch.long)
    tensors = {
        "prompts": torch.zeros(n, 1, dtype=torch.long),
        "responses": batch.tokens,
        "attention_mask": torch.cat([ones, mask.long()], dim=1),
        "response_mask": mask.long(),
        "old_log_probs": batch.behaviour_logp.detach(),
        "ref_log_prob": batch.ref_logp.detach(),
        "advantages": torch.zeros(n, horizon, dtype=logp.dtype) if advantages is None else advantages.detach(),
    }
    if rollout_logp is not None:  # the inference engine's log-probs (verl's rollout_log_probs)
        tensors["rollout_log_probs"] = rollout_logp.detach()
    if with_uid:
        tensors["uid"] = uid_strings(batch.group_ids)
    data = tu.get_tensordict(tensors, {"dp_size": dp_size, "batch_num_tokens": batch_num_tokens,
                                       "global_batch_size": global_batch_size})
    return {"log_probs": log_probs}, data


def token_level_scores(mask: Tensor, scores: Tensor | None, dtype) -> Tensor:
    """verl's outcome reward layout: the score on the last response token."""
    out = torch.zeros(mask.shape, dtype=dtype)
    if scores is not None:
        last = (mask.sum(-1) - 1).clamp(min=0)
        out[torch.arange(mask.shape[0]), last] = scores.to(dtype) * mask.any(-1)
    return out


def reward_data(batch, settings: KLSettings, *, scores: Tensor | None = None, values: Tensor | None = None):
    """verl's trainer-side ``DataProto`` for ``batch`` (``uid`` = its group ids)."""
    from verl import DataProto

    dtype = batch.behaviour_logp.dtype
    tensors = {
        "response_mask": batch.mask.long(),
        "old_log_probs": batch.behaviour_logp.detach(),
        "ref_log_prob": batch.ref_logp.detach(),
        "token_level_scores": token_level_scores(batch.mask, scores, dtype),
    }
    if values is not None:
        tensors["values"] = values.to(dtype)
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": np.array(uid_strings(batch.group_ids), dtype=object)})


def apply_reward(data, settings: KLSettings):
    """verl's ``apply_kl_penalty`` when the KL is in the reward, else the scores as the rewards (as verl's fit)."""
    from verl.trainer.ppo import core_algos, ray_trainer

    if settings.use_kl_in_reward:
        kl_ctrl = core_algos.FixedKLController(kl_coef=settings.kl_coef)
        data, _ = ray_trainer.apply_kl_penalty(data, kl_ctrl=kl_ctrl, kl_penalty=settings.kl_penalty)
    else:
        data.batch["token_level_rewards"] = data.batch["token_level_scores"]
    return data


def reward_advantages(batch, settings: KLSettings, *, scores: Tensor | None = None, values: Tensor | None = None,
                      num_repeat: int = GROUP_SIZE) -> Tensor:
    """verl's advantages for ``batch``: ``apply_kl_penalty`` + ``compute_advantage`` (detached)."""
    from verl.trainer.ppo import ray_trainer

    data = apply_reward(reward_data(batch, settings, scores=scores, values=values), settings)
    data = ray_trainer.compute_advantage(
        data, adv_estimator=settings.adv_estimator, gamma=settings.gamma, lam=settings.lam, num_repeat=num_repeat,
        norm_adv_by_std_in_grpo=settings.norm_adv_by_std_in_grpo, config=algo_config(settings),
    )
    return data.batch["advantages"]


def verl_actor_loss(batch, settings: KLSettings, *, actor=None, scores: Tensor | None = None,
                    values: Tensor | None = None, batch_num_tokens: Any = None, global_batch_size: Any = None,
                    dp_size: int = 1, with_uid: bool = True) -> tuple[Tensor, dict]:
    """verl's actor loss for one training batch: advantages from verl's reward path (when the KL is in the reward
    or ``scores`` are given; zeros otherwise), then ``ppo_loss`` (policy gradient + the loss-side KL if on)."""
    from verl.workers.utils import losses

    advantages = None
    if settings.use_kl_in_reward or scores is not None:
        advantages = reward_advantages(batch, settings, scores=scores, values=values, num_repeat=batch.mask.shape[0])
    model_output, data = micro_batch(batch, advantages=advantages, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                                     global_batch_size=global_batch_size, with_uid=with_uid)
    return losses.ppo_loss(actor if actor is not None else actor_config(settings), model_output, data)


def make_verl_loss(overrides: Mapping[str, Any] | Sequence[str] | KLSettings = (), *,
                   batch_num_tokens: Any = None, global_batch_size: Any = None,
                   scores: Callable[[Any], Tensor] | None = None, values: Callable[[Any], Tensor] | None = None,
                   with_uid: bool = True) -> Callable[[Any], Tensor]:
    """A function batch -> verl's scalar actor loss for the configuration ``overrides`` (hydra-style strings or a
    ``{dotted key: value}`` mapping, see :data:`OVERRIDE_KEYS`), for training-loop benchmarks. ``scores`` /
    ``values`` map a batch to task rewards (B,) / critic values (B, T) when the run has them."""
    ensure_patched()
    settings = overrides if isinstance(overrides, KLSettings) else settings_from_overrides(overrides)
    actor = actor_config(settings)

    def loss(batch) -> Tensor:
        return verl_actor_loss(
            batch, settings, actor=actor, scores=None if scores is None else scores(batch),
            values=None if values is None else values(batch), batch_num_tokens=batch_num_tokens,
            global_batch_size=global_batch_size, with_uid=with_uid,
        )[0]

    return loss


# ----------------------------------------------------------------------------------- audit machinery


@dataclass
class ProblemContext:
    """One regime's problem with what every cell shares: the true gradient, sampling weights, the critics."""

    problem: AuditProblem
    truth: Tensor
    weights: Tensor  # sampling probabilities of the enumerated responses
    expected_length: float
    critics: dict = field(default_factory=dict)

    @classmethod
    def build(cls, spec: PolicySpec, off_policy: bool) -> "ProblemContext":
        problem = build_problem(spec, off_policy=off_policy)
        with torch.no_grad():
            sampler = problem.policy if problem.on_policy else problem.behaviour
            weights = sampler.token_logprobs(problem.tokens, problem.mask).sum(-1).exp()
        expected_length = float((weights * problem.mask.sum(-1)).sum())
        return cls(problem, exact_kl_gradient(problem), weights, expected_length)

    def full_batch(self) -> AuditBatch:
        """Every enumerated response once (detached log-probs; for the critic's rewards)."""
        p = self.problem
        with torch.no_grad():
            logp = p.policy.token_logprobs(p.tokens, p.mask)
            ref = p.reference.token_logprobs(p.tokens, p.mask)
            behaviour = logp if p.on_policy else p.behaviour.token_logprobs(p.tokens, p.mask)
        n = p.tokens.shape[0]
        return AuditBatch(p.tokens, p.mask, logp, ref, behaviour, torch.arange(n), torch.arange(n), 1, p.on_policy)

    def critic(self, settings: KLSettings) -> Tensor:
        """A perfect critic for the rewards verl's reward path produces under ``settings``: V(s_t) = the
        expected discounted reward-to-go from the prefix, under the sampling policy, by enumeration."""
        key = (settings.use_kl_in_reward, settings.kl_penalty, settings.kl_coef, settings.gamma)
        if key not in self.critics:
            batch = self.full_batch()
            rewards = apply_reward(reward_data(batch, settings), settings).batch["token_level_rewards"].detach()
            self.critics[key] = perfect_values(self.problem.tokens, self.problem.mask, rewards, self.weights,
                                               settings.gamma)
        return self.critics[key]


def perfect_values(tokens: Tensor, mask: Tensor, rewards: Tensor, weights: Tensor, gamma: float) -> Tensor:
    """V(s_t) for every enumerated response and position: E[sum_k gamma^k r_{t+k} | y_<t] by enumeration."""
    n, horizon = tokens.shape
    to_go = torch.zeros_like(rewards)
    running = torch.zeros(n, dtype=rewards.dtype)
    for t in reversed(range(horizon)):
        running = rewards[:, t] + gamma * running * mask[:, t]
        to_go[:, t] = running
    values = torch.zeros_like(rewards)
    for t in range(horizon):
        sums: dict[tuple, list] = {}
        for row in range(n):
            if mask[row, t]:
                entry = sums.setdefault(tuple(tokens[row, :t].tolist()), [0.0, 0.0])
                entry[0] += float(weights[row] * to_go[row, t])
                entry[1] += float(weights[row])
        for row in range(n):
            if mask[row, t]:
                total, mass = sums[tuple(tokens[row, :t].tolist())]
                values[row, t] = total / mass
    return values


def normaliser(mode: str, group_size: int, ctx: ProblemContext, loss_scale_factor: Any,
               kl_patches_term: bool = False) -> float:
    """The constant a loss aggregated with ``mode`` is divided by, for one group (see module docstring).
    ``seq-mean-token-mean`` is a sequence mean of per-response token means: its constant is the number of
    responses (the 1/|y_i| weights are the bias under audit), except for the k1-rtg-loss term, which replaces them
    by the batch-constant global token count."""
    if mode == "token-mean" or (mode == "seq-mean-token-mean" and kl_patches_term):
        return group_size * ctx.expected_length
    if mode == "token-sum":
        return 1.0
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        return float(group_size)
    if mode == "seq-mean-token-sum-norm":
        return float(group_size * (loss_scale_factor or ctx.problem.spec.horizon))
    raise ValueError(f"Invalid loss_agg_mode: {mode}")


def declared_scale(settings: KLSettings, group_size: int, ctx: ProblemContext) -> float:
    """The constant the configuration multiplies grad KL_seq by when its KL terms are exact."""
    def group_scale(kl_patches_term: bool = False) -> float:
        return group_size / normaliser(settings.loss_agg_mode, group_size, ctx, settings.loss_scale_factor,
                                       kl_patches_term)

    scale = 0.0
    if settings.use_kl_loss:
        scale += settings.kl_loss_coef * group_scale(settings.kl_loss_type == LOSS_VALUE)
    if settings.use_kl_in_reward:
        factor = 1.0
        if settings.adv_estimator == "grpo" and settings.kl_penalty != REWARD_VALUE:
            factor = (group_size - 1) / group_size  # GRPO's group mean includes the sample itself
        scale += settings.kl_coef * group_scale() * factor
    return scale


def per_response_set(scalar_loss: Callable[[AuditBatch], Tensor]) -> Callable[[AuditBatch], Tensor]:
    """``per_group``, computing each *set* of responses once (``per_group(..., order_invariant=True)``): every verl
    computation on a group (normalisers, GRPO / RLOO statistics over a ``uid``, leave-one-out baselines, batch
    whitening) is invariant to the order of its rows (tests/integrations/verl check this against ``per_group``).
    Halves the audit's calls into verl for groups of 2."""
    return per_group(scalar_loss, order_invariant=True)


def cell_loss(settings: KLSettings, ctx: ProblemContext, group_size: int, with_uid: bool = True,
              grouping: Callable = per_response_set):
    """The per-group loss of ``settings`` through verl's code (AuditBatch -> (G,))."""
    actor = actor_config(settings)
    tokens = normaliser("token-mean", group_size, ctx, None)
    gae = settings.use_kl_in_reward and settings.adv_estimator == "gae"
    critic = ctx.critic(settings) if gae else None

    def scalar(group: AuditBatch) -> Tensor:
        values = critic[group.rows] if critic is not None else None
        return verl_actor_loss(group, settings, actor=actor, values=values, batch_num_tokens=tokens,
                               global_batch_size=group_size, with_uid=with_uid)[0]

    return grouping(scalar)


@dataclass(frozen=True)
class Cell(CellBase):
    settings: KLSettings
    estimator: str
    placement: str
    reason_on: str
    reason_off: str
    fix_on: str | None = None
    fix_off: str | None = None
    mode: str = LIBRARY
    group_size: int = 1
    with_uid: bool = True
    notes: tuple[str, ...] = ()


CONVENTION_NOTE = ("verl cells: {coefficients}, zero task reward, batch_num_tokens fixed at the expected token count "
                   "of the batch, global_batch_size = responses per batch; kl-patches' patches installed (they "
                   "delegate to verl's original for every verl value)")


def convention_note(user_config: bool) -> str:
    return CONVENTION_NOTE.format(coefficients="the configured KL coefficients" if user_config else "KL coefficient 1")


def run_cell(cell: Cell, ctx: ProblemContext, version: str, user_config: bool = False) -> AuditRecord:
    on = ctx.problem.on_policy
    try:
        loss = cell_loss(cell.settings, ctx, cell.group_size, cell.with_uid)
        return audit_record(
            ctx.problem, loss, library="verl", library_version=version, configuration=cell.configuration,
            estimator=cell.estimator, placement=cell.placement, mode=cell.mode, group_size=cell.group_size,
            scale=declared_scale(cell.settings, cell.group_size, ctx), truth=ctx.truth,
            reason=cell.reason(on), fix=cell.fix_for(on),
            notes=[convention_note(user_config), *cell.notes], user_config=user_config,
            overrides=describe(cell.settings), expected_length=ctx.expected_length,
        )
    except Exception as error:  # a verl path this CPU audit cannot run: say so, never drop the cell
        return not_covered(cell, ctx, version, f"verl's code raised {type(error).__name__}: {error}", user_config)


def not_covered(cell: Cell, ctx: ProblemContext, version: str, reason: str, user_config: bool = False) -> AuditRecord:
    return AuditRecord(
        library="verl", library_version=version, configuration=cell.configuration, mode=cell.mode,
        estimator=cell.estimator, placement=cell.placement, policy=ctx.problem.policy_label, rel_err=None,
        cosine=None, norm_ratio=None, verdict=NOT_COVERED, reason=reason, fix=None,
        spec={**ctx.problem.spec.as_dict(), "overrides": describe(cell.settings)},
        notes=[convention_note(user_config), *cell.notes], user_config=user_config,
    )


# ------------------------------------------------------------------------------------------ the cells

OFF_UNWEIGHTED = "off-policy nothing reweights the stale samples, so it is not even that gradient"
OFF_TOKEN_RATIO = ("off-policy the PPO token ratio corrects each action but not the prefix distribution (and the "
                   "clip zeroes some tokens)")
LOSS_FIX = f"{LOSS_KEY}={LOSS_VALUE}"
RTG_FIX = f"{LOSS_OVERRIDES} {REWARD_FLAG}=False"
REWARD_FIX_ON = f"{REWARD_KEY}={REWARD_VALUE} (or {LOSS_OVERRIDES})"
#: the reward-side cells' policy-loss aggregation: a normaliser the configuration fixes (global_batch_size), so a
#: loss-level "exact" here holds through verl's step too; token-mean divides by the realised token count, a ratio
#: estimator, which the step cells audit (steps.py: biased)
REWARD_AGG = "seq-mean-token-sum"
REWARD_AGG_NOTE = ("policy loss aggregated with loss_agg_mode=seq-mean-token-sum (normaliser fixed by the "
                   "configuration); verl's default token-mean divides by the realised token count: see the step cells")

KL_LOSS_TYPES = {
    # value: (estimator label, on-policy reason)
    "kl": ("k1", "k1 (= kl) in the loss: E[sum_t g_t] = 0, no KL force at all, only noise."),
    "abs": ("abs", "|l_t| in the loss: E[sum_t sign(l_t) g_t], the gradient of a different divergence, own token only."),
    "mse": ("k2", "k2 (= mse) in the loss: E[sum_t l_t g_t], the own-token term only, missing the future-token KL."),
    "low_var_kl": ("k3", "k3 (= low_var_kl, verl's default) in the loss: E[sum_t (1 - e^-l_t) g_t], the per-position "
                   "forward-KL gradient."),
    "kl+": ("k2-grad", "k1 value with k2's straight-through gradient: E[sum_t l_t g_t], own-token term only."),
    "abs+": ("k2-grad", "|l| value with k2's straight-through gradient: E[sum_t l_t g_t], own-token term only."),
    "mse+": ("k2", "mse+ is mse (no straight-through for k2): own-token term only."),
    "low_var_kl+": ("k2-grad", "k3 value with k2's straight-through gradient (verl's k3+ fix): E[sum_t l_t g_t], "
                    "own-token term only, missing the future-token KL."),
}
ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3", "kl+": "k1+", "mse+": "k2+", "low_var_kl+": "k3+"}

ESTIMATORS = {
    # label: (settings changes, on-policy reason for verl's k1, for verl's k3)
    "grpo": (dict(adv_estimator="grpo"),
             "GRPO divides the summed reward, KL included, by the group std: the KL force is rescaled per prompt "
             "(with no task reward it is normalised away entirely).",
             "k3 in the reward, then divided by the group std."),
    "grpo, norm_adv_by_std_in_grpo=False": (dict(adv_estimator="grpo", norm_adv_by_std_in_grpo=False),
             "sequence k1 minus the group mean: exact direction, scaled by (G-1)/G.",
             "k3 in the reward: grad KL_seq + E[G sum_t (e^-l_t - 1)], the regulariser nearly cancels near pi_ref."),
    "rloo": (dict(adv_estimator="rloo"),
             "sequence k1 with RLOO's leave-one-out baseline: exact.",
             "k3 in the reward: grad KL_seq + E[G sum_t (e^-l_t - 1)], the regulariser nearly cancels near pi_ref."),
    "gae, lam=1": (dict(adv_estimator="gae", lam=1.0),
             "per-token k1 reward-to-go with a perfect critic, then verl whitens the advantages over the batch "
             "(masked_whiten): a batch-dependent shift and scale, exact only as the batch grows without bound.",
             "k3 reward-to-go, and whitened over the batch."),
    "gae, lam=0.95": (dict(adv_estimator="gae", lam=0.95),
             "GAE(0.95) with a perfect critic is unbiased for the advantage, but verl whitens the advantages over "
             "the batch (masked_whiten): exact only as the batch grows without bound.",
             "k3 rewards, and whitened over the batch."),
    "reinforce_plus_plus": (dict(adv_estimator="reinforce_plus_plus"),
             "k1 reward-to-go, then whitened over the batch: exact only as the batch grows without bound.",
             "k3 reward-to-go, whitened over the batch."),
}


def _loss_cells() -> list[Cell]:
    cells = []
    for value, (estimator, reason) in KL_LOSS_TYPES.items():
        alias = f" (= {ALIASES[value]})" if value in ALIASES else ""
        settings = KLSettings(use_kl_loss=True, kl_loss_type=value, kl_loss_coef=1.0)
        cells.append(Cell(f"actor.kl_loss_type={value}{alias}", settings, estimator, "loss", reason,
                          f"{reason[:-1]}; {OFF_UNWEIGHTED}.", LOSS_FIX, LOSS_FIX))
    for mode in loss_agg_modes()[1:]:
        settings = KLSettings(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=1.0, loss_agg_mode=mode)
        reason = "k3 in the loss: the per-position forward-KL gradient"
        if mode == "seq-mean-token-mean":
            reason += ", and each response weighted by 1/|y_i| (length-weighted)"
        cells.append(Cell(f"actor.kl_loss_type=low_var_kl, loss_agg_mode={mode}", settings, "k3", "loss",
                          reason + ".", f"{reason}; {OFF_UNWEIGHTED}.", LOSS_FIX, LOSS_FIX))
    return cells


def _reward_cells() -> list[Cell]:
    cells = []
    for kl_penalty in ("kl", "low_var_kl"):
        for label, (changes, reason_k1, reason_k3) in ESTIMATORS.items():
            if label == "reinforce_plus_plus":  # whitened like GAE: audited with the kl-patches value only
                continue
            settings = KLSettings(use_kl_in_reward=True, kl_penalty=kl_penalty, kl_coef=1.0,
                                  loss_agg_mode=REWARD_AGG, **changes)
            reason = reason_k1 if kl_penalty == "kl" else reason_k3
            cells.append(Cell(f"algorithm.kl_penalty={kl_penalty}, {label}", settings,
                              "k1" if kl_penalty == "kl" else "k3", "reward", reason,
                              f"{reason[:-1]}; {OFF_TOKEN_RATIO}.", REWARD_FIX_ON, RTG_FIX,
                              group_size=GROUP_SIZE, notes=(REWARD_AGG_NOTE,)))
    for mode in loss_agg_modes()[1:]:
        settings = KLSettings(use_kl_in_reward=True, kl_penalty="kl", kl_coef=1.0, adv_estimator="rloo",
                              loss_agg_mode=mode)
        if mode == "seq-mean-token-mean":
            reason = "sequence k1 with RLOO's baseline, but the policy loss weights response i by 1/|y_i|: length-weighted."
            fix_on = f"actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum (or {LOSS_OVERRIDES})"
        else:
            reason = "sequence k1 with RLOO's baseline and a batch-constant policy-loss normaliser: exact."
            fix_on = REWARD_FIX_ON
        cells.append(Cell(f"algorithm.kl_penalty=kl, rloo, loss_agg_mode={mode}", settings, "k1", "reward", reason,
                          f"{reason[:-1]}; {OFF_TOKEN_RATIO}.", fix_on, RTG_FIX, group_size=GROUP_SIZE))
    off = (f"exact on-policy only: the KL part goes through the PPO token ratio, which corrects each action but not "
           f"the prefix distribution; for stale batches use {LOSS_VALUE}.")
    for label, (changes, _, _) in ESTIMATORS.items():
        settings = KLSettings(use_kl_in_reward=True, kl_penalty=REWARD_VALUE, kl_coef=1.0, loss_agg_mode=REWARD_AGG,
                              **changes)
        cells.append(Cell(
            f"algorithm.kl_penalty={REWARD_VALUE}, {label}", settings, "k1", "reward",
            "sequence k1 with a leave-one-out baseline added to the advantage after verl's estimator (never divided "
            "by a std, never whitened): exact.", off, None, RTG_FIX, mode=K1_IN_REWARD, group_size=GROUP_SIZE,
            notes=(REWARD_AGG_NOTE,),
        ))
    for mode in loss_agg_modes()[1:]:
        settings = KLSettings(use_kl_in_reward=True, kl_penalty=REWARD_VALUE, kl_coef=1.0, adv_estimator="grpo",
                              loss_agg_mode=mode)
        if mode == "seq-mean-token-mean":
            reason = ("the advantage's KL part is right, but verl's policy loss weights response i by 1/|y_i|: "
                      "length-weighted.")
            fix_on = f"actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum (or {LOSS_OVERRIDES})"
        else:
            reason = "KL part added after GRPO's std normalisation, batch-constant policy-loss normaliser: exact."
            fix_on = None
        cells.append(Cell(f"algorithm.kl_penalty={REWARD_VALUE}, grpo, loss_agg_mode={mode}", settings, "k1",
                          "reward", reason, off, fix_on, RTG_FIX, mode=K1_IN_REWARD, group_size=GROUP_SIZE))
    return cells


def default_cells() -> list[Cell]:
    return _loss_cells() + _reward_cells()


