"""The kl-patches modes inside TRL's ``GRPOTrainer``, written once and used by both ways in: the drop-in subclass
(:mod:`.trainer`) and the in-place patch (:mod:`.patches`).

Each function takes the trainer and TRL's own method (``original``) and wraps it; TRL's code still does all the
work it did before (generation, rewards, the group advantages, the policy-gradient loss and its aggregation):

* :func:`score` wraps ``_generate_and_score_completions``. It checks the configuration once (:mod:`.config`:
  refusals name the flag and the fix). ``k1-rtg-loss`` (default baseline "none") needs nothing from other rows,
  so it adds nothing and runs **no extra forward**; only a non-default ``kl_rtg_baseline`` adds the core's
  whole-generation-batch columns. ``k1-in-reward`` needs every group member's sequence KL before the batch is
  shuffled and split: it computes :func:`kl_patches.statistics.group_statistics` over the generation batch of
  every process (one no-grad policy forward -- TRL skips old log-probs on-policy, and k1-in-reward is refused
  off-policy) and attaches the KL advantage -beta * (KL_i - b_i) to each row.
* :func:`loss` wraps ``_compute_loss``. TRL's own loss runs with ``beta`` set to 0 for the call, so its k3 term
  (and its "bias correction") leaves the loss while every other line runs unchanged. ``k1-rtg-loss`` then adds the
  core surrogate :func:`kl_patches.terms.kl_rtg_loss` on the log-probs TRL's forward just computed (captured, not
  recomputed) with per-decision weights against mu, the distribution TRL itself trusts as the sampler
  (:func:`behaviour_logps`). ``k1-in-reward`` adds its KL advantage to TRL's advantages, rescaled per row so that
  TRL's loss_type aggregation becomes the constant below. Both log TRL's ``kl`` metric and ``kl_patches/*``.
* :func:`compute_loss` wraps ``compute_loss`` and refuses trainers whose ``_compute_loss`` never reaches kl-patches.

Normaliser: the KL part of one optimisation step is ``beta / C * sum over the step's responses`` for every
loss_type, with C fixed before sampling (:class:`kl_patches.statistics.FixedNormalizer`): the number of sequences
per optimisation step from the configuration (``per_device_train_batch_size x gradient_accumulation_steps x
processes``) times ``max_completion_length`` (times 1 for ``luspo``, whose task loss is a per-sequence sum), so
beta keeps its token-mean meaning. Realised token counts (TRL's ``num_items_in_batch``, ``mask.sum()``) are never
used: they are ratio estimators.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from typing import Any, Callable

import torch

from kl_patches import estimators, terms
from kl_patches.integrations.trl import SUPPORTED, compat
from kl_patches.integrations.trl import config as trl_config
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY, validate_mode
from kl_patches.patching import PatchError, installed_version
from kl_patches.statistics import (
    RTG_BASELINE,
    SEQUENCE_KL,
    FixedNormalizer,
    group_statistics,
    importance_weight_stats,
)

logger = logging.getLogger("kl_patches.trl")

Tensor = torch.Tensor

__all__ = ["SUPPORTED", "score", "loss", "compute_loss", "behaviour_logps", "kl_scale", "normalizer"]

#: Keys kl-patches adds to the generation batch. TRL shuffles and splits every tensor of that dict along its first
#: dimension in unison, so they stay aligned with their rows through ``steps_per_generation`` and ``num_iterations``.
KL_ADVANTAGE_KEY = "kl_patches_kl_advantage"  # -beta * (KL_i - b_i), (B,)   [k1-in-reward]

METRIC_PREFIX = "kl_patches"

#: ``kl_patches/mu_source``: which log-probs were taken as mu, the distribution that sampled the batch.
MU_SOURCES = {"on-policy": 0.0, "old_per_token_logps": 1.0, "vllm_sampling_logps": 2.0}

#: Every loss_type of every supported TRL line; the installed line's own are ``compat.current().loss_types``.
KNOWN_LOSS_TYPES = ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo")

#: Multimodal / model-specific inputs TRL passes to ``_get_per_token_logps_and_entropies`` in ``_compute_loss``.
FORWARD_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)

OWNER_FLAG = "_kl_patches_owns_mode"  # set on kl-patches' own subclass: the in-place patch then stands aside
ALLOW_OVERRIDE_FLAG = "_kl_patches_allow_override"  # a subclass sets it to vouch its override adds no KL
REACHED_FLAG = "_kl_patches_loss_reached"
WARNED_FLAG = "_kl_patches_warned_beta0"
OVERRIDES_FLAG = "_kl_patches_overrides_checked"

#: TRL's own classes whose methods kl-patches wraps; any other class in the MRO defining these is a user override.
OVERRIDABLE = ("compute_loss", "_compute_loss")
OWN_KL_MARKERS = ("ref_per_token_logps", "self.beta", "per_token_kl")


@functools.lru_cache(maxsize=None)
def trl_version() -> str:
    return installed_version("trl") or "not installed"  # read once: package metadata costs ~10 ms a call


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


def setting(trainer, name: str, default):
    """A kl-patches field of the trainer's config (kl_truncation, kl_rtg_baseline), or its default on TRL's own
    GRPOConfig (the in-place patch)."""
    return getattr(trainer.args, name, default)


def loss_mask(inputs: dict) -> Tensor:
    """The positions TRL's loss covers: completion tokens, minus tool/environment tokens in multi-turn rollouts."""
    mask = inputs["completion_mask"]
    if inputs.get("tool_mask") is not None:
        mask = mask * inputs["tool_mask"]
    return mask.bool()


