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
import numbers
import warnings
from typing import Literal, TypeAlias, Union

import torch

from kl_patches.estimators import check_inputs, compute_dtype, masked, masked_log_ratio, max_exponent

Tensor: TypeAlias = torch.Tensor
Normalizer = Union[float, int, Literal["sequences", "tokens"]]
#: ``"sequence-loo"``: the other members' mean sequence total (``"leave-one-out"`` is its older name);
#: ``"position-loo"``: the other members' mean reward-to-go at the same position (k1-rtg-loss only);
#: ``"none"``; or a tensor fixed by the caller, (batch,) or (batch, time), e.g. a :class:`GroupStatistics` column.
Baseline = Union[Literal["sequence-loo", "position-loo", "leave-one-out", "none"], Tensor]
BASELINES = ("sequence-loo", "position-loo", "leave-one-out", "none")
DEFAULT_REWARD_BASELINE = "sequence-loo"
DEFAULT_RTG_BASELINE = "none"  # measured: see kl_patches.statistics


class KLPatchesWarning(UserWarning):
    """Something that keeps the run going but changes what the KL gradient is (a cap hit, no baseline)."""


def sequence_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Per-response k1 sum, sum_t l_t over the masked positions: shape (batch,). Detached."""
    return masked_log_ratio(logp.detach(), ref_logp.detach(), mask).sum(dim=-1)


def check_finite(mask: Tensor, **named: Tensor | None) -> None:
    """-inf / NaN log-probs at *response* positions mean the caller passed the wrong tensor (a token the
    model gives probability 0 cannot have been sampled from it): say which rows, before any work."""
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(mask.shape)}")
        bad = mask & ~torch.isfinite(tensor.detach())
        if bool(bad.any()):
            rows = torch.nonzero(bad.any(dim=-1)).flatten().tolist()
            shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
            raise ValueError(f"{name} is -inf or NaN at response positions of rows [{shown}]: a response token "
                             "must have a finite log-probability (mask the position out if it is padding)")


def _canonical_baseline(baseline) -> str | Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)} or pass a tensor")
    return "sequence-loo" if baseline == "leave-one-out" else baseline


def check_group_ids(group_ids: Tensor | None, batch: int) -> Tensor:
    if group_ids is None:
        raise ValueError("a leave-one-out baseline needs group_ids (the prompt index of every response); "
                         "pass baseline='none' to use no baseline")
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("group_ids must be an integer tensor of shape (batch,)")
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({batch},)")
    return group_ids


def _check_baseline_tensor(baseline: Tensor, shape: tuple[int, ...], allow_positions: bool) -> None:
    allowed = [shape[:1]] + ([shape] if allow_positions else [])
    if tuple(baseline.shape) not in allowed:
        want = " or ".join(str(tuple(a)) for a in allowed)
        raise ValueError(f"a baseline tensor must have shape {want}, got {tuple(baseline.shape)}")


def _groups_of_one(inverse: Tensor, counts: Tensor) -> None:
    if bool((counts == 1).any()):
        warnings.warn("a group of one response has no leave-one-out baseline (its baseline is 0): "
                      "still exact, with more variance", KLPatchesWarning, stacklevel=3)


def leave_one_out_mean(values: Tensor, group_ids: Tensor, weights: Tensor | None = None) -> Tensor:
    """For each row, the mean of ``values`` over the *other* rows of its group (0 where there are none).

    ``values`` is (batch,) or (batch, time); ``weights`` (same shape, 0/1) says which entries count -- e.g. the
    other members still generating at position t. Each row's statistic is a sum over the other rows only
    (exclusive prefix + suffix sums inside the group), never a total minus the row itself: one dominant value
    cannot wipe out the others in floating point.
    """
    values = values.detach()
    group_ids = check_group_ids(group_ids, values.shape[0])
    batch = values.shape[0]
    if batch == 0:
        return values.clone()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    counts = torch.bincount(inverse)
    _groups_of_one(inverse, counts)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(order)
    slot[order] = torch.arange(batch, device=values.device) - starts[inverse[order]]
    tail = values.shape[1:]
    weights = torch.ones_like(values) if weights is None else weights.detach().to(values.dtype)
    padded = values.new_zeros((counts.numel(), int(counts.max()), *tail))
    padded_w = values.new_zeros(padded.shape)
    padded[inverse, slot] = values * weights
    padded_w[inverse, slot] = weights

    def others(x: Tensor) -> Tensor:
        zero = torch.zeros_like(x[:, :1])
        before = torch.cat([zero, x[:, :-1]], dim=1).cumsum(dim=1)
        after = torch.flip(torch.cat([zero, torch.flip(x, (1,))[:, :-1]], dim=1).cumsum(dim=1), (1,))
        return (before + after)[inverse, slot]

    total, count = others(padded), others(padded_w)
    return torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))


def leave_one_out_baseline(values: Tensor, group_ids: Tensor) -> Tensor:
    """For each row, the mean of ``values`` (batch,) over the *other* rows of its group (0 for a group of one)."""
    return leave_one_out_mean(values, group_ids)


def kl_advantage(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    beta: float,
    group_ids: Tensor | None = None,
    baseline: Baseline = DEFAULT_REWARD_BASELINE,
) -> Tensor:
    """``k1-in-reward``: the KL part of each response's advantage, -beta * (KL_i - b_i), shape (batch,).

    ``logp`` are the log-probs the responses were sampled with (rollout / old log-probs). Add the result to
    advantages *after* any division by a reward std, and use a policy-gradient loss whose normaliser is a batch
    constant: then the KL part of the gradient is exactly beta * grad KL_seq on-policy. Compute it over the
    whole generation batch (every member of every group), before any shuffle or micro-batch split.
    """
    baseline = _canonical_baseline(baseline)
    seq = detached_log_ratios(logp, ref_logp, mask)[0].sum(dim=-1)
    if isinstance(baseline, torch.Tensor):
        _check_baseline_tensor(baseline, tuple(logp.shape), allow_positions=False)
        seq = seq - baseline.detach().to(seq.dtype)
    elif baseline == "position-loo":
        raise ValueError("baseline='position-loo' is a reward-to-go baseline (k1-rtg-loss); k1-in-reward "
                         "takes 'sequence-loo', 'none' or a (batch,) tensor")
    elif baseline == "sequence-loo":
        seq = seq - leave_one_out_mean(seq, group_ids)
    return -beta * seq


def log_prefix_weights(logp: Tensor, behaviour_logp: Tensor, mask: Tensor) -> Tensor:
    """log rho_{1:t} = sum_{s<=t} log pi(y_s|s_s) - log mu(y_s|s_s), detached; 0 at masked positions."""
    return masked_log_ratio(logp.detach(), behaviour_logp.detach(), mask).cumsum(dim=-1)


def weight_cap(dtype: torch.dtype) -> float:
    """Largest log rho_{1:t} the loss can carry: a quarter of the dtype's overflow exponent (rho <= ~2.7e9 in
    float32). The loss multiplies two weights (the baseline term) by sums of log-ratios and log-probs."""
    return max_exponent(dtype) / 4


def prefix_importance_weights(
    logp: Tensor, behaviour_logp: Tensor, mask: Tensor, truncation: float | None = None
) -> Tensor:
    """rho_{1:t} = prod_{s<=t, s in response} pi(y_s|s_s) / mu(y_s|s_s), detached; 0 at masked positions.

    ``truncation`` c clips each rho_{1:t} at c (bounded bias, bounded variance). Without it, log rho is still
    clamped at :func:`weight_cap` so the loss stays finite; reaching that cap biases the gradient, so it warns
    (:class:`KLPatchesWarning`) and :func:`kl_patches.statistics.importance_weight_stats` counts it.
    """
    return _capped_weights(log_prefix_weights(logp, behaviour_logp, mask), mask, truncation, stacklevel=3)


def _capped_weights(log_rho: Tensor, mask: Tensor, truncation: float | None, stacklevel: int) -> Tensor:
    """exp(log rho), clipped at the truncation c and at the dtype cap (warned: a bias); 0 at masked positions."""
    cap = weight_cap(log_rho.dtype)
    if truncation is not None:
        truncation = check_truncation(truncation)
        if truncation != math.inf:
            cap = min(cap, math.log(truncation))  # type: ignore[arg-type]  # not None: checked above
    if (truncation is None or math.log(truncation) > cap) and bool((mask & (log_rho > cap)).any()):
        fraction = float((mask & (log_rho > cap)).sum()) / max(int(mask.sum()), 1)
        warnings.warn(
            f"{fraction:.1%} of the prefix importance weights reached the {log_rho.dtype} cap "
            f"rho = e^{cap:.1f}: the gradient is biased there. The behaviour policy is far from the current one "
            "(stale samples, long responses): set a truncation, or refresh the samples more often",
            KLPatchesWarning, stacklevel=stacklevel)
    return masked(torch.exp(log_rho.clamp(max=cap)), mask)


def check_truncation(truncation: float | None) -> float | None:
    if truncation is None:
        return None
    if isinstance(truncation, bool) or not isinstance(truncation, numbers.Real) or not truncation > 0:
        raise ValueError(f"truncation must be a positive number (or None / inf for none), got {truncation!r}")
    return float(truncation)


def reverse_cumsum(x: Tensor) -> Tensor:
    """sum_{t' >= t} x_t' along the last dimension."""
    return torch.flip(torch.cumsum(torch.flip(x, dims=(-1,)), dim=-1), dims=(-1,))


def detached_log_ratios(
    logp: Tensor, ref_logp: Tensor, mask: Tensor, behaviour_logp: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """(l_t, log pi_t - log mu_t or None): detached, in the compute dtype, 0 at masked positions.

    Checks shapes, and finiteness at response positions with a single device sync for all inputs: a difference is
    non-finite wherever one of its operands is, so one ``isfinite`` on the combined differences covers them all
    (the per-tensor check, which names the tensor and rows, runs only when that one fails)."""
    check_inputs(logp, ref_logp, mask)
    if behaviour_logp is not None and behaviour_logp.shape != logp.shape:
        raise ValueError(f"behaviour_logp has shape {tuple(behaviour_logp.shape)}, expected {tuple(logp.shape)}")
    dtype = compute_dtype(logp, ref_logp)
    current = logp.detach().to(dtype)
    log_ratio = current - ref_logp.detach().to(dtype)
    log_pi_mu = None if behaviour_logp is None else current - behaviour_logp.detach().to(dtype)
    probe = log_ratio if log_pi_mu is None else log_ratio + log_pi_mu
    if bool((mask & ~torch.isfinite(probe)).any()):
        check_finite(mask, logp=logp, ref_logp=ref_logp, behaviour_logp=behaviour_logp)
    zero = torch.zeros((), dtype=dtype, device=log_ratio.device)
    return (torch.where(mask, log_ratio, zero),
            None if log_pi_mu is None else torch.where(mask, log_pi_mu, zero))


def weighted_log_ratio(
    logp: Tensor, ref_logp: Tensor, mask: Tensor, behaviour_logp: Tensor | None, truncation: float | None
) -> tuple[Tensor, Tensor]:
    """(rho_{1:t}, rho_{1:t} * l_t): the prefix weights (1 on-policy) and the weighted per-token log-ratios."""
    if behaviour_logp is None and truncation is not None:
        raise ValueError("truncation only applies with behaviour_logp (off-policy importance weights)")
    log_ratio, log_pi_mu = detached_log_ratios(logp, ref_logp, mask, behaviour_logp)
    rho = _prefix_weights(log_pi_mu, mask, truncation, log_ratio.dtype)
    return rho, (log_ratio if log_pi_mu is None else rho * log_ratio)


def _prefix_weights(log_pi_mu: Tensor | None, mask: Tensor, truncation: float | None, dtype: torch.dtype) -> Tensor:
    if log_pi_mu is None:
        return mask.to(dtype)
    return _capped_weights(log_pi_mu.cumsum(dim=-1), mask, truncation, stacklevel=4).to(dtype)


def rtg_baseline(weighted: Tensor, mask: Tensor, group_ids: Tensor | None, baseline: str) -> Tensor:
    """The leave-one-out baselines of k1-rtg-loss, (batch, time), from the rows' weighted log-ratios."""
    if baseline == "none":
        return torch.zeros_like(weighted)
    if baseline == "sequence-loo":
        return leave_one_out_mean(weighted.sum(dim=-1), group_ids)[:, None].expand_as(weighted)
    # position-loo: the mean reward-to-go at position t over the other members still generating at t
    return leave_one_out_mean(reverse_cumsum(weighted), group_ids, weights=mask)


def rtg_coefficients(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    behaviour_logp: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline: Baseline = DEFAULT_RTG_BASELINE,
    truncation: float | None = None,
) -> Tensor:
    """The detached coefficient of log pi_t in ``k1-rtg-loss``: sum_{t'>=t} rho_{1:t'} l_t' - rho_{1:t} b_it.

    ``baseline`` is computed from this batch's rows (``"sequence-loo"``, ``"position-loo"`` over ``group_ids``),
    ``"none"``, or a (batch,) / (batch, time) tensor fixed by the caller -- computed over the whole generation
    batch before it was shuffled or split (:func:`kl_patches.statistics.group_statistics`). Any b_it that does
    not depend on sample i keeps the estimator exact; a baseline taken from the rows that happen to share a
    micro-batch does not, when the library groups rows by length.
    """
    baseline = _canonical_baseline(baseline)
    truncation = check_truncation(truncation)
    if isinstance(baseline, torch.Tensor):
        _check_baseline_tensor(baseline, tuple(logp.shape), allow_positions=True)
    rho, weighted = weighted_log_ratio(logp, ref_logp, mask, behaviour_logp, truncation)
    # on-policy with no baseline (the default) this is four ops on top of the log-ratio: it runs on every micro-batch
    coefficients = reverse_cumsum(weighted)
    if isinstance(baseline, torch.Tensor):
        fixed = baseline.detach().to(coefficients.dtype)
        coefficients = coefficients - rho * (fixed[:, None] if fixed.dim() == 1 else fixed)
    elif baseline != "none":
        coefficients = coefficients - rho * rtg_baseline(weighted, mask, group_ids, baseline)
    # a masked position inside a response (a tool token) still sees the later tokens' sum: zero it
    return masked(coefficients, mask)


def resolve_normalizer(normalizer: Normalizer, mask: Tensor) -> float | Tensor:
    """C in beta/C: a batch constant ("sequences", a positive number or one-element tensor), or "tokens", the
    realised token count of this batch -- a ratio estimator, biased by O(1/N): not exact."""
    if isinstance(normalizer, str):
        if normalizer == "sequences":
            return float(mask.shape[0])
        if normalizer == "tokens":
            return mask.sum().clamp(min=1).to(torch.float64)
        raise ValueError(f"normalizer must be 'sequences', 'tokens' or a positive number, got {normalizer!r}")
    if isinstance(normalizer, torch.Tensor) and normalizer.numel() == 1 and not normalizer.dtype == torch.bool:
        value = normalizer.detach().reshape(())
        if not bool(value > 0):
            raise ValueError(f"normalizer must be positive, got {float(value)}")
        return value
    if isinstance(normalizer, numbers.Real) and not isinstance(normalizer, bool):
        if not normalizer > 0 or not math.isfinite(normalizer):
            raise ValueError(f"normalizer must be positive and finite, got {normalizer}")
        return float(normalizer)
    raise ValueError(f"normalizer must be 'sequences', 'tokens' or a positive number, got {normalizer!r}")


def kl_rtg_loss(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    beta: float,
    behaviour_logp: Tensor | None = None,
    group_ids: Tensor | None = None,
    baseline: Baseline = DEFAULT_RTG_BASELINE,
    truncation: float | None = None,
    normalizer: Normalizer = "sequences",
    reduction: Literal["sum", "none"] = "sum",
) -> Tensor:
    """``k1-rtg-loss``: beta/C * sum_i sum_t log pi_it * sg(sum_{t'>=t} rho_{1:t'} l_t' - rho_{1:t} b_it).

    Its gradient is a pure score-function term whose expectation under the sampling policy is exactly
    beta/C * grad KL_seq (per response) when C is fixed before the responses are sampled: ``"sequences"`` (the
    batch size, when the library's batches have a fixed size) or a number the caller fixes -- the number of
    sequences times a length fixed in advance (:class:`kl_patches.statistics.FixedNormalizer`). ``"tokens"`` (this
    batch's token count) is a ratio estimator, consistent but not exact. ``reduction="none"`` returns the
    per-response sums, shape (batch,), before beta/C. bf16/fp16 inputs give a float32 loss.
    """
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    constant = resolve_normalizer(normalizer, mask) if reduction == "sum" else 1.0
    coefficients = rtg_coefficients(
        logp, ref_logp, mask, behaviour_logp=behaviour_logp, group_ids=group_ids,
        baseline=baseline, truncation=truncation,
    )
    dtype = coefficients.dtype
    per_response = (masked(logp.to(dtype), mask) * coefficients).sum(dim=-1)
    if reduction == "none":
        return per_response
    if isinstance(constant, torch.Tensor):
        constant = constant.to(dtype)
    return beta * per_response.sum() / constant
