"""The OpenRLHF patches: one replacement ``compute_approx_kl`` and a context-setting ``training_step``.

OpenRLHF 0.11 computes the KL in two places, both through ``openrlhf.models.utils.compute_approx_kl``:

* the reward path (default): ``RemoteExperienceMaker.make_experience`` (in the ``PPOTrainer`` Ray actor) calls it
  under ``torch.no_grad`` with ``--algo.kl.estimator``; ``compute_reward`` turns it into per-token rewards and
  ``compute_advantages_and_returns`` into reward-to-go advantages;
* the loss path (``--algo.kl.use_loss``): ``ActorPPOTrainer.training_step`` (in the ``PolicyModelActor`` Ray actors)
  calls it on the attached log-probs and aggregates it with ``aggregate_loss`` (global token mean).

``k1-in-reward`` forces the k1 estimator in the reward path (OpenRLHF's own function with ``kl_estimator="k1"``).
``k1-rtg-loss`` replaces the value of the KL block of ``training_step`` by a per-token tensor whose forward value is
OpenRLHF's k1 estimate (so the logged ``kl`` and the adaptive controller see the KL) and whose gradient is the core
surrogate's (``kl_patches.terms``): after OpenRLHF's own ``aggregate_loss`` it is exactly the gradient of
``kl_rtg_loss(normalizer=batch_num_tokens / dp_size)`` with per-decision importance weights from the experience's
rollout log-probs. Anything unexpected raises; nothing falls back to the biased path.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
import wrapt

from kl_patches import estimators, terms
from kl_patches.integrations.openrlhf import SUPPORTED
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, KLModeError, validate_mode
from kl_patches.patching import MARKER, DeferredPatch, Integration, Patch, PatchError, Rebind

logger = logging.getLogger("kl_patches.openrlhf")

LIBRARY_NAME = "openrlhf"

UTILS_MODULE = "openrlhf.models.utils"
ACTOR_MODULE = "openrlhf.trainer.ray.ppo_actor"
TRAINER_CLASS = "ActorPPOTrainer"


@dataclass
class LossContext:
    """What ``training_step`` knows and ``compute_approx_kl`` is not given: the experience (masks, rollout log-probs,
    prompts) of the micro-batch whose KL is being computed."""

    trainer: Any
    experience: Any


_LOSS_CONTEXT: contextvars.ContextVar[LossContext | None] = contextvars.ContextVar("kl_patches_openrlhf_loss",
                                                                                     default=None)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def group_ids_from_prompts(prompts, batch: int) -> torch.Tensor | None:
    """Rows answering the same prompt share a group (OpenRLHF's replay buffer drops ``Experience.index``, so the
    prompt text is what identifies a group in a training micro-batch). Any grouping keeps the leave-one-out baseline
    exact (it never uses the row itself); grouping by prompt is what lowers the variance. None without prompts."""
    if not isinstance(prompts, (list, tuple)) or len(prompts) != batch:
        return None
    ids: dict[Any, int] = {}
    return torch.tensor([ids.setdefault(p if isinstance(p, str) else repr(p), len(ids)) for p in prompts],
                        dtype=torch.long)


def rtg_loss_tokens(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    behaviour_log_probs: torch.Tensor | None,
    value: torch.Tensor,
    group_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token ``k1-rtg-loss`` for OpenRLHF's ``aggregate_loss``: forward ``value`` (the logged KL estimate), gradient
    ``log pi_t * sg(sum_{t'>=t} rho_{1:t'} l_t' - rho_{1:t} b_i)`` (kl_patches.terms.rtg_coefficients). Summed over
    tokens and divided by a batch constant C it has the gradient of ``kl_rtg_loss(..., normalizer=C)``. Masked
    positions are exactly 0 with zero gradient."""
    mask = action_mask.bool() if action_mask.dtype != torch.bool else action_mask
    coefficients = terms.rtg_coefficients(
        log_probs, ref_log_probs, mask, behaviour_logp=behaviour_log_probs, group_ids=group_ids,
        baseline="none" if group_ids is None else "leave-one-out",
    )
    dtype = estimators.compute_dtype(log_probs, ref_log_probs)
    surrogate = estimators.masked(log_probs.to(dtype), mask) * coefficients
    shown = estimators.masked(value.detach().to(dtype), mask)
    return shown + surrogate - surrogate.detach()


def _arguments(original, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name, against the installed signature (0.11.0 has no log_probs_old /
    unbiased_gradient; 0.11.1+ does)."""
    import inspect

    bound = inspect.signature(original).bind(*args, **kwargs)
    return dict(bound.arguments)


class OpenRLHFIntegration(Integration):
    library = LIBRARY_NAME
    distribution = LIBRARY_NAME
    supported = SUPPORTED

    def build_patches(self, mode: str) -> list:
        if mode == LIBRARY:
            return []  # the library's own KL, untouched: nothing is patched
        utils = importlib.import_module(UTILS_MODULE)
        original = vars(utils).get("compute_approx_kl")
        if original is None:
            raise PatchError(f"{LIBRARY_NAME} {self.version}: expected {UTILS_MODULE}.compute_approx_kl; it is missing")
        replacement = make_compute_approx_kl(self, original)
        return [
            Patch(utils, "compute_approx_kl", lambda _original: replacement, LIBRARY_NAME),
            Rebind(LIBRARY_NAME, original, replacement),
            DeferredPatch(ACTOR_MODULE, TRAINER_CLASS, "training_step", make_training_step, LIBRARY_NAME),
        ]


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
    experience = context.experience
    behaviour = experience.rollout_log_probs
    if behaviour is None:  # no vLLM log-probs (is_correction off): the rollout-time actor log-probs stand in
        behaviour = experience.action_log_probs
    if behaviour is None:
        raise PatchError("kl-patches k1-rtg-loss: the experience has neither rollout_log_probs nor action_log_probs, "
                         "so the importance weights of off-policy mini-batches cannot be computed")
    value = original(log_probs, ref_log_probs, kl_estimator="k1")
    return rtg_loss_tokens(
        log_probs, ref_log_probs, experience.action_mask, behaviour_log_probs=behaviour.to(log_probs.device),
        value=value, group_ids=_group_ids(experience, log_probs),
    )


def _group_ids(experience, log_probs: torch.Tensor) -> torch.Tensor | None:
    ids = group_ids_from_prompts(getattr(experience, "prompts", None), log_probs.shape[0])
    return None if ids is None else ids.to(log_probs.device)


def make_training_step(original):
    def training_step(self, experience, *args, **kwargs):
        token = _LOSS_CONTEXT.set(LossContext(self, experience))
        try:
            return original(self, experience, *args, **kwargs)
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
    if actor is not None:
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