def forward_kwargs(trainer, inputs: dict) -> dict:
    """The multimodal inputs of the batch that this TRL's log-prob method takes (TRL 0.24 takes fewer)."""
    return compat.accepted(trainer, {key: inputs.get(key) for key in FORWARD_KEYS})


# ------------------------------------------------------------------------------------------ guards


def check_overrides(trainer, mode: str) -> None:
    """Refuse a subclass that overrides ``compute_loss``/``_compute_loss`` with KL code of its own: it would train on
    that KL while the metrics name a kl-patches mode. An override that only wraps TRL's (calls ``super()``) and
    touches no KL is said once as a warning; ``_kl_patches_allow_override = True`` on the class silences it."""
    if getattr(trainer, OVERRIDES_FLAG, False):
        return
    import trl.trainer.grpo_trainer as grpo_module

    base = grpo_module.GRPOTrainer
    for cls in type(trainer).__mro__:
        if cls is base or getattr(cls, "__module__", "").startswith("kl_patches") or not issubclass(cls, base):
            continue
        if vars(cls).get(ALLOW_OVERRIDE_FLAG, False):
            continue
        for name in OVERRIDABLE:
            method = vars(cls).get(name)
            if method is None:
                continue
            try:
                source = inspect.getsource(method)
            except (OSError, TypeError):
                source = ""
            where = f"{cls.__module__}.{cls.__qualname__}.{name}"
            if any(marker in source for marker in OWN_KL_MARKERS) or not source:
                raise PatchError(
                    f"trl {trl_version()}: {where} overrides GRPOTrainer.{name} and computes a KL of its own "
                    f"({'source unavailable' if not source else 'it reads the reference log-probs or beta'}); "
                    f"with kl-patches mode {mode!r} it would train on that KL while the metrics say {mode}. Remove "
                    f"the KL from the override (beta stays TRL's), or set kl_mode='library' / unset KL_PATCHES_MODE, "
                    f"or set {ALLOW_OVERRIDE_FLAG} = True on the class if it adds no KL.")
            message = (f"kl-patches mode {mode!r}: {where} overrides GRPOTrainer.{name}; kl-patches replaces TRL's KL "
                       f"inside GRPOTrainer._compute_loss and cannot verify the override adds none (set "
                       f"{ALLOW_OVERRIDE_FLAG} = True on the class to vouch for it).")
            logger.warning(message)
            warnings.warn(message, UserWarning, stacklevel=4)
    setattr(trainer, OVERRIDES_FLAG, True)


def check(trainer, mode: str) -> None:
    if getattr(trainer, trl_config.CHECKED_FLAG, None) == mode and getattr(trainer, OVERRIDES_FLAG, False):
        return
    trl_config.check_trainer(trainer, mode, trl_version())
    check_overrides(trainer, mode)
    check_loss_type(trainer)


def check_loss_type(trainer) -> str:
    loss_type = trainer.loss_type
    known = compat.current().loss_types
    if loss_type not in known:
        raise PatchError(
            f"trl {trl_version()}: unknown GRPO loss_type {loss_type!r}; kl-patches knows "
            f"{', '.join(known)} on this TRL and will not guess how a new one normalises the loss"
        )
    return loss_type


# ------------------------------------------------------------------------------------------ generation time


