"""What each mode does inside OpenRLHF, on OpenRLHF's own functions and training_step."""

import math

import pytest
import torch

import openrlhf.models.utils as utils
import openrlhf.trainer.ppo_utils.experience_maker as experience_maker
from kl_patches import terms
from kl_patches.audit import AuditBatch
from kl_patches.integrations import openrlhf as adapter
from kl_patches.integrations.openrlhf import audit as oaudit
from kl_patches.integrations.openrlhf.kl import fixed_normalizer, rtg_loss_tokens
from kl_patches.modes import KLModeError
from kl_patches.patching import PatchError
from kl_patches.audit.tolerances import FLOAT32_VALUE, LIBRARY_TRAINER

ORIGINAL_KL = utils.compute_approx_kl


def random_batch(rows=4, horizon=5, seed=0, group_size=2, masked_rows=()):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(rows, horizon, dtype=torch.float64, generator=generator).requires_grad_(True)
    logp = torch.nn.functional.logsigmoid(theta)  # valid log-probs, attached
    ref = torch.nn.functional.logsigmoid(torch.randn(rows, horizon, dtype=torch.float64, generator=generator))
    behaviour = torch.nn.functional.logsigmoid(theta.detach() + 0.3 * torch.randn(rows, horizon, dtype=torch.float64,
                                                                                     generator=generator))
    lengths = torch.randint(1, horizon + 1, (rows,), generator=generator)
    mask = torch.arange(horizon)[None, :] < lengths[:, None]
    for row in masked_rows:
        mask[row] = False
    batch = AuditBatch(tokens=torch.zeros(rows, horizon, dtype=torch.long), mask=mask, logp=logp, ref_logp=ref,
                       behaviour_logp=behaviour, group_ids=torch.arange(rows) // group_size,
                       rows=torch.arange(rows), group_size=group_size, on_policy=False)
    return theta, batch


def test_k1_in_reward_forces_k1_in_the_reward_path(caplog, monkeypatch):
    from kl_patches.integrations.openrlhf import patches

    monkeypatch.setattr(patches, "_warned", set())  # the override is reported once per process
    _, batch = random_batch()
    adapter.enable("k1-in-reward")
    with torch.no_grad():
        forced = experience_maker.compute_approx_kl(batch.behaviour_logp, batch.ref_logp, kl_estimator="k3")
    assert torch.equal(forced, ORIGINAL_KL(batch.behaviour_logp, batch.ref_logp, kl_estimator="k1"))
    assert not torch.equal(forced, ORIGINAL_KL(batch.behaviour_logp, batch.ref_logp, kl_estimator="k3"))
    assert "k3 is overridden to k1" in caplog.text


def test_k1_in_reward_refuses_the_kl_loss():
    theta, batch = random_batch()
    adapter.enable("k1-in-reward")
    args = oaudit.audit_args(["--algo.kl.use_loss", "--algo.advantage.estimator", "group_norm",
                              "--rollout.n_samples_per_prompt", "2"])
    with pytest.raises(KLModeError, match="drop --algo.kl.use_loss"):
        oaudit.openrlhf_loss(args)(batch)


def test_k1_rtg_loss_refuses_the_in_reward_kl():
    _, batch = random_batch()
    adapter.enable("k1-rtg-loss")
    with torch.no_grad(), pytest.raises(KLModeError, match="add --algo.kl.use_loss"):
        experience_maker.compute_approx_kl(batch.behaviour_logp, batch.ref_logp, kl_estimator="k1")


def test_k1_rtg_loss_outside_training_step_raises_rather_than_computing_the_biased_loss():
    _, batch = random_batch()
    adapter.enable("k1-rtg-loss")
    with pytest.raises(PatchError, match="outside openrlhf.trainer.ray.ppo_actor.ActorPPOTrainer.training_step"):
        utils.compute_approx_kl(batch.logp, batch.ref_logp, kl_estimator="k3")


@pytest.mark.parametrize("dp_size,batch_num_tokens", [(1, 7.0), (4, 13.0)])
def test_k1_rtg_loss_in_training_step_undoes_the_token_count_for_a_fixed_C(dp_size, batch_num_tokens):
    """Through OpenRLHF's training_step: value = OpenRLHF's k1 KL (what it logs); gradient = grad of
    kl_rtg_loss(normalizer=C / dp_size) whatever batch_num_tokens is (DeepSpeed's 1/dp averaging then leaves beta/C),
    with per-decision weights from vLLM's rollout log-probs and no cross-row baseline."""
    theta, batch = random_batch(rows=4, horizon=5, seed=3)
    args = oaudit.audit_args(["--algo.kl.use_loss", "--algo.advantage.estimator", "group_norm",
                              "--rollout.n_samples_per_prompt", "2"])
    experience = oaudit.reward_path(batch, args)
    experience.advantages = torch.zeros_like(experience.advantages)  # isolate the KL term
    experience.action_log_probs = batch.logp.detach()  # the actor's recomputation differs from the sampler's
    experience.rollout_log_probs = batch.behaviour_logp

    adapter.enable("k1-rtg-loss")
    trainer = oaudit.minimal_trainer(args, oaudit.keep64(batch.logp), experience.sequences)
    info = {"dp_size": dp_size, "batch_num_tokens": batch_num_tokens, "global_batch_size": 4.0}
    trainer.training_step(experience, 0.5, 0, info)
    loss = oaudit.plain(trainer.strategy.loss)
    (grad,) = torch.autograd.grad(loss, theta, retain_graph=True)

    reference = 0.5 * terms.kl_rtg_loss(batch.logp, batch.ref_logp, batch.mask, beta=1.0,
                                        behaviour_logp=batch.behaviour_logp,
                                        normalizer=fixed_normalizer(args) / dp_size)
    (expected,) = torch.autograd.grad(reference, theta)
    torch.testing.assert_close(grad, expected, **LIBRARY_TRAINER)
    k1 = batch.logp.detach() - batch.ref_logp
    value = (k1 * batch.mask).sum() / batch_num_tokens * dp_size
    torch.testing.assert_close(float(experience.info["kl"]), float(value), **FLOAT32_VALUE)  # float32 value
    assert float(experience.info["kl_patches/mu_source"]) == 1.0


def test_rtg_loss_tokens_masks_exactly_and_stays_finite_with_fully_masked_rows():
    theta, batch = random_batch(rows=4, horizon=5, seed=5, masked_rows=(1,))
    logp = torch.where(batch.mask, batch.logp, torch.full_like(batch.logp, -math.inf))  # -inf at padding
    value = ORIGINAL_KL(logp.detach(), batch.ref_logp, kl_estimator="k1")
    tokens = rtg_loss_tokens(logp, batch.ref_logp, batch.mask, behaviour_log_probs=batch.behaviour_logp,
                             value=value)
    assert torch.isfinite(tokens).all()
    assert torch.equal(tokens[~batch.mask], torch.zeros_like(tokens[~batch.mask]))
    (grad,) = torch.autograd.grad(tokens.sum(), theta)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[~batch.mask], torch.zeros_like(grad[~batch.mask]))
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # the fully masked response contributes nothing


def test_rtg_loss_tokens_rejects_mismatched_shapes():
    _, batch = random_batch()
    with pytest.raises(ValueError, match="shape mismatch"):
        rtg_loss_tokens(batch.logp, batch.ref_logp[:, :-1], batch.mask, behaviour_log_probs=None,
                        value=batch.ref_logp)
