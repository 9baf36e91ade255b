"""The correct-gradient KL terms: hand-computed values, padding on either side, baselines, errors, numerics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kl_patches import terms
from kl_patches.audit.tolerances import REORDERED, SAME_OPERATIONS, assert_close

f64 = torch.float64


def test_leave_one_out_baseline():
    values = torch.tensor([1.0, 3.0, 5.0, 10.0, 7.0], dtype=f64)
    groups = torch.tensor([0, 0, 0, 4, 9])
    expected = torch.tensor([4.0, 3.0, 2.0, 0.0, 0.0], dtype=f64)  # singleton groups get no baseline
    assert torch.equal(terms.leave_one_out_baseline(values, groups), expected)


def test_kl_advantage_is_minus_beta_times_centred_sequence_kl():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=f64)
    ref = torch.tensor([[-1.5, -1.0], [-1.0, -9.0]], dtype=f64)
    mask = torch.tensor([[True, True], [True, False]])
    # sequence KL: 0.5 - 1.0 = -0.5 ; 0.5 ; baselines 0.5 and -0.5
    adv = terms.kl_advantage(logp, ref, mask, beta=0.1, group_ids=torch.tensor([0, 0]))
    assert_close(adv, torch.tensor([0.1, -0.1], dtype=f64), **SAME_OPERATIONS)
    no_baseline = terms.kl_advantage(logp, ref, mask, beta=0.1, baseline="none")
    assert_close(no_baseline, torch.tensor([0.05, -0.05], dtype=f64), **SAME_OPERATIONS)


def test_rtg_coefficients_on_policy_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], dtype=f64)
    ref = torch.tensor([[-2.0, -1.0, -1.0]], dtype=f64)  # l = 1, -1, -2
    mask = torch.tensor([[True, True, True]])
    coef = terms.rtg_coefficients(logp, ref, mask, baseline="none")
    assert torch.equal(coef, torch.tensor([[-2.0, -3.0, -2.0]], dtype=f64))


def test_rtg_coefficients_off_policy_by_hand():
    logp = torch.tensor([[-1.0, -2.0]], dtype=f64)
    ref = torch.tensor([[-2.0, -1.0]], dtype=f64)  # l = 1, -1
    behaviour = torch.tensor([[-1.5, -1.0]], dtype=f64)  # log rho = 0.5, -1 -> prefix 0.5, -0.5
    mask = torch.tensor([[True, True]])
    coef = terms.rtg_coefficients(logp, ref, mask, behaviour_logp=behaviour, baseline="none")
    r1, r12 = torch.exp(torch.tensor(0.5, dtype=f64)), torch.exp(torch.tensor(-0.5, dtype=f64))
    expected = torch.stack([r1 * 1 + r12 * -1, r12 * -1]).reshape(1, 2)
    assert_close(coef, expected, **SAME_OPERATIONS)
    truncated = terms.rtg_coefficients(logp, ref, mask, behaviour_logp=behaviour, baseline="none", truncation=1.0)
    assert_close(truncated, torch.stack([1 - r12, -r12]).reshape(1, 2), **SAME_OPERATIONS)


def test_rtg_loss_gradient_is_logprob_gradient_times_coefficient():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, 0.0]], dtype=f64, requires_grad=True)
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-0.2, -0.3, -5.0]], dtype=f64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    groups = torch.tensor([0, 0])
    loss = terms.kl_rtg_loss(logp, ref, mask, beta=0.5, group_ids=groups, normalizer=4.0)
    loss.backward()
    coef = terms.rtg_coefficients(logp, ref, mask, group_ids=groups)
    assert_close(logp.grad, 0.5 / 4.0 * coef, **SAME_OPERATIONS)
    assert logp.grad[1, 2] == 0


def _shift_left_padded(x, mask, fill):
    """Move each row's response to the right end (left padding), filling the rest with ``fill``."""
    out = torch.full_like(x, fill)
    new_mask = torch.zeros_like(mask)
    for i in range(x.shape[0]):
        n = int(mask[i].sum())
        if n:
            out[i, -n:] = x[i, :n]
            new_mask[i, -n:] = True
    return out, new_mask


