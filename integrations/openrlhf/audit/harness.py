"""The exact audit of OpenRLHF's KL, through OpenRLHF's own code on the core's enumerated tiny policy.

Every cell runs, for each group of ``group_size`` responses (one prompt, ``--rollout.n_samples_per_prompt =
group_size``):

1. the reward path of ``RemoteExperienceMaker``: ``compute_approx_kl`` on the rollout log-probs with the configured
   estimator (skipped under ``--algo.kl.use_loss``, as ``make_experience`` does; ``make_experience`` itself needs Ray
   actor groups, so its two KL lines are mirrored here), then OpenRLHF's own
   ``RemoteExperienceMaker.compute_advantages_and_returns`` (``compute_reward``, the advantage estimator, whitening);
2. OpenRLHF's own ``ActorPPOTrainer.training_step`` (the class attribute, so a kl-patches patch is what runs) on a
   minimal trainer object: the actor returns the tiny policy's attached log-probs, ``actor_loss_fn`` is OpenRLHF's
   ``PolicyLoss`` built from the arguments as ``ActorPPOTrainer.__init__`` builds it, and ``strategy.backward``
   captures the loss instead of stepping an optimizer.

The loss normaliser ``batch_num_tokens`` is fixed at a constant (OpenRLHF divides by the optimizer step's global
token count, a near-constant at training batch sizes; a per-batch count would be a ratio estimator), beta = 1 (the KL
gradient is linear in ``--algo.kl.init_coef``) and the task reward is 0, so the whole gradient is the KL's.
OpenRLHF casts log-probs with ``.float()``; the audit's tensors keep float64 through those casts
(:class:`KeepFloat64`) so float32 rounding neither hides nor fakes a bias at the 1e-10 level.

The helpers :func:`audit_args`, :func:`reward_path`, :func:`training_loss` and :func:`openrlhf_loss` compute
OpenRLHF's loss for any arguments namespace on an ``AuditBatch``-like batch (benchmarks reuse them).

The **step** harness (:func:`ppo_step_fn`, :class:`StepSetup`) drives OpenRLHF's real ``ActorPPOTrainer.ppo_train``
on a whole generation batch instead: per-sample experiences, ``compute_advantages_and_returns``, the trainer's
``balance_experiences`` and rank split (as ``PPOTrainer`` and ``RayActorGroup.async_run_method_batch`` do), the real
``NaiveReplayBuffer`` (split, padding removal, shuffling ``DataLoader``, packing, ``setup_dynamic_batch``),
``iter_grad_accum_global_norm`` / ``get_loss_batch_info`` (the normaliser), ``training_step`` and ``PolicyLoss``,
several epochs, and N data-parallel ranks as threads whose collectives are summed in process. Only DeepSpeed is
emulated: ``backward`` scales by 1/gas (its ``gradient_accumulation_steps``, 1 under dynamic batching) and the
optimizer step averages the ranks' accumulated gradients and records them instead of moving the weights.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from kl_patches.audit import AuditBatch, AuditRecord, PolicySpec, audit_record, build_problem, exact_kl_gradient
from kl_patches.audit.cells import GROUP_SIZE
from kl_patches.audit.engine import accumulated_grad, per_group
from kl_patches.audit.records import NOT_COVERED
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, KLModeError
from kl_patches.patching import installed_version

LIBRARY_NAME = "openrlhf"
AUDIT_PROMPT = "kl-patches audit prompt"
#: Model paths OpenRLHF's argument checks need; nothing is loaded.
BASE_ARGV = ("--actor.model_name_or_path", "audit-actor", "--reward.model_name_or_path", "audit-reward")

Tensor = torch.Tensor


class KeepFloat64(torch.Tensor):
    """A tensor whose ``.float()`` keeps float64: OpenRLHF's arithmetic, without its float32 rounding."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float and args and args[0].dtype == torch.float64:
            return args[0]
        return super().__torch_function__(func, types, args, kwargs or {})


def keep64(tensor: Tensor) -> Tensor:
    return tensor.as_subclass(KeepFloat64)


def plain(tensor: Tensor) -> Tensor:
    return tensor.as_subclass(torch.Tensor)


# ----------------------------------------------------------------------------------------------- OpenRLHF modules

