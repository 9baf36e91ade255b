"""Whole-generation-batch statistics, fixed normalisers and off-policy metrics (issue 9).

The claims are checked by exact enumeration through a *step*: the whole generation batch is permuted and split
into micro-batches (including splits that depend on the responses: sorted by length), micro-batch gradients are
accumulated, and the expectation over every enumerated batch is compared with grad KL_seq.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from kl_patches import statistics, terms
from kl_patches.audit.engine import (
    EXACT_TOLERANCE,
    accumulated_grad,
    build_problem,
    compare,
    enumerated_logprobs,
    exact_kl_gradient,
    expected_step_gradient,
)
from kl_patches.audit.policies import PolicySpec
from kl_patches.audit.reference import policy_gradient
from kl_patches.audit.tolerances import ENUMERATION_REL, SAME_OPERATIONS, assert_close

f64 = torch.float64
SPEC = PolicySpec(vocab=3, horizon=2, seed=5, distance=0.8, staleness=0.6)

ORDERS = {
    "reversed": lambda batch: torch.arange(batch.tokens.shape[0]).flip(0),
    "sorted by length": lambda batch: torch.argsort(batch.mask.sum(-1), stable=True),
}


def rtg_step(problem, baseline: str, order: str, micro_batch: int, use_policy_logp: bool = False):
    """A training step: statistics over the whole batch, then reorder, split, accumulate micro-batch backwards."""
    parameters = problem.parameters()

    def step(batch):
        behaviour = None if batch.on_policy else batch.behaviour_logp
        stats = statistics.group_statistics(
            batch.behaviour_logp, batch.ref_logp, batch.mask, batch.group_ids, rtg_baseline=baseline,
            policy_logp=batch.logp.detach() if use_policy_logp else None)
        constant = statistics.FixedNormalizer(batch.tokens.shape[1]).constant(batch.tokens.shape[0])
        for rows in ORDERS[order](batch).split(micro_batch):
            loss = terms.kl_rtg_loss(batch.logp[rows], batch.ref_logp[rows], batch.mask[rows], beta=1.0,
                                     behaviour_logp=None if behaviour is None else behaviour[rows],
                                     baseline=stats.select(rows).rtg_baseline, normalizer=constant)
            loss.backward(retain_graph=True)
        return accumulated_grad(parameters)

    return step


@pytest.fixture(scope="module", params=["on", "off"])
def problem(request):
    return build_problem(SPEC, off_policy=request.param == "off")


@pytest.mark.parametrize("baseline", ["none", "sequence-loo", "position-loo"])
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("micro_batch", [1, 2])
def test_rtg_step_exact_for_any_order_and_split(problem, baseline, order, micro_batch):
    truth = exact_kl_gradient(problem)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", terms.KLPatchesWarning)
        estimate = expected_step_gradient(problem, rtg_step(problem, baseline, order, micro_batch),
                                          num_groups=1, group_size=3)
    assert estimate.exact
    result = compare(estimate, truth, scale=1.0 / SPEC.horizon)
    assert result.rel_err < ENUMERATION_REL, (baseline, order, micro_batch, result)


@pytest.mark.parametrize("baseline", ["position-loo"])
def test_rtg_step_exact_with_groups_split_across_micro_batches(problem, baseline):
    """Two groups of two, sorted by length and cut into micro-batches of one: every group is split."""
    truth = exact_kl_gradient(problem)
    estimate = expected_step_gradient(problem, rtg_step(problem, baseline, "sorted by length", 1,
                                                        use_policy_logp=True), num_groups=2, group_size=2)
    assert compare(estimate, truth, scale=1.0 / SPEC.horizon).rel_err < ENUMERATION_REL


def test_micro_batch_local_baseline_is_biased_under_length_sorting():
    """The defect the whole-batch statistics remove: a leave-one-out baseline over whoever shares the micro-batch."""
    problem = build_problem(SPEC)
    parameters = problem.parameters()

    def step(batch):
        for rows in ORDERS["sorted by length"](batch).split(2):
            terms.kl_rtg_loss(batch.logp[rows], batch.ref_logp[rows], batch.mask[rows], beta=1.0,
                              group_ids=batch.group_ids[rows], baseline="sequence-loo",
                              normalizer=float(3 * SPEC.horizon)).backward(retain_graph=True)
        return accumulated_grad(parameters)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", terms.KLPatchesWarning)
        estimate = expected_step_gradient(problem, step, num_groups=1, group_size=3)
    assert compare(estimate, exact_kl_gradient(problem), scale=1.0 / SPEC.horizon).rel_err > 1e-3


def test_realised_token_normaliser_is_a_ratio_estimator():
    problem = build_problem(SPEC)
    parameters = problem.parameters()

    def step(batch):
        terms.kl_rtg_loss(batch.logp, batch.ref_logp, batch.mask, beta=1.0, normalizer="tokens").backward()
        return accumulated_grad(parameters)

    estimate = expected_step_gradient(problem, step, num_groups=1, group_size=2)
    *_, weights = enumerated_logprobs(problem)
    mean_length = float((weights * problem.mask.sum(-1)).sum())
    # against the nominal constant 2 * E|y|: the direction or the size is off by O(1/N)
    assert compare(estimate, exact_kl_gradient(problem), scale=1.0 / mean_length).rel_err > 1e-3


def test_k1_in_reward_whole_batch_baseline_exact_for_any_split():
    problem = build_problem(SPEC)
    parameters = problem.parameters()

    def step(batch):
        stats = statistics.group_statistics(batch.behaviour_logp, batch.ref_logp, batch.mask, batch.group_ids)
        advantage = -(stats.sequence_kl - stats.reward_baseline)
        for rows in ORDERS["sorted by length"](batch).split(1):
            sub = type(batch)(batch.tokens[rows], batch.mask[rows], batch.logp[rows], batch.ref_logp[rows],
                              batch.behaviour_logp[rows], torch.zeros(len(rows), dtype=torch.long), rows, len(rows),
                              True)
            (policy_gradient(sub, advantage[rows]).sum() * len(rows) / batch.tokens.shape[0]).backward(
                retain_graph=True)
        return accumulated_grad(parameters)

    estimate = expected_step_gradient(problem, step, num_groups=2, group_size=2)
    assert compare(estimate, exact_kl_gradient(problem)).rel_err < ENUMERATION_REL


def test_group_statistics_columns():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-0.3, -0.2]], dtype=f64)
    ref = torch.tensor([[-1.5, -1.0], [-1.0, -9.0], [-0.1, -0.2]], dtype=f64)
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    groups = torch.tensor([7, 7, 3])
    with pytest.warns(terms.KLPatchesWarning, match="group of one"):
        stats = statistics.group_statistics(logp, ref, mask, groups, rtg_baseline="position-loo")
    assert_close(stats.sequence_kl, torch.tensor([-0.5, 0.5, -0.2], dtype=f64), **SAME_OPERATIONS)
    assert_close(stats.reward_baseline, torch.tensor([0.5, -0.5, 0.0], dtype=f64), **SAME_OPERATIONS)
    # position t=0: the other member's reward-to-go there; t=1: row 1 has ended, so row 0 has no active other
    assert_close(stats.rtg_baseline, torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.0]], dtype=f64),
                 **SAME_OPERATIONS)
    assert set(stats.columns()) == {statistics.SEQUENCE_KL, statistics.REWARD_BASELINE, statistics.RTG_BASELINE}
    assert torch.equal(stats.select(torch.tensor([2, 0])).sequence_kl, stats.sequence_kl[[2, 0]])
    none = statistics.group_statistics(logp, ref, mask, None, reward_baseline="none", rtg_baseline="none")
    assert not none.reward_baseline.any() and not none.rtg_baseline.any()
    with pytest.raises(ValueError, match="reward-to-go baseline"):
        statistics.group_statistics(logp, ref, mask, groups, reward_baseline="position-loo")
    with pytest.raises(ValueError, match="unknown rtg_baseline"):
        statistics.group_statistics(logp, ref, mask, groups, rtg_baseline="mean")


def test_leave_one_out_never_loses_the_others_to_one_dominant_value():
    values = torch.tensor([1e17, 5.0, 1e17, -1e17], dtype=f64)
    groups = torch.tensor([0, 0, 1, 1])
    assert torch.equal(terms.leave_one_out_baseline(values, groups),
                       torch.tensor([5.0, 1e17, -1e17, 1e17], dtype=f64))


def test_stale_transformer_case_is_exact():
    """Reported in issue 9: this stale transformer once made the off-policy k1-rtg-loss cell look biased (0.199)."""
    from kl_patches.audit.reference import CELLS, run_reference

    spec = PolicySpec(kind="transformer", vocab=4, horizon=3, seed=11, distance=1.5, staleness=2.0)
    cells = tuple(c for c in CELLS if c.mode == "k1-rtg-loss" and "truncated" not in c.configuration
                  and "seq-mean" not in c.configuration)
    records = run_reference(spec, cells, regimes=("off",), steps=False)
    assert records and all(r.verdict == "exact" and r.rel_err < EXACT_TOLERANCE for r in records), records


def test_fixed_and_running_normalisers():
    assert statistics.FixedNormalizer(128).constant(8) == 1024.0
    assert statistics.FixedNormalizer().constant(np.int64(4)) == 4.0
    with pytest.raises(ValueError, match="length"):
        statistics.FixedNormalizer(0)
    with pytest.raises(ValueError, match="num_sequences"):
        statistics.FixedNormalizer(3).constant(0)
    running = statistics.RunningLengthNormalizer(initial=10.0, momentum=0.5)
    before = running.constant(2)
    running.update(torch.tensor([[True, True, False], [True, False, False]]))  # mean length 1.5
    assert before == 20.0 and running.constant(2) == pytest.approx(2 * 5.75)
    with pytest.raises(ValueError, match="momentum"):
        statistics.RunningLengthNormalizer(1.0, momentum=1.0)


def test_normaliser_inputs():
    x = torch.zeros(2, 3, dtype=f64, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert terms.kl_rtg_loss(x, x.detach(), mask, beta=1.0, normalizer=np.int64(6)).dtype == f64
    for bad in (torch.tensor(0.0), torch.tensor(-2.0), float("nan"), float("inf"), -1, True):
        with pytest.raises(ValueError, match="normalizer"):
            terms.kl_rtg_loss(x, x.detach(), mask, beta=1.0, normalizer=bad)


@pytest.mark.parametrize("normalizer", ["sequences", "tokens", torch.tensor(7.0, dtype=f64), 3])
@pytest.mark.parametrize("off_policy", [False, True])
def test_bf16_inputs_give_float32_on_every_path(normalizer, off_policy):
    logp = (-torch.rand(3, 4)).to(torch.bfloat16).requires_grad_(True)
    ref = (-torch.rand(3, 4)).to(torch.bfloat16)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    loss = terms.kl_rtg_loss(logp, ref, mask, beta=0.1, normalizer=normalizer,
                             behaviour_logp=ref if off_policy else None)
    assert loss.dtype == torch.float32
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16 and (logp.grad[~mask] == 0).all()
    assert terms.kl_advantage(logp, ref, mask, beta=0.1, baseline="none").dtype == torch.float32


@pytest.mark.parametrize("bad", [float("-inf"), float("nan")])
def test_non_finite_logprobs_at_response_positions_name_the_rows(bad):
    logp = torch.zeros(3, 2, dtype=f64)
    logp[2, 1] = bad
    mask = torch.ones(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"logp is -inf or NaN at response positions of rows \[2\]"):
        terms.kl_rtg_loss(logp, torch.zeros_like(logp), mask, beta=1.0)
    with pytest.raises(ValueError, match=r"ref_logp .* rows \[2\]"):
        terms.kl_advantage(torch.zeros_like(logp), logp, mask, beta=1.0, baseline="none")
    with pytest.raises(ValueError, match=r"behaviour_logp .* rows \[2\]"):
        terms.kl_rtg_loss(torch.zeros_like(logp), torch.zeros_like(logp), mask, beta=1.0, behaviour_logp=logp)
    mask[2, 1] = False  # masked out: fine
    terms.kl_rtg_loss(logp, torch.zeros_like(logp), mask, beta=1.0)


def test_importance_weight_stats():
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=f64)
    mask = torch.tensor([[True, True], [True, False]])
    on = statistics.importance_weight_stats(logp, logp, mask)
    assert on == {"ess": pytest.approx(1.0), "truncated_fraction": 0.0, "capped_fraction": 0.0,
                  "max_log_weight": 0.0}
    behaviour = torch.tensor([[-1.0, -1.0 - np.log(4.0)], [-1.0 - np.log(2.0), 0.0]], dtype=f64)
    stats = statistics.importance_weight_stats(logp, behaviour, mask, truncation=3.0)
    rho = np.array([1.0, 4.0, 2.0])  # prefix weights at the three response positions
    assert stats["ess"] == pytest.approx(rho.sum() ** 2 / (3 * (rho ** 2).sum()))
    assert stats["truncated_fraction"] == pytest.approx(1 / 3)
    assert stats["max_log_weight"] == pytest.approx(np.log(4.0))
    empty = statistics.importance_weight_stats(logp, logp, torch.zeros_like(mask))
    assert empty["ess"] == 1.0


def test_weight_cap_is_never_silent():
    logp = torch.zeros(1, 40)
    behaviour = torch.full((1, 40), -1.0)  # log rho_{1:t} = t: past the float32 cap of ~21.9
    mask = torch.ones(1, 40, dtype=torch.bool)
    with pytest.warns(terms.KLPatchesWarning, match="reached the torch.float32 cap"):
        weights = terms.prefix_importance_weights(logp, behaviour, mask)
    assert torch.isfinite(weights).all()
    assert statistics.importance_weight_stats(logp, behaviour, mask)["capped_fraction"] > 0.4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncation below the cap: nothing to say
        terms.prefix_importance_weights(logp, behaviour, mask, truncation=5.0)
