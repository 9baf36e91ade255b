"""The facts of kl-gradients.md, pinned by exact enumeration of every response (and every pair)."""

import pytest
import torch

from kl_patches.audit import PolicySpec, TabularPolicy, build_problem, compare, exact_kl_gradient, expected_gradient
from kl_patches.audit import reference as ref
from kl_patches.audit.engine import EXACT_TOLERANCE
from kl_patches.audit.tolerances import ENUMERATION_REL, ENUMERATION_SELF, REDUCTION, REORDERED, assert_close

SPECS = [
    PolicySpec(),
    PolicySpec(vocab=4, horizon=3, seed=1, distance=1.0, staleness=0.5),
    PolicySpec(vocab=3, horizon=4, seed=2, distance=0.3),
    PolicySpec(kind="transformer", seed=3, distance=1.0, staleness=0.5),
]
IDS = [f"{s.kind}-V{s.vocab}-T{s.horizon}-s{s.seed}" for s in SPECS]
CELLS = {cell.configuration: cell for cell in ref.CELLS}


def audit(cell_name, spec, off_policy=False):
    cell = CELLS[cell_name]
    problem = build_problem(spec, off_policy=off_policy)
    return compare(expected_gradient(problem, cell.loss, cell.group_size), exact_kl_gradient(problem))


def expected(problem, loss, group_size=1):
    return expected_gradient(problem, loss, group_size).gradient


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_k1_in_loss_has_zero_expected_gradient(spec):
    problem = build_problem(spec)
    assert float(expected(problem, CELLS["k1 in loss"].loss).norm()) < ENUMERATION_SELF
    assert audit("k1 in loss", spec).rel_err == pytest.approx(1.0, abs=ENUMERATION_REL)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.kind == "tabular"], ids=IDS[:3])
def test_k3_in_loss_is_the_per_position_forward_kl_gradient(spec):
    """E[grad sum_t k3] = grad_theta sum_s P_pi(s) KL(pi_ref(.|s) || pi_theta(.|s)) with the state
    distribution held fixed; computed here directly from the tabular policy's prefixes."""
    problem = build_problem(spec)
    policy: TabularPolicy = problem.policy
    tokens, mask = problem.tokens, problem.mask
    codes = policy.prefix_codes(tokens)
    with torch.no_grad():
        step_logp = policy.token_logprobs(tokens, mask)
        prefix_prob = torch.exp(torch.cumsum(step_logp, dim=1) - step_logp)  # P(s_t) for each visited prefix
    states = {}
    for i in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            if mask[i, t]:
                states[int(codes[i, t])] = float(prefix_prob[i, t])
    log_pi = torch.log_softmax(policy.logits, -1)
    with torch.no_grad():
        log_ref = torch.log_softmax(problem.reference.logits, -1)
    forward_kl = sum(weight * (log_ref[c].exp() * (log_ref[c] - log_pi[c])).sum() for c, weight in states.items())
    truth = torch.autograd.grad(forward_kl, policy.logits)[0].reshape(-1)
    got = expected(problem, CELLS["k3 in loss (GRPO default)"].loss)
    assert_close(got, truth, **REORDERED)
    assert audit("k3 in loss (GRPO default)", spec).rel_err > 1e-3


OWN_TOKEN = ["k2 in loss", "k3 value, k2 gradient (straight-through)", "k3 x token ratio (bias-corrected k3)",
             "k2 gradient x detached token ratio"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("name", OWN_TOKEN)
def test_k2_and_straight_through_forms_are_the_own_token_term_only(spec, name):
    problem = build_problem(spec)
    own_token = expected(problem, lambda b: ref.group_mean((b.logp * (b.logp.detach() - b.ref_logp)
                                                            * b.mask).sum(-1), b))
    got = expected(problem, CELLS[name].loss)
    assert_close(got, own_token, **REDUCTION)
    # ... which misses the future-token term: biased
    assert compare(got, exact_kl_gradient(problem)).rel_err > 1e-3


EXACT_ON_POLICY = ["k1 in reward (sequence sum)", "k1 in reward (reward-to-go)", "k3 in reward and in loss",
                   "k1-in-reward (kl-patches)", "k1-rtg-loss (kl-patches)", "reward-to-go with token-only ratios"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("name", EXACT_ON_POLICY)
def test_exact_cells_on_policy(spec, name):
    result = audit(name, spec)
    assert result.exact and result.rel_err < EXACT_TOLERANCE
    assert abs(result.cosine - 1) < ENUMERATION_REL and abs(result.norm_ratio - 1) < ENUMERATION_REL


BIASED_ON_POLICY = ["k1 in loss", "k2 in loss", "k3 in loss (GRPO default)", "k2 in reward", "k3 in reward",
                    "k1 in reward, seq-mean-token-mean", "k3 in loss, seq-mean-token-mean",
                    "k1-rtg-loss, seq-mean-token-mean normaliser"]


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("name", BIASED_ON_POLICY)
def test_biased_cells_on_policy(spec, name):
    assert audit(name, spec).rel_err > 1e-3


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_k1_rtg_loss_is_exact_off_policy_and_token_only_ratios_are_not(spec):
    assert audit("k1-rtg-loss (kl-patches)", spec, off_policy=True).exact
    assert audit("reward-to-go with token-only ratios", spec, off_policy=True).rel_err > 1e-3
    assert audit("k1-in-reward (kl-patches)", spec, off_policy=True).rel_err > 1e-3


def test_truncated_weights_are_biased_off_policy():
    spec = PolicySpec(vocab=4, horizon=3, seed=1, distance=1.0, staleness=0.5)
    assert audit("k1-rtg-loss, truncated weights", spec).exact
    assert audit("k1-rtg-loss, truncated weights", spec, off_policy=True).rel_err > 1e-3


def test_seq_mean_token_mean_is_exact_when_all_lengths_are_equal():
    spec = PolicySpec(vocab=4, horizon=1)  # every response has length 1
    assert audit("k1 in reward, seq-mean-token-mean", spec).exact
    assert audit("k1-rtg-loss, seq-mean-token-mean normaliser", spec).exact
    assert audit("k1 in reward, seq-mean-token-mean", PolicySpec(vocab=4, horizon=2)).rel_err > 1e-3


def test_k3_in_reward_nearly_cancels_near_the_reference():
    near = audit("k3 in reward", PolicySpec(distance=0.05))
    assert near.norm_ratio < 0.2  # the regulariser almost vanishes
    assert near.rel_err > 0.8


def test_run_reference_covers_every_cell_both_regimes():
    records = ref.run_reference(PolicySpec())
    assert len(records) == 2 * (len(ref.CELLS) + len(ref.STEP_CELLS))
    by_key = {(r.configuration, r.policy): r for r in records}
    assert by_key[("k1-rtg-loss (kl-patches)", "off")].verdict == "exact"
    assert by_key[("k1-rtg-loss (kl-patches)", "off")].mode == "k1-rtg-loss"
    assert by_key[("k3 in loss (GRPO default)", "on")].verdict == "biased"
    assert by_key[("k3 in loss (GRPO default)", "on")].fix
    assert by_key[("k1-rtg-loss (kl-patches)", "on")].fix is None
    # the step cells: what a training step adds (length-sorted micro-batches), kl-gradients.md section 8
    for cell in ref.STEP_CELLS:
        for regime in ("on", "off"):
            record = by_key[(cell.configuration, regime)]
            assert record.spec["step"] and record.verdict == ("exact" if cell.fix is None else "biased"), record

