"""Named tolerances for comparing float64 results, each with the reason for its size, and an assertion that says
where two tensors first differ. The tests use these instead of bare literals; the audit's own verdict uses
:data:`EXACT_TOLERANCE`.

Sizes, from float64 rounding (unit roundoff 1.1e-16) on O(1) values:

* a few operations in a different order: ~1e-16 per element, so ``SAME_OPERATIONS`` (atol 1e-15);
* a reduction over a batch or a whole enumeration (hundreds of terms, cancellation in differences of expectations):
  ~1e-14 .. 1e-13 absolute, ~1e-13 .. 1e-12 relative;
* a library's code path against the core's formula: the library reorders sums, divides by normalisers and
  multiplies by coefficients in its own order, so a few more orders of magnitude (rtol 1e-13 .. 1e-10);
* an audit verdict: the relative error of an enumerated expectation, exact below :data:`EXACT_TOLERANCE`
  (measured 1e-16 .. 1e-13; biased cells are above 1e-3).
"""

from __future__ import annotations

from typing import Any

import torch

from kl_patches.audit.engine import EXACT_TOLERANCE

__all__ = [
    "EXACT_TOLERANCE", "ENUMERATION_REL", "ENUMERATION_SELF", "SAME_OPERATIONS", "REORDERED", "REDUCTION",
    "SPLIT_INVARIANCE", "LIBRARY_PATH", "LIBRARY_PARITY", "LIBRARY_TRAINER", "RAY_ROUND_TRIP", "LIBRARY_STEP",
    "LIBRARY_GRADIENT", "FLOAT32_VALUE", "assert_close",
]

#: Relative error of an enumerated float64 expectation against a closed form or another enumeration of the same
#: quantity (sums of a few hundred terms): well below EXACT_TOLERANCE, so a regression of the formula shows.
ENUMERATION_REL = 1e-12

#: One enumeration against another enumeration of the very same gradient (a zero gradient's norm, a record's
#: cosine): rounding of a single float64 sum of a few hundred terms.
ENUMERATION_SELF = 1e-13

#: The same float64 formula evaluated twice with a few operations in another order, on O(1) values.
SAME_OPERATIONS: dict[str, float] = dict(rtol=0.0, atol=1e-15)

#: A float64 result reached through a different sequence of operations (a cumulative sum, a shifted layout, a
#: difference of two gradients): one or two more orders of magnitude of accumulated rounding.
REORDERED: dict[str, float] = dict(rtol=0.0, atol=1e-14)

#: A reduction over a whole enumeration or batch compared with its closed form (hundreds of terms).
REDUCTION: dict[str, float] = dict(rtol=0.0, atol=1e-13)

#: The same step split differently (micro-batches, dynamic batch sizes, ranks): identical up to the order in which
#: float64 gradients are accumulated.
SPLIT_INVARIANCE: dict[str, float] = dict(rtol=1e-15, atol=1e-17)

#: A library's loss / gradient on one micro-batch against the core's formula on the same tensors.
LIBRARY_PATH: dict[str, float] = dict(rtol=1e-13, atol=1e-15)

#: A library's expected gradient (an enumeration through its code) against the core reference's.
LIBRARY_PARITY: dict[str, float] = dict(rtol=1e-12, atol=1e-14)

#: A library's trainer on one batch against the core's surrogate on the same batch (OpenRLHF's training_step:
#: its loss normalisers and DeepSpeed-style scaling, then autograd through the tiny model).
LIBRARY_TRAINER: dict[str, float] = dict(rtol=1e-11, atol=1e-13)

#: A Ray worker's result (returned as Python floats) against the same computation in this process.
RAY_ROUND_TRIP: dict[str, float] = dict(rtol=1e-12, atol=1e-15)

#: A library's whole step or trainer (model forward, normalisers, accumulation scaling) against the core's term:
#: the longest chain of float64 operations in the tests.
LIBRARY_STEP: dict[str, float] = dict(rtol=1e-10, atol=1e-12)

#: As LIBRARY_STEP, for gradients whose small entries are compared (parameter gradients of a tiny model, whose
#: entries reach 1e-12): a tighter absolute floor.
LIBRARY_GRADIENT: dict[str, float] = dict(rtol=1e-10, atol=1e-13)

#: A value the library computes in float32 (a logged metric) against the float64 one.
FLOAT32_VALUE: dict[str, float] = dict(rtol=1e-6, atol=1e-9)


def assert_close(actual: Any, expected: Any, *, rtol: float, atol: float, msg: str = "") -> None:
    """``torch.allclose(actual, expected, rtol=rtol, atol=atol)`` (same broadcasting, same test), raising an
    AssertionError that names the first mismatching element, its two values and the tolerance, and how many
    elements differ."""
    actual_t, expected_t = torch.as_tensor(actual), torch.as_tensor(expected)
    if torch.allclose(actual_t, expected_t, rtol=rtol, atol=atol):
        return
    if actual_t.dtype != expected_t.dtype:
        common = torch.promote_types(actual_t.dtype, expected_t.dtype)
        actual_t, expected_t = actual_t.to(common), expected_t.to(common)
    a, e = torch.broadcast_tensors(actual_t, expected_t)
    diff = (a - e).abs()
    allowed = atol + rtol * e.abs()
    bad = ~(diff <= allowed)  # NaN differences count as mismatches, as in torch.allclose
    where = bad.nonzero()
    first = tuple(int(i) for i in where[0]) if where.numel() else ()
    raise AssertionError(
        f"{msg + ': ' if msg else ''}{int(bad.sum())} of {bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
        f"first at {first}: actual {a[first].item()!r}, expected {e[first].item()!r}, "
        f"|diff| {diff[first].item():.3e} > allowed {allowed[first].item():.3e}; "
        f"max |diff| {float(torch.nan_to_num(diff, nan=float('inf')).max()):.3e}"
    )
