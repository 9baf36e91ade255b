"""Parity: unpatched OpenRLHF is bit-identical with kl-patches installed; init_coef = 0 changes nothing; the patched
modes give the core reference's expected gradients."""

import pytest
import torch

from kl_patches.audit import expected_gradient, reference
from kl_patches.integrations import openrlhf as adapter
from kl_patches.integrations.openrlhf import audit as oaudit
from kl_patches.audit.tolerances import LIBRARY_PARITY
from kl_patches.audit import flat_grad

CONFIGS = {
    "k1 reward, gae": ["--algo.advantage.estimator", "gae"],
    "k3 reward, rloo": ["--algo.advantage.estimator", "rloo", "--algo.kl.estimator", "k3"],
    "k3 loss, group_norm": ["--algo.advantage.estimator", "group_norm", "--algo.kl.use_loss", "--algo.kl.estimator",
                            "k3"],
    "k2-grad loss": ["--algo.advantage.estimator", "group_norm", "--algo.kl.use_loss", "--algo.kl.unbiased_gradient"],
}
SAMPLES = ["--rollout.n_samples_per_prompt", "2"]


def loss_and_gradient(problem, argv, kl_coef=1.0):
    if "--algo.kl.unbiased_gradient" in argv and not oaudit.available(oaudit.Cell("", tuple(argv), "", "", "", "")):
        pytest.skip("this OpenRLHF release has no --algo.kl.unbiased_gradient")
    args = oaudit.audit_args([*argv, *SAMPLES])
    grads, losses = [], []
    logp = problem.policy.token_logprobs(problem.tokens, problem.mask)
    with torch.no_grad():
        ref = problem.reference.token_logprobs(problem.tokens, problem.mask)
        sampler = problem.behaviour if problem.behaviour is not None else problem.policy
        behaviour = sampler.token_logprobs(problem.tokens, problem.mask)
    from kl_patches.audit import AuditBatch

    rows = torch.tensor([0, 5, 3, 14, 7, 7])  # three groups of two enumerated responses, one duplicated
    batch = AuditBatch(problem.tokens[rows], problem.mask[rows], logp[rows], ref[rows], behaviour[rows],
                       torch.arange(3).repeat_interleave(2), rows, 2, problem.on_policy)
    for g in range(batch.num_groups):
        loss = oaudit.openrlhf_loss(args, kl_coef=kl_coef)(batch.group(g))
        losses.append(loss.detach())
        grads.append(flat_grad(loss, problem.parameters(), retain_graph=True))
    return torch.stack(losses), torch.stack(grads)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unpatched_openrlhf_is_bit_identical_with_kl_patches_installed(name, off_problem):
    baseline = loss_and_gradient(off_problem, CONFIGS[name])
    adapter.enable("library")  # the library mode patches nothing
    library_mode = loss_and_gradient(off_problem, CONFIGS[name])
    adapter.enable("k1-rtg-loss")
    adapter.disable()  # and disabling leaves nothing behind
    after = loss_and_gradient(off_problem, CONFIGS[name])
    for other in (library_mode, after):
        assert torch.equal(baseline[0], other[0]) and torch.equal(baseline[1], other[1])


@pytest.mark.parametrize("mode", ["k1-in-reward", "k1-rtg-loss"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_init_coef_zero_changes_nothing(mode, name, off_problem):
    argv = [*CONFIGS[name], "--algo.kl.init_coef", "0"]
    baseline = loss_and_gradient(off_problem, argv, kl_coef=0.0)
    adapter.enable(mode)
    patched = loss_and_gradient(off_problem, argv, kl_coef=0.0)
    assert torch.equal(baseline[0], patched[0]) and torch.equal(baseline[1], patched[1])


def test_a_patched_mode_changes_the_gradient_it_should(off_problem):
    """The parity above could not fail if the patch did nothing at all: here it must change the gradient."""
    argv = CONFIGS["k3 loss, group_norm"]
    baseline = loss_and_gradient(off_problem, argv)
    adapter.enable("k1-rtg-loss")
    patched = loss_and_gradient(off_problem, argv)
    assert not torch.allclose(baseline[1], patched[1])


def _expected(problem, loss):
    return expected_gradient(problem, loss, group_size=2).gradient


@pytest.mark.parametrize("regime", ["on", "off"])
def test_k1_rtg_loss_matches_the_core_reference(regime, on_problem, off_problem):
    problem = on_problem if regime == "on" else off_problem
    args = oaudit.audit_args([*CONFIGS["k3 loss, group_norm"], *SAMPLES])
    adapter.enable("k1-rtg-loss")
    ours = _expected(problem, oaudit.per_group_loss(oaudit.openrlhf_loss(args)))
    core = _expected(problem, reference.mode_k1_rtg_loss())
    torch.testing.assert_close(ours, core, **LIBRARY_PARITY)


def test_k1_in_reward_matches_the_core_reference_on_policy(on_problem):
    args = oaudit.audit_args(["--algo.advantage.estimator", "rloo", "--algo.kl.estimator", "k3", *SAMPLES])
    adapter.enable("k1-in-reward")
    ours = _expected(on_problem, oaudit.per_group_loss(oaudit.openrlhf_loss(args)))
    core = _expected(on_problem, reference.in_reward("k1", reward_to_go=True))
    torch.testing.assert_close(ours, core, **LIBRARY_PARITY)


def test_unpatched_in_loss_k3_matches_the_core_reference_cell(on_problem):
    """OpenRLHF's own k3-in-loss is the core's "k3 in loss" cell: the audit measures the library, not a copy."""
    args = oaudit.audit_args([*CONFIGS["k3 loss, group_norm"], *SAMPLES])
    ours = _expected(on_problem, oaudit.per_group_loss(oaudit.openrlhf_loss(args)))
    core = _expected(on_problem, reference.in_loss("k3"))
    torch.testing.assert_close(ours, core, **LIBRARY_PARITY)
