"""The verl-specific KL math, built on ``kl_patches.terms`` / ``kl_patches.statistics``.

Loss side (``kl_loss_type=k1-rtg-loss``), per micro-batch of verl's actor update:

    kl_loss = dp_size * sum_{i in micro-batch} S_i / C

with S_i the k1 reward-to-go surrogate of response i (no baseline by default: nothing from other rows, so the
accumulated gradient is the same for any shuffle, length balancing, rank partition and micro-batch split) and C
a constant fixed *before sampling* from the configuration (:func:`fixed_normalizer`). verl's FSDP/DDP engine
averages gradients over the ``dp_size`` ranks, so the mini-batch's accumulated KL gradient is
``beta / C * sum over its responses of grad S_i`` -- whatever ``ppo_micro_batch_size_per_gpu``,
``use_dynamic_bsz`` or the padding width of a micro-batch.

mu, the distribution that sampled the tokens, is ``rollout_log_probs`` (the inference engine's) when the batch
carries them, else verl's ``old_log_probs`` (the trainer's recomputation: exact only when engine and trainer
agree).

Reward side (``kl_penalty=k1-in-reward``): the sequence KL and its leave-one-out baseline over whole ``uid``
groups, from :func:`kl_patches.statistics.group_statistics`, on the driver over the whole generation batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from kl_patches import terms
from kl_patches.statistics import group_statistics, importance_weight_stats

Tensor = torch.Tensor

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")

#: key of ``ActorConfig.global_batch_info`` under which the driver hands the worker its fixed settings
SETTINGS_KEY = "kl_patches"

MU_ROLLOUT = "rollout_log_probs"
MU_TRAINER = "old_log_probs"
#: numeric code of kl_patches/mu_source in verl's metrics (verl's metrics are numbers)
MU_SOURCE_CODE = {MU_ROLLOUT: 1.0, MU_TRAINER: 0.0}


@dataclass(frozen=True)
class LossSettings:
    """What the worker needs to fix the k1-rtg-loss term before sampling (computed on the driver from the
    configuration, carried in ``ActorConfig.global_batch_info['kl_patches']``)."""

    #: the fixed response length L (``data.max_response_length`` = ``rollout.response_length``)
    length: int
    #: the importance-weight truncation c (None: no truncation)
    truncation: float | None = None

    def as_dict(self) -> dict:
        return {"length": int(self.length), "truncation": self.truncation}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "LossSettings":
        truncation = values.get("truncation")
        return cls(int(values["length"]), None if truncation is None else float(truncation))


def fixed_normalizer(loss_agg_mode: str, num_sequences: int, length: int, loss_scale_factor: Any = None) -> float:
    """C for the KL term, fixed before sampling: ``num_sequences`` is the mini-batch size from the configuration
    (``ppo_mini_batch_size x rollout.n``, verl's ``global_batch_size``), ``length`` the configured maximum
    response length. Per ``loss_agg_mode`` it keeps the scale verl gives that mode, with every realised count
    replaced by its configured bound:

    * token-mean, seq-mean-token-mean: N x L (beta per token of a full-length response);
    * seq-mean-token-sum: N (beta per response);
    * seq-mean-token-sum-norm: N x (loss_scale_factor or L);
    * token-sum: 1 (beta per response, summed over the mini-batch).
    """
    if num_sequences is None or int(num_sequences) <= 0:
        raise ValueError(f"the mini-batch size must be a positive number from the configuration, got {num_sequences}")
    if loss_agg_mode in ("token-mean", "seq-mean-token-mean"):
        return float(num_sequences) * float(length)
    if loss_agg_mode == "seq-mean-token-sum":
        return float(num_sequences)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return float(num_sequences) * float(loss_scale_factor if loss_scale_factor is not None else length)
    if loss_agg_mode == "token-sum":
        return 1.0
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")  # verl's own message


def choose_mu(fields: Mapping[str, Tensor]) -> tuple[Tensor, str]:
    """(mu log-probs, source): the engine's rollout log-probs when present, else the trainer's old_log_probs."""
    if MU_ROLLOUT in fields and fields[MU_ROLLOUT] is not None:
        return fields[MU_ROLLOUT], MU_ROLLOUT
    return fields[MU_TRAINER], MU_TRAINER


def rtg_micro_batch_loss(
    log_prob: Tensor,
    ref_log_prob: Tensor,
    mu_log_prob: Tensor,
    mask: Tensor,
    *,
    normalizer: float,
    dp_size: int = 1,
    truncation: float | None = None,
) -> Tensor:
    """``dp_size * sum_i S_i / C`` for one micro-batch (before ``kl_loss_coef``): rows are independent, so the sum
    over micro-batches and ranks (after the engine's average over ranks) is the mini-batch's ``sum_i S_i / C``."""
    per_response = terms.kl_rtg_loss(
        log_prob, ref_log_prob, mask, beta=1.0, behaviour_logp=mu_log_prob, baseline="none",
        truncation=truncation, reduction="none",
    )
    return per_response.sum() * (float(dp_size) / float(normalizer))


def loss_metrics(log_prob: Tensor, ref_log_prob: Tensor, mu_log_prob: Tensor, mask: Tensor,
                 truncation: float | None, mu_source: str) -> dict[str, float]:
    """kl_patches/* metrics of one micro-batch (means over its responses / positions)."""
    with torch.no_grad():
        seq = terms.sequence_kl(log_prob.detach(), ref_log_prob, mask)
        stats = importance_weight_stats(log_prob.detach(), mu_log_prob, mask, truncation)
    return {
        "kl_patches/sequence_kl": float(seq.mean()) if seq.numel() else 0.0,
        "kl_patches/ess": stats["ess"],
        "kl_patches/truncated_fraction": stats["truncated_fraction"],
        "kl_patches/capped_fraction": stats["capped_fraction"],
        "kl_patches/mu_source": MU_SOURCE_CODE[mu_source],
    }


# ------------------------------------------------------------------------------------------- reward side


def group_ids_from(values: Sequence[Any] | None) -> Tensor | None:
    """Integer group ids from verl's ``uid`` (strings or numbers), None when there are none."""
    if values is None:
        return None
    if isinstance(values, Tensor):
        return values.to(torch.long).reshape(-1)
    index: dict[Any, int] = {}
    return torch.tensor([index.setdefault(value, len(index)) for value in list(values)], dtype=torch.long)


def reward_side_kl_part(sampling_logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: Tensor,
                        group_ids: Tensor | None) -> Tensor:
    """-beta * (KL_i - b_i) per response, KL_i from the sampling log-probs and b_i the leave-one-out mean over
    the whole ``uid`` group, computed by the core's ``group_statistics`` over the whole generation batch."""
    stats = group_statistics(sampling_logp, ref_logp, mask, group_ids,
                             reward_baseline="sequence-loo" if group_ids is not None else "none")
    part = -(stats.sequence_kl - stats.reward_baseline)
    return part * beta.to(part.dtype)


def add_kl_advantage(advantages: Tensor, kl_part: Tensor, mask: Tensor) -> Tensor:
    """advantages + the per-response KL part on every response token; a new tensor (verl may alias
    advantages and returns)."""
    return advantages + (kl_part[:, None] * mask).to(advantages.dtype)


def session_kl_part(sampling_logp: Tensor, ref_logp: Tensor, mask: Tensor, batch_keys: Sequence[str],
                    beta: Tensor) -> Tensor:
    """-beta * (KL_s - b_s) for each row of an agent session s (all outputs of one ``{uid}_{session}``), KL_s
    summed over the session's outputs and b_s the leave-one-out mean over the sessions of the same uid."""
    row_kl = terms.sequence_kl(sampling_logp, ref_logp, mask)
    sessions: dict[str, int] = {}
    session_uid: list[str] = []
    row_session = []
    for key in batch_keys:
        uid, session_id, _ = key.rsplit("_", 2)
        name = f"{uid}_{session_id}"
        if name not in sessions:
            sessions[name] = len(sessions)
            session_uid.append(uid)
        row_session.append(sessions[name])
    row_session = torch.tensor(row_session, dtype=torch.long)
    session_kl = torch.zeros(len(sessions), dtype=row_kl.dtype).index_add_(0, row_session, row_kl)
    baseline = terms.leave_one_out_mean(session_kl, group_ids_from(session_uid))
    return -(session_kl - baseline)[row_session] * beta.to(row_kl.dtype)
