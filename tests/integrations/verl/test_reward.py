"""Reward side: ``algorithm.kl_penalty=k1-in-reward`` through verl's ``apply_kl_penalty`` and
``compute_advantage`` (legacy trainer) and ``compute_advantage_for_multi_trajectories`` (V1 trainer): the
advantage is verl's estimator on the task reward alone plus -beta * (KL_i - b_i), never divided by a std."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from kl_patches import terms
from kl_patches.audit.tolerances import LIBRARY_PARITY, REORDERED

ESTIMATORS = ("grpo", "grpo-nostd", "rloo", "gae", "reinforce_plus_plus", "remax-free")


def settings_for(estimator: str, **changes):
    from kl_patches.integrations.verl.audit import KLSettings

    if estimator == "grpo-nostd":
        return KLSettings(adv_estimator="grpo", norm_adv_by_std_in_grpo=False, **changes)
    if estimator == "remax-free":  # an estimator from verl's registry path (the `else` branch of compute_advantage)
        return KLSettings(adv_estimator="grpo_passk", **changes)
    return KLSettings(adv_estimator=estimator, **changes)


def run_reward_path(batch, settings, scores, values, beta=0.25):
    """verl's fit: apply_kl_penalty (kl in reward) or scores as rewards, then compute_advantage."""
    from dataclasses import replace

    from kl_patches.integrations.verl.audit import apply_reward, algo_config, reward_data
    from verl.trainer.ppo import core_algos, ray_trainer

    data = reward_data(batch, settings, scores=scores, values=values)
    if settings.use_kl_in_reward:
        kl_ctrl = core_algos.FixedKLController(kl_coef=beta)
        data, metrics = ray_trainer.apply_kl_penalty(data, kl_ctrl=kl_ctrl, kl_penalty=settings.kl_penalty)
    else:
        data, metrics = apply_reward(data, settings), {}
    data = ray_trainer.compute_advantage(data, adv_estimator=settings.adv_estimator, gamma=settings.gamma,
                                         lam=settings.lam, num_repeat=3,
                                         norm_adv_by_std_in_grpo=settings.norm_adv_by_std_in_grpo,
                                         config=algo_config(replace(settings, kl_coef=beta)))
    return data, metrics


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_k1_in_reward_is_the_task_only_advantage_plus_the_kl_part(make_batch, estimator):
    batch = make_batch()
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.25], dtype=torch.float64)
    values = torch.randn(batch.mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * batch.mask
    task_only, _ = run_reward_path(batch, settings_for(estimator), scores, values)
    ours, metrics = run_reward_path(batch, settings_for(estimator, use_kl_in_reward=True, kl_penalty="k1-in-reward"),
                                    scores, values)
    kl_part = terms.kl_advantage(batch.behaviour_logp, batch.ref_logp, batch.mask, beta=0.25, group_ids=batch.group_ids)
    expected = task_only.batch["advantages"] + kl_part[:, None] * batch.mask
    torch.testing.assert_close(ours.batch["advantages"], expected, **REORDERED)
    # nothing added at padded positions (verl's GAE whitening leaves them nonzero; the loss masks them)
    assert torch.equal(ours.batch["advantages"][~batch.mask], task_only.batch["advantages"][~batch.mask])
    # no per-token KL in the reward; task-only returns (the critic learns the task value); verl's metrics
    assert torch.equal(ours.batch["token_level_rewards"], task_only.batch["token_level_rewards"])
    assert torch.equal(ours.batch["returns"], task_only.batch["returns"])
    assert "kl_patches_kl_beta" not in ours.batch.keys()
    assert set(metrics) == {"actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff"}


def test_kl_part_is_not_divided_by_the_group_std(make_batch):
    """Doubling the task rewards' spread halves verl's std-normalised task advantage, never the KL part."""
    batch = make_batch()
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.25], dtype=torch.float64)
    settings = settings_for("grpo", use_kl_in_reward=True, kl_penalty="k1-in-reward")
    one, _ = run_reward_path(batch, settings, scores, None)
    two, _ = run_reward_path(batch, settings, 2 * scores, None)
    task, _ = run_reward_path(batch, settings_for("grpo"), scores, None)
    torch.testing.assert_close(one.batch["advantages"] - task.batch["advantages"],
                               two.batch["advantages"] - task.batch["advantages"], rtol=0, atol=1e-6)
    # verl's own kl in reward is divided by the std: its KL part changes with the task rewards' spread
    verl_settings = settings_for("grpo", use_kl_in_reward=True, kl_penalty="kl")
    one, _ = run_reward_path(batch, verl_settings, scores, None)
    two, _ = run_reward_path(batch, verl_settings, 2 * scores, None)
    task2, _ = run_reward_path(batch, settings_for("grpo"), 2 * scores, None)
    assert not torch.allclose(one.batch["advantages"] - task.batch["advantages"],
                              two.batch["advantages"] - task2.batch["advantages"], atol=1e-3)


def test_k1_in_reward_metrics_and_adaptive_controller_match_verls_k1(make_batch):
    """The KL metric and the adaptive controller see the same k1 value verl's ``kl`` penalty reports."""
    from kl_patches.integrations.verl.audit import KLSettings, reward_data
    from verl.trainer.ppo import core_algos, ray_trainer

    batch = make_batch()
    controllers, metrics = [], []
    for kl_penalty in ("kl", "k1-in-reward"):
        controller = core_algos.AdaptiveKLController(init_kl_coef=0.2, target_kl=0.05, horizon=100)
        _, metric = ray_trainer.apply_kl_penalty(reward_data(batch, KLSettings()), controller, kl_penalty=kl_penalty)
        controllers.append(controller.value)
        metrics.append(metric)
    assert metrics[0] == pytest.approx(metrics[1], rel=LIBRARY_PARITY["rtol"]) and controllers[0] == pytest.approx(controllers[1])