def _openrlhf():
    """OpenRLHF's modules the audit drives (placeholders are the caller's business: see :func:`audit`)."""
    from openrlhf.models import PolicyLoss, aggregate_loss
    from openrlhf.trainer.ppo_utils import experience_maker
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf.trainer.ray import ppo_actor

    return SimpleNamespace(PolicyLoss=PolicyLoss, aggregate_loss=aggregate_loss, experience_maker=experience_maker,
                           Experience=Experience, FixedKLController=FixedKLController, ppo_actor=ppo_actor)


@functools.lru_cache(maxsize=64)
def _parsed(argv: tuple[str, ...]):
    from kl_patches.integrations.openrlhf import config

    with contextlib.redirect_stdout(io.StringIO()):  # OpenRLHF prints its recommendations while checking
        return config.openrlhf_args(list(argv))


def audit_args(argv: Sequence[str] = (), **overrides):
    """OpenRLHF's arguments for ``train_ppo_ray <BASE_ARGV> <argv>`` (its own parser and checks), as a fresh copy;
    ``overrides`` set dotted attributes, e.g. ``audit_args(**{"algo.kl.use_loss": True})``."""
    args = copy.deepcopy(_parsed(tuple(BASE_ARGV) + tuple(argv)))
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = args
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    return args


# ------------------------------------------------------------------------------------------ the minimal trainer

class _CapturingStrategy:
    """What ``training_step`` uses of a DeepspeedStrategy: ``backward`` keeps the loss, the rest does nothing (one
    micro-batch per optimizer step: ``accumulated_gradient`` 1)."""

    ring_attn_group = None
    accumulated_gradient = 1

    def __init__(self, args) -> None:
        self.args = args
        self.loss: Tensor | None = None

    def backward(self, loss, model, optimizer) -> None:
        self.loss = loss

    def optimizer_step(self, *args, **kwargs) -> None:
        pass

    def moving_average(self, *args, **kwargs) -> None:
        pass

    def get_grad_norm(self, model) -> float:
        return 0.0

    def is_rank_0(self) -> bool:
        return True


class _PolicyActor:
    """Stands in for OpenRLHF's ``Actor``: returns the enumerated policy's attached per-token log-probs."""

    def __init__(self, log_probs: Tensor, sequences: Tensor) -> None:
        self.log_probs, self.sequences = log_probs, sequences

    def train(self, mode: bool = True) -> "_PolicyActor":
        return self

    def __call__(self, sequences, action_mask, attention_mask=None, return_output=False, return_entropy=False,
                 **_kwargs):
        if sequences is not self.sequences:
            raise RuntimeError("the audit's actor was called with sequences it did not compute log-probs for")
        output = SimpleNamespace(aux_loss=torch.zeros((), dtype=torch.float64),
                                 entropy=torch.zeros(self.log_probs.shape, dtype=torch.float64))
        return (self.log_probs, output) if return_output else self.log_probs


class _Scheduler:
    def get_last_lr(self) -> list[float]:
        return [0.0]


def minimal_trainer(args, log_probs: Tensor, sequences: Tensor):
    """An ``ActorPPOTrainer`` (its real class and methods) with only what ``training_step`` reads. ``__init__`` is
    not run (it needs CUDA and torch.distributed); the attributes it would set from ``args`` are set the same way."""
    modules = _openrlhf()
    trainer = object.__new__(modules.ppo_actor.ActorPPOTrainer)
    trainer.strategy = _CapturingStrategy(args)
    trainer.args = args
    trainer.actor = _PolicyActor(log_probs, sequences)
    trainer.ema_model = None
    trainer.actor_optim = None
    trainer.actor_scheduler = _Scheduler()
    trainer.aux_loss = args.actor.aux_loss_coef > 1e-8
    trainer.replay_buffer = SimpleNamespace(dynamic_optimizer_step=[True], dynamic_sample_loss_scale=[1.0])
    trainer.actor_loss_fn = modules.PolicyLoss(**policy_loss_kwargs(args))
    return trainer


