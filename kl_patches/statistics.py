"""Statistics computed once per generation batch, so the loss is exact whatever order and split the library uses.

A training step sees the generation batch in pieces: shuffled, balanced by length, partitioned over ranks, split
into micro-batches (``../shared/docs/kl-gradients.md`` sections 4 and 8). Anything the KL term needs from *other*
rows -- the leave-one-out baselines -- and the normaliser must therefore be fixed before that happens:

* :func:`group_statistics` takes the **whole** generation batch (every member of every group) and returns
  detached per-row columns (:class:`GroupStatistics`) that travel with the rows; the loss only reads them.
* :class:`FixedNormalizer` / :class:`RunningLengthNormalizer` give the constant C of beta/C, fixed before the
  step's responses are sampled (the realised token count is a ratio estimator, not a constant).
* :func:`importance_weight_stats` makes the off-policy weights visible: effective sample size, how many were
  truncated or hit the dtype cap, the largest log-weight -- metrics every adapter logs.

With these, the sum of micro-batch losses over any partition of the batch equals the loss of the whole batch,
so the accumulated gradient is the same whatever the library does (tests/core/test_statistics.py enumerates it).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from typing import TypeAlias

import torch

from kl_patches import terms
from kl_patches.estimators import check_inputs, masked

Tensor: TypeAlias = torch.Tensor

#: The default baseline of each mode, chosen by measurement (``benchmarks/variance.py``, docs/results.md): for the
#: reward-to-go surrogate every leave-one-out baseline *raised* the exact variance in groups of 4 (on-policy
#: 0.91x / 0.92x of sequence k1 against 0.68x without one; off-policy 1.3x / 1.5x of no baseline), so none.
DEFAULT_REWARD_BASELINE = terms.DEFAULT_REWARD_BASELINE
DEFAULT_RTG_BASELINE = terms.DEFAULT_RTG_BASELINE

#: Column names the adapters attach to their batches (verl DataProto, TRL inputs, OpenRLHF experiences).
SEQUENCE_KL = "kl_patches_sequence_kl"
REWARD_BASELINE = "kl_patches_reward_baseline"
RTG_BASELINE = "kl_patches_rtg_baseline"


@dataclass
class GroupStatistics:
    """Per-row, detached columns computed over the whole generation batch.

    ``sequence_kl`` (batch,): sum_t l_t at the sampling log-probs (metric; the k1-in-reward term).
    ``reward_baseline`` (batch,): the k1-in-reward baseline b_i (0 with baseline "none").
    ``rtg_baseline`` (batch, time): the k1-rtg-loss baseline b_it (0 with baseline "none").
    """

    sequence_kl: Tensor
    reward_baseline: Tensor
    rtg_baseline: Tensor

    def columns(self) -> dict[str, Tensor]:
        """The columns under their shared names, for a library batch."""
        return {SEQUENCE_KL: self.sequence_kl, REWARD_BASELINE: self.reward_baseline, RTG_BASELINE: self.rtg_baseline}

    def select(self, rows: Tensor | slice) -> "GroupStatistics":
        return GroupStatistics(*(getattr(self, f.name)[rows] for f in fields(self)))


def group_statistics(
    sampling_logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    group_ids: Tensor | None,
    *,
    policy_logp: Tensor | None = None,
    reward_baseline: str = DEFAULT_REWARD_BASELINE,
    rtg_baseline: str = DEFAULT_RTG_BASELINE,
) -> GroupStatistics:
    """The baselines and sequence KL of every row, from the whole generation batch.

    ``sampling_logp``: the log-probs of the distribution that sampled the tokens (mu: the inference engine's,
    after temperature). ``policy_logp``: the trainer's log-probs at generation time (pi_old) when the library
    computed them; the k1-rtg-loss baseline then uses the weighted reward-to-go the loss will see at the first
    optimisation step. Both baselines only use *other* rows of the group, so any value is valid: these choices
    only lower the variance. ``group_ids`` may be None with both baselines "none".
    """
    check_inputs(sampling_logp, ref_logp, mask)
    terms.check_finite(mask, sampling_logp=sampling_logp, ref_logp=ref_logp, policy_logp=policy_logp)
    if reward_baseline == "position-loo":
        raise ValueError("reward_baseline='position-loo' is a reward-to-go baseline; choose 'sequence-loo' or 'none'")
    for name, value in (("reward_baseline", reward_baseline), ("rtg_baseline", rtg_baseline)):
        if value not in terms.BASELINES:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(terms.BASELINES)}")
    sampling_logp, ref_logp = sampling_logp.detach(), ref_logp.detach()
    seq = terms.sequence_kl(sampling_logp, ref_logp, mask)
    reward_b = (torch.zeros_like(seq) if reward_baseline == "none"
                else terms.leave_one_out_mean(seq, group_ids))
    logp = sampling_logp if policy_logp is None else policy_logp.detach()
    behaviour = None if policy_logp is None else sampling_logp
    _, weighted = terms.weighted_log_ratio(logp, ref_logp, mask, behaviour, None)
    rtg_kind = "sequence-loo" if rtg_baseline == "leave-one-out" else rtg_baseline
    rtg_b = masked(terms.rtg_baseline(weighted, mask, group_ids, rtg_kind).contiguous(), mask)
    return GroupStatistics(seq, reward_b, rtg_b)


# ------------------------------------------------------------------------------------------ normalisers


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or not math.isfinite(value):  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FixedNormalizer:
    """C = number of sequences x a length fixed in advance (1 for a per-sequence mean).

    With ``length`` = the maximum completion length, beta keeps the meaning it has in a token-mean loss at full
    length: beta per token of a full-length response. ``constant(n)`` is C for a batch of n sequences, where n
    is fixed by the configuration (e.g. the mini-batch size), never counted from the sample.
    """

    length: float = 1.0

    def __post_init__(self) -> None:
        _positive("length", self.length)

    def constant(self, num_sequences: int) -> float:
        return _positive("num_sequences", num_sequences) * self.length


class RunningLengthNormalizer:
    """C = number of sequences x the mean response length of *earlier* steps (``initial`` before any).

    Keeps the scale of a token-mean loss (and so the meaning of beta) as lengths drift, while C stays a constant
    for the current step: call :meth:`constant` before the step and :meth:`update` after it.
    """

    def __init__(self, initial: float, momentum: float = 0.9):
        self.mean_length = _positive("initial", initial)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def constant(self, num_sequences: int) -> float:
        return _positive("num_sequences", num_sequences) * self.mean_length

    def update(self, mask: Tensor) -> None:
        if mask.shape[0]:
            observed = float(mask.sum()) / mask.shape[0]
            self.mean_length = max(self.momentum * self.mean_length + (1 - self.momentum) * observed, 1e-6)


# ------------------------------------------------------------------------------------------ off-policy metrics


def importance_weight_stats(
    logp: Tensor, behaviour_logp: Tensor, mask: Tensor, truncation: float | None = None
) -> dict[str, float]:
    """Metrics of the per-decision weights rho_{1:t} = prod_{s<=t} pi/mu over the response positions.

    ``ess``: effective sample size fraction (sum rho)^2 / (n sum rho^2), 1 on-policy, falling like
    exp(-sigma^2 t) on long stale responses; ``truncated_fraction``: share of weights above the truncation c;
    ``capped_fraction``: share that reached the dtype cap (a bias, also warned about); ``max_log_weight``.
    """
    check_inputs(logp, behaviour_logp, mask)
    truncation = terms.check_truncation(truncation)
    log_rho = terms.log_prefix_weights(logp, behaviour_logp, mask).to(torch.float64)
    n = int(mask.sum())
    if n == 0:
        return {"ess": 1.0, "truncated_fraction": 0.0, "capped_fraction": 0.0, "max_log_weight": 0.0}
    values = log_rho[mask]
    peak = float(values.max())
    # ESS in log space: stable for any spread of log-weights
    ess = float(torch.exp(2 * torch.logsumexp(values, 0) - torch.logsumexp(2 * values, 0)) / n)
    cap = terms.weight_cap(terms.compute_dtype(logp, behaviour_logp))
    truncated = 0.0 if truncation is None else float((values > math.log(truncation)).sum()) / n
    return {"ess": ess, "truncated_fraction": truncated, "capped_fraction": float((values > cap).sum()) / n,
            "max_log_weight": peak}