def test_a_group_of_one_gets_no_baseline_and_missing_uid_means_no_baseline(make_batch):
    from kl_patches.integrations.verl.kl import reward_side_kl_part

    batch = make_batch(group_size=1)
    from kl_patches.integrations.verl.audit import reward_data

    data = reward_data(batch, settings_for("grpo"))
    beta = torch.full((6,), 0.5, dtype=torch.float64)
    fields = (data.batch["old_log_probs"], data.batch["ref_log_prob"], data.batch["response_mask"].bool())
    part = reward_side_kl_part(*fields, beta, batch.group_ids)
    torch.testing.assert_close(part, -0.5 * terms.sequence_kl(batch.behaviour_logp, batch.ref_logp, batch.mask))
    torch.testing.assert_close(reward_side_kl_part(*fields, beta, None), part)


def test_verl_values_are_bit_identical_to_verls_functions(make_batch):
    from kl_patches.integrations.verl.audit import KLSettings, algo_config, reward_data
    from verl.trainer.ppo import core_algos, ray_trainer

    batch = make_batch()
    values = torch.randn(batch.mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * batch.mask
    scores = torch.arange(6, dtype=torch.float64)
    for kl_penalty in ("kl", "abs", "mse", "low_var_kl", "k3+"):
        for estimator in ("grpo", "rloo", "gae", "reinforce_plus_plus"):
            settings = KLSettings(use_kl_in_reward=True, kl_penalty=kl_penalty, adv_estimator=estimator)
            outputs = []
            for apply, compute in ((ray_trainer.apply_kl_penalty, ray_trainer.compute_advantage),
                                   (ray_trainer.apply_kl_penalty.__wrapped__, ray_trainer.compute_advantage.__wrapped__)):
                data = reward_data(batch, settings, scores=scores, values=values)
                data, metrics = apply(data, core_algos.FixedKLController(0.1), kl_penalty=kl_penalty)
                data = compute(data, adv_estimator=estimator, num_repeat=3, config=algo_config(settings))
                outputs.append((data.batch["advantages"], data.batch["returns"], data.batch["token_level_rewards"],
                                metrics))
            same = [torch.equal(a, b) for a, b in zip(outputs[0][:3], outputs[1][:3], strict=True)]
            assert all(same), (kl_penalty, estimator)
            assert outputs[0][3] == outputs[1][3]


def multi_trajectory_batch(make_batch):
    """Two prompts (uid a, b), three sessions each; session a_1 and b_0 have two outputs."""
    batch = make_batch(lengths=(3, 5, 1, 4, 5, 2, 3, 4), group_size=8)
    keys = ["a_0_0", "a_1_0", "a_1_1", "a_2_0", "b_0_0", "b_0_1", "b_1_0", "b_2_0"]
    uids = [key.split("_")[0] for key in keys]
    return batch, keys, uids


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_v1_multi_trajectory_sessions_carry_their_whole_kl(make_batch, estimator):
    """The V1 trainer's compute_advantage_for_multi_trajectories: every output of a session gets
    -beta * (KL of the whole session - leave-one-out mean over the other sessions of its uid) under GRPO
    (verl scores whole sessions), and the per-output KL part for the other estimators (per-output trajectories)."""
    from kl_patches.integrations.verl.audit import KLSettings, algo_config, reward_data
    from verl.trainer.ppo import core_algos, ray_trainer
    from kl_patches.integrations.verl import INTEGRATION

    # verl 0.9's V1 trainer (verl.trainer.ppo.v1.utils) or verl 0.8's main_ppo_sync: the module this verl has
    (name,) = [t.module for t in INTEGRATION.targets if t.attribute == "compute_advantage_for_multi_trajectories"]
    v1_utils = importlib.import_module(name)

    batch, keys, uids = multi_trajectory_batch(make_batch)
    scores = torch.tensor([1.0, 0.0, 0.5, 2.0, -1.0, 0.25, 0.75, 1.5], dtype=torch.float64)
    results = {}
    for kl_penalty in ("k1-in-reward", None):
        settings = KLSettings(use_kl_in_reward=kl_penalty is not None, kl_penalty=kl_penalty or "kl",
                              adv_estimator=estimator)
        data = reward_data(batch, settings, scores=scores)
        data.non_tensor_batch["uid"] = np.array(uids, dtype=object)
        if kl_penalty:
            data, _ = ray_trainer.apply_kl_penalty(data, core_algos.FixedKLController(0.5), kl_penalty=kl_penalty)
        else:
            data.batch["token_level_rewards"] = data.batch["token_level_scores"]
        data = v1_utils.compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator=estimator,
                                                                 num_repeat=3, config=algo_config(settings))
        results[kl_penalty] = data.batch["advantages"]
    seq = terms.sequence_kl(batch.behaviour_logp, batch.ref_logp, batch.mask)
    if estimator == "grpo":
        sessions = ["a_0", "a_1", "a_1", "a_2", "b_0", "b_0", "b_1", "b_2"]
        names = list(dict.fromkeys(sessions))
        session_kl = torch.stack([seq[[i for i, s in enumerate(sessions) if s == name]].sum() for name in names])
        baseline = terms.leave_one_out_baseline(session_kl, torch.tensor([0, 0, 0, 1, 1, 1]))
        per_row = torch.stack([-(session_kl - baseline)[names.index(s)] for s in sessions]) * 0.5
    else:
        per_row = terms.kl_advantage(batch.behaviour_logp, batch.ref_logp, batch.mask, beta=0.5,
                                     group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    torch.testing.assert_close(results["k1-in-reward"], results[None] + per_row[:, None] * batch.mask, **REORDERED)