@pytest.mark.parametrize("off_policy", [False, True])
def test_padding_never_leaks_on_either_side(off_policy):
    torch.manual_seed(0)
    logp = -torch.rand(4, 5, dtype=f64)
    ref = -torch.rand(4, 5, dtype=f64)
    behaviour = -torch.rand(4, 5, dtype=f64) if off_policy else None
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    groups = torch.tensor([0, 0, 1, 1])

    def loss_and_grad(lp, rf, bh, m):
        lp = lp.clone().requires_grad_(True)
        loss = terms.kl_rtg_loss(lp, rf, m, beta=1.0, behaviour_logp=bh, group_ids=groups)
        loss.backward()
        return loss, lp.grad, terms.kl_advantage(bh if bh is not None else lp, rf, m, beta=1.0, group_ids=groups)

    garbage = torch.where(mask, logp, torch.tensor(float("-inf"), dtype=f64))
    right = loss_and_grad(garbage, torch.where(mask, ref, torch.tensor(123.0, dtype=f64)), behaviour, mask)
    lp_left, mask_left = _shift_left_padded(logp, mask, float("-inf"))
    ref_left, _ = _shift_left_padded(ref, mask, float("nan"))
    bh_left = _shift_left_padded(behaviour, mask, 7.0)[0] if off_policy else None
    left = loss_and_grad(lp_left, ref_left, bh_left, mask_left)
    assert_close(right[0], left[0], **REORDERED)
    assert_close(right[2], left[2], **REORDERED)
    assert (right[1][~mask] == 0).all() and (left[1][~mask_left] == 0).all()
    assert_close(right[1][mask], left[1][mask_left], **REORDERED)


