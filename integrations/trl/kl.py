"""The kl-patches modes inside TRL's ``GRPOTrainer``, written once and used by both ways in: the drop-in
subclass (:mod:`.trainer`) and the in-place patch (:mod:`.patch`).

Each function takes the trainer and TRL's own method (``original``) and wraps it; TRL's code still does all the
work it did before (generation, rewards, the group advantages, the policy-gradient loss and its aggregation):

* :func:`score` wraps ``_generate_and_score_completions``: it adds, per response, the k1 sequence KL at the
  sampling log-probs and the group quantity the mode needs (``k1-in-reward``: the KL advantage
  -beta * (KL_i - b_i) from :func:`kl_patches.terms.kl_advantage`; ``k1-rtg-loss``: the leave-one-out baseline
  b_i), gathered across processes the way TRL gathers rewards, plus the KL metrics.
* :func:`loss` wraps ``_compute_loss``: TRL's own loss runs with ``beta`` set to 0 for the call, so its k3 term
  (and its importance-ratio "bias correction") leaves the loss while every other line runs unchanged; then
  ``k1-in-reward`` adds the KL advantage to TRL's advantages, ``k1-rtg-loss`` adds the core surrogate
  :func:`kl_patches.terms.kl_rtg_loss` with per-decision importance weights when the batch is off-policy.
* :func:`compute_loss` wraps ``compute_loss`` to fail loudly when a subclass overrides ``_compute_loss`` without
  reaching TRL's (e.g. the experimental ``GMPOTrainer``): its own KL would otherwise stay in the loss.

Normalisation: the KL part is divided by a *batch constant* C that keeps the scale of the configured
``loss_type``: TRL's global token count (``num_items_in_batch``, rescaled to one micro-batch exactly as the
``dapo`` loss does) for the token-mean losses, including ``grpo``/``sapo`` (per-sequence 1/|y_i|) and ``bnpo``
(this micro-batch's token count), whose own normalisers depend on the sample and would bias the KL gradient;
TRL's own constant for ``dr_grpo`` (B * max_completion_length) and ``luspo`` (B).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Callable

import torch

from kl_patches import estimators, terms
from kl_patches.modes import K1_IN_REWARD, LIBRARY, validate_mode
from kl_patches.patching import PatchError, installed_version

logger = logging.getLogger("kl_patches.trl")

Tensor = torch.Tensor

#: The TRL releases this adapter was verified on (its tests and exact audit pass there).
SUPPORTED = ">=1.15,<1.17"

#: Keys kl-patches adds to the generation batch. TRL shuffles and splits every (B,)-shaped tensor of that dict
#: in unison, so they stay aligned with their rows through ``steps_per_generation`` and ``num_iterations``.
SEQ_KL_KEY = "kl_patches_seq_kl"  # sum_t k1 at the sampling log-probs, (B,)
KL_ADVANTAGE_KEY = "kl_patches_kl_advantage"  # -beta * (KL_i - b_i), (B,)   [k1-in-reward]
BASELINE_KEY = "kl_patches_baseline"  # leave-one-out mean of the other group members' KL, (B,)   [k1-rtg-loss]

METRIC_PREFIX = "kl_patches"

#: TRL's loss types and the per-row normaliser each applies to a micro-batch of B rows (see ``row_normalizer``).
TOKEN_MEAN_LOSSES = ("dapo", "cispo", "vespo")
KNOWN_LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo")

#: Multimodal / model-specific inputs TRL passes to ``_get_per_token_logps_and_entropies`` in ``_compute_loss``.
FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)

OWNER_FLAG = "_kl_patches_owns_mode"  # set on kl-patches' own subclass: the in-place patch then stands aside
REACHED_FLAG = "_kl_patches_loss_reached"
WARNED_FLAG = "_kl_patches_warned_beta0"


def trl_version() -> str:
    return installed_version("trl") or "not installed"


def train_or_eval(trainer) -> str:
    return "train" if trainer.model.training else "eval"


def active_mode(trainer, mode: str) -> str | None:
    """The mode to apply to this trainer, or None when there is nothing to change (``library``, or beta = 0: TRL
    then has no KL term and no reference log-probs). The beta = 0 case is said once per trainer."""
    validate_mode(mode)
    if mode == LIBRARY:
        return None
    if float(trainer.beta) == 0.0:
        if not getattr(trainer, WARNED_FLAG, False):
            setattr(trainer, WARNED_FLAG, True)
            message = (f"kl-patches mode {mode!r}: beta=0, so {type(trainer).__name__} has no KL term; nothing to "
                       f"patch, training is unchanged. Set beta > 0 to regularise toward the reference model.")
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=3)
        return None
    return mode


def loss_mask(inputs: dict) -> Tensor:
    """The positions TRL's loss covers: completion tokens, minus tool/environment tokens in multi-turn rollouts."""
    mask = inputs["completion_mask"]
    if inputs.get("tool_mask") is not None:
        mask = mask * inputs["tool_mask"]
    return mask.bool()


