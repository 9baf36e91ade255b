"""TRL's own configuration, checked against what a kl-patches mode can make exact: refusals name the flag and the fix.

Called once per trainer, at its first generation batch (:func:`check_trainer`), and by ``kl-patches check`` on the
user's parsed ``GRPOConfig`` (:func:`refusals`), so the audit and the run refuse the same configurations.

What is refused, and why (``docs/trl.md`` has the table):

* any mode, a truncated sampler (``top_p < 1``, ``0 < top_k < vocabulary``, ``min_p > 0``): responses the policy can
  produce are never sampled, and no importance weight recovers them;
* any mode, Unsloth importable: it replaces GRPOTrainer's loss with its own (kl-patches issue 14);
* ``k1-rtg-loss`` with ``mask_truncated_completions``: TRL removes truncated responses from the forward pass, so
  their KL cannot be counted without a second forward;
* ``k1-in-reward`` off-policy (``num_iterations > 1``, ``steps_per_generation > gradient_accumulation_steps``,
  vLLM): exact on-policy only -- an error, not a warning, since the run would train on a biased gradient;
* ``k1-in-reward`` with a clamp or mask on its path through TRL's policy loss (``cispo`` with ``epsilon_high < 1``,
  ``top_entropy_quantile < 1``, ``mask_truncated_completions``, ``delta < 1``, ``vespo``).

``use_vllm`` without ``vllm_importance_sampling_correction`` is warned about (once): TRL then trusts no sampler
log-probs, so neither does kl-patches, and a sampler/trainer mismatch is left uncorrected.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass

from kl_patches.modes import ENV_VAR, K1_IN_REWARD, K1_RTG_LOSS
from kl_patches.patching import PatchError

logger = logging.getLogger("kl_patches.trl")

CHECKED_FLAG = "_kl_patches_config_checked"

FIX_RTG = f"kl_mode: {K1_RTG_LOSS} (the default; or {ENV_VAR}={K1_RTG_LOSS})"


@dataclass(frozen=True)
class Refusal:
    flag: str
    reason: str
    fix: str

    def message(self, mode: str, version: str) -> str:
        return f"kl-patches (trl {version}), kl_mode={mode!r} with {self.flag}: {self.reason}. Fix: {self.fix}."


def is_off_policy(args, use_vllm: bool | None = None) -> bool:
    """True when TRL trains on responses sampled by another distribution than the current policy: several
    passes over a generation batch, generation ahead of optimisation, or a separate sampler (vLLM)."""
    use_vllm = bool(getattr(args, "use_vllm", False)) if use_vllm is None else use_vllm
    generate_every = args.steps_per_generation * args.num_iterations
    return bool(args.num_iterations > 1 or args.gradient_accumulation_steps % generate_every != 0 or use_vllm)


def unsloth_installed() -> bool:
    try:
        return importlib.util.find_spec("unsloth") is not None
    except (ImportError, ValueError):
        return False


def truncated_sampler(args, vocab_size: int | None) -> str | None:
    top_p = getattr(args, "top_p", 1.0)
    top_k = getattr(args, "top_k", 0) or 0
    min_p = getattr(args, "min_p", None) or 0.0
    found = []
    if top_p is not None and float(top_p) < 1.0:
        found.append(f"top_p={top_p}")
    if top_k > 0 and (vocab_size is None or top_k < vocab_size):
        found.append(f"top_k={top_k}" + (f" < vocabulary {vocab_size}" if vocab_size else ""))
    if float(min_p) > 0.0:
        found.append(f"min_p={min_p}")
    for key in ("top_p", "top_k", "min_p"):
        value = (getattr(args, "generation_kwargs", None) or {}).get(key)
        if value is not None and ((key == "top_p" and value < 1.0) or (key == "top_k" and 0 < value and (
                vocab_size is None or value < vocab_size)) or (key == "min_p" and value > 0.0)):
            found.append(f"generation_kwargs.{key}={value}")
    return ", ".join(found) or None


def refusals(args, mode: str, *, vocab_size: int | None = None, use_vllm: bool | None = None,
             trainer_attrs: dict | None = None) -> list[Refusal]:
    """Everything in ``args`` (a TRL GRPOConfig) that ``mode`` cannot make exact; empty when all is well."""
    found: list[Refusal] = []
    attrs = trainer_attrs or {}
    truncated = truncated_sampler(args, vocab_size)
    if truncated:
        found.append(Refusal(
            truncated, "the sampler's support is truncated, so responses the policy can produce are never sampled "
            "and no importance weight recovers them (the KL gradient misses their share of pi's mass)",
            "top_p=1.0, top_k=0, min_p=0 (or kl_mode=library to keep TRL's own KL)"))
    if unsloth_installed():
        found.append(Refusal(
            "Unsloth installed", "Unsloth replaces GRPOTrainer's loss with its own compiled copy, which kl-patches "
            "cannot reach (kl-patches issue 14); the run would train on Unsloth's KL while the metrics say otherwise",
            "run without Unsloth (uninstall it from this environment), or kl_mode=library"))
    if mode == K1_RTG_LOSS and getattr(args, "mask_truncated_completions", False):
        found.append(Refusal(
            "mask_truncated_completions=True", "TRL removes truncated responses from the forward pass, so their KL "
            "to the reference cannot be counted without a second forward; dropping them biases the KL gradient",
            "mask_truncated_completions=False (or kl_mode=library)"))
    if mode == K1_IN_REWARD:
        if is_off_policy(args, use_vllm):
            settings = (f"num_iterations={args.num_iterations}, steps_per_generation={args.steps_per_generation}, "
                        f"gradient_accumulation_steps={args.gradient_accumulation_steps}, "
                        f"use_vllm={bool(getattr(args, 'use_vllm', False) if use_vllm is None else use_vllm)}")
            found.append(Refusal(
                f"an off-policy batch ({settings})", "k1-in-reward is exact on-policy only: TRL's token ratio corrects "
                "each action but not the prefix distribution", FIX_RTG))
        loss_type = attrs.get("loss_type", getattr(args, "loss_type", None))
        epsilon_high = attrs.get("epsilon_high", getattr(args, "epsilon_high", None))
        if epsilon_high is None:  # TRL's GRPOTrainer: epsilon_high defaults to epsilon
            epsilon_high = getattr(args, "epsilon", None)
        if loss_type == "cispo" and epsilon_high is not None and float(epsilon_high) < 1.0:
            found.append(Refusal(
                f"loss_type=cispo, epsilon_high={epsilon_high}", "CISPO clamps the ratio at epsilon_high < 1, which "
                f"scales the KL advantage by {epsilon_high}", FIX_RTG))
        if loss_type == "vespo":
            found.append(Refusal("loss_type=vespo", "VESPO's sequence weights reweight the KL advantage", FIX_RTG))
        if getattr(args, "top_entropy_quantile", 1.0) < 1.0:
            found.append(Refusal(
                f"top_entropy_quantile={args.top_entropy_quantile}", "the entropy mask drops the KL advantage at "
                "low-entropy tokens", FIX_RTG))
        if getattr(args, "mask_truncated_completions", False):
            found.append(Refusal("mask_truncated_completions=True", "truncated responses lose their KL advantage",
                                 "mask_truncated_completions=False, or " + FIX_RTG))
        delta = getattr(args, "delta", None)
        if delta is not None and float(delta) < 1.0:
            found.append(Refusal(f"delta={delta}", "the two-sided clip caps the on-policy ratio below 1", FIX_RTG))
    return found


def warnings_for(args, mode: str, use_vllm: bool | None = None, correction: bool | None = None) -> list[str]:
    """Configurations kl-patches follows TRL on, but which the user should know about."""
    said = []
    use_vllm = bool(getattr(args, "use_vllm", False)) if use_vllm is None else use_vllm
    if correction is None:
        correction = bool(getattr(args, "vllm_importance_sampling_correction", True))
    if use_vllm and not correction:
        said.append(
            f"kl-patches mode {mode!r}: use_vllm=True with vllm_importance_sampling_correction=False. TRL then trusts "
            "no sampler log-probs, and kl-patches follows it (mu = the trainer's log-probs), so a vLLM/trainer "
            "mismatch biases the KL gradient. Set vllm_importance_sampling_correction=True to take vLLM's sampling "
            "log-probs as mu.")
    return said


def vocab_size_of(trainer) -> int | None:
    config = getattr(getattr(trainer, "model", None), "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None:
        size = getattr(getattr(config, "get_text_config", lambda: None)(), "vocab_size", None)
    return size


def check_trainer(trainer, mode: str, version: str) -> None:
    """Refuse (PatchError) what ``mode`` cannot make exact on this trainer; warn once about the rest."""
    if getattr(trainer, CHECKED_FLAG, None) == mode:
        return
    attrs = {"loss_type": trainer.loss_type, "epsilon_high": getattr(trainer, "epsilon_high", None)}
    found = refusals(trainer.args, mode, vocab_size=vocab_size_of(trainer), use_vllm=bool(trainer.use_vllm),
                     trainer_attrs=attrs)
    if found:
        raise PatchError(" ".join(r.message(mode, version) for r in found))
    for message in warnings_for(trainer.args, mode, use_vllm=bool(trainer.use_vllm),
                                correction=bool(getattr(trainer, "vllm_importance_sampling_correction", True))):
        logger.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    setattr(trainer, CHECKED_FLAG, mode)