def policy_loss_kwargs(args) -> dict:
    """``PolicyLoss`` arguments exactly as the installed ``ActorPPOTrainer.__init__`` derives them from ``args``
    (0.11.2 added ``token_level_loss`` and replaced the vLLM importance-correction flags)."""
    import inspect

    from openrlhf.models import PolicyLoss

    parameters = inspect.signature(PolicyLoss.__init__).parameters
    advantage = args.algo.advantage
    kwargs = dict(clip_eps_low=args.actor.eps_clip_low_high[0], clip_eps_high=args.actor.eps_clip_low_high[1],
                  dual_clip=args.actor.dual_clip, policy_loss_type=args.actor.policy_loss_type)
    if "token_level_loss" in parameters and hasattr(args.actor, "loss_agg_mode"):  # 0.11.2
        kwargs["token_level_loss"] = args.actor.loss_agg_mode == "token-mean"
    if "is_correction_level" in parameters:
        kwargs.update(is_correction_level=advantage.is_correction_level,
                      is_correction_mode=advantage.is_correction_mode,
                      is_correction_gating=advantage.is_correction_gating,
                      is_correction_threshold=advantage.is_correction_threshold)
    else:  # 0.11.0 - 0.11.1
        kwargs.update(
            enable_vllm_is_correction=advantage.is_correction_enable,
            vllm_is_truncated_threshold=advantage.is_correction_threshold if advantage.is_correction_enable else None,
            vllm_is_correction_type=advantage.is_correction_type,
        )
    return kwargs


# ------------------------------------------------------------------------------------------- the two halves

def rollout_args(args, group_size: int):
    """A copy of ``args`` whose rollout has ``group_size`` responses per prompt (OpenRLHF's advantage code may
    write to the arguments, e.g. gamma; the caller's stay untouched)."""
    args = copy.deepcopy(args)
    args.rollout.n_samples_per_prompt = group_size
    return args


def reward_path(batch: AuditBatch, args, kl_coef: float = 1.0, *, copy_args: bool = True):
    """One rollout of ``batch`` (one prompt, ``batch.group_size`` responses per prompt): OpenRLHF's Experience after
    ``make_experience``'s KL lines and ``compute_advantages_and_returns``. Task reward 0, critic values 0.
    ``copy_args=False``: ``args`` comes from :func:`rollout_args` already (saves a deep copy per call)."""
    modules = _openrlhf()
    if copy_args:
        args = rollout_args(args, batch.group_size)
    elif args.rollout.n_samples_per_prompt != batch.group_size:
        raise ValueError(f"args has --rollout.n_samples_per_prompt {args.rollout.n_samples_per_prompt}, the batch "
                         f"groups of {batch.group_size}: build args with rollout_args(args, group_size)")
    rows = batch.tokens.shape[0]
    rollout_log_probs = keep64(batch.behaviour_logp.detach())
    ref_log_probs = keep64(batch.ref_logp.detach())
    with torch.no_grad():  # make_experience runs under no_grad, on the log-probs recorded at rollout
        if kl_coef > 0 and not args.algo.kl.use_loss:
            kl = modules.experience_maker.compute_approx_kl(rollout_log_probs, ref_log_probs,
                                                            kl_estimator=args.algo.kl.estimator)
        else:
            kl = torch.zeros_like(rollout_log_probs)
    experience = modules.Experience(
        sequences=batch.tokens, attention_mask=batch.mask.long(), action_mask=batch.mask,
        action_log_probs=rollout_log_probs,
        base_action_log_probs=ref_log_probs if args.algo.kl.use_loss else None,
        values=keep64(torch.zeros(batch.mask.shape, dtype=torch.float64)),
        rewards=keep64(torch.zeros(rows, dtype=torch.float64)),
        index=list(range(rows)), prompts=[AUDIT_PROMPT] * rows, info={},
    )
    experience.kl = kl
    maker = object.__new__(modules.experience_maker.RemoteExperienceMaker)
    maker.strategy, maker.args = SimpleNamespace(args=args), args
    maker.advantage_estimator = args.algo.advantage.estimator
    maker.kl_ctl = modules.FixedKLController(kl_coef)
    with contextlib.redirect_stdout(io.StringIO()):
        [experience] = maker.compute_advantages_and_returns([experience])
    return experience


def training_loss(batch: AuditBatch, args, experience, kl_coef: float = 1.0, normalizer: float | None = None):
    """The loss OpenRLHF's ``training_step`` hands to ``strategy.backward`` for ``experience`` (one micro-batch that
    is the whole optimizer step), with ``batch_num_tokens = normalizer`` (default: the number of responses)."""
    trainer = minimal_trainer(args, keep64(batch.logp), experience.sequences)
    rows = batch.tokens.shape[0]
    normalizer = float(rows) if normalizer is None else float(normalizer)
    loss_batch_info = {"dp_size": 1, "batch_num_tokens": normalizer, "global_batch_size": float(rows)}
    trainer.training_step(experience, kl_coef, 0, loss_batch_info)
    if trainer.strategy.loss is None:
        raise RuntimeError("OpenRLHF's training_step returned without calling strategy.backward")
    return trainer.strategy.loss


