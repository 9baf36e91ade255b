"""The two correct-gradient KL terms, on (batch, time) per-token log-probs and a response mask.

Both give, in expectation, the gradient of beta * KL(pi_theta || pi_ref) over whole responses
(``../shared/docs/kl-gradients.md`` section 4):

* :func:`kl_advantage` -- ``k1-in-reward``: -beta * (sum_t l_t - b_i), to be added to the advantage after
  any reward-std normalisation, and optimised by a policy-gradient loss with a batch-constant normaliser.
* :func:`kl_rtg_loss` -- ``k1-rtg-loss``: beta/C * sum_i sum_t log pi_it * sg(sum_{t'>=t} rho_{1:t'} l_t'
  - rho_{1:t} b_i), with per-decision importance weights rho_{1:t} = prod_{s<=t} pi/mu when the samples come
  from a behaviour policy mu.

The baseline b_i is the leave-one-out mean over the other members of sample i's group, so it never depends on
sample i. Off-policy the baseline term is weighted by rho_{1:t} (E_mu[rho_{1:t} g_t] = E_pi[g_t] = 0); the
on-policy form in the shared doc is the special case rho = 1.
"""

from __future__ import annotations

import math
from typing import Literal, Union

import torch

from kl_patches.estimators import check_inputs, compute_dtype, masked, masked_log_ratio, max_exponent

Tensor = torch.Tensor
Normalizer = Union[float, int, Literal["sequences", "tokens"]]
Baseline = Union[Literal["leave-one-out", "none"], Tensor]


