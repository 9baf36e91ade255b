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
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from kl_patches.audit import AuditBatch, AuditRecord, PolicySpec, audit_record, build_problem, exact_kl_gradient
from kl_patches.audit.records import NOT_COVERED
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, KLModeError
from kl_patches.patching import installed_version

LIBRARY_NAME = "openrlhf"
GROUP_SIZE = 2  # every configuration: the advantage estimators couple a prompt's responses
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
    """What ``training_step`` uses of a DeepspeedStrategy: ``backward`` keeps the loss, the rest does nothing."""

    ring_attn_group = None

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
        experience = reward_path(batch, local, kl_coef, copy_args=False)
        return plain(training_loss(batch, local, experience, kl_coef, normalizer))

    return loss


def per_group_loss(scalar_loss: Callable[[AuditBatch], Tensor]) -> Callable[[AuditBatch], Tensor]:
    def loss(batch: AuditBatch) -> Tensor:
        return torch.stack([scalar_loss(batch.group(g)).reshape(()) for g in range(batch.num_groups)])

    return loss


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


# ------------------------------------------------------------------------------------------------ configurations

@dataclass(frozen=True)
class Cell:
    configuration: str  # the flags, as a user types them
    argv: tuple[str, ...]
    estimator: str
    placement: str
    reason_on: str
    reason_off: str
    mode: str = LIBRARY
    direct: tuple | None = None  # (estimator, unbiased_gradient, with_old) for a direct compute_approx_kl cell
    fix: str | None = "--algo.kl.mode k1-rtg-loss"


OFF_RATIO = ("the PPO ratio pi/mu is per token: it corrects the action at the visited prefix, not the prefix "
             "distribution, and clipping drops tokens whose ratio left the trust region")
WHITEN = ("the advantages, KL included, are whitened with the batch's own token mean and std: sample-dependent "
          "statistics (a bias that shrinks with the batch; beta is rescaled by 1/std)")
OWN_TOKEN = "E[sum_t l_t g_t]: the own-token term only, missing the future-token KL"


def _reward(adv: str, extra: tuple[str, ...] = (), estimator: str = "k1") -> tuple[str, ...]:
    return ("--algo.advantage.estimator", adv, "--algo.kl.estimator", estimator, "--rollout.n_samples_per_prompt",
            str(GROUP_SIZE), *extra)


def _loss(estimator: str, unbiased: bool) -> tuple[str, ...]:
    return (*_reward("group_norm", estimator=estimator), "--algo.kl.use_loss",
            *(("--algo.kl.unbiased_gradient",) if unbiased else ()))


RTG_EXACT = ("k1 per-token reward, reward-to-go (gamma = 1), untouched by the estimator: the exact score-function "
             "gradient")