def forward_kwargs(inputs: dict) -> dict:
    return {key: inputs.get(key) for key in FORWARD_KEYS}


def sampling_logps(trainer, output: dict) -> Tensor:
    """The log-probs the generation batch was sampled with, per token: TRL's ``old_per_token_logps`` when it
    computed them (off-policy batches, vLLM), else one no-grad forward of the current policy (TRL skips it when
    the batch is on-policy, but the group baseline needs every group member's KL now, before the batch is split)."""
    old = output.get("old_per_token_logps")
    if old is not None:
        return old.detach()
    completion_ids = output["completion_ids"]
    input_ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    mode = train_or_eval(trainer)
    args = trainer.args
    batch_size = args.per_device_train_batch_size if mode == "train" else args.per_device_eval_batch_size
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, completion_ids.size(1), batch_size=batch_size,
            **forward_kwargs(output),
        )
    return logps.detach()


def gather_padded(trainer, tensor: Tensor) -> Tensor:
    """All processes' rows in process order (as TRL gathers rewards), right-padded to a common width."""
    tensor = trainer.accelerator.pad_across_processes(tensor, dim=1, pad_index=0)
    return trainer.accelerator.gather(tensor)


def score(trainer, original: Callable, inputs, mode: str) -> dict:
    """``_generate_and_score_completions`` with the per-response KL quantities of ``mode`` added."""
    output = original(trainer, inputs)
    metrics = trainer._metrics[train_or_eval(trainer)]
    metrics[f"{METRIC_PREFIX}/mode/{mode}"].append(1.0)
    if active_mode(trainer, mode) is None:
        return output
    ref = output.get("ref_per_token_logps")
    if ref is None:
        raise PatchError(
            f"trl {trl_version()}: {type(trainer).__name__}._generate_and_score_completions returned no "
            f"ref_per_token_logps although beta={trainer.beta}; kl-patches cannot compute the KL of mode {mode!r}"
        )
    mask = loss_mask(output)
    logp = sampling_logps(trainer, output)
    ref = ref.detach()

    # Group quantities over the whole generation batch of every process, then this process's slice, exactly like
    # TRL's rewards -> advantages (groups are consecutive runs of num_generations rows).
    all_logp = gather_padded(trainer, logp)
    all_ref = gather_padded(trainer, ref)
    all_mask = gather_padded(trainer, mask.to(torch.int32)).bool()
    num_generations = trainer.num_generations if train_or_eval(trainer) == "train" else trainer.num_generations_eval
    group_ids = torch.arange(all_logp.shape[0], device=all_logp.device) // num_generations
    local = slice(trainer.accelerator.process_index * len(logp), (trainer.accelerator.process_index + 1) * len(logp))

    all_kl = terms.sequence_kl(all_logp, all_ref, all_mask)
    output[SEQ_KL_KEY] = all_kl[local]
    if mode == K1_IN_REWARD:
        advantage = terms.kl_advantage(all_logp, all_ref, all_mask, beta=float(trainer.beta), group_ids=group_ids)
        output[KL_ADVANTAGE_KEY] = advantage[local]  # the log-probs' precision (float32 for bf16/fp32 models)
    else:
        output[BASELINE_KEY] = terms.leave_one_out_baseline(all_kl, group_ids)[local]

    # The sequence KL to the reference, mean per response, over all processes (k1 and k3 estimates).
    all_k3 = estimators.k3(all_logp, all_ref, all_mask).sum(-1)
    metrics[f"{METRIC_PREFIX}/kl_seq_k1"].append(all_kl.mean().item())
    metrics[f"{METRIC_PREFIX}/kl_seq_k3"].append(all_k3.mean().item())
    return output


