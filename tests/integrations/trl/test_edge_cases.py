"""Edge cases: masked and empty rows, truncated completions, unknown loss types, bad inputs."""

import pytest
import torch

from kl_patches import terms
from kl_patches.audit import PolicySpec
from kl_patches.integrations.trl.audit import build_tiny_trainer, trl_loss
from kl_patches.patching import PatchError
from kl_patches.audit.tolerances import LIBRARY_STEP
from kl_patches.audit import flat_grad

TRUNCATED = (7, 8, 11, 14)  # V=3, H=3: rows 7..14 run to the horizon without EOS


def grads(tiny, rows, **kwargs):
    index = torch.tensor(rows)
    loss = trl_loss(tiny, tiny.problem.tokens[index], tiny.problem.mask[index], **kwargs)
    return loss, flat_grad(loss, list(tiny.trainer.model.parameters()))


def test_rtg_term_masked_positions_get_exactly_zero_gradient_even_at_inf():
    logp = torch.tensor([[-0.5, -1.0, float("-inf")], [-0.2, float("nan"), -3.0], [-1.0, -1.0, -1.0]],
                        dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-0.7, -0.9, -2.0], [-0.1, -0.3, float("-inf")], [-1.2, -0.8, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])  # last row empty
    behaviour = logp.detach().nan_to_num(neginf=-5.0) - 0.1
    for behaviour_logp in (None, behaviour):
        value = terms.kl_rtg_loss(logp, ref, mask, beta=1.0, behaviour_logp=behaviour_logp, reduction="none").sum()
        (grad,) = torch.autograd.grad(value, logp)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()


def test_truncated_completions_without_eos_are_regularised_exactly_like_the_core(reward):
    """Rows cut at max_completion_length carry every token in the mask: the KL term sees them whole."""
    patched = build_tiny_trainer(PolicySpec(), kl_mode="k1-rtg-loss", beta=0.04, reward_funcs=reward)
    plain = build_tiny_trainer(PolicySpec(), beta=0.0, reward_funcs=reward)
    loss, with_kl = grads(patched, TRUNCATED, num_items=12.0)
    _, without = grads(plain, TRUNCATED, num_items=12.0)
    index = torch.tensor(TRUNCATED)
    constant = 2 * 3  # sequences per optimisation step (per_device_train_batch_size=2) x max_completion_length
    tokens, mask = patched.problem.tokens[index], patched.problem.mask[index]
    assert mask.all()
    logp = patched.problem.policy.token_logprobs(tokens, mask)
    ref = patched.problem.reference.token_logprobs(tokens, mask).detach()
    core = terms.kl_rtg_loss(logp, ref, mask, beta=0.04, normalizer=constant)
    expected = without + flat_grad(core, list(patched.problem.parameters()))
    assert torch.isfinite(loss)
    torch.testing.assert_close(with_kl, expected, **LIBRARY_STEP)


@pytest.mark.parametrize("mode", ["k1-in-reward", "k1-rtg-loss"])
def test_masked_out_completions_are_refused_with_the_fix(reward, mode):
    """mask_truncated_completions=True removes truncated rows from TRL's forward: their KL could not be counted."""
    patched = build_tiny_trainer(PolicySpec(), kl_mode=mode, beta=0.04, mask_truncated_completions=True,
                                 reward_funcs=reward)
    with pytest.raises(PatchError, match="mask_truncated_completions=True.*Fix: mask_truncated_completions=False"):
        grads(patched, TRUNCATED, num_items=12.0)


def test_an_unknown_loss_type_is_refused(reward):
    tiny = build_tiny_trainer(PolicySpec(), kl_mode="k1-rtg-loss", beta=0.04, reward_funcs=reward)
    tiny.trainer.loss_type = "brand_new"
    with pytest.raises(PatchError, match="unknown GRPO loss_type 'brand_new'"):
        grads(tiny, (0, 1))


def test_empty_and_malformed_response_batches_are_refused(reward):
    tiny = build_tiny_trainer(PolicySpec(), kl_mode="k1-in-reward", beta=0.04, reward_funcs=reward)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="empty responses"):
        trl_loss(tiny, tokens, torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="boolean"):
        trl_loss(tiny, tokens, torch.ones(2, 3, dtype=torch.long))


def test_eval_mode_uses_the_same_kl(reward):
    """prediction_step / evaluation goes through compute_loss too; no accumulation scaling there."""
    tiny = build_tiny_trainer(PolicySpec(), kl_mode="k1-rtg-loss", beta=0.04, reward_funcs=reward)
    tiny.trainer.model.eval()
    loss, gradient = grads(tiny, (0, 5, 9, 14))
    assert torch.isfinite(loss) and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