def sampling_logps(trainer, output: dict) -> Tensor:
    """mu at generation time, per token: the sampler's log-probs TRL trusts, else TRL's ``old_per_token_logps``,
    else (on-policy, TRL skipped them) one no-grad forward of the current policy."""
    old = output.get("old_per_token_logps")
    mu, _ = choose_mu(trainer, output, old)
    if mu is not None:
        return mu
    completion_ids = output["completion_ids"]
    input_ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    args = trainer.args
    batch_size = args.per_device_train_batch_size if train_or_eval(trainer) == "train" else \
        args.per_device_eval_batch_size
    with torch.no_grad():
        logps = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, completion_ids.size(1), batch_size=batch_size,
            **forward_kwargs(trainer, output),
        )[0]  # (logps, entropies) on TRL 0.24, (logps, entropies, aux) on 1.15+
    return logps.detach()


def gather_padded(trainer, tensor: Tensor) -> Tensor:
    """All processes' rows in process order (as TRL gathers rewards), right-padded to a common width."""
    tensor = trainer.accelerator.pad_across_processes(tensor, dim=1, pad_index=0)
    return trainer.accelerator.gather(tensor)


@contextlib.contextmanager
def capture_sampling_logps(trainer, captured: dict):
    """TRL 0.24 keeps only the clamped vLLM ratio in the batch, not vLLM's per-token sampling log-probs (mu): keep
    them as ``_generate`` returns them while TRL scores the batch. A no-op on lines that keep them (1.15+)."""
    corrected = trainer.use_vllm and trainer.vllm_importance_sampling_correction
    if compat.current().sampling_logps_in_batch or not corrected:
        yield
        return
    name = "_generate"
    previous = trainer.__dict__.get(name, _MISSING)
    inner = getattr(trainer, name)

    def capturing(*args, **kwargs):
        result = inner(*args, **kwargs)
        captured["logprobs"] = result[3]  # (prompt_ids, completion_ids, num_items, logprobs, forward_kwargs)
        return result

    setattr(trainer, name, capturing)
    try:
        yield
    finally:
        if previous is _MISSING:
            delattr(trainer, name)
        else:
            setattr(trainer, name, previous)


def sampling_tensor(logprobs: list, like: Tensor) -> Tensor:
    """vLLM's per-token log-probs (lists per row) right-padded with 0 to the completion width, as TRL 1.x does."""
    rows = [torch.tensor(row, device=like.device) for row in logprobs]
    padded = torch.zeros(len(rows), like.shape[1], dtype=rows[0].dtype if rows else torch.float32,
                         device=like.device)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    return padded


def score(trainer, original: Callable, inputs, mode: str) -> dict:
    """``_generate_and_score_completions`` with what ``mode`` needs from the whole generation batch added."""
    sampled: dict[str, Any] = {}
    if active_mode(trainer, mode) is not None:
        check(trainer, mode)  # before generation: a refused configuration costs nothing
        with capture_sampling_logps(trainer, sampled):
            output = original(trainer, inputs)
        if sampled.get("logprobs") is not None and "sampling_per_token_logps" not in output:
            output["sampling_per_token_logps"] = sampling_tensor(sampled["logprobs"], output["completion_ids"])
    else:
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
    rtg_baseline = setting(trainer, "kl_rtg_baseline", "none")
    if mode == K1_RTG_LOSS and rtg_baseline == "none":
        return output  # nothing from other rows: no statistic, no forward

    mask = loss_mask(output)
    logp = sampling_logps(trainer, output)
    old = output.get("old_per_token_logps")
    # The whole generation batch of every process, then this process's slice, exactly like TRL's rewards ->
    # advantages (groups are consecutive runs of num_generations rows), before TRL shuffles and splits it.
    all_logp = gather_padded(trainer, logp)
    all_ref = gather_padded(trainer, ref.detach())
    all_mask = gather_padded(trainer, mask.to(torch.int32)).bool()
    all_policy = None if old is None or mode == K1_IN_REWARD else gather_padded(trainer, old.detach())
    num_generations = trainer.num_generations if train_or_eval(trainer) == "train" else getattr(
        trainer, "num_generations_eval", trainer.num_generations)  # TRL 0.24 has one group size
    group_ids = torch.arange(all_logp.shape[0], device=all_logp.device) // num_generations
    process = trainer.accelerator.process_index
    local = slice(process * len(logp), (process + 1) * len(logp))
    width = logp.shape[1]
    stats = group_statistics(all_logp, all_ref, all_mask, group_ids, policy_logp=all_policy,
                             rtg_baseline=rtg_baseline if mode == K1_RTG_LOSS else "none").select(local)
    output[SEQUENCE_KL] = stats.sequence_kl
    if mode == K1_IN_REWARD:
        output[KL_ADVANTAGE_KEY] = terms.kl_advantage(logp, ref.detach(), mask, beta=float(trainer.beta),
                                                      baseline=stats.reward_baseline)
    else:
        output[RTG_BASELINE] = stats.rtg_baseline[:, :width].contiguous()
    return output


