"""Per-token KL estimators (Schulman's k1, k2, k3) on (batch, time) log-probs with a response mask.

All functions return zeros at masked positions and send exactly zero gradient there, even when the masked
log-probs are -inf or NaN (``torch.where`` selects before any arithmetic touches them). bf16/fp16 inputs are
computed and returned in float32: the estimators feed losses that accumulate in float32 anyway.
"""

from __future__ import annotations

import math

from typing import TypeAlias

import torch

Tensor: TypeAlias = torch.Tensor


def check_inputs(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> None:
    """Shape and dtype contract shared by every core function: same shape, boolean mask."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a torch.bool tensor (True = response token), got {got}")
    if logp.shape != ref_logp.shape or logp.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: logp {tuple(logp.shape)}, ref_logp {tuple(ref_logp.shape)}, mask {tuple(mask.shape)}"
        )
    if logp.dim() != 2:
        raise ValueError(f"expected (batch, time) tensors, got {logp.dim()} dimensions {tuple(logp.shape)}")
    if not logp.is_floating_point() or not ref_logp.is_floating_point():
        raise TypeError(f"log-probs must be floating point, got {logp.dtype} and {ref_logp.dtype}")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.promote_types(tensors[0].dtype, tensors[1].dtype) if len(tensors) > 1 else tensors[0].dtype
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where mask, 0 elsewhere; zero gradient to the masked entries whatever their value."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def max_exponent(dtype: torch.dtype) -> float:
    """Largest argument of exp() that stays finite in ``dtype`` (with head-room for the sums that follow)."""
    return math.log(torch.finfo(dtype).max) - 2.0


def masked_log_ratio(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """l_t = log pi(y_t|s_t) - log pi_ref(y_t|s_t) at response positions, 0 elsewhere."""
    check_inputs(logp, ref_logp, mask)
    dtype = compute_dtype(logp, ref_logp)
    return masked(logp.to(dtype), mask) - masked(ref_logp.to(dtype), mask)


def k1(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """k1 = l. Unbiased for the KL value; its pathwise gradient has expectation zero."""
    return masked_log_ratio(logp, ref_logp, mask)


def k2(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """k2 = l^2 / 2. Biased value; gradient l * g (own-token term only)."""
    return 0.5 * masked_log_ratio(logp, ref_logp, mask).square()


def k3(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """k3 = exp(-l) - 1 + l. Unbiased, non-negative value; pathwise gradient (1 - e^{-l}) g.

    exp's argument is clamped at the dtype's overflow point, so the value stays finite for any log-ratio;
    below that point (|l| < ~86 in float32) nothing is clamped.
    """
    log_ratio = masked_log_ratio(logp, ref_logp, mask)
    exp_neg = torch.exp((-log_ratio).clamp(max=max_exponent(log_ratio.dtype)))
    return masked(exp_neg - 1.0 + log_ratio, mask)


ESTIMATORS = {"k1": k1, "k2": k2, "k3": k3}