def accumulation_steps(trainer) -> float:
    if train_or_eval(trainer) != "train":
        return 1.0  # TRL: no accumulation in eval
    return float(getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps))


def check_loss_type(trainer) -> str:
    loss_type = trainer.loss_type
    if loss_type not in KNOWN_LOSS_TYPES:
        raise PatchError(
            f"trl {trl_version()}: unknown GRPO loss_type {loss_type!r}; kl-patches knows "
            f"{', '.join(KNOWN_LOSS_TYPES)} and will not guess how a new one normalises the loss"
        )
    return loss_type


def kl_normalizer(trainer, inputs: dict, mask: Tensor) -> Tensor:
    """C, the batch constant dividing the KL part of one micro-batch's loss (see the module docstring)."""
    loss_type = check_loss_type(trainer)
    rows = mask.shape[0]
    steps = accumulation_steps(trainer)
    if loss_type == "dr_grpo":
        value = rows * trainer.max_completion_length * steps
    elif loss_type == "luspo":
        value = rows * steps
    else:
        # TRL's dapo normaliser: the generation batch's global token count, rescaled to one accumulation window.
        value = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if train_or_eval(trainer) == "train":
            value = value * steps / trainer.args.steps_per_generation
        return value.detach().to(torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=mask.device)


def row_normalizer(trainer, mask: Tensor, inputs: dict) -> Tensor:
    """What TRL's aggregation divides row i's token sum by, for the configured loss_type, shape (B,)."""
    loss_type = check_loss_type(trainer)
    rows = mask.shape[0]
    steps = accumulation_steps(trainer)
    lengths = mask.sum(-1).clamp(min=1).to(torch.float64)
    if loss_type in ("grpo", "sapo"):
        return lengths * rows * steps
    if loss_type == "bnpo":
        return mask.sum().clamp(min=1).to(torch.float64).expand(rows) * steps
    return kl_normalizer(trainer, inputs, mask).expand(rows)


@contextlib.contextmanager
def without_library_kl(trainer):
    """TRL's ``_compute_loss`` with beta = 0 for the call: its KL lines are skipped, nothing else changes."""
    beta = trainer.beta
    trainer.beta = 0.0
    try:
        yield
    finally:
        trainer.beta = beta


_MISSING = object()


@contextlib.contextmanager
def capture_policy_logps(trainer, captured: dict):
    """Keep the per-token log-probs ``_compute_loss`` computes for the policy (its first forward), so the KL
    surrogate reuses them (same graph, no second forward)."""
    name = "_get_per_token_logps_and_entropies"
    previous = trainer.__dict__.get(name, _MISSING)
    inner = getattr(trainer, name)

    def capturing(*args, **kwargs):
        result = inner(*args, **kwargs)
        captured.setdefault("logps", result[0])
        return result

    setattr(trainer, name, capturing)
    try:
        yield
    finally:
        if previous is _MISSING:
            delattr(trainer, name)
        else:
            setattr(trainer, name, previous)


def behaviour_logps(inputs: dict, logp: Tensor) -> Tensor | None:
    """The log-probs of the policy that sampled the batch, or None when TRL treats it as on-policy.

    vLLM / rollout log-probs are the real sampler; tokens they could not score (NaN) fall back to TRL's old
    log-probs, else the current ones (weight 1). Without them, ``old_per_token_logps`` is the behaviour policy:
    TRL computes it exactly when the batch is off-policy (num_iterations > 1, generation ahead of optimisation)."""
    old = inputs.get("old_per_token_logps")
    sampling = inputs.get("sampling_per_token_logps")
    if sampling is not None:
        fallback = old if old is not None else logp.detach()
        return torch.where(torch.isnan(sampling), fallback.to(sampling.dtype), sampling).detach()
    return None if old is None else old.detach()