# ------------------------------------------------------------------------------------------ the loss


def normalizer(trainer) -> FixedNormalizer:
    """beta keeps its token-mean meaning: C = sequences x max_completion_length (x 1 for luspo, a sequence sum)."""
    length = 1.0 if trainer.loss_type == "luspo" else float(trainer.max_completion_length)
    return FixedNormalizer(length)


def trainer_scales_for_accumulation(trainer) -> bool:
    """Whether the loss ``compute_loss`` returns is taken as already scaled for gradient accumulation (TRL's
    GRPOTrainer says so, ``loss_is_scaled_for_ga = True``) or divided by the accumulation steps by Trainer."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    return bool(getattr(trainer, "model_accepts_loss_kwargs", False) or getattr(trainer, "compute_loss_func", None))


def kl_scale(trainer) -> float:
    """The factor of sum_rows(surrogate) in one micro-batch's returned loss such that, after Trainer's scaling and
    the data-parallel gradient mean over processes, an optimisation step accumulates beta / C * sum over the
    step's responses, C = FixedNormalizer.constant(sequences per optimisation step, all processes)."""
    args = trainer.args
    train = train_or_eval(trainer) == "train"
    per_process = args.per_device_train_batch_size * args.gradient_accumulation_steps if train else \
        args.per_device_eval_batch_size
    processes = trainer.accelerator.num_processes
    constant = normalizer(trainer).constant(per_process * processes)
    scale = float(trainer.beta) * processes / constant  # x processes: DDP averages the ranks' gradients
    if train and not trainer_scales_for_accumulation(trainer):
        scale *= trainer.current_gradient_accumulation_steps
    return scale


def row_normalizer(trainer, mask: Tensor, inputs: dict) -> Tensor:
    """What TRL's ``_compute_loss`` divides row i's token sum by, for the configured loss_type, shape (B,)
    (read off each supported TRL line's aggregation; the parity tests check it against TRL's own loss)."""
    loss_type = check_loss_type(trainer)
    line = compat.current()
    rows = mask.shape[0]
    train = train_or_eval(trainer) == "train"
    steps = float(trainer.current_gradient_accumulation_steps) if train or line.eval_divides_by_accumulation else 1.0
    lengths = mask.sum(-1).clamp(min=1).to(torch.float64)
    if loss_type in ("grpo", "sapo"):
        value = lengths * rows * steps
    elif loss_type == "bnpo":
        value = mask.sum().clamp(min=1).to(torch.float64).expand(rows) * steps
    elif loss_type == "dr_grpo":
        value = torch.full((rows,), float(rows * trainer.max_completion_length) * steps, dtype=torch.float64)
    elif loss_type == "luspo":
        value = torch.full((rows,), float(rows) * steps, dtype=torch.float64)
    else:  # dapo, cispo, vespo: the generation batch's token count, rescaled to one accumulation window
        count = inputs["num_items_in_batch"].clamp(min=1.0).to(torch.float64) / trainer.accelerator.num_processes
        if train and line.dapo_window:
            count = count * steps / trainer.args.steps_per_generation
        value = count.expand(rows)
    return value.to(mask.device)


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
    """Keep the per-token log-probs ``_compute_loss`` computes for the policy (its forward), so the KL surrogate
    reuses them (same graph, no second forward)."""
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


def choose_mu(trainer, inputs: dict, old: Tensor | None) -> tuple[Tensor | None, str]:
    """(mu, source): the log-probs TRL itself trusts as the sampler in its importance-sampling correction.

    vLLM's sampling log-probs when TRL uses them (``use_vllm`` and ``vllm_importance_sampling_correction``; tokens
    vLLM could not score, NaN, fall back to ``old_per_token_logps`` as TRL's ratio does); else TRL's
    ``old_per_token_logps`` (it computes them exactly when the batch is off-policy); else None: TRL treats the
    batch as on-policy, and so does kl-patches (no weights)."""
    sampling = inputs.get("sampling_per_token_logps")
    if sampling is not None and trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        if old is None:
            raise PatchError(f"trl {trl_version()}: vLLM importance sampling without old_per_token_logps; "
                             f"kl-patches cannot resolve the NaN sampling log-probs")
        mu = torch.where(torch.isnan(sampling), old.to(sampling.dtype), sampling)
        return mu.detach(), "vllm_sampling_logps"
    if old is not None:
        return old.detach(), "old_per_token_logps"
    return None, "on-policy"


def behaviour_logps(trainer, inputs: dict) -> tuple[Tensor | None, str]:
    return choose_mu(trainer, inputs, inputs.get("old_per_token_logps"))


