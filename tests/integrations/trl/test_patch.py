"""kl_patches.enable / disable on trl.GRPOTrainer: idempotent, reversible by identity, version-guarded, and loud
on trainers whose _compute_loss it cannot reach."""

import pytest
import torch

import kl_patches
import kl_patches.integrations.trl as adapter
import kl_patches.patching as patching
from kl_patches.audit import PolicySpec
from kl_patches.integrations.trl.audit import build_tiny_trainer, trl_loss
from kl_patches.modes import KLModeError
from kl_patches.patching import MARKER, PatchError, is_patched

TARGETS = ("_generate_and_score_completions", "_compute_loss", "compute_loss")


def originals():
    import trl

    return {name: vars(trl.GRPOTrainer)[name] for name in TARGETS}


def test_enable_disable_restores_the_exact_originals():
    import trl

    before = originals()
    assert kl_patches.enable("trl", "k1-rtg-loss") is True
    for name in TARGETS:
        assert is_patched(trl.GRPOTrainer, name)
        assert vars(trl.GRPOTrainer)[name] is not before[name]
        assert vars(trl.GRPOTrainer)[name].__wrapped__ is before[name]
    assert kl_patches.is_enabled("trl") == "k1-rtg-loss"
    assert kl_patches.disable("trl") is True
    assert originals() == before and all(originals()[n] is before[n] for n in TARGETS)
    assert not any(getattr(f, MARKER, False) for f in originals().values())
    assert kl_patches.is_enabled("trl") is None


def test_enable_is_idempotent_and_mode_switches_cleanly():
    before = originals()
    assert adapter.enable("k1-in-reward") is True
    patched = originals()
    assert adapter.enable("k1-in-reward") is False  # second call: nothing to do
    assert originals() == patched
    assert adapter.enable("k1-rtg-loss") is True  # switch: unpatch then patch, never stacked
    assert all(originals()[n].__wrapped__ is before[n] for n in TARGETS)
    assert adapter.enabled_mode() == "k1-rtg-loss"
    assert adapter.disable() is True and adapter.disable() is False
    assert all(originals()[n] is before[n] for n in TARGETS)


def test_the_trl_name_and_the_module_name_are_one_class():
    import trl
    from trl.trainer import grpo_trainer

    adapter.enable("k1-in-reward")
    assert trl.GRPOTrainer is grpo_trainer.GRPOTrainer and is_patched(trl.GRPOTrainer, "_compute_loss")


def test_a_subclass_inherits_the_patch_without_looking_patched():
    import trl

    class Mine(trl.GRPOTrainer):
        pass

    adapter.enable("k1-in-reward")
    assert not is_patched(Mine, "_compute_loss")  # marker read from the class's own __dict__
    assert getattr(Mine._compute_loss, MARKER, False)  # but it resolves to the patched method


def test_unknown_mode_is_refused_before_patching():
    before = originals()
    with pytest.raises(KLModeError, match="unknown KL mode"):
        kl_patches.enable("trl", "k3")
    assert originals() == before


@pytest.mark.parametrize("version", ["1.14.0", "1.17.0", "0.16.0"])
def test_unsupported_versions_raise_patch_error_naming_the_version(monkeypatch, version):
    before = originals()
    monkeypatch.setattr(patching, "installed_version", lambda distribution: version)
    with pytest.raises(PatchError, match=f"trl {version} is not supported"):
        kl_patches.enable("trl", "k1-in-reward")
    with pytest.raises(PatchError, match=f"trl {version}"):
        adapter.autoload("k1-rtg-loss")  # the KL_PATCHES_MODE path refuses at `import trl` time
    assert originals() == before and adapter.enabled_mode() is None


def test_a_moved_target_raises_and_leaves_nothing_half_patched(monkeypatch):
    import trl

    before = originals()
    monkeypatch.delattr(trl.GRPOTrainer, "compute_loss")  # the last target: the first two get applied first
    with pytest.raises(PatchError, match="expected .*compute_loss to exist"):
        adapter.enable("k1-in-reward")
    monkeypatch.undo()
    assert originals() == before and adapter.enabled_mode() is None


class OwnKLTrainer(__import__("trl").GRPOTrainer):
    """Overrides _compute_loss with its own KL, like the experimental GMPOTrainer."""

    def _compute_loss(self, model, inputs):
        return (inputs["advantages"] * 0.0).sum() + next(model.parameters()).sum() * 0.0


def test_a_trainer_overriding_compute_loss_fails_loudly_in_a_patched_mode(reward):
    spec = PolicySpec()
    adapter.enable("k1-rtg-loss")
    tiny = build_tiny_trainer(spec, trainer_class=OwnKLTrainer, beta=0.04, reward_funcs=reward)
    tokens, mask = spec_batch(tiny)
    with pytest.raises(PatchError, match="OwnKLTrainer overrides _compute_loss"):
        trl_loss(tiny, tokens, mask)
    adapter.disable()
    assert torch.isfinite(trl_loss(tiny, tokens, mask))  # unpatched it runs (with its own KL)


def test_the_real_gmpo_trainer_is_refused_in_a_patched_mode(reward):
    gmpo = pytest.importorskip("trl.experimental.gmpo")
    spec = PolicySpec()
    adapter.enable("k1-in-reward")
    tiny = build_tiny_trainer(spec, trainer_class=gmpo.GMPOTrainer, config=gmpo_config(gmpo, spec),
                              reward_funcs=reward)
    tokens, mask = spec_batch(tiny)
    with pytest.raises(PatchError, match="GMPOTrainer._compute_loss overrides GRPOTrainer._compute_loss"):
        trl_loss(tiny, tokens, mask)


def gmpo_config(gmpo, spec):
    from kl_patches.integrations.trl.audit import base_config, tiny_model_path

    return gmpo.GMPOConfig(**{**base_config(spec, tiny_model_path(spec) + "/out"), "beta": 0.04})


def spec_batch(tiny, rows=(0, 4, 7, 14)):
    index = torch.tensor(rows)
    return tiny.problem.tokens[index], tiny.problem.mask[index]


def test_beta_zero_patched_is_said_once_and_changes_nothing(reward):
    spec = PolicySpec()
    adapter.enable("k1-rtg-loss")
    tiny = build_tiny_trainer(spec, beta=0.0, reward_funcs=reward)
    tokens, mask = spec_batch(tiny)
    with pytest.warns(UserWarning, match="beta=0.*nothing to patch") as caught:
        trl_loss(tiny, tokens, mask)
        trl_loss(tiny, tokens, mask)
    assert len([w for w in caught if "nothing to patch" in str(w.message)]) == 1