CELLS: tuple[Cell, ...] = (
    Cell("--algo.advantage.estimator gae (OpenRLHF default; gamma = lambd = 1, critic values 0)", _reward("gae"),
         "k1", "reward", f"reward-to-go, but {WHITEN}.", f"{OFF_RATIO}; and {WHITEN}.",
         fix="--algo.advantage.estimator rloo / group_norm / dr_grpo, or --algo.kl.mode k1-rtg-loss"),
    Cell("--algo.advantage.estimator reinforce", _reward("reinforce"), "k1", "reward",
         f"reward-to-go, but {WHITEN}.", f"{OFF_RATIO}; and {WHITEN}.",
         fix="--algo.advantage.estimator rloo / group_norm / dr_grpo, or --algo.kl.mode k1-rtg-loss"),
    Cell("--algo.advantage.estimator reinforce_baseline", _reward("reinforce_baseline"), "k1", "reward",
         f"reward-to-go, but {WHITEN}.", f"{OFF_RATIO}; and {WHITEN}.",
         fix="--algo.advantage.estimator rloo / group_norm / dr_grpo, or --algo.kl.mode k1-rtg-loss"),
    Cell("--algo.advantage.estimator rloo", _reward("rloo"), "k1", "reward", f"{RTG_EXACT}.", f"{OFF_RATIO}."),
    Cell("--algo.advantage.estimator group_norm", _reward("group_norm"), "k1", "reward",
         f"{RTG_EXACT} (the group std divides the task reward only).", f"{OFF_RATIO}."),
    Cell("--algo.advantage.estimator dr_grpo", _reward("dr_grpo"), "k1", "reward", f"{RTG_EXACT}.", f"{OFF_RATIO}."),
    Cell("--algo.kl.estimator k2 (rloo)", _reward("rloo", estimator="k2"), "k2", "reward",
         "E[G * sum_t l_t^2/2]: the gradient of a different divergence.", f"a different divergence; {OFF_RATIO}.",
         fix="--algo.kl.estimator k1, or --algo.kl.mode k1-in-reward / k1-rtg-loss"),
    Cell("--algo.kl.estimator k3 (rloo)", _reward("rloo", estimator="k3"), "k3", "reward",
         "grad KL_seq + E[G sum_t (e^{-l_t} - 1)]: near pi_ref the regulariser nearly cancels.",
         f"the pathwise part of E[sum k3] is missing; {OFF_RATIO}.",
         fix="--algo.kl.estimator k1, or --algo.kl.mode k1-in-reward / k1-rtg-loss"),
    Cell("--actor.loss_agg_mode seq-mean-token-mean (rloo)", _reward("rloo", ("--actor.loss_agg_mode",
                                                                                "seq-mean-token-mean")),
         "k1", "reward", "each response weighted by 1/|y|: a length-weighted objective.",
         f"length-weighted; {OFF_RATIO}.", fix="--actor.loss_agg_mode token-mean, or --algo.kl.mode k1-rtg-loss"),
    Cell("--algo.kl.use_loss --algo.kl.estimator k1", _loss("k1", False), "k1", "loss",
         "E[sum_t g_t] = 0: no KL force at all, only noise.", "no KL force; off-policy a spurious pull toward mu."),
    Cell("--algo.kl.use_loss --algo.kl.estimator k2", _loss("k2", False), "k2", "loss", f"{OWN_TOKEN}.",
         f"{OWN_TOKEN}; nothing reweights the samples from mu."),
    Cell("--algo.kl.use_loss --algo.kl.estimator k3 (GRPO)", _loss("k3", False), "k3", "loss",
         "E[sum_t (1 - e^{-l_t}) g_t]: the per-position forward-KL gradient.",
         "per-position forward-KL gradient; nothing reweights the samples from mu."),
    Cell("--algo.kl.use_loss --algo.kl.estimator k1 --algo.kl.unbiased_gradient", _loss("k1", True), "k2-grad",
         "loss", f"{OWN_TOKEN} (k2 gradient x detached token ratio).",
         "own-token term with token ratios (clamped at 10) only: misses the future-token KL and the prefix weights."),
    Cell("--algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.unbiased_gradient", _loss("k3", True), "k2-grad",
         "loss", f"{OWN_TOKEN} (k3 value, k2 gradient x detached token ratio).",
         "own-token term with token ratios (clamped at 10) only: misses the future-token KL and the prefix weights."),
    Cell("compute_approx_kl(k3, unbiased_gradient=True) without log_probs_old", (), "k2-grad", "loss",
         f"{OWN_TOKEN} (weight 1).", "own-token term and no importance weight at all.",
         direct=("k3", True, False)),
    Cell("--algo.kl.mode k1-in-reward (rloo, --algo.kl.estimator k3)", _reward("rloo", estimator="k3"), "k1",
         "reward", f"k3 overridden to k1: {RTG_EXACT}.", f"{OFF_RATIO}: exact on-policy only.", mode=K1_IN_REWARD),
    Cell("--algo.kl.mode k1-in-reward (group_norm)", _reward("group_norm"), "k1", "reward", f"{RTG_EXACT}.",
         f"{OFF_RATIO}: exact on-policy only.", mode=K1_IN_REWARD),
    Cell("--algo.kl.mode k1-in-reward (gae)", _reward("gae"), "k1", "reward",
         f"k1 in the reward, but {WHITEN}.", f"{OFF_RATIO}; and {WHITEN}.", mode=K1_IN_REWARD,
         fix="--algo.advantage.estimator rloo / group_norm / dr_grpo, or --algo.kl.mode k1-rtg-loss"),
    Cell("--algo.kl.mode k1-rtg-loss (group_norm, --algo.kl.estimator k3)", _loss("k3", False), "k1", "loss",
         "k1 reward-to-go surrogate with a leave-one-out baseline over the prompt's responses: exact.",
         "per-decision prefix weights rho_{1:t} from the rollout log-probs make the surrogate exact under mu.",
         mode=K1_RTG_LOSS),
    Cell("--algo.kl.mode k1-rtg-loss (rloo, --actor.loss_agg_mode seq-mean-token-mean)",
         (*_loss("k1", False)[:2], *_reward("rloo", ("--actor.loss_agg_mode", "seq-mean-token-mean"))[2:],
          "--algo.kl.use_loss"), "k1", "loss",
         "the KL term keeps OpenRLHF's global token normaliser whatever the policy-loss aggregation: exact.",
         "per-decision prefix weights make the surrogate exact under mu.", mode=K1_RTG_LOSS),
)