def log_metrics(trainer, logp: Tensor, ref: Tensor, mask: Tensor, mu: Tensor | None, source: str) -> None:
    """TRL's own ``kl`` (the k3 mean it would have logged, for dashboards; no gradient) and kl-patches' metrics, every
    micro-batch: TRL averages them over each logging window."""
    metrics = trainer._metrics[train_or_eval(trainer)]
    with torch.no_grad():
        # one log-ratio, one collective and one device->host copy per micro-batch (TRL's own k3 line costs one each)
        log_ratio = estimators.masked_log_ratio(logp.detach(), ref, mask)
        # TRL's k3, exp(-l) - 1 + l: 0 at masked positions, where l = 0
        k3 = torch.exp((-log_ratio).clamp(max=estimators.max_exponent(log_ratio.dtype))) - 1.0 + log_ratio
        if mu is None:
            weights = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64, device=logp.device)
        else:
            stats = importance_weight_stats(logp, mu, mask, setting(trainer, "kl_truncation", None))
            weights = torch.tensor([stats["ess"], stats["truncated_fraction"], stats["capped_fraction"]],
                                   dtype=torch.float64, device=logp.device)
        sums = torch.stack([k3.sum().double(), mask.sum().double(), log_ratio.sum().double(),
                            torch.tensor(float(mask.shape[0]), dtype=torch.float64, device=logp.device)])
        reduced = trainer.accelerator.reduce(torch.cat([sums, weights / trainer.accelerator.num_processes]),
                                             reduction="sum").tolist()
    metrics["kl"].append(reduced[0] / max(reduced[1], 1.0))
    metrics[f"{METRIC_PREFIX}/sequence_kl"].append(reduced[2] / max(reduced[3], 1.0))
    for name, value in zip(("ess", "truncated_fraction", "capped_fraction"), reduced[4:]):
        metrics[f"{METRIC_PREFIX}/{name}"].append(value)
    metrics[f"{METRIC_PREFIX}/mu_source"].append(MU_SOURCES[source])


def loss(trainer, original: Callable, model, inputs: dict, mode: str) -> Tensor:
    """``_compute_loss`` with TRL's KL term replaced by the mode's."""
    if active_mode(trainer, mode) is None:
        return original(trainer, model, inputs)
    check(trainer, mode)
    if mode == K1_IN_REWARD and KL_ADVANTAGE_KEY not in inputs:
        raise PatchError(
            f"trl {trl_version()}: the batch reaching {type(trainer).__name__}._compute_loss was not scored by "
            f"kl-patches (does the trainer override _generate_and_score_completions?); mode {mode!r} cannot apply"
        )
    setattr(trainer, REACHED_FLAG, True)
    mask = loss_mask(inputs)
    ref = inputs["ref_per_token_logps"].detach()
    scale = kl_scale(trainer)
    captured: dict[str, Any] = {}

    if mode == K1_IN_REWARD:
        # The KL advantage joins TRL's (already std-scaled) advantages; TRL's aggregation divides row i by
        # row_normalizer_i, so rescaling the KL part by row_normalizer_i * scale / beta makes it beta / C overall.
        kl_part = inputs[KL_ADVANTAGE_KEY]
        factor = row_normalizer(trainer, mask, inputs) * (scale / float(trainer.beta))
        kl_part = kl_part * factor.to(kl_part.dtype)
        advantages = inputs["advantages"]
        inputs = dict(inputs)
        inputs["advantages"] = advantages + (kl_part if advantages.dim() == 1 else kl_part[:, None])
        with without_library_kl(trainer), capture_policy_logps(trainer, captured):
            result = original(trainer, model, inputs)
        if "logps" in captured:
            log_metrics(trainer, captured["logps"], ref, mask, None, "on-policy")
        return result

    with without_library_kl(trainer), capture_policy_logps(trainer, captured):
        policy_loss = original(trainer, model, inputs)
    if "logps" not in captured:
        raise PatchError(f"trl {trl_version()}: _compute_loss computed no policy log-probs through "
                         f"_get_per_token_logps_and_entropies; kl-patches cannot attach the {mode} term")
    logp = captured["logps"]
    mu, source = behaviour_logps(trainer, inputs)
    baseline = inputs.get(RTG_BASELINE, "none")
    per_response = terms.kl_rtg_loss(logp, ref, mask, beta=1.0, behaviour_logp=mu, baseline=baseline,
                                     truncation=setting(trainer, "kl_truncation", None), reduction="none")
    log_metrics(trainer, logp, ref, mask, mu, source)
    kl_loss = scale * per_response.sum()
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
