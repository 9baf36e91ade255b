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
    from kl_patches.integrations.verl.config import check_trainer_config

    config = trainer_config(use_kl_loss=True, kl_loss_type="k1-rtg-loss", kl_loss_coef=0.01,
                            use_kl_in_reward=True, kl_penalty="kl", kl_coef=0.02)
    with caplog.at_level(logging.WARNING, logger="kl_patches.verl"):
        terms = check_trainer_config(config)
    assert terms == ["loss: actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss (kl-patches), beta=0.01",
                     "reward: algorithm.kl_penalty=kl (verl), beta=0.02"]
    assert "both KL paths are on" in caplog.text and "k1-rtg-loss (kl-patches)" in caplog.text
    assert "kl (verl)" in caplog.text


def test_verl_values_pass_the_checks_untouched(caplog):
    from kl_patches.integrations.verl.config import check_trainer_config

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


# ------------------------------------------------------------------------------- driver-side refusals (issue 11)


def composed(*overrides):
    """verl's ppo_trainer composed with ``overrides`` (what main_ppo's driver validates)."""
    from kl_patches.integrations.verl.audit import load_user_config

    return load_user_config(None, list(overrides))


RTG = ("actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss")
IN_REWARD = ("algorithm.use_kl_in_reward=True", "algorithm.kl_penalty=k1-in-reward",
             "data.train_batch_size=256")  # verl's defaults (1024 / 256) make 4 mini-batches: stale


@pytest.mark.parametrize("overrides, expected", [
    (("actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_type=k1_rtg_loss"), "k1-rtg-loss"),
    (("actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_type=k1-rtg"), "k1-rtg-loss"),
    (("actor_rollout_ref.actor.kl_loss_type=k1-rtg"), "k1-rtg-loss"),  # a typo even with the flag off
    (("algorithm.use_kl_in_reward=True", "algorithm.kl_penalty=k1_in_reward"), "k1-in-reward"),
    (("algorithm.use_kl_in_reward=True", "algorithm.kl_penalty=low-var-kl"), "low_var_kl"),
])
def test_near_miss_values_are_refused_at_the_driver_with_did_you_mean(overrides, expected):
    import verl.trainer.main_ppo as main_ppo

    overrides = (overrides,) if isinstance(overrides, str) else overrides
    with pytest.raises(KLModeError, match=f"did you mean .*={expected}\\?"):
        main_ppo.validate_config(config=composed(*overrides), use_reference_policy=True, use_critic=False)


@pytest.mark.parametrize("overrides, message", [
    (("actor_rollout_ref.actor.policy_loss.loss_mode=geo_mean",), "loss_mode=geo_mean"),
    (("actor_rollout_ref.actor.policy_loss.loss_mode=sapo",), "loss_mode=sapo"),
    (("actor_rollout_ref.actor.policy_loss.loss_mode=clip_cov",), "loss_mode=clip_cov"),
    (("actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",), "seq-mean-token-mean"),
    (("actor_rollout_ref.actor.ppo_epochs=2",), "stale mini-batches.*ppo_epochs=2"),
    (("data.train_batch_size=64", "actor_rollout_ref.actor.ppo_mini_batch_size=16"), "stale mini-batches"),
])
def test_k1_in_reward_where_it_is_biased_is_refused_with_the_fix(overrides, message):
    from kl_patches.integrations.verl.config import check_trainer_config

    with pytest.raises(KLModeError, match=message) as caught:
        check_trainer_config(composed(*IN_REWARD, *overrides))
    assert "kl_loss_type=k1-rtg-loss" in str(caught.value)
    check_trainer_config(composed(*RTG, *overrides))  # the fix is accepted