# ----------------------------------------------------------------------------------------------------- the audit

@dataclass
class _Session:
    """Placeholders and the mode the process had, restored after the audit."""

    notes: list[str] = field(default_factory=list)
    previous_mode: str | None = None


@contextlib.contextmanager
def _session():
    from kl_patches.integrations.openrlhf import disable, enabled_mode
    from kl_patches.integrations.openrlhf.placeholders import install_placeholders, placeholder_notes

    install_placeholders()  # only where flash_attn / vllm are not installed; the notes say which
    session = _Session(notes=placeholder_notes(), previous_mode=enabled_mode())
    _openrlhf()
    try:
        yield session
    finally:
        from kl_patches.integrations.openrlhf import enable

        disable()
        if session.previous_mode is not None:
            enable(session.previous_mode)


def _mode_applied(mode: str):
    from kl_patches.integrations.openrlhf import disable, enable

    if mode == LIBRARY:
        disable()
    else:
        enable(mode)


@functools.lru_cache(maxsize=1)
def _known_flags() -> frozenset[str]:
    from kl_patches.integrations.openrlhf import config

    return frozenset(option for action in config.openrlhf_parser()._actions for option in action.option_strings)


def available(cell: Cell) -> bool:
    """Whether the installed OpenRLHF has the cell's flags (and, for a direct call, compute_approx_kl's arguments):
    a configuration a release does not have is not audited on it."""
    import inspect

    if cell.direct is not None:
        from openrlhf.models import utils

        return "log_probs_old" in inspect.signature(vars(utils)["compute_approx_kl"]).parameters
    return all(item in _known_flags() for item in cell.argv if item.startswith("--"))


def _cell_loss(cell: Cell, args) -> Callable[[AuditBatch], Tensor]:
    if cell.direct is not None:
        return per_group_loss(direct_kl_loss(*cell.direct))
    return per_group_loss(openrlhf_loss(args))


NOTES = (
    "make_experience's KL lines mirrored (it needs Ray actor groups); compute_approx_kl, compute_reward, "
    "compute_advantages_and_returns, PolicyLoss, aggregate_loss and ActorPPOTrainer.training_step are OpenRLHF's own",
    "training_step ran on a minimal ActorPPOTrainer (object.__new__, no __init__) whose actor returns the enumerated "
    "policy's log-probs; batch_num_tokens fixed at the number of responses; beta = 1; task reward 0",
)


def _record(problem, truth, cell: Cell, args, notes: list[str], *, configuration: str | None = None,
            user_config: bool = False, reason: str | None = None, fix: str | None = None,
            argv: Sequence[str] | None = None) -> AuditRecord:
    regime_reason = cell.reason_on if problem.on_policy else cell.reason_off
    return audit_record(
        problem, _cell_loss(cell, args), library=LIBRARY_NAME, library_version=installed_version(LIBRARY_NAME) or "?",
        configuration=configuration or cell.configuration, estimator=cell.estimator, placement=cell.placement,
        reason=reason or regime_reason, mode=cell.mode, group_size=GROUP_SIZE, truth=truth,
        fix=fix if fix is not None else cell.fix, notes=list(notes), user_config=user_config,
        argv=list(cell.argv if argv is None else argv),
    )


def audit(spec: PolicySpec, *, config: str | None = None, args: Sequence[str] = ()) -> list[AuditRecord]:
    """OpenRLHF's configurations (unpatched, then each kl-patches mode), on- and off-policy; or, with ``args`` (a
    ``train_ppo_ray`` command line, ``--algo.kl.mode`` allowed), the records of that configuration
    (``user_config=True``). ``config`` files are not an OpenRLHF format: OpenRLHF is configured by its command line."""
    if config is not None:
        raise ValueError("OpenRLHF has no configuration file format: pass the train_ppo_ray command line as args")
    with _session() as session:
        if args:
            return _audit_user(spec, list(args), session.notes)
        records = []
        for regime in ("on", "off"):
            problem = build_problem(spec, off_policy=regime == "off")
            truth = exact_kl_gradient(problem)
            for cell in filter(available, CELLS):
                _mode_applied(cell.mode)
                records.append(_record(problem, truth, cell, audit_args(cell.argv), [*NOTES, *session.notes]))
        return records


