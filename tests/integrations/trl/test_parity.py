"""Parity on one batch in float64: the same inputs through unpatched TRL, the subclass and the in-place patch.

* ``kl_mode="library"`` and a disabled patch: gradients identical to unpatched TRL (bit for bit).
* ``beta=0``: every mode, both ways in, identical to unpatched TRL (nothing to patch).
* Each patched mode = unpatched TRL at beta=0 (the policy-gradient part, untouched) + the core's KL term
  computed on the same tensors, on- and off-policy (k1-in-reward on-policy: its KL rides TRL's clipped ratio).
"""

import pytest
import torch

import kl_patches.integrations.trl as adapter
from kl_patches import estimators, terms
from kl_patches.audit import PolicySpec
from kl_patches.statistics import group_statistics
from kl_patches.integrations.trl.audit import build_tiny_trainer, trl_loss
from kl_patches.audit.tolerances import LIBRARY_GRADIENT, LIBRARY_STEP
from kl_patches.audit import flat_grad

BETA = 0.04
ROWS = (3, 7, 0, 14, 9, 9, 1, 12)  # 4 groups of 2: short, long, EOS-terminated and truncated responses
MODES = ("k1-in-reward", "k1-rtg-loss")


def batch(tiny):
    index = torch.tensor(ROWS)
    return tiny.problem.tokens[index], tiny.problem.mask[index]


def gradient(tiny, num_items=None):
    tokens, mask = batch(tiny)
    loss = trl_loss(tiny, tokens, mask, group_size=2, num_items=num_items)
    return flat_grad(loss, [p for p in tiny.trainer.model.parameters() if p.requires_grad])


def build(reward, *, kl_mode=None, off_policy=False, **settings):
    settings = {"beta": BETA, **settings}
    if off_policy:
        settings["num_iterations"] = 2
    return build_tiny_trainer(PolicySpec(), kl_mode=kl_mode, off_policy=off_policy, reward_funcs=reward, **settings)


@pytest.mark.parametrize("off_policy", [False, True])
def test_library_mode_and_a_disabled_patch_equal_unpatched_trl(reward, off_policy):
    unpatched = gradient(build(reward, off_policy=off_policy))
    assert unpatched.abs().sum() > 0
    assert torch.equal(gradient(build(reward, kl_mode="library", off_policy=off_policy)), unpatched)
    adapter.enable("k1-rtg-loss")
    adapter.disable()
    assert torch.equal(gradient(build(reward, off_policy=off_policy)), unpatched)
    adapter.enable("library")  # the patch in library mode passes straight through too
    assert torch.equal(gradient(build(reward, off_policy=off_policy)), unpatched)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("way", ["subclass", "patch"])
def test_beta_zero_every_mode_equals_unpatched_trl(reward, mode, way):
    unpatched = gradient(build(reward, beta=0.0))
    assert unpatched.abs().sum() > 0  # the task reward moves the policy
    with pytest.warns(UserWarning, match="nothing to patch"):
        if way == "subclass":
            patched = gradient(build(reward, kl_mode=mode, beta=0.0))
        else:
            adapter.enable(mode)
            patched = gradient(build(reward, beta=0.0))
    assert torch.equal(patched, unpatched)


#: kl-patches' constant C: sequences per optimisation step from the config (per_device_train_batch_size=2 x
#: gradient_accumulation_steps=1 x 1 process) x max_completion_length (3), whatever the batch holds.
FIXED_C = 2 * 1 * 3


def core_kl_gradient(tiny, mode, off_policy):
    """The core's KL term on the batch's tensors, differentiated: beta/C * grad of the mode's surrogate."""
    tokens, mask = batch(tiny)
    problem = tiny.problem
    logp = problem.policy.token_logprobs(tokens, mask)
    with torch.no_grad():
        ref = problem.reference.token_logprobs(tokens, mask)
        behaviour = problem.behaviour.token_logprobs(tokens, mask) if off_policy else logp.detach()
    group_ids = torch.arange(len(ROWS)) // 2
    if mode == "k1-in-reward":  # on-policy: TRL's ratio exp(logp - logp.detach()) has gradient logp's
        stats = group_statistics(behaviour, ref, mask, group_ids)
        advantage = terms.kl_advantage(behaviour, ref, mask, beta=BETA, baseline=stats.reward_baseline)
        surrogate = -(advantage[:, None] * estimators.masked(logp, mask)).sum() / FIXED_C
    else:  # baseline "none"; off-policy: the core's prefix weights against mu = TRL's old log-probs
        surrogate = terms.kl_rtg_loss(logp, ref, mask, beta=BETA, behaviour_logp=behaviour if off_policy else None,
                                      normalizer=FIXED_C)
    return flat_grad(surrogate, list(problem.parameters()))


@pytest.mark.parametrize("mode, off_policy", [("k1-in-reward", False), ("k1-rtg-loss", False),
                                              ("k1-rtg-loss", True)])
@pytest.mark.parametrize("way", ["subclass", "patch"])
def test_patched_mode_is_trl_policy_gradient_plus_the_core_kl_term(reward, mode, off_policy, way):
    num_items = 17.0  # TRL's dapo normaliser for the task part, fixed for both runs
    policy_gradient = gradient(build(reward, beta=0.0, off_policy=off_policy), num_items)
    library = gradient(build(reward, off_policy=off_policy), num_items)  # TRL's own k3 term
    if way == "subclass":
        tiny = build(reward, kl_mode=mode, off_policy=off_policy)
    else:
        adapter.enable(mode)
        tiny = build(reward, off_policy=off_policy)
    patched = gradient(tiny, num_items)
    expected = policy_gradient + core_kl_gradient(tiny, mode, off_policy)
    torch.testing.assert_close(patched, expected, **LIBRARY_STEP)
    assert (patched - library).norm() > 1e-3 * library.norm()  # and it is not TRL's own KL


@pytest.mark.parametrize("loss_type, mode", [(loss, mode) for loss in ("grpo", "bnpo", "dr_grpo", "luspo", "cispo",
                                                                       "sapo", "vespo", "dapo") for mode in MODES
                                             if not (mode == "k1-in-reward" and loss in ("cispo", "vespo"))])
def test_policy_gradient_part_unchanged_for_every_loss_type(reward, loss_type, mode):
    """The patched loss minus TRL's loss at beta=0 depends only on the KL tensors: it equals the KL term computed
    with zero task reward on the same batch (the task part passes through TRL untouched)."""
    def zero(completions, **kwargs):
        return [0.0] * len(completions)

    task_only = gradient(build(reward, beta=0.0, loss_type=loss_type))
    patched = gradient(build(reward, kl_mode=mode, loss_type=loss_type))
    kl_only = gradient(build(zero, kl_mode=mode, loss_type=loss_type))
    torch.testing.assert_close(patched, task_only + kl_only, **LIBRARY_GRADIENT)


def test_the_patch_and_the_subclass_agree_in_every_mode(reward):
    for mode in MODES:
        off_policy = mode == "k1-rtg-loss"  # k1-in-reward is refused off-policy (test_guards)
        subclass = gradient(build(reward, kl_mode=mode, off_policy=off_policy), 17.0)
        adapter.enable(mode)
        patched = gradient(build(reward, off_policy=off_policy), 17.0)
        adapter.disable()
        assert torch.equal(subclass, patched)