def sequence_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-response k1 sum, sum_t l_t over the masked positions: shape (batch,). Detached."""
    return masked_log_ratio(logp.detach(), ref_logp.detach(), mask).sum(dim=-1)


def _check_group_ids(group_ids: Tensor | None, batch: int, baseline) -> None:
    if isinstance(baseline, torch.Tensor):
        if baseline.shape != (batch,):
            raise ValueError(f"a baseline tensor must have shape ({batch},), got {tuple(baseline.shape)}")
        return
    if baseline not in ("leave-one-out", "none"):
        raise ValueError(f"unknown baseline {baseline!r}; choose 'leave-one-out' or 'none'")
    if baseline == "none":
        return
    if group_ids is None:
        raise ValueError(
            "baseline='leave-one-out' needs group_ids (the prompt index of every response); "
            "pass baseline='none' to use no baseline"
        )
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("group_ids must be an integer tensor of shape (batch,)")
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({batch},)")


def leave_one_out_baseline(values: Tensor, group_ids: Tensor) -> Tensor:
    """For each row, the mean of ``values`` over the *other* rows of its group (0 for a group of one)."""
    values = values.detach()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = torch.zeros(groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=groups).to(values.dtype)
    others = counts[inverse] - 1.0
    return torch.where(others > 0, (sums[inverse] - values) / others.clamp(min=1.0), torch.zeros_like(values))


def kl_advantage(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    beta: float,
    group_ids: Tensor | None = None,
    baseline: Baseline = "leave-one-out",
) -> Tensor:
    """``k1-in-reward``: the KL part of each response's advantage, -beta * (KL_i - b_i), shape (batch,).

    ``logp`` are the log-probs the responses were sampled with (rollout / old log-probs). Add the result to
    advantages *after* any division by a reward std, and use a policy-gradient loss whose normaliser is a batch
    constant: then the KL part of the gradient is exactly beta * grad KL_seq on-policy.
    """
    check_inputs(logp, ref_logp, mask)
    _check_group_ids(group_ids, logp.shape[0], baseline)
    seq = sequence_kl(logp, ref_logp, mask)
    if isinstance(baseline, torch.Tensor):
        seq = seq - baseline.detach().to(seq.dtype)
    elif baseline == "leave-one-out":
        seq = seq - leave_one_out_baseline(seq, group_ids)
    return -beta * seq


def prefix_importance_weights(
    logp: Tensor, behaviour_logp: Tensor, mask: Tensor, truncation: float | None = None
) -> Tensor:
    """rho_{1:t} = prod_{s<=t, s in response} pi(y_s|s_s) / mu(y_s|s_s), detached; 0 at masked positions.

    ``truncation`` c clips each rho_{1:t} at c (bounded bias, bounded variance). Without it, log rho is
    still clamped at a quarter of the dtype's overflow exponent (rho <= ~2.7e9 in float32, ~1e77 in
    float64): the loss multiplies two weights (the baseline term) by log-ratios and log-probs summed over
    long responses, and must stay finite. A weight that large means mu has nothing to say about pi anyway.
    """
    log_rho = masked_log_ratio(logp.detach(), behaviour_logp.detach(), mask).cumsum(dim=-1)
    cap = max_exponent(log_rho.dtype) / 4
    if truncation is not None:
        if not truncation > 0:
            raise ValueError(f"truncation must be positive, got {truncation}")
        cap = min(cap, math.log(truncation))
    return masked(torch.exp(log_rho.clamp(max=cap)), mask)


def reverse_cumsum(x: Tensor) -> Tensor:
    """sum_{t' >= t} x_t' along the last dimension."""
    return torch.flip(torch.cumsum(torch.flip(x, dims=(-1,)), dim=-1), dims=(-1,))


def rtg_coefficients(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    behaviour_logp: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline: Baseline = "leave-one-out",
    truncation: float | None = None,
) -> Tensor:
    """The detached coefficient of log pi_t in ``k1-rtg-loss``: sum_{t'>=t} rho_{1:t'} l_t' - rho_{1:t} b_i.

    ``baseline`` is ``"leave-one-out"`` (over ``group_ids``, from this batch's rows), ``"none"``, or a (batch,)
    tensor of b_i fixed by the caller -- e.g. computed over the whole generation batch before it was split into
    micro-batches. Any b_i that does not depend on sample i keeps the estimator exact.
    """
    check_inputs(logp, ref_logp, mask)
    _check_group_ids(group_ids, logp.shape[0], baseline)
    log_ratio = masked_log_ratio(logp.detach(), ref_logp.detach(), mask)
    if behaviour_logp is None:
        if truncation is not None:
            raise ValueError("truncation only applies with behaviour_logp (off-policy importance weights)")
        rho = mask.to(log_ratio.dtype)
    else:
        if behaviour_logp.shape != logp.shape:
            raise ValueError(f"behaviour_logp has shape {tuple(behaviour_logp.shape)}, expected {tuple(logp.shape)}")
        rho = prefix_importance_weights(logp, behaviour_logp, mask, truncation).to(log_ratio.dtype)
    weighted = rho * log_ratio
    coefficients = reverse_cumsum(weighted)
    if isinstance(baseline, torch.Tensor):
        coefficients = coefficients - rho * baseline.detach().to(coefficients.dtype)[:, None]
    elif baseline == "leave-one-out":
        coefficients = coefficients - rho * leave_one_out_baseline(weighted.sum(dim=-1), group_ids)[:, None]
    return masked(coefficients, mask)


def resolve_normalizer(normalizer: Normalizer, mask: Tensor) -> float | Tensor:
    if normalizer == "sequences":
        return float(mask.shape[0])
    if normalizer == "tokens":
        return mask.sum().clamp(min=1).to(torch.float64)
    if isinstance(normalizer, (int, float)) and not isinstance(normalizer, bool):
        if not normalizer > 0:
            raise ValueError(f"normalizer must be positive, got {normalizer}")
        return float(normalizer)
    if isinstance(normalizer, torch.Tensor) and normalizer.numel() == 1:
        return normalizer.detach()
    raise ValueError(f"normalizer must be 'sequences', 'tokens' or a positive number, got {normalizer!r}")


def kl_rtg_loss(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    beta: float,
    behaviour_logp: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline: Baseline = "leave-one-out",
    truncation: float | None = None,
    normalizer: Normalizer = "sequences",
    reduction: Literal["sum", "none"] = "sum",
) -> Tensor:
    """``k1-rtg-loss``: beta/C * sum_i sum_t log pi_it * sg(sum_{t'>=t} rho_{1:t'} l_t' - rho_{1:t} b_i).

    Its gradient is a pure score-function term whose expectation under the sampling policy is exactly
    beta/C * grad KL_seq (per response) when C does not depend on the sample: ``"sequences"`` (the batch
    size) or a number the caller fixes, e.g. the global token count of the generation batch to match a
    token-mean policy loss. ``"tokens"`` (this batch's token count) is a ratio estimator, consistent but not
    exact for tiny batches. ``reduction="none"`` returns the per-response sums, shape (batch,), before beta/C.
    """
    coefficients = rtg_coefficients(
        logp, ref_logp, mask, behaviour_logp=behaviour_logp, group_ids=group_ids,
        baseline=baseline, truncation=truncation,
    )
    dtype = compute_dtype(logp, ref_logp)
    per_response = (masked(logp.to(dtype), mask) * coefficients).sum(dim=-1)
    if reduction == "none":
        return per_response
    if reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    return beta * per_response.sum() / resolve_normalizer(normalizer, mask)