def _user_cell(plan) -> Cell:
    args = plan.args
    kl = args.algo.kl
    if plan.mode == K1_RTG_LOSS:
        return next(cell for cell in CELLS if cell.mode == K1_RTG_LOSS)
    if kl.use_loss:
        unbiased = getattr(kl, "unbiased_gradient", False)  # 0.11.1+
        estimator = "k2-grad" if unbiased else kl.estimator
        return Cell("", (), estimator, "loss",
                    OWN_TOKEN + "." if unbiased or kl.estimator == "k2" else
                    {"k1": "E[sum_t g_t] = 0: no KL force at all.",
                     "k3": "the per-position forward-KL gradient."}[kl.estimator],
                    "in-loss KL with token ratios at most: misses the future-token KL and the prefix weights.")
    estimator = "k1" if plan.mode == K1_IN_REWARD else kl.estimator
    return Cell("", (), estimator, "reward", "", OFF_RATIO + ": exact on-policy only.", mode=plan.mode)


def _with_model_paths(argv: list[str]) -> list[str]:
    """The audit loads no model: fill in the model paths OpenRLHF's checks read when the command line has none."""
    given = {item.split("=", 1)[0] for item in argv}
    extra: list[str] = []
    for flag, value in zip(BASE_ARGV[::2], BASE_ARGV[1::2]):
        if flag not in given and not (flag == "--reward.model_name_or_path" and "--reward.remote_url" in given):
            extra += [flag, value]
    return extra + argv


def _audit_user(spec: PolicySpec, argv: list[str], notes: list[str]) -> list[AuditRecord]:
    from kl_patches.integrations.openrlhf import config as cli

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            plan = cli.plan(_with_model_paths(argv))
    except SystemExit as error:  # argparse rejected the command line
        raise KLModeError(f"train_ppo_ray rejected the arguments (exit {error.code}): "
                          f"run them through kl-patches-openrlhf --help") from None
    except (AssertionError, AttributeError, ValueError) as error:
        if isinstance(error, KLModeError):
            raise
        raise KLModeError(f"OpenRLHF rejected the arguments: {error!r}") from None
    args = plan.args
    label = " ".join(argv)
    notes = [*NOTES, *notes, *plan.notes]
    if not args.algo.kl.init_coef > 0:
        return [AuditRecord(
            library=LIBRARY_NAME, library_version=installed_version(LIBRARY_NAME) or "?", configuration=label,
            mode=plan.mode, estimator=args.algo.kl.estimator, placement="none", policy="on", rel_err=None, cosine=None,
            norm_ratio=None, verdict=NOT_COVERED, reason="--algo.kl.init_coef 0: no KL regularisation to audit.",
            notes=notes, user_config=True)]
    cell = _user_cell(plan)
    issues = [] if args.algo.kl.use_loss or plan.mode == K1_RTG_LOSS else cli.reward_path_issues(args)
    regimes = ["on"] + (["off"] if cli.off_policy_reasons(args) else [])
    if len(regimes) == 1:
        notes.append("on-policy only: one optimizer step per rollout and no async training")
    records = []
    _mode_applied(plan.mode)
    for regime in regimes:
        problem = build_problem(spec, off_policy=regime == "off")
        truth = exact_kl_gradient(problem)
        reason = None
        if cell.placement == "reward" and regime == "on":
            reason = ("k1 per-token reward with reward-to-go: the exact score-function gradient." if cell.estimator ==
                      "k1" and not issues else "; ".join(issues or [f"{cell.estimator} in the reward is not k1."]))
        off_policy = cli.off_policy_reasons(args)
        if cell.placement == "reward" and regime == "on" and off_policy and not issues and cell.estimator == "k1":
            reason += " Exact on-policy only: in this configuration only the first mini-batch of each rollout is."
        if regime == "off" and plan.mode != K1_RTG_LOSS:
            reason = (f"{cell.reason_off} Here {'; '.join(off_policy)}. Use --algo.kl.mode k1-rtg-loss: its "
                      f"per-decision importance weights keep it exact off-policy.")
        record = _record(problem, truth, cell, args, notes, configuration=label, user_config=True, reason=reason,
                         fix="--algo.kl.mode k1-rtg-loss", argv=argv)
        records.append(record)
    return records