def test_errors_are_clear():
    x = torch.zeros(2, 3, dtype=f64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs group_ids"):
        terms.kl_rtg_loss(x, x, mask, beta=1.0, baseline="sequence-loo")
    with pytest.raises(ValueError, match=r"group_ids has shape \(3,\)"):
        terms.kl_advantage(x, x, mask, beta=1.0, group_ids=torch.tensor([0, 0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        terms.kl_advantage(x, x, mask, beta=1.0, group_ids=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown baseline"):
        terms.kl_advantage(x, x, mask, beta=1.0, baseline="mean")
    with pytest.raises(ValueError, match="truncation only applies"):
        terms.kl_rtg_loss(x, x, mask, beta=1.0, baseline="none", truncation=2.0)
    with pytest.raises(ValueError, match="normalizer"):
        terms.kl_rtg_loss(x, x, mask, beta=1.0, baseline="none", normalizer="mean")
    with pytest.raises(ValueError, match="normalizer must be positive"):
        terms.kl_rtg_loss(x, x, mask, beta=1.0, baseline="none", normalizer=0)
    with pytest.raises(ValueError, match="behaviour_logp has shape"):
        terms.kl_rtg_loss(x, x, mask, beta=1.0, baseline="none", behaviour_logp=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="torch.bool"):
        terms.kl_rtg_loss(x, x, mask.long(), beta=1.0, baseline="none")


def test_empty_and_all_masked_batches():
    empty = torch.zeros(3, 0, dtype=f64, requires_grad=True)
    loss = terms.kl_rtg_loss(empty, empty.detach(), torch.zeros(3, 0, dtype=torch.bool), beta=1.0,
                             group_ids=torch.tensor([0, 0, 1]))
    loss.backward()
    assert loss.item() == 0.0
    logp = torch.full((2, 4), float("-inf"), dtype=f64, requires_grad=True)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    loss = terms.kl_rtg_loss(logp, logp.detach(), mask, beta=1.0, group_ids=torch.tensor([0, 0]),
                             behaviour_logp=logp.detach(), normalizer="tokens")
    loss.backward()
    assert loss.item() == 0.0 and (logp.grad == 0).all()


ratio = st.floats(min_value=-50, max_value=50, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.data(), st.sampled_from([torch.float32, torch.bfloat16, f64]),
       st.booleans(), st.sampled_from([None, 1.0, 5.0]))
def test_rtg_loss_numerics(batch, time, data, dtype, off_policy, truncation):
    values = lambda: torch.tensor(data.draw(st.lists(st.lists(ratio, min_size=time, max_size=time),
                                                     min_size=batch, max_size=batch)), dtype=f64)
    mask = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=time, max_size=time),
                                           min_size=batch, max_size=batch)))
    logp = torch.where(mask, values() - 60, torch.tensor(float("-inf"), dtype=f64)).to(dtype).requires_grad_(True)
    ref = (values() - 60).to(dtype)
    behaviour = (values() - 60).to(dtype) if off_policy else None
    loss = terms.kl_rtg_loss(logp, ref, mask, beta=1.0, behaviour_logp=behaviour,
                             truncation=truncation if off_policy else None,
                             group_ids=torch.zeros(batch, dtype=torch.long), normalizer="tokens")
    loss.backward()
    assert torch.isfinite(loss)
    # in the input's own dtype: a float64 gradient may legitimately exceed float32's range
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()
    advantage = terms.kl_advantage(logp, ref, mask, beta=1.0, group_ids=torch.zeros(batch, dtype=torch.long))
    assert torch.isfinite(advantage).all()


def test_precomputed_baseline_tensor_matches_leave_one_out_and_is_checked():
    torch.manual_seed(1)
    logp, ref, behaviour = (-torch.rand(4, 3, dtype=f64) for _ in range(3))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    groups = torch.tensor([0, 0, 1, 1])
    weighted = terms.prefix_importance_weights(logp, behaviour, mask) * terms.masked_log_ratio(logp, ref, mask)
    b = terms.leave_one_out_baseline(weighted.sum(-1), groups)
    given = terms.rtg_coefficients(logp, ref, mask, behaviour_logp=behaviour, baseline=b)
    loo = terms.rtg_coefficients(logp, ref, mask, behaviour_logp=behaviour, group_ids=groups,
                                 baseline="sequence-loo")
    assert_close(given, loo, **SAME_OPERATIONS)
    with pytest.raises(ValueError, match=r"baseline tensor must have shape \(4,\) or \(4, 3\)"):
        terms.rtg_coefficients(logp, ref, mask, baseline=b[:3])


class _DispatchCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators a block dispatches, and the device-to-host reads among them (syncs on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("off_policy", [False, True])
def test_rtg_loss_costs_a_few_elementwise_ops_and_one_sync(off_policy):
    """The default k1-rtg-loss runs on every micro-batch: it must stay a handful of elementwise passes over (B, T)
    with one finiteness check (one device sync) for all its inputs, not one per tensor, and no per-row work.
    Counted, not timed (benchmarks/overhead.py times it), so the bound is exact on every machine."""
    import torch.utils._python_dispatch  # noqa: F401  (the counter's base class)

    generator = torch.Generator().manual_seed(0)
    logp = (-torch.rand(16, 64, generator=generator)).requires_grad_()
    ref = -torch.rand(16, 64, generator=generator)
    behaviour = -torch.rand(16, 64, generator=generator) if off_policy else None
    mask = torch.rand(16, 64, generator=generator) > 0.2
    with _DispatchCounter() as counted:
        loss = terms.kl_rtg_loss(logp, ref, mask, beta=0.1, behaviour_logp=behaviour)
    assert counted.syncs == (2 if off_policy else 1)  # off-policy: + the weight-cap check, which warns
    assert counted.ops <= (42 if off_policy else 28), counted.ops  # 27 / 40 today (41 / 66 before the one-sync check)
    loss.backward()
    assert torch.all(logp.grad[~mask] == 0)
