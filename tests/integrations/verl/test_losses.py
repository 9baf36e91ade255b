"""Loss side: verl's ``ppo_loss`` with the plugin installed. verl's values are bit-identical to verl's own
function (in this process and against a process without the plugin); ``k1-rtg-loss`` equals the core's
``kl_rtg_loss`` on the same tensors, with the normaliser of each ``loss_agg_mode``; padding never leaks in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kl_patches import terms

VERL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "kl+", "abs+", "mse+", "k2+", "low_var_kl+", "k3+")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def loss_and_grad(batch, settings, function=None, **global_info):
    """verl's actor loss on ``batch`` (advantages from the task scores when given) and d loss / d logp."""
    from kl_patches.integrations.verl.audit import actor_config, micro_batch

    import verl.workers.utils.losses as losses

    logp = batch.logp.detach().clone().requires_grad_(True)
    batch = type(batch)(**{**vars(batch), "logp": logp})
    advantages = global_info.pop("advantages", None)
    with_uid = global_info.pop("with_uid", True)
    model_output, data = micro_batch(batch, advantages=advantages, with_uid=with_uid, **global_info)
    loss, metrics = (function or losses.ppo_loss)(actor_config(settings), model_output, data)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def settings_for(**changes):
    from kl_patches.integrations.verl.audit import KLSettings

    return KLSettings(**changes)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("kl_loss_type", VERL_TYPES)
