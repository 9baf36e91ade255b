"""The OpenRLHF patch targets: one replacement ``compute_approx_kl`` and a context-setting ``training_step``.

OpenRLHF 0.11 computes the KL in two places, both through ``openrlhf.models.utils.compute_approx_kl``:

* the reward path (default): ``RemoteExperienceMaker.make_experience`` (in the ``PPOTrainer`` Ray actor) calls it
  under ``torch.no_grad`` with ``--algo.kl.estimator``; ``compute_reward`` turns it into per-token rewards and
  ``compute_advantages_and_returns`` into reward-to-go advantages;
* the loss path (``--algo.kl.use_loss``): ``ActorPPOTrainer.training_step`` (in the ``PolicyModelActor`` Ray actors)
  calls it on the attached log-probs and aggregates it with ``aggregate_loss``.

``k1-in-reward`` forces the k1 estimator in the reward path (OpenRLHF's own function with ``kl_estimator="k1"``;
no KL baseline: see docs/openrlhf.md). ``k1-rtg-loss`` replaces the value of the KL block of ``training_step`` by
a per-token tensor whose forward value is OpenRLHF's k1 estimate (the logged ``kl`` and the adaptive controller see
the KL) and whose gradient is the core surrogate's (:mod:`.kl`): mu = the experience's ``rollout_log_probs`` (the
sampler), no cross-row statistic, and OpenRLHF's per-window token normaliser undone on the KL part so every optimizer
step accumulates ``beta / C * sum`` over its responses with C fixed by the configuration. Anything unexpected raises;
nothing falls back to the biased path.

=====================================================  ==========================================================
target                                                 why (and when it can go)
=====================================================  ==========================================================
``openrlhf.models.utils.compute_approx_kl``            k1 in the reward / the rtg surrogate in the loss (until
(and every ``from ... import`` copy: ``Rebind``)       OpenRLHF has a sequence-level KL option)
``...ray.ppo_actor.ActorPPOTrainer.training_step``     gives the KL the experience (mu, mask) and the step's
                                                       loss_batch_info; logs ``kl_patches/*``
=====================================================  ==========================================================
"""

from __future__ import annotations

import contextvars
import logging
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import wrapt

from kl_patches.integrations.openrlhf import SUPPORTED, kl
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, KLModeError, validate_mode
from kl_patches.patching import MARKER, DeferredPatch, Integration, PatchError, Target

logger = logging.getLogger("kl_patches.openrlhf")

LIBRARY_NAME = "openrlhf"

UTILS_MODULE = "openrlhf.models.utils"
ACTOR_MODULE = "openrlhf.trainer.ray.ppo_actor"
TRAINER_CLASS = "ActorPPOTrainer"


@dataclass
class LossContext:
    """What ``training_step`` knows and ``compute_approx_kl`` is not given: the experience (masks, rollout log-probs)
    of the micro-batch whose KL is being computed, and the loss normalisers OpenRLHF will divide it by."""

    trainer: Any
    experience: Any
    loss_batch_info: dict


