"""Per-token estimators: values, masking (exactly zero gradient), finiteness, input validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kl_patches import estimators
from kl_patches.audit.tolerances import SAME_OPERATIONS, assert_close

ESTIMATORS = ("k1", "k2", "k3")


def test_values_match_definitions():
    logp = torch.tensor([[-1.0, -0.5, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -0.5, -0.25]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    l = torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64)
    assert torch.equal(estimators.k1(logp, ref, mask), l)
    assert torch.equal(estimators.k2(logp, ref, mask), 0.5 * l**2)
    assert_close(estimators.k3(logp, ref, mask), torch.exp(-l) - 1 + l, **SAME_OPERATIONS)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_masked_minus_inf_gives_zero_value_and_exactly_zero_gradient(name):
    logp = torch.tensor([[-0.3, -float("inf"), float("nan")]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-0.7, -float("inf"), -1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False, False]])
    value = estimators.ESTIMATORS[name](logp, ref, mask)
    assert torch.isfinite(value).all()
    assert value[0, 1] == 0 and value[0, 2] == 0
    value.sum().backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 2] == 0
    assert logp.grad[0, 0] != 0 or name == "k1" and logp.grad[0, 0] == 1


def test_bad_inputs_are_refused():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="torch.bool"):
        estimators.k3(x, x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        estimators.k3(x, torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch, time"):
        estimators.k1(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating point"):
        estimators.k1(torch.zeros(2, 3, dtype=torch.long), x, torch.ones(2, 3, dtype=torch.bool))


log_ratios = st.floats(min_value=-50, max_value=50, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(log_ratios, min_size=1, max_size=8), st.lists(st.booleans(), min_size=8, max_size=8),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), st.sampled_from(ESTIMATORS))
def test_finite_for_extreme_log_ratios_and_any_mask(values, keep, dtype, name):
    n = len(values)
    ref = torch.tensor([values], dtype=torch.float64).to(dtype) * 0 - 1.0
    logp = (torch.tensor([values], dtype=torch.float64) - 1.0).to(dtype).requires_grad_(True)
    mask = torch.tensor([keep[:n]])
    value = estimators.ESTIMATORS[name](logp, ref.to(dtype), mask)
    assert value.dtype in (torch.float32, torch.float64)
    assert torch.isfinite(value).all()
    value.sum().backward()
    assert torch.isfinite(logp.grad.float()).all()
    assert (logp.grad[~mask] == 0).all()


def test_k3_clamps_only_beyond_overflow():
    logp = torch.tensor([[-100.0, -80.0]], dtype=torch.float32)
    ref = torch.zeros_like(logp)
    value = estimators.k3(logp, ref, torch.ones_like(logp, dtype=torch.bool))
    assert torch.isfinite(value).all()
    assert math.isclose(float(value[0, 1]), math.exp(80.0) - 81.0, rel_tol=1e-5)