def test_verl_values_are_bit_identical_to_verls_function(make_batch, kl_loss_type, mode):
    import verl.workers.utils.losses as losses

    batch = make_batch()
    advantages = torch.randn(batch.mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    settings = settings_for(use_kl_loss=True, kl_loss_type=kl_loss_type, kl_loss_coef=0.3, loss_agg_mode=mode)
    info = dict(advantages=advantages * batch.mask, batch_num_tokens=17, global_batch_size=6)
    ours = loss_and_grad(batch, settings, **info)
    theirs = loss_and_grad(batch, settings, losses.ppo_loss.__wrapped__, **info)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert ours[2]["kl_loss"].values == theirs[2]["kl_loss"].values


def test_coefficient_zero_or_kl_loss_off_changes_nothing(make_batch):
    import verl.workers.utils.losses as losses

    batch = make_batch()
    advantages = torch.randn(batch.mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    info = dict(advantages=advantages * batch.mask, batch_num_tokens=17, global_batch_size=6)
    no_kl = loss_and_grad(batch, settings_for(use_kl_loss=False), losses.ppo_loss.__wrapped__, **info)
    for settings in (settings_for(use_kl_loss=True, kl_loss_type="k1-rtg-loss", kl_loss_coef=0.0),
                     settings_for(use_kl_loss=False, kl_loss_type="low_var_kl"),
                     settings_for(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.0)):
        loss, grad, _ = loss_and_grad(batch, settings, **info)
        assert torch.equal(loss, no_kl[0]) and torch.equal(grad, no_kl[1]), settings


def expected_normalizer(mode, batch, batch_num_tokens, global_batch_size, loss_scale_factor=None):
    if mode in ("token-mean", "seq-mean-token-mean"):
        return batch_num_tokens
    if mode == "token-sum":
        return 1.0
    if mode == "seq-mean-token-sum":
        return global_batch_size
    return global_batch_size * (loss_scale_factor or batch.mask.shape[1])


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("with_uid", [True, False])
def test_k1_rtg_loss_equals_the_core_term_on_the_same_tensors(make_batch, mode, with_uid):
    """pg part from verl (advantages nonzero) + beta * kl_rtg_loss(old log-probs as behaviour, uid groups)."""
    import verl.workers.utils.losses as losses

    batch = make_batch()
    advantages = torch.randn(batch.mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    info = dict(advantages=advantages * batch.mask, batch_num_tokens=17, global_batch_size=6, with_uid=with_uid)
    loss, grad, metrics = loss_and_grad(batch, settings_for(use_kl_loss=True, kl_loss_type="k1-rtg-loss",
                                                            kl_loss_coef=0.3, loss_agg_mode=mode), **info)
    pg_loss, pg_grad, _ = loss_and_grad(batch, settings_for(use_kl_loss=False, loss_agg_mode=mode),
                                        losses.ppo_loss.__wrapped__, **info)
    logp = batch.logp.detach().clone().requires_grad_(True)
    core = 0.3 * terms.kl_rtg_loss(
        logp, batch.ref_logp, batch.mask, beta=1.0, behaviour_logp=batch.behaviour_logp,
        group_ids=batch.group_ids if with_uid else None, baseline="leave-one-out" if with_uid else "none",
        normalizer=expected_normalizer(mode, batch, 17, 6))
    (core_grad,) = torch.autograd.grad(core, logp)
    torch.testing.assert_close(loss, pg_loss + core.detach(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, pg_grad + core_grad, rtol=1e-13, atol=1e-15)
    assert core.item() != 0.0
    # the metric keeps verl's meaning: an estimate of the KL value (k1), aggregated as verl would
    k1 = terms.masked_log_ratio(batch.logp.detach(), batch.ref_logp, batch.mask)
    from verl.trainer.ppo.core_algos import agg_loss

    value = agg_loss(k1, batch.mask, mode, dp_size=1, batch_num_tokens=17, global_batch_size=6)
    assert metrics["kl_loss"].values == [value] or torch.equal(metrics["kl_loss"].values[0], value)


def test_k1_rtg_loss_on_the_first_mini_batch_is_the_on_policy_surrogate(make_batch):
    """old_log_probs == current log-probs: every per-decision weight is 1, the on-policy formula."""
    batch = make_batch()
    batch = type(batch)(**{**vars(batch), "behaviour_logp": torch.where(batch.mask, batch.logp.detach(), batch.behaviour_logp)})
    loss, grad, _ = loss_and_grad(batch, settings_for(use_kl_loss=True, kl_loss_type="k1-rtg-loss", kl_loss_coef=1.0,
                                                      loss_agg_mode="token-sum"), batch_num_tokens=17, global_batch_size=6)
    logp = batch.logp.detach().clone().requires_grad_(True)
    on_policy = terms.kl_rtg_loss(logp, batch.ref_logp, batch.mask, beta=1.0, group_ids=batch.group_ids, normalizer=1.0)
    (on_grad,) = torch.autograd.grad(on_policy, logp)
    torch.testing.assert_close(grad, on_grad, rtol=1e-13, atol=1e-15)


def test_padding_never_leaks_and_masked_positions_get_zero_gradient(make_batch):
    """Junk at padded positions of old / ref log-probs (as a padded tensor may hold) changes nothing."""
    batch = make_batch()
    clean = type(batch)(**{**vars(batch), "ref_logp": batch.ref_logp * batch.mask,
                           "behaviour_logp": batch.behaviour_logp * batch.mask})
    settings = settings_for(use_kl_loss=True, kl_loss_type="k1-rtg-loss", kl_loss_coef=1.0)
    dirty_loss, dirty_grad, _ = loss_and_grad(batch, settings, batch_num_tokens=17, global_batch_size=6)
    clean_loss, clean_grad, _ = loss_and_grad(clean, settings, batch_num_tokens=17, global_batch_size=6)
    assert torch.equal(dirty_loss, clean_loss) and torch.equal(dirty_grad, clean_grad)
    assert torch.all(dirty_grad[~batch.mask] == 0) and torch.isfinite(dirty_grad).all()
    # the core term itself, fed NaN / inf at masked positions
    from kl_patches.integrations.verl.patches import k1_rtg_kl_loss

    logp = torch.where(batch.mask, batch.logp.detach(), torch.full_like(batch.logp, float("nan"))).requires_grad_(True)
    loss = k1_rtg_kl_loss(logp, torch.where(batch.mask, batch.ref_logp, torch.tensor(float("inf"), dtype=torch.float64)),
                          torch.where(batch.mask, batch.behaviour_logp, torch.tensor(float("-inf"), dtype=torch.float64)),
                          batch.mask.long(), batch_num_tokens=17, group_ids=batch.group_ids)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.all(grad[~batch.mask] == 0) and torch.isfinite(grad).all()


def test_all_padding_responses(make_batch):
    """A response with no tokens contributes nothing; a micro-batch of only such responses gives a zero loss
    (not 0/0) and zero gradient."""
    settings = settings_for(use_kl_loss=True, kl_loss_type="k1-rtg-loss", kl_loss_coef=1.0)
    batch = make_batch(lengths=(3, 0, 2, 0, 4, 1))
    loss, grad, _ = loss_and_grad(batch, settings, batch_num_tokens=10, global_batch_size=6)
    assert torch.isfinite(loss) and torch.all(grad[1] == 0) and torch.all(grad[3] == 0)
    from kl_patches.integrations.verl.patches import k1_rtg_kl_loss

    empty = make_batch(lengths=(0, 0, 0), group_size=3)
    for mode in AGG_MODES:
        logp = empty.logp.detach().clone().requires_grad_(True)
        value = k1_rtg_kl_loss(logp, empty.ref_logp, empty.behaviour_logp, empty.mask, loss_agg_mode=mode,
                               group_ids=empty.group_ids)
        (grad,) = torch.autograd.grad(value, logp)
        assert value.item() == 0.0 and torch.all(grad == 0), mode


def test_dynamic_batch_size_micro_batches_use_no_baseline(make_batch):
    """Micro-batches formed from sequence lengths: a baseline from the same micro-batch would depend on the
    sample's own length, so none is used (still exact)."""
    from kl_patches.integrations.verl.audit import micro_batch
    from kl_patches.integrations.verl.patches import micro_batch_group_ids
    from verl.utils import tensordict_utils as tu

    batch = make_batch()
    _, data = micro_batch(batch)
    assert torch.equal(micro_batch_group_ids(data), batch.group_ids)
    tu.assign_non_tensor(data, use_dynamic_bsz=True)
    assert micro_batch_group_ids(data) is None
    _, data = micro_batch(batch, with_uid=False)
    assert micro_batch_group_ids(data) is None


def test_global_batch_information_is_required_with_several_ranks(make_batch):
    from kl_patches.integrations.verl.patches import batch_constant_normalizer

    batch = make_batch()
    with pytest.raises(ValueError, match="batch_num_tokens is required when dp_size > 1"):
        batch_constant_normalizer("token-mean", batch.mask, dp_size=2)
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        batch_constant_normalizer("seq-sum", batch.mask)
    assert batch_constant_normalizer("token-mean", batch.mask, dp_size=4, batch_num_tokens=40) == 10.0
    assert batch_constant_normalizer("seq-mean-token-sum-norm", batch.mask, global_batch_size=8,
                                     loss_scale_factor=3) == 24.0


PARITY_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import random_batch
from kl_patches.integrations.verl.audit import KLSettings, verl_actor_loss
out = {}
values = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
for kl_loss_type in ("low_var_kl", "k3+", "kl", "mse", "abs+"):
    for mode in ("token-mean", "seq-mean-token-mean"):
        settings = KLSettings(use_kl_loss=True, kl_loss_type=kl_loss_type, kl_loss_coef=0.2, loss_agg_mode=mode)
        batch = random_batch()
        loss, _ = verl_actor_loss(batch, settings, batch_num_tokens=17, global_batch_size=6)
        (grad,) = torch.autograd.grad(loss, batch.logp)
        out[f"loss {kl_loss_type} {mode}"] = [loss.item(), grad.flatten().tolist()]
for kl_penalty in ("kl", "low_var_kl", "k3+"):
    for estimator in ("grpo", "rloo", "gae", "reinforce_plus_plus"):
        settings = KLSettings(use_kl_in_reward=True, kl_penalty=kl_penalty, kl_coef=0.1, adv_estimator=estimator)
        batch = random_batch()
        loss, _ = verl_actor_loss(batch, settings, scores=torch.arange(6, dtype=torch.float64), values=values * batch.mask,
                                  batch_num_tokens=17, global_batch_size=6)
        (grad,) = torch.autograd.grad(loss, batch.logp)
        out[f"reward {kl_penalty} {estimator}"] = [loss.item(), grad.flatten().tolist()]
import kl_patches.integrations.verl as adapter
out["enabled"] = adapter.enabled_mode()
print("PARITY" + json.dumps(out))
"""


def test_plugin_installed_or_not_gives_bit_identical_results_for_verl_values():
    """The same script in two fresh processes: verl's plugin discovery on (kl-patches patches installed) and
    off (``VERL_USE_EXTERNAL_PLUGINS=none``: verl's functions untouched). Floats compared exactly."""
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    for policy in ("auto", "none"):
        env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": policy}
        result = subprocess.run([sys.executable, "-c", PARITY_SCRIPT, here], capture_output=True, text=True, env=env,
                                cwd=here, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        line = [line for line in result.stdout.splitlines() if line.startswith("PARITY")][-1]
        runs[policy] = json.loads(line[len("PARITY"):])
    assert runs["auto"].pop("enabled") == "library" and runs["none"].pop("enabled") is None
    assert len(runs["auto"]) == 22
    assert runs["auto"] == runs["none"]


def test_benchmark_helper_computes_verls_loss_from_overrides(make_batch):
    """``make_verl_loss`` (for training-loop benchmarks): hydra-style strings or a mapping, same loss as the
    explicit path; unknown keys refused."""
    from kl_patches.integrations.verl.audit import KLSettings, make_verl_loss, verl_actor_loss

    batch = make_batch()
    scores = lambda b: torch.arange(b.mask.shape[0], dtype=torch.float64)  # noqa: E731
    from_strings = make_verl_loss(["algorithm.use_kl_in_reward=true", "algorithm.kl_penalty=k1-in-reward",
                                   "algorithm.adv_estimator=grpo", "algorithm.kl_ctrl.kl_coef=0.1"],
                                  batch_num_tokens=17, global_batch_size=6, scores=scores)
    from_mapping = make_verl_loss({"algorithm.use_kl_in_reward": True, "algorithm.kl_penalty": "k1-in-reward",
                                   "algorithm.adv_estimator": "grpo", "algorithm.kl_ctrl.kl_coef": 0.1},
                                  batch_num_tokens=17, global_batch_size=6, scores=scores)
    settings = KLSettings(use_kl_in_reward=True, kl_penalty="k1-in-reward", adv_estimator="grpo", kl_coef=0.1)
    explicit, _ = verl_actor_loss(batch, settings, scores=scores(batch), batch_num_tokens=17, global_batch_size=6)
    assert torch.equal(from_strings(batch), explicit) and torch.equal(from_mapping(batch), explicit)
    (grad,) = torch.autograd.grad(from_strings(batch), batch.logp)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unsupported key 'actor_rollout_ref.actor.bogus'"):
        make_verl_loss(["actor_rollout_ref.actor.bogus=1"])