def rtg_surrogate(logp: Tensor, ref: Tensor, mask: Tensor, behaviour: Tensor | None, baseline: Tensor) -> Tensor:
    """sum_i sum_t log pi_it * sg(sum_{t'>=t} rho_{1:t'} l_t' - rho_{1:t} b_i): the core's k1-rtg-loss surrogate
    (unnormalised), with the baseline b_i fixed at generation time, since a micro-batch may not hold the whole
    group."""
    return terms.kl_rtg_loss(logp, ref, mask, beta=1.0, behaviour_logp=behaviour, baseline=baseline,
                             reduction="none").sum()


def loss(trainer, original: Callable, model, inputs: dict, mode: str) -> Tensor:
    """``_compute_loss`` with TRL's KL term replaced by the mode's."""
    if active_mode(trainer, mode) is None:
        return original(trainer, model, inputs)
    if SEQ_KL_KEY not in inputs:
        raise PatchError(
            f"trl {trl_version()}: the batch reaching {type(trainer).__name__}._compute_loss was not scored by "
            f"kl-patches (does the trainer override _generate_and_score_completions?); mode {mode!r} cannot apply"
        )
    setattr(trainer, REACHED_FLAG, True)
    mask = loss_mask(inputs)
    normalizer = kl_normalizer(trainer, inputs, mask)

    if mode == K1_IN_REWARD:
        # The KL advantage joins TRL's (already std-scaled) advantages. TRL's aggregation divides row i by
        # row_normalizer_i; rescaling the KL part by row_normalizer_i / C makes that a batch constant C.
        kl_part = inputs[KL_ADVANTAGE_KEY]
        kl_part = kl_part * (row_normalizer(trainer, mask, inputs) / normalizer).to(kl_part.dtype)
        advantages = inputs["advantages"]
        inputs = dict(inputs)
        inputs["advantages"] = advantages + (kl_part if advantages.dim() == 1 else kl_part[:, None])
        with without_library_kl(trainer):
            return original(trainer, model, inputs)

    captured: dict[str, Any] = {}
    with without_library_kl(trainer), capture_policy_logps(trainer, captured):
        policy_loss = original(trainer, model, inputs)
    if "logps" not in captured:
        raise PatchError(f"trl {trl_version()}: _compute_loss computed no policy log-probs through "
                         f"_get_per_token_logps_and_entropies; kl-patches cannot attach the {mode} term")
    logp = captured["logps"]
    surrogate = rtg_surrogate(logp, inputs["ref_per_token_logps"], mask, behaviour_logps(inputs, logp),
                              inputs[BASELINE_KEY])
    kl_loss = float(trainer.beta) * surrogate / normalizer
    return policy_loss + kl_loss.to(policy_loss.dtype)


def compute_loss(trainer, original: Callable, mode: str, model, inputs, *args, **kwargs):
    """``compute_loss``: fail loudly when ``_compute_loss`` is overridden and never reaches kl-patches, so a
    trainer such as GMPOTrainer (its own k3 block) never trains on a KL the user asked to replace."""
    if active_mode(trainer, mode) is None:
        return original(trainer, model, inputs, *args, **kwargs)
    setattr(trainer, REACHED_FLAG, False)
    result = original(trainer, model, inputs, *args, **kwargs)
    if not getattr(trainer, REACHED_FLAG):
        raise PatchError(
            f"trl {trl_version()}: {type(trainer).__qualname__} overrides _compute_loss with its own KL code, which "
            f"kl-patches mode {mode!r} cannot reach (its KL would stay as it is). Use GRPOTrainer, or set beta=0 "
            f"and unset KL_PATCHES_MODE for this trainer."
        )
    return result
