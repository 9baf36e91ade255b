"""The two kl-patches values in verl's configuration: accepted where they belong, refused with the missing flag
named, verl's own errors kept for values nobody knows, both paths on at once reported."""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from kl_patches.modes import KLModeError


def trainer_config(**kl):
    defaults = {"use_kl_loss": False, "kl_loss_type": "low_var_kl", "kl_loss_coef": 0.001,
                "use_kl_in_reward": False, "kl_penalty": "kl", "kl_coef": 0.001}
    values = {**defaults, **kl}
    return OmegaConf.create({
        "actor_rollout_ref": {"actor": {key: values[key] for key in ("use_kl_loss", "kl_loss_type", "kl_loss_coef")}},
        "algorithm": {"use_kl_in_reward": values["use_kl_in_reward"], "kl_penalty": values["kl_penalty"],
                      "kl_ctrl": {"kl_coef": values["kl_coef"]}},
    })


@pytest.mark.parametrize("kl, message", [
    (dict(kl_loss_type="k1-rtg-loss"), r"kl_loss_type=k1-rtg-loss needs actor_rollout_ref\.actor\.use_kl_loss=True"),
    (dict(kl_penalty="k1-in-reward"), r"kl_penalty=k1-in-reward needs algorithm\.use_kl_in_reward=True"),
    (dict(use_kl_loss=True, kl_loss_type="k1-in-reward"), r"k1-in-reward is a value of algorithm\.kl_penalty"),
    (dict(use_kl_in_reward=True, kl_penalty="k1-rtg-loss"), r"k1-rtg-loss is a value of actor_rollout_ref\.actor\.kl_loss_type"),
])
def test_configuration_errors_name_the_missing_flag_before_any_ray_work(kl, message):
    """verl's validate_config (as bound in main_ppo, run by the driver before ray.init) refuses them."""
    import verl.trainer.main_ppo as main_ppo

    with pytest.raises(KLModeError, match=message):
        main_ppo.validate_config(config=trainer_config(**kl), use_reference_policy=True, use_critic=False)


def test_both_paths_on_says_which_terms_are_applied(caplog):
    from kl_patches.integrations.verl.values import check_trainer_config

    config = trainer_config(use_kl_loss=True, kl_loss_type="k1-rtg-loss", kl_loss_coef=0.01,
                            use_kl_in_reward=True, kl_penalty="kl", kl_coef=0.02)
    with caplog.at_level(logging.WARNING, logger="kl_patches.verl"):
        terms = check_trainer_config(config)
    assert terms == ["loss: actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss (kl-patches), beta=0.01",
                     "reward: algorithm.kl_penalty=kl (verl), beta=0.02"]
    assert "both KL paths are on" in caplog.text and "k1-rtg-loss (kl-patches)" in caplog.text
    assert "kl (verl)" in caplog.text


def test_verl_values_pass_the_checks_untouched(caplog):
    from kl_patches.integrations.verl.values import check_trainer_config

    with caplog.at_level(logging.WARNING, logger="kl_patches.verl"):
        assert check_trainer_config(trainer_config(use_kl_loss=True, use_kl_in_reward=True)) == [
            "loss: actor_rollout_ref.actor.kl_loss_type=low_var_kl (verl), beta=0.001",
            "reward: algorithm.kl_penalty=kl (verl), beta=0.001"]
    assert caplog.text == ""  # verl prints its own notice for both-on with its values


def test_worker_refuses_k1_rtg_loss_with_use_kl_loss_off(make_batch):
    """The same check where the loss runs (a config that skipped validate_config)."""
    from kl_patches.integrations.verl.audit import KLSettings, actor_config, micro_batch

    import verl.workers.utils.losses as losses

    batch = make_batch()
    model_output, data = micro_batch(batch)
    config = actor_config(KLSettings(use_kl_loss=False, kl_loss_type="k1-rtg-loss"))
    with pytest.raises(KLModeError, match="use_kl_loss=True"):
        losses.ppo_loss(config, model_output, data)


def test_unknown_values_keep_verls_own_errors(make_batch):
    from kl_patches.integrations.verl.audit import KLSettings, actor_config, micro_batch, reward_data
    from verl.trainer.ppo import core_algos, ray_trainer

    import verl.workers.utils.losses as losses

    batch = make_batch()
    model_output, data = micro_batch(batch)
    config = actor_config(KLSettings(use_kl_loss=True, kl_loss_type="bogus"))
    errors = []
    for function in (losses.ppo_loss, losses.ppo_loss.__wrapped__):
        with pytest.raises(NotImplementedError) as caught:
            function(config, model_output, micro_batch(batch)[1])
        errors.append(caught.value.args)
    assert errors[0] == errors[1]
    for function in (ray_trainer.apply_kl_penalty, ray_trainer.apply_kl_penalty.__wrapped__):
        with pytest.raises(NotImplementedError):
            function(reward_data(batch, KLSettings()), core_algos.FixedKLController(0.1), kl_penalty="bogus")


def test_kl_patches_value_reaching_verls_per_token_estimator_says_where_it_came_from():
    from verl.trainer.ppo import core_algos

    x = torch.zeros(2, 3)

    def some_recipe_loss():
        return core_algos.kl_penalty(x, x, kl_penalty="k1-rtg-loss")

    with pytest.raises(KLModeError, match=r"from .*some_recipe_loss, a code path kl-patches does not patch"):
        some_recipe_loss()
    assert torch.equal(core_algos.kl_penalty(x, x + 1, "low_var_kl"), core_algos.kl_penalty.__wrapped__(x, x + 1, "low_var_kl"))