_LOSS_CONTEXT: contextvars.ContextVar[LossContext | None] = contextvars.ContextVar("kl_patches_openrlhf_loss",
                                                                                     default=None)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _arguments(original, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name, against the installed signature (0.11.0 has no log_probs_old /
    unbiased_gradient; 0.11.1+ does)."""
    import inspect

    bound = inspect.signature(original).bind(*args, **kwargs)
    return dict(bound.arguments)


# -------------------------------------------------------------------------------------- import-order safety

def _initializing(module) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _when_loaded(name: str, callback: Callable[[types.ModuleType], None]) -> None:
    """Call ``callback(module)`` once ``name`` (now half-loaded: we are inside its import) has finished loading.

    Python sets a submodule as an attribute of its package right after executing it; watching that ``setattr``
    (a ModuleType subclass on the package, removed after it fired) is the first moment the module is complete."""
    parent_name, _, child = name.rpartition(".")
    parent = sys.modules[parent_name]
    base = type(parent)

    class _Watch(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, key, value):
            base.__setattr__(self, key, value)
            if key == child and value is sys.modules.get(name) and not _initializing(value):
                self.__class__ = base
                callback(value)

    parent.__class__ = _Watch


class AfterLoadPatch(DeferredPatch):
    """A :class:`DeferredPatch` that also waits for a module imported *right now*: enabling from inside the import
    of ``module`` (a process whose first OpenRLHF import is ``ppo_actor``, which imports ``models.utils``, whose
    post-import hook enables the mode) patches once ``module`` has finished loading, not half-way through."""

    def apply(self) -> bool:
        loaded = sys.modules.get(self.module)
        if loaded is not None and _initializing(loaded):
            self.armed = True
            _when_loaded(self.module, self._apply_to)
            return True
        return super().apply()


# ------------------------------------------------------------------------------------------ the integration

NOT_LIBRARY = (K1_IN_REWARD, K1_RTG_LOSS)

#: What is patched (``kl_patches.patching.Target`` rows), in ``k1-in-reward`` and ``k1-rtg-loss`` only: in
#: ``library`` mode OpenRLHF's own KL is untouched and nothing is patched.
TARGETS: tuple[Target, ...] = (
    Target(UTILS_MODULE, None, "compute_approx_kl", "_compute_approx_kl_replacement",
           "k1 in the reward / the k1 reward-to-go surrogate in the loss (OpenRLHF's estimators are per token)",
           "OpenRLHF has a sequence-level KL option", rebind=LIBRARY_NAME, modes=NOT_LIBRARY),
    Target(ACTOR_MODULE, TRAINER_CLASS, "training_step", "_training_step_replacement",
           "gives the KL the experience (mu, mask) and the step's loss_batch_info; logs kl_patches/*",
           "with the compute_approx_kl patch", deferred=True, modes=NOT_LIBRARY),
)


class OpenRLHFIntegration(Integration):
    library = LIBRARY_NAME
    distribution = LIBRARY_NAME
    supported = SUPPORTED
    targets = TARGETS
    deferred_patch = AfterLoadPatch

    def _compute_approx_kl_replacement(self, original: Callable[..., Any]) -> Callable[..., Any]:
        return make_compute_approx_kl(self, original)

    def _training_step_replacement(self, original: Callable[..., Any]) -> Callable[..., Any]:
        return make_training_step(original)


def make_compute_approx_kl(integration: OpenRLHFIntegration, original):
    def compute_approx_kl(*args, **kwargs):
        mode = integration.mode
        if mode in (None, LIBRARY):  # a copy bound while enabled and still held after disable(): the original
            return original(*args, **kwargs)
        context = _LOSS_CONTEXT.get()
        log_probs = args[0] if args else kwargs.get("log_probs")
        in_loss = context is not None or (isinstance(log_probs, torch.Tensor) and log_probs.requires_grad)
        if not in_loss:
            return _reward_path_kl(mode, original, args, kwargs)
        if context is None:
            raise PatchError(
                f"{LIBRARY_NAME} {integration.version}: compute_approx_kl was called on attached log-probs outside "
                f"{ACTOR_MODULE}.{TRAINER_CLASS}.training_step (a subclass overriding it, or a moved KL block); "
                f"kl-patches {mode} cannot reach this KL loss, refusing to compute the biased one"
            )
        return _loss_path_kl(mode, original, context, args, kwargs)

    return compute_approx_kl


def _reward_path_kl(mode: str, original, args: tuple, kwargs: dict):
    if mode == K1_RTG_LOSS:
        raise KLModeError(
            "kl-patches k1-rtg-loss puts the KL in the loss, but OpenRLHF is computing an in-reward KL because "
            "--algo.kl.use_loss is off: add --algo.kl.use_loss (the kl-patches-openrlhf launcher turns it on for you)"
        )
    call = _arguments(original, args, kwargs)
    if call.get("kl_estimator", "k1") != "k1":
        _warn_once(f"kl-patches k1-in-reward: --algo.kl.estimator {call['kl_estimator']} is overridden to k1 "
                   f"in the reward")
    call["kl_estimator"] = "k1"
    call.pop("unbiased_gradient", None)  # only shapes a gradient; the reward is detached
    return original(**call)


def sampler_log_probs(experience, args) -> tuple[torch.Tensor, float]:
    """mu and where it came from: vLLM's ``rollout_log_probs`` when OpenRLHF recorded them; otherwise the actor's
    experience-time recomputation, refused under ``--train.async_enable`` (computed with newer weights than the
    sampler's, stale samples would get weight 1) and warned about otherwise (vLLM/actor numerics differ)."""
    if experience.rollout_log_probs is not None:
        return experience.rollout_log_probs, kl.MU_SAMPLER
    if getattr(args.train, "async_enable", False):
        raise KLModeError(
            "kl-patches k1-rtg-loss with --train.async_enable needs the sampler's log-probs: the experience has no "
            "rollout_log_probs, and action_log_probs are recomputed with the current weights (stale samples would "
            "get importance weight 1). Add --algo.advantage.is_correction_level token (vLLM then records them)")
    if experience.action_log_probs is None:
        raise PatchError("kl-patches k1-rtg-loss: the experience has neither rollout_log_probs nor action_log_probs")
    _warn_once("kl-patches k1-rtg-loss: no rollout_log_probs (--algo.advantage.is_correction_level off), so mu is the "
               "actor's recomputation (action_log_probs), not vLLM's: exact only while vLLM and the actor agree. "
               "Add --algo.advantage.is_correction_level token to use the sampler's log-probs")
    return experience.action_log_probs, kl.MU_TRAINER


def deepspeed_gas(trainer) -> int:
    """How many micro-batches DeepSpeed accumulates (it scales every backward by 1/gas): 1 under dynamic batching
    (OpenRLHF's ds_config), else the strategy's accumulated_gradient; checked against the engine when it has one."""
    args = trainer.args
    gas = 1 if args.train.dynamic_batch_enable else int(trainer.strategy.accumulated_gradient)
    engine = getattr(getattr(trainer, "actor", None), "model", None)
    reported = getattr(engine, "gradient_accumulation_steps", None)
    if callable(reported) and int(reported()) != gas:
        raise PatchError(f"{LIBRARY_NAME}: DeepSpeed accumulates {int(reported())} micro-batches but OpenRLHF's "
                         f"configuration implies {gas}; kl-patches cannot fix the KL normaliser")
    return gas


def _loss_path_kl(mode: str, original, context: LossContext, args: tuple, kwargs: dict):
    if mode == K1_IN_REWARD:
        raise KLModeError(
            "kl-patches k1-in-reward puts the KL in the reward, but --algo.kl.use_loss moved OpenRLHF's KL into the "
            "loss: drop --algo.kl.use_loss, or use --algo.kl.mode k1-rtg-loss"
        )
    call = _arguments(original, args, kwargs)
    log_probs, ref_log_probs = call["log_probs"], call["log_probs_base"]
    if call.get("kl_estimator", "k1") != "k1" or call.get("unbiased_gradient", False):
        _warn_once("kl-patches k1-rtg-loss: --algo.kl.estimator / --algo.kl.unbiased_gradient no longer shape the "
                   "gradient (the k1 reward-to-go surrogate does); the logged kl is the k1 estimate")
    trainer, experience, info = context.trainer, context.experience, context.loss_batch_info
    behaviour, source = sampler_log_probs(experience, trainer.args)
    behaviour = behaviour.to(log_probs.device)
    truncation = kl.truncation_from_env()
    scale = kl.kl_scale(info["batch_num_tokens"], info["dp_size"], deepspeed_gas(trainer),
                        kl.fixed_normalizer(trainer.args)).to(log_probs.device)
    value = original(log_probs, ref_log_probs, kl_estimator="k1")
    experience.info.update(kl.step_metrics(log_probs, ref_log_probs, behaviour, experience.action_mask,
                                           truncation=truncation, mu_source=source))
    return kl.rtg_loss_tokens(log_probs, ref_log_probs, experience.action_mask, behaviour_log_probs=behaviour,
                              value=value, truncation=truncation, scale=scale)


def make_training_step(original):
    def training_step(self, experience, kl_ctl, step, loss_batch_info=None, *args, **kwargs):
        if loss_batch_info is None:  # what the original computes itself (dynamic batching); computed once, here
            get_info = vars(sys.modules[ACTOR_MODULE])["get_loss_batch_info"]
            loss_batch_info = get_info(self.strategy, experience.action_mask, replay_buffer=self.replay_buffer,
                                       step=step, dynamic_batch=self.args.train.dynamic_batch_enable)
        token = _LOSS_CONTEXT.set(LossContext(self, experience, loss_batch_info))
        try:
            return original(self, experience, kl_ctl, step, loss_batch_info, *args, **kwargs)
        finally:
            _LOSS_CONTEXT.reset(token)

    return training_step


def patched_targets() -> dict[str, bool]:
    """Which OpenRLHF objects are currently replaced in this process (for diagnostics and the Ray test)."""
    state = {}
    utils = sys.modules.get(UTILS_MODULE)
    state[f"{UTILS_MODULE}.compute_approx_kl"] = bool(utils and getattr(vars(utils).get("compute_approx_kl"),
                                                                         MARKER, False))
    for name in ("openrlhf.trainer.ppo_utils.experience_maker", ACTOR_MODULE):
        module = sys.modules.get(name)
        if module is not None:
            state[f"{name}.compute_approx_kl"] = bool(getattr(vars(module).get("compute_approx_kl"), MARKER, False))
    actor = sys.modules.get(ACTOR_MODULE)
    if actor is not None and hasattr(actor, TRAINER_CLASS):
        owner = getattr(actor, TRAINER_CLASS)
        state[f"{ACTOR_MODULE}.{TRAINER_CLASS}.training_step"] = bool(
            getattr(vars(owner).get("training_step"), MARKER, False))
    return state


integration = OpenRLHFIntegration()


def autoload(mode: str) -> None:
    """Arm ``mode`` in this process: patch as soon as ``openrlhf.models.utils`` is imported (now, if it already is).
    Unsupported versions raise here, from the import of ``openrlhf``."""
    mode = validate_mode(mode)
    if mode == LIBRARY:
        return
    integration.check_version()
    wrapt.register_post_import_hook(lambda _module: integration.enable(mode), UTILS_MODULE)
