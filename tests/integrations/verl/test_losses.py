"""Loss side: verl's ``ppo_loss`` with the plugin installed. verl's values are bit-identical to verl's own
function (in this process and against a process without the plugin); ``k1-rtg-loss`` equals the core's
``kl_rtg_loss`` on the same tensors with mu = the engine's log-probs when present and a normaliser fixed from the
configuration for each ``loss_agg_mode``; no statistic from other rows; padding never leaks in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kl_patches import terms
from kl_patches.audit.tolerances import LIBRARY_PATH, SPLIT_INVARIANCE

VERL_TYPES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "kl+", "abs+", "mse+", "k2+", "low_var_kl+", "k3+")
#: the installed verl's loss_agg_mode values (verl 0.8 has no token-sum)
AGG_MODES = __import__("kl_patches.integrations.verl.compat", fromlist=["x"]).loss_agg_modes()


def loss_and_grad(batch, settings, function=None, **global_info):
    """verl's actor loss on ``batch`` (advantages from the task scores when given) and d loss / d logp."""
    from kl_patches.integrations.verl.audit import actor_config, micro_batch

    import verl.workers.utils.losses as losses

    logp = batch.logp.detach().clone().requires_grad_(True)
    batch = type(batch)(**{**vars(batch), "logp": logp})
    advantages = global_info.pop("advantages", None)
    with_uid = global_info.pop("with_uid", True)
    rollout_logp = global_info.pop("rollout_logp", None)
    model_output, data = micro_batch(batch, advantages=advantages, with_uid=with_uid, rollout_logp=rollout_logp,
                                     **global_info)
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
    for settings in (settings_for(use_kl_loss=True, kl_loss_type="k1-rtg-loss", kl_loss_coef=0.0,
                                  max_response_length=5),
                     settings_for(use_kl_loss=False, kl_loss_type="low_var_kl"),
                     settings_for(use_kl_loss=True, kl_loss_type="low_var_kl", kl_loss_coef=0.0)):
        loss, grad, _ = loss_and_grad(batch, settings, **info)
        assert torch.equal(loss, no_kl[0]) and torch.equal(grad, no_kl[1]), settings


HORIZON = 5  # random_batch's padded width, used as data.max_response_length
N_SEQ = 6  # global_batch_size: the mini-batch size from the configuration


def rtg_settings(**changes):
    return settings_for(use_kl_loss=True, kl_loss_type="k1-rtg-loss", max_response_length=HORIZON, **changes)


def fixed_c(mode, loss_scale_factor=None):
    from kl_patches.integrations.verl.kl import fixed_normalizer

    return fixed_normalizer(mode, N_SEQ, HORIZON, loss_scale_factor)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("with_uid", [True, False])
