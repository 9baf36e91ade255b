"""The audit engine is itself verified: enumeration, finite differences, exact expectations, sampling."""

import pytest
import torch

from kl_patches.audit import (
    AuditBatch,
    PolicySpec,
    build_problem,
    compare,
    enumerate_responses,
    exact_kl_gradient,
    expected_gradient,
    per_group,
)
from kl_patches.audit.engine import exact_kl_value, sequence_logprobs
from kl_patches.audit.tolerances import ENUMERATION_REL, ENUMERATION_SELF, REORDERED, assert_close

SPECS = [PolicySpec(), PolicySpec(vocab=4, horizon=2, seed=3), PolicySpec(kind="transformer", seed=1)]


def test_enumeration_counts_and_lengths():
    tokens, mask = enumerate_responses(3, 3)
    # EOS at step 1, 2, 3 (1 + 2 + 4) plus 8 truncated responses without EOS
    assert tokens.shape == (15, 3)
    assert sorted(mask.sum(1).tolist()) == [1, 2, 2, 3, 3, 3, 3] + [3] * 8
    assert len({tuple(t[m].tolist()) for t, m in zip(tokens, mask)}) == 15


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_probabilities_sum_to_one(spec):
    problem = build_problem(spec, off_policy=True)
    for policy in (problem.policy, problem.reference, problem.behaviour):
        with torch.no_grad():
                assert abs(float(sequence_logprobs(policy, problem).exp().sum()) - 1.0) < ENUMERATION_REL


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_kl_gradient_agrees_with_finite_differences(spec):
    problem = build_problem(spec)
    grad = exact_kl_gradient(problem)
    parameters = problem.parameters()
    generator = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in parameters]
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(parameters, direction):
            p.add_(eps * d)
        plus = exact_kl_value(problem)
        for p, d in zip(parameters, direction):
            p.sub_(2 * eps * d)
        minus = exact_kl_value(problem)
        for p, d in zip(parameters, direction):
            p.add_(eps * d)
    numeric = (plus - minus) / (2 * eps)
    analytic = float(grad @ torch.cat([d.reshape(-1) for d in direction]))
    assert abs(numeric - analytic) <= 1e-7 * max(1.0, abs(analytic))


def test_score_function_of_constant_has_zero_expectation_and_sum_logprob_matches_kl_at_known_case():
    problem = build_problem(PolicySpec(seed=5))
    # E[grad log pi(y)] = 0 exactly
    zero = expected_gradient(problem, lambda b: b.logp.sum(-1)).gradient
    assert float(zero.norm()) < ENUMERATION_SELF
    # E[grad log pi(y) * sg(log pi(y) - log pi_ref(y))] = grad KL_seq exactly
    loss = lambda b: b.logp.sum(-1) * (b.logp.detach() - b.ref_logp).sum(-1)
    result = compare(expected_gradient(problem, loss), exact_kl_gradient(problem))
    assert result.exact and result.rel_err < ENUMERATION_SELF and abs(result.cosine - 1) < ENUMERATION_SELF


def test_groups_enumerate_ordered_pairs_and_per_group_matches_vectorised():
    problem = build_problem(PolicySpec(), off_policy=True)
    seen = []

    def vectorised(batch: AuditBatch):
        seen.append(batch.num_groups)
        per_row = batch.logp.sum(-1) * (batch.logp.detach() - batch.ref_logp).sum(-1)
        return per_row.reshape(-1, 2).mean(-1)

    looped = per_group(lambda b: (b.logp.sum(-1) * (b.logp.detach() - b.ref_logp).sum(-1)).mean())
    a = expected_gradient(problem, vectorised, group_size=2).gradient
    b = expected_gradient(problem, looped, group_size=2).gradient
    assert seen == [15 * 15]
    assert_close(a, b, **REORDERED)


def test_sampled_expectation_reports_a_standard_error_that_covers_the_truth():
    problem = build_problem(PolicySpec())
    loss = lambda b: b.logp.sum(-1) * (b.logp.detach() - b.ref_logp).sum(-1)
    truth = exact_kl_gradient(problem)
    sampled = expected_gradient(problem, loss, group_size=1, max_groups=1, samples=4000, seed=1)
    assert not sampled.exact and sampled.stderr is not None
    result = compare(sampled, truth)
    assert result.stderr > 0 and result.exact  # within 4 standard errors of zero bias
    biased = compare(expected_gradient(problem, lambda b: b.logp.sum(-1) * (b.logp.detach()).sum(-1),
                                       max_groups=1, samples=4000, seed=1), truth)
    assert not biased.exact


def test_loss_shape_is_checked_and_zero_truth_refused():
    problem = build_problem(PolicySpec())
    with pytest.raises(ValueError, match="one loss per group"):
        expected_gradient(problem, lambda b: b.logp.sum())
    with pytest.raises(ValueError, match="true KL gradient is zero"):
        compare(torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="distance must be > 0"):
        PolicySpec(distance=0)
    with pytest.raises(ValueError, match="unknown policy kind"):
        PolicySpec(kind="lstm")