def openrlhf_loss(args, *, kl_coef: float = 1.0, normalizer: float | None = None) -> Callable[[AuditBatch], Tensor]:
    """OpenRLHF's scalar loss for a training batch (reward path, then ``training_step``) under ``args``; wrap with
    ``kl_patches.audit.per_group`` for the audit engine."""

    copies: dict[int, object] = {}

    def loss(batch: AuditBatch) -> Tensor:
        local = copies.get(batch.group_size)
        if local is None:
            local = copies[batch.group_size] = rollout_args(args, batch.group_size)
            # k1-rtg-loss's fixed C = --train.batch_size x --rollout.max_new_tokens: one group is one optimizer step
            # here, so C = its number of responses (x 1) keeps this helper's per-response mean
            local.train.batch_size, local.rollout.max_new_tokens = batch.group_size, 1
        experience = reward_path(batch, local, kl_coef, copy_args=False)
        return plain(training_loss(batch, local, experience, kl_coef, normalizer))

    return loss


per_group_loss = per_group  # the core's (kl_patches.audit.per_group), under the name this adapter exports


def direct_kl_loss(estimator: str, unbiased_gradient: bool, with_old: bool) -> Callable[[AuditBatch], Tensor]:
    """``aggregate_loss(compute_approx_kl(...))`` called directly, as the KL block does, but with or without
    ``log_probs_old`` (training_step always passes it)."""

    def loss(batch: AuditBatch) -> Tensor:
        modules = _openrlhf()
        from openrlhf.models import utils

        kwargs = dict(kl_estimator=estimator, unbiased_gradient=unbiased_gradient)
        if with_old:
            kwargs["log_probs_old"] = keep64(batch.behaviour_logp)
        kl = utils.compute_approx_kl(keep64(batch.logp), keep64(batch.ref_logp), **kwargs)
        rows = float(batch.tokens.shape[0])
        return plain(modules.aggregate_loss(kl, batch.mask, dp_size=1, batch_num_tokens=rows, global_batch_size=rows))

    return loss




# =============================================================================================== the step harness

@dataclass(frozen=True)
class StepSetup:
    """How the generation batch reaches OpenRLHF: ``ranks`` data-parallel actors, and what the experiences carry.

    ``actor_log_probs``: what the actor's experience-time recomputation (``action_log_probs``) equals -- "sampler"
    (the actor that sampled, e.g. later mini-batches of a sync rollout: mu) or "current" (the weights being trained:
    a vLLM/actor numerics mismatch, or ``--train.async_enable``, where the sampler's weights are older). vLLM's
    ``rollout_log_probs`` (always mu) are recorded when ``--algo.advantage.is_correction_level`` is not off, as
    OpenRLHF does."""

    ranks: int = 1
    actor_log_probs: str = "sampler"

    def __post_init__(self) -> None:
        if self.actor_log_probs not in ("sampler", "current"):
            raise ValueError(f"actor_log_probs must be 'sampler' or 'current', got {self.actor_log_probs!r}")
        if self.ranks < 1:
            raise ValueError(f"ranks must be >= 1, got {self.ranks}")


class _RankLocal(threading.local):
    rank = 0


class _Collective:
    """In-process all-reduce for ranks running as threads (every rank deposits, all wait, each reads the same
    reduction in rank order)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.local = _RankLocal()
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world)

    @property
    def rank(self) -> int:
        return self.local.rank

    def reduce(self, value, op: str):
        self.slots[self.rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        if op == "sum":
            return functools.reduce(lambda a, b: a + b, values)
        if op == "mean":
            return functools.reduce(lambda a, b: a + b, values) / self.world
        if op in ("max", "min"):
            pick = (torch.maximum if op == "max" else torch.minimum) if isinstance(values[0], Tensor) else \
                (max if op == "max" else min)
            return functools.reduce(pick, values)
        raise ValueError(f"unknown reduction {op!r}")


class _FakeDist:
    """The ``torch.distributed`` calls OpenRLHF's loss utilities and replay buffer make, over :class:`_Collective`."""

    class ReduceOp:
        SUM = "sum"
        MAX = "max"
        MIN = "min"

    def __init__(self, collective: _Collective) -> None:
        self.collective = collective

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self, group=None) -> int:
        return self.collective.world

    def get_rank(self, group=None) -> int:
        return self.collective.rank

    def all_reduce(self, tensor, op="sum", group=None) -> None:
        tensor.copy_(self.collective.reduce(tensor.clone(), op))