def test_k1_rtg_loss_equals_the_core_term_on_the_same_tensors(make_batch, mode, with_uid):
    """pg part from verl (advantages nonzero) + beta * kl_rtg_loss(old log-probs as mu, no baseline: nothing from
    other rows, uid or not) / C, C fixed from the configuration (N_SEQ x max_response_length per mode)."""
    import verl.workers.utils.losses as losses

    batch = make_batch()
    advantages = torch.randn(batch.mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    info = dict(advantages=advantages * batch.mask, batch_num_tokens=17, global_batch_size=N_SEQ, with_uid=with_uid)
    loss, grad, metrics = loss_and_grad(batch, rtg_settings(kl_loss_coef=0.3, loss_agg_mode=mode), **info)
    pg_loss, pg_grad, _ = loss_and_grad(batch, settings_for(use_kl_loss=False, loss_agg_mode=mode),
                                        losses.ppo_loss.__wrapped__, **info)
    logp = batch.logp.detach().clone().requires_grad_(True)
    core = 0.3 * terms.kl_rtg_loss(logp, batch.ref_logp, batch.mask, beta=1.0, behaviour_logp=batch.behaviour_logp,
                                   baseline="none", normalizer=fixed_c(mode))
    (core_grad,) = torch.autograd.grad(core, logp)
    torch.testing.assert_close(loss, pg_loss + core.detach(), **LIBRARY_PATH)
    torch.testing.assert_close(grad, pg_grad + core_grad, **LIBRARY_PATH)
    assert core.item() != 0.0
    # the metric keeps verl's meaning: an estimate of the KL value (k1), aggregated as verl would
    k1 = terms.masked_log_ratio(batch.logp.detach(), batch.ref_logp, batch.mask)
    from verl.trainer.ppo.core_algos import agg_loss

    value = agg_loss(k1, batch.mask, mode, dp_size=1, batch_num_tokens=17, global_batch_size=N_SEQ)
    assert metrics["kl_loss"].values == [value] or torch.equal(metrics["kl_loss"].values[0], value)
    assert metrics["kl_patches/mu_source"].values == [0.0]  # no rollout log-probs: the trainer's old_log_probs
    for name in ("sequence_kl", "ess", "truncated_fraction", "capped_fraction"):
        assert f"kl_patches/{name}" in metrics


def test_engine_log_probs_are_mu_when_present(make_batch):
    """rollout_log_probs (the inference engine's) in the micro-batch: they are mu, not verl's old_log_probs; the
    mu_source metric says so; the normaliser does not depend on the realised token count."""
    batch = make_batch()
    engine = batch.behaviour_logp + 0.2 * torch.randn(batch.mask.shape, dtype=torch.float64,
                                                      generator=torch.Generator().manual_seed(5))
    loss, grad, metrics = loss_and_grad(batch, rtg_settings(kl_loss_coef=1.0), rollout_logp=engine,
                                        batch_num_tokens=17, global_batch_size=N_SEQ)
    other, _, _ = loss_and_grad(batch, rtg_settings(kl_loss_coef=1.0), rollout_logp=engine,
                                batch_num_tokens=999, global_batch_size=N_SEQ)
    logp = batch.logp.detach().clone().requires_grad_(True)
    core = terms.kl_rtg_loss(logp, batch.ref_logp, batch.mask, beta=1.0, behaviour_logp=engine,
                             normalizer=fixed_c("token-mean"))
    (core_grad,) = torch.autograd.grad(core, logp)
    torch.testing.assert_close(grad, core_grad, **LIBRARY_PATH)
    assert torch.equal(loss, other)
    assert metrics["kl_patches/mu_source"].values == [1.0]
    assert metrics["kl_patches/ess"].values[0] < 1.0


def test_truncation_reaches_the_loss_and_its_metric(make_batch):
    batch = make_batch(staleness=1.0)
    loss, grad, metrics = loss_and_grad(batch, rtg_settings(kl_loss_coef=1.0, truncation=1.5),
                                        batch_num_tokens=17, global_batch_size=N_SEQ)
    logp = batch.logp.detach().clone().requires_grad_(True)
    core = terms.kl_rtg_loss(logp, batch.ref_logp, batch.mask, beta=1.0, behaviour_logp=batch.behaviour_logp,
                             truncation=1.5, normalizer=fixed_c("token-mean"))
    (core_grad,) = torch.autograd.grad(core, logp)
    torch.testing.assert_close(grad, core_grad, **LIBRARY_PATH)
    assert metrics["kl_patches/truncated_fraction"].values[0] > 0.0


def test_k1_rtg_loss_on_the_first_mini_batch_is_the_on_policy_surrogate(make_batch):
    """old_log_probs == current log-probs: every per-decision weight is 1, the on-policy formula."""
    batch = make_batch()
    batch = type(batch)(**{**vars(batch), "behaviour_logp": torch.where(batch.mask, batch.logp.detach(), batch.behaviour_logp)})
    mode, normalizer = ("token-sum", 1.0) if "token-sum" in AGG_MODES else ("seq-mean-token-sum", float(N_SEQ))
    loss, grad, _ = loss_and_grad(batch, rtg_settings(kl_loss_coef=1.0, loss_agg_mode=mode),
                                  batch_num_tokens=17, global_batch_size=N_SEQ)
    logp = batch.logp.detach().clone().requires_grad_(True)
    on_policy = terms.kl_rtg_loss(logp, batch.ref_logp, batch.mask, beta=1.0, normalizer=normalizer)
    (on_grad,) = torch.autograd.grad(on_policy, logp)
    torch.testing.assert_close(grad, on_grad, **LIBRARY_PATH)


def test_padding_never_leaks_and_masked_positions_get_zero_gradient(make_batch):
    """Junk at padded positions of old / ref log-probs (as a padded tensor may hold) changes nothing."""
    batch = make_batch()
    clean = type(batch)(**{**vars(batch), "ref_logp": batch.ref_logp * batch.mask,
                           "behaviour_logp": batch.behaviour_logp * batch.mask})
    settings = rtg_settings(kl_loss_coef=1.0)
    dirty_loss, dirty_grad, _ = loss_and_grad(batch, settings, batch_num_tokens=17, global_batch_size=N_SEQ)
    clean_loss, clean_grad, _ = loss_and_grad(clean, settings, batch_num_tokens=17, global_batch_size=N_SEQ)
    assert torch.equal(dirty_loss, clean_loss) and torch.equal(dirty_grad, clean_grad)
    assert torch.all(dirty_grad[~batch.mask] == 0) and torch.isfinite(dirty_grad).all()
    # the micro-batch term itself, fed NaN / inf at masked positions
    from kl_patches.integrations.verl.kl import rtg_micro_batch_loss

    logp = torch.where(batch.mask, batch.logp.detach(), torch.full_like(batch.logp, float("nan"))).requires_grad_(True)
    loss = rtg_micro_batch_loss(
        logp, torch.where(batch.mask, batch.ref_logp, torch.tensor(float("inf"), dtype=torch.float64)),
        torch.where(batch.mask, batch.behaviour_logp, torch.tensor(float("-inf"), dtype=torch.float64)),
        batch.mask, normalizer=30.0)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.all(grad[~batch.mask] == 0) and torch.isfinite(grad).all()


def test_all_padding_responses(make_batch):
    """A response with no tokens contributes nothing; a micro-batch of only such responses gives a zero loss
    and zero gradient."""
    settings = rtg_settings(kl_loss_coef=1.0)
    batch = make_batch(lengths=(3, 0, 2, 0, 4, 1))
    loss, grad, _ = loss_and_grad(batch, settings, batch_num_tokens=10, global_batch_size=N_SEQ)
    assert torch.isfinite(loss) and torch.all(grad[1] == 0) and torch.all(grad[3] == 0)
    from kl_patches.integrations.verl.kl import rtg_micro_batch_loss

    empty = make_batch(lengths=(0, 0, 0), group_size=3)
    logp = empty.logp.detach().clone().requires_grad_(True)
    value = rtg_micro_batch_loss(logp, empty.ref_logp, empty.behaviour_logp, empty.mask, normalizer=fixed_c("token-mean"))
    (grad,) = torch.autograd.grad(value, logp)
    assert value.item() == 0.0 and torch.all(grad == 0)


def test_split_anywhere_the_micro_batch_losses_add_up_to_the_whole(make_batch):
    """No statistic from other rows: any split of the rows into micro-batches (in any order) gives the same
    accumulated gradient as the whole batch, to rounding."""
    batch = make_batch()
    settings = rtg_settings(kl_loss_coef=1.0)
    _, whole, _ = loss_and_grad(batch, settings, batch_num_tokens=17, global_batch_size=N_SEQ)
    for parts in ([[0, 1, 2], [3, 4, 5]], [[5, 0], [3], [1, 4, 2]], [[i] for i in range(6)]):
        total = torch.zeros_like(whole)
        for rows in parts:
            rows = torch.tensor(rows)
            sub = type(batch)(batch.tokens[rows], batch.mask[rows], batch.logp.detach()[rows], batch.ref_logp[rows],
                              batch.behaviour_logp[rows], batch.group_ids[rows], rows, 1, False)
            _, grad, _ = loss_and_grad(sub, settings, batch_num_tokens=int(batch.mask[rows].sum()),
                                       global_batch_size=N_SEQ)
            total[rows] += grad
        torch.testing.assert_close(total, whole, **SPLIT_INVARIANCE)


def test_fixed_normalizer_per_loss_agg_mode():
    from kl_patches.integrations.verl.kl import fixed_normalizer

    assert fixed_normalizer("token-mean", 8, 100) == 800.0
    assert fixed_normalizer("seq-mean-token-mean", 8, 100) == 800.0
    assert fixed_normalizer("seq-mean-token-sum", 8, 100) == 8.0
    assert fixed_normalizer("seq-mean-token-sum-norm", 8, 100) == 800.0
    assert fixed_normalizer("seq-mean-token-sum-norm", 8, 100, loss_scale_factor=3) == 24.0
    assert fixed_normalizer("token-sum", 8, 100) == 1.0
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        fixed_normalizer("seq-sum", 8, 100)
    with pytest.raises(ValueError, match="mini-batch size"):
        fixed_normalizer("token-mean", None, 100)


def test_worker_without_the_drivers_settings_says_what_to_do(make_batch):
    from kl_patches.modes import KLModeError

    batch = make_batch()
    with pytest.raises(KLModeError, match="no fixed normaliser length.*validate_config"):
        loss_and_grad(batch, settings_for(use_kl_loss=True, kl_loss_type="k1-rtg-loss"), batch_num_tokens=17,
                      global_batch_size=N_SEQ)


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


def plugin_switch() -> dict:
    """The environment that loads kl-patches in a fresh verl process ("auto") and the one that does not ("none"):
    verl 0.9's plugin discovery on / off; verl 0.8's VERL_USE_EXTERNAL_MODULES naming the plugin / unset."""
    import importlib.metadata

    from kl_patches.integrations.verl import compat

    if compat.loads_entry_points(importlib.metadata.version("verl")):
        return {"auto": {"VERL_USE_EXTERNAL_PLUGINS": "auto"}, "none": {"VERL_USE_EXTERNAL_PLUGINS": "none"}}
    return {"auto": {compat.PLUGIN_ENV: compat.PLUGIN_MODULE}, "none": {}}


def test_plugin_installed_or_not_gives_bit_identical_results_for_verl_values():
    """The same script in two fresh processes: kl-patches loaded by verl (its patches installed) and not
    (verl's functions untouched; ``plugin_switch``). Floats compared exactly."""
    here = os.path.dirname(os.path.abspath(__file__))
    runs = {}
    for policy, switch in plugin_switch().items():
        env = {key: value for key, value in os.environ.items()
               if key not in ("VERL_USE_EXTERNAL_MODULES", "VERL_USE_EXTERNAL_PLUGINS")}
        env.update(switch)
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