@pytest.mark.parametrize("sampler", ["actor_rollout_ref.rollout.top_p=0.9", "actor_rollout_ref.rollout.top_k=50"])
@pytest.mark.parametrize("value", [RTG, IN_REWARD])
def test_truncated_sampler_support_is_refused(sampler, value):
    from kl_patches.integrations.verl.config import check_trainer_config

    with pytest.raises(KLModeError, match="support is truncated.*top_p=1.0"):
        check_trainer_config(composed(*value, sampler))
    check_trainer_config(composed("actor_rollout_ref.actor.use_kl_loss=True", sampler))  # verl's own value: untouched


def test_without_engine_log_probs_the_driver_warns_that_the_mismatch_is_uncorrected():
    from kl_patches.integrations.verl.config import check_trainer_config

    with pytest.warns(UserWarning, match="engine/trainer mismatch is left uncorrected.*calculate_log_probs=True"):
        check_trainer_config(composed(*RTG, "actor_rollout_ref.rollout.calculate_log_probs=False"))


def test_the_driver_hands_the_workers_their_fixed_settings_and_truncation():
    """validate_config puts the normaliser's length and the truncation into the actor's global_batch_info (a dict
    field of verl's ActorConfig), removes the kl_patches_truncation key verl's strict dataclass would reject, and
    the worker's ActorConfig carries them."""
    from kl_patches.integrations.verl.config import check_trainer_config  # what verl's validate_config runs first
    from verl.utils.config import omega_conf_to_dataclass

    config = composed(*RTG, "data.max_response_length=77", "+actor_rollout_ref.actor.kl_patches_truncation=2.5",
                      "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4")  # ActorConfig requires one
    check_trainer_config(config)
    assert "kl_patches_truncation" not in config.actor_rollout_ref.actor
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)  # as the worker builds it (_target_)
    assert actor.global_batch_info["kl_patches"] == {"length": 77, "truncation": 2.5}
    check_trainer_config(config)  # idempotent
    assert config.actor_rollout_ref.actor.global_batch_info.kl_patches.truncation == 2.5
    with pytest.raises(KLModeError, match="acts on actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss only"):
        check_trainer_config(composed("+actor_rollout_ref.actor.kl_patches_truncation=2.5"))


def test_verl_values_get_no_kl_patches_settings():
    from kl_patches.integrations.verl.config import check_trainer_config

    config = composed("actor_rollout_ref.actor.use_kl_loss=True")
    check_trainer_config(config)
    assert not (config.actor_rollout_ref.actor.get("global_batch_info") or {})


def test_kl_patches_mode_in_a_verl_process(monkeypatch):
    """KL_PATCHES_MODE by the one precedence rule: the hydra values are explicit and win (a conflict is warned);
    with no KL term configured a kl-patches mode cannot choose a coefficient: refused, naming the overrides."""
    from kl_patches.integrations.verl.config import check_trainer_config

    monkeypatch.setenv("KL_PATCHES_MODE", "k1-rtg-loss")
    with pytest.raises(KLModeError, match="KL_PATCHES_MODE=k1-rtg-loss.*turns no KL term on.*use_kl_loss=True"):
        check_trainer_config(composed())
    check_trainer_config(composed(*RTG))  # agrees: nothing said
    with pytest.warns(UserWarning, match="overrides KL_PATCHES_MODE='k1-rtg-loss'"):
        check_trainer_config(composed("actor_rollout_ref.actor.use_kl_loss=True"))
    monkeypatch.setenv("KL_PATCHES_MODE", "library")
    check_trainer_config(composed())


def test_a_plugin_that_failed_to_load_is_reported_at_the_driver(monkeypatch):
    import kl_patches.integrations.verl as adapter
    from kl_patches.integrations.verl.config import check_trainer_config

    monkeypatch.setitem(adapter._plugin_state, "error", "ImportError: something verl moved")
    with pytest.raises(KLModeError, match="could not patch verl in this process.*something verl moved"):
        check_trainer_config(composed(*RTG))
    check_trainer_config(composed("actor_rollout_ref.actor.use_kl_loss=True"))  # verl's values keep working