class _Mesh:
    def __getitem__(self, _name):
        return SimpleNamespace(get_group=lambda: "dp")


class _EmulatedDeepSpeed:
    """A DeepspeedStrategy for ``ppo_train`` / ``training_step``: OpenRLHF's ``accumulated_gradient``, DeepSpeed's
    1/gas backward scaling, and an optimizer step that averages the ranks' gradients and records them (the weights
    do not move: every step's gradient is taken at the policy the batch is audited against)."""

    ring_attn_group = None

    def __init__(self, args, collective: _Collective, parameters: list[Tensor], steps: list[Tensor],
                 step_barrier: threading.Barrier) -> None:
        self.args = args
        self.collective = collective
        self.parameters = parameters
        self.steps = steps
        self.step_barrier = step_barrier
        world = collective.world
        self.accumulated_gradient = max(args.train.batch_size // args.train.micro_batch_size // world, 1)
        self.gas = 1 if args.train.dynamic_batch_enable else self.accumulated_gradient  # OpenRLHF's ds_config
        self.ds_device_mesh = _Mesh()
        self.micro_steps = 0

    def backward(self, loss, model, optimizer) -> None:
        (loss / self.gas).backward()
        self.micro_steps += 1

    def optimizer_step(self, *args, **kwargs) -> None:
        # DeepSpeed's engine.step() only updates at a gradient-accumulation boundary (every gas micro-batches)
        if self.micro_steps % self.gas == 0:
            self.step_barrier.wait()  # every rank's backward of this step is done; the barrier's action records it

    def moving_average(self, *args, **kwargs) -> None:
        pass

    def get_grad_norm(self, model) -> float:
        return 0.0

    def is_rank_0(self) -> bool:
        return False  # keeps tqdm quiet

    def all_reduce(self, data, op="mean"):
        if isinstance(data, dict):
            return {key: self.all_reduce(value, op) for key, value in data.items()}
        return self.collective.reduce(data, op)


class _EnumeratedActor:
    """OpenRLHF's ``Actor`` call on the enumerated policy: the response is the last ``action_mask.shape[1]`` tokens
    of each (right-padded, possibly re-collated) row, as ``Actor.forward`` slices ``[:, -num_actions:]``."""

    def __init__(self, policy, horizon: int) -> None:
        self.policy, self.horizon = policy, horizon

    def train(self, mode: bool = True) -> "_EnumeratedActor":
        return self

    def log_probs(self, sequences: Tensor, action_mask: Tensor) -> Tensor:
        width = action_mask.shape[1]
        tokens = torch.zeros(sequences.shape[0], self.horizon, dtype=torch.long)
        mask = torch.zeros(sequences.shape[0], self.horizon, dtype=torch.bool)
        tokens[:, :width] = sequences[:, -width:]
        mask[:, :width] = action_mask.bool()
        tokens = torch.where(mask, tokens, torch.zeros((), dtype=torch.long))
        return self.policy.token_logprobs(tokens, mask)[:, :width]

    def __call__(self, sequences, action_mask, attention_mask=None, return_output=False, return_entropy=False,
                 **_kwargs):
        log_probs = self.log_probs(sequences, action_mask)
        output = SimpleNamespace(aux_loss=torch.zeros((), dtype=log_probs.dtype),
                                 entropy=torch.zeros(log_probs.shape, dtype=log_probs.dtype))
        return (log_probs, output) if return_output else log_probs


def _sample_experiences(batch: AuditBatch, args, policy_logp: Tensor, setup: StepSetup, kl_coef: float):
    """One single-sample ``Experience`` per response (``--rollout.micro_batch_size 1``), as ``make_experience``
    leaves them, then OpenRLHF's ``compute_advantages_and_returns`` over all of them (task reward 0)."""
    modules = _openrlhf()
    rows, horizon = batch.mask.shape
    sampler = batch.behaviour_logp.detach()
    actor_lp = sampler if setup.actor_log_probs == "sampler" else policy_logp.detach()
    from kl_patches.integrations.openrlhf.config import records_sampler_log_probs

    correction = records_sampler_log_probs(args)
    experiences = []
    for row in range(rows):
        mask = batch.mask[row:row + 1]
        length = int(mask.sum())
        sequences = torch.cat([torch.zeros(1, 1, dtype=torch.long),
                               torch.where(mask, batch.tokens[row:row + 1], torch.zeros((), dtype=torch.long))], 1)
        action_lp = actor_lp[row:row + 1]
        ref = batch.ref_logp[row:row + 1].detach()
        with torch.no_grad():  # make_experience's KL lines
            if kl_coef > 0 and not args.algo.kl.use_loss:
                kl = modules.experience_maker.compute_approx_kl(keep64(action_lp), keep64(ref),
                                                                kl_estimator=args.algo.kl.estimator)
                kl = plain(kl)
            else:
                kl = torch.zeros_like(action_lp)
        experience = modules.Experience(
            sequences=sequences, attention_mask=torch.cat([torch.ones(1, 1, dtype=torch.long), mask.long()], 1),
            action_mask=mask.clone(), action_log_probs=action_lp.clone(),
            base_action_log_probs=ref.clone() if args.algo.kl.use_loss else None,
            rollout_log_probs=sampler[row:row + 1].clone() if correction else None,
            values=torch.zeros(1, horizon, dtype=torch.float64), rewards=torch.zeros(1, dtype=torch.float64),
            response_length=torch.tensor([float(length)]), total_length=torch.tensor([float(length + 1)]),
            index=[row], prompts=[f"{AUDIT_PROMPT} {int(batch.group_ids[row])}"], info={},
        )
        experience.kl = kl
        experiences.append(experience)
    maker = object.__new__(modules.experience_maker.RemoteExperienceMaker)
    maker.strategy, maker.args = SimpleNamespace(args=args), args
    maker.advantage_estimator = args.algo.advantage.estimator
    maker.kl_ctl = modules.FixedKLController(kl_coef)
    with contextlib.redirect_stdout(io.StringIO()):
        return maker.compute_advantages_and_returns(experiences)


def _rank_chunks(experiences: list, args, ranks: int) -> list[list]:
    """What each rank's ``append`` receives: ``balance_experiences`` under dynamic batching (``PPOTrainer``), then
    ``async_run_method_batch``'s contiguous chunks of ceil(n / ranks)."""
    from openrlhf.trainer.ppo_utils.experience import balance_experiences

    if args.train.dynamic_batch_enable:
        experiences = balance_experiences(experiences, args)
    chunk = -(-len(experiences) // ranks)
    return [experiences[i * chunk:(i + 1) * chunk] for i in range(ranks)]


@contextlib.contextmanager
def _cpu_openrlhf(fake: _FakeDist):
    """OpenRLHF's CUDA device lookups answer "cpu" and its loss utilities / replay buffer use the in-process
    collectives, for the duration of one step."""
    from openrlhf.trainer.ppo_utils import replay_buffer
    from openrlhf.utils import loss_utils

    saved = (torch.cuda.current_device, loss_utils.dist, replay_buffer.dist)
    torch.cuda.current_device = lambda: "cpu"
    loss_utils.dist = replay_buffer.dist = fake
    try:
        yield
    finally:
        torch.cuda.current_device, loss_utils.dist, replay_buffer.dist = saved


def _rank_trainer(args, strategy, actor, kl_coef: float):
    """An ``ActorPPOTrainer`` (its real class and methods) with what ``ppo_train`` reads; ``__init__`` needs CUDA and
    DeepSpeed engines, so its attributes are set as it sets them, with OpenRLHF's own ``NaiveReplayBuffer``."""
    modules = _openrlhf()
    from openrlhf.trainer.ppo_utils import NaiveReplayBuffer

    trainer = object.__new__(modules.ppo_actor.ActorPPOTrainer)
    trainer.strategy, trainer.args, trainer.actor = strategy, args, actor
    trainer.ema_model, trainer.actor_optim, trainer.actor_scheduler = None, None, _Scheduler()
    trainer.dataloader_pin_memory = False
    trainer.micro_train_batch_size = args.train.micro_batch_size
    trainer.max_epochs = args.train.max_epochs
    trainer.aux_loss = args.actor.aux_loss_coef > 1e-8
    trainer.actor_loss_fn = modules.PolicyLoss(**policy_loss_kwargs(args))
    saved = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0  # NaiveReplayBuffer names a CUDA device it never uses without offload
    try:
        trainer.replay_buffer = NaiveReplayBuffer(args.train.micro_batch_size, 0, False, args.ds.packing_samples,
                                                  args.train.dynamic_batch_enable)
    finally:
        torch.cuda.current_device = saved
    trainer.replay_buffer.target_device = torch.device("cpu")
    return trainer


def ppo_step(batch: AuditBatch, args, policy, setup: StepSetup = StepSetup(), *, kl_coef: float = 1.0,
             shuffle_seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """Run OpenRLHF's ``ppo_train`` on the generation batch ``batch`` and return the sum of the recorded optimizer
    steps' gradients (flat, on ``policy``'s trainable parameters) and the list of per-step gradients."""
    if args.rollout.n_samples_per_prompt != batch.group_size:
        raise ValueError(f"args has --rollout.n_samples_per_prompt {args.rollout.n_samples_per_prompt}, the batch "
                         f"groups of {batch.group_size}")
    parameters = [p for p in policy.parameters() if p.requires_grad]
    experiences = _sample_experiences(batch, args, batch.logp, setup, kl_coef)
    chunks = _rank_chunks(experiences, args, setup.ranks)
    collective = _Collective(setup.ranks)
    steps: list[Tensor] = []

    def record() -> None:  # runs once per optimizer step, after every rank's backward: DeepSpeed's averaged grads
        steps.append(accumulated_grad(parameters) / setup.ranks)

    step_barrier = threading.Barrier(setup.ranks, action=record)
    errors: list[BaseException] = []

    trainers = []
    for rank in range(setup.ranks):  # built here: NaiveReplayBuffer's constructor swaps a torch.cuda function
        strategy = _EmulatedDeepSpeed(args, collective, parameters, steps, step_barrier)
        trainer = _rank_trainer(args, strategy, _EnumeratedActor(policy, batch.mask.shape[1]), kl_coef)
        for experience in chunks[rank]:
            trainer.replay_buffer.append(experience)
        trainers.append(trainer)

    def run(rank: int) -> None:
        collective.local.rank = rank
        try:
            trainers[rank].ppo_train(kl_coef)
        except BaseException as error:  # surfaced below; the other ranks are released
            errors.append(error)
            collective.barrier.abort()
            step_barrier.abort()

    accumulated_grad(parameters)  # nothing left over from a previous step
    threads_before = torch.get_num_threads()
    # stdout redirected once, here: redirect_stdout swaps a process-wide attribute, not a per-thread one
    with torch.random.fork_rng(devices=[]), _cpu_openrlhf(_FakeDist(collective)), \
            contextlib.redirect_stdout(io.StringIO()):
        torch.default_generator.manual_seed(shuffle_seed)  # the replay buffer's DataLoader shuffles with it
        torch.set_num_threads(1)  # tiny tensors: intra-op threads only cost time (restored below)
        if setup.ranks == 1:
            run(0)
        else:
            threads = [threading.Thread(target=run, args=(rank,)) for rank in range(setup.ranks)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    torch.set_num_threads(threads_before)
    if errors:
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        raise (real or errors)[0]
    leftover = accumulated_grad(parameters)
    if float(leftover.abs().max()) != 0.0:
        raise RuntimeError("ppo_train left gradients that no optimizer step consumed")
    if not steps:
        raise RuntimeError("ppo_train took no optimizer step (is the batch smaller than --train.batch_size?)")
    return torch.stack(steps).sum(0), steps


def ppo_step_fn(problem, args, setup: StepSetup = StepSetup(), *, kl_coef: float = 1.0):
    """A ``step_fn`` for ``kl_patches.audit.expected_step_gradient``: OpenRLHF's ``ppo_train`` on each enumerated
    generation batch. The shuffle seed follows the batch so the step is a deterministic function of it."""

    def step(batch: AuditBatch) -> Tensor:
        seed = int(batch.rows.sum()) * 7919 + int(batch.rows[0])
        total, _ = ppo_step(batch, args, problem.policy, setup, kl_coef=kl_coef, shuffle_seed=seed)
        return total

    return step


def optimizer_steps(args, rows: int) -> int:
    """How many optimizer steps ``ppo_train`` takes on ``rows`` samples: per epoch, rows / --train.batch_size."""
    return args.train.max_epochs * (rows // args.train.batch_size)
