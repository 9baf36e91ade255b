"""Refusals and loud notices: configurations a kl-patches mode cannot make exact fail before any work with the flag
and the fix; a user subclass with its own KL, Unsloth and RLOOTrainer are detected."""

import pytest
import torch

import kl_patches.integrations.trl as adapter
from kl_patches.audit import PolicySpec
from kl_patches.integrations.trl import config as trl_config
from kl_patches.integrations.trl.audit import build_tiny_trainer, trl_loss
from kl_patches.integrations.trl.compat import installed_loss_types
from kl_patches.patching import PatchError

ROWS = (0, 4, 7, 14)


def run(tiny):
    index = torch.tensor(ROWS)
    return trl_loss(tiny, tiny.problem.tokens[index], tiny.problem.mask[index])


@pytest.mark.parametrize("settings, match", [(settings, match) for settings, match in [
    ({"num_iterations": 2}, "num_iterations=2"),
    ({"steps_per_generation": 2}, "steps_per_generation=2"),
    ({"loss_type": "cispo"}, "epsilon_high=0.2"),
    ({"top_entropy_quantile": 0.5}, "top_entropy_quantile=0.5"),
    ({"loss_type": "vespo"}, "loss_type=vespo"),
] if settings.get("loss_type", "dapo") in installed_loss_types(settings.get("loss_type", "dapo"))])
def test_k1_in_reward_refuses_what_it_cannot_make_exact(reward, settings, match):
    tiny = build_tiny_trainer(PolicySpec(), kl_mode="k1-in-reward", beta=0.04, reward_funcs=reward, **settings)
    with pytest.raises(PatchError, match=f"(?s){match}.*Fix: kl_mode: k1-rtg-loss"):
        run(tiny)


def test_k1_in_reward_refuses_an_emulated_vllm_sampler(reward):
    tiny = build_tiny_trainer(PolicySpec(), kl_mode="k1-in-reward", beta=0.04, reward_funcs=reward, vllm="match")
    with pytest.raises(PatchError, match="use_vllm=True"):
        run(tiny)


@pytest.mark.parametrize("settings", [{"num_iterations": 2}, {"top_entropy_quantile": 0.5}, {"top_k": 3}]
                         + [{"loss_type": loss_type} for loss_type in installed_loss_types("cispo")])
def test_k1_rtg_loss_accepts_them(reward, settings):
    """The k1-rtg-loss term stays outside TRL's clamps and masks; top_k = vocabulary truncates nothing."""
    tiny = build_tiny_trainer(PolicySpec(), kl_mode="k1-rtg-loss", beta=0.04, reward_funcs=reward,
                              off_policy=settings.get("num_iterations", 1) > 1, **settings)
    assert torch.isfinite(run(tiny))


@pytest.mark.parametrize("settings, match", [({"top_p": 0.9}, "top_p=0.9"), ({"top_k": 2}, "top_k=2 < vocabulary 3"),
                                             ({"min_p": 0.1}, "min_p=0.1")])
@pytest.mark.parametrize("mode", ["k1-rtg-loss", "k1-in-reward"])
def test_a_truncated_sampler_is_refused(reward, settings, match, mode):
    tiny = build_tiny_trainer(PolicySpec(), kl_mode=mode, beta=0.04, reward_funcs=reward, **settings)
    with pytest.raises(PatchError, match=f"(?s){match}.*support is truncated.*Fix: top_p=1.0, top_k=0"):
        run(tiny)


def test_library_mode_refuses_nothing(reward):
    tiny = build_tiny_trainer(PolicySpec(), kl_mode="library", beta=0.04, reward_funcs=reward, top_p=0.9,
                              num_iterations=2, off_policy=True)
    assert torch.isfinite(run(tiny))


def test_vllm_without_importance_sampling_correction_is_warned_about(reward):
    tiny = build_tiny_trainer(PolicySpec(), kl_mode="k1-rtg-loss", beta=0.04, reward_funcs=reward, vllm="mismatch",
                              vllm_correction=False)
    with pytest.warns(UserWarning, match="vllm_importance_sampling_correction=False"):
        run(tiny)


class OwnK3Trainer(__import__("trl").GRPOTrainer):
    """A user subclass adding its own k3 term in compute_loss (the classic way around a guard)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        ref = inputs["ref_per_token_logps"]
        return loss + self.beta * (torch.exp(ref) - ref - 1).mean() * 0.0


class VouchedTrainer(__import__("trl").GRPOTrainer):
    """An override that logs and delegates, and says so."""

    _kl_patches_allow_override = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("way", ["patch", "subclass"])
def test_a_subclass_with_its_own_kl_is_refused(reward, way):
    if way == "patch":
        adapter.enable("k1-rtg-loss")
        cls = OwnK3Trainer
    else:
        cls = type("Mixed", (OwnK3Trainer, adapter.GRPOTrainer), {})
    tiny = build_tiny_trainer(PolicySpec(), trainer_class=cls, beta=0.04, reward_funcs=reward,
                              **({"kl_mode": "k1-rtg-loss"} if way == "subclass" else {}))
    with pytest.raises(PatchError, match="OwnK3Trainer.compute_loss overrides GRPOTrainer.compute_loss and computes "
                                         "a KL of its own"):
        run(tiny)


def test_a_vouched_subclass_runs(reward):
    adapter.enable("k1-rtg-loss")
    tiny = build_tiny_trainer(PolicySpec(), trainer_class=VouchedTrainer, beta=0.04, reward_funcs=reward)
    assert torch.isfinite(run(tiny))


def test_unsloth_installed_is_refused_naming_it(tmp_path, monkeypatch, reward):
    (tmp_path / "unsloth").mkdir()
    (tmp_path / "unsloth" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert trl_config.unsloth_presence() == "unsloth is installed"
    with pytest.raises(PatchError, match="unsloth is installed.*Unsloth replaces TRL's GRPOTrainer.*grpo_compute_loss"
                                         ".*check --library unsloth.*Fix: train with TRL's GRPOTrainer"):
        adapter.enable("k1-rtg-loss")
    assert adapter.enabled_mode() is None
    assert adapter.enable("library") is True  # library mode touches no loss: allowed
    adapter.disable()
    tiny = build_tiny_trainer(PolicySpec(), kl_mode="k1-rtg-loss", beta=0.04, reward_funcs=reward)
    with pytest.raises(PatchError, match=r"(?s)Unsloth \(unsloth is installed\).*UnslothGRPOTrainer.*Fix: train with"):
        run(tiny)


@pytest.mark.parametrize("name", ["unsloth", "unsloth_zoo"])
def test_unsloth_already_imported_is_refused_even_without_a_package_spec(monkeypatch, reward, name):
    """A module in sys.modules with no spec (a stub, a vendored copy) makes importlib's find_spec raise: it must
    still count as Unsloth, or a mode would silently leave Unsloth's k3 in place."""
    import types

    monkeypatch.setitem(__import__("sys").modules, name, types.ModuleType(name))
    assert trl_config.unsloth_presence() == f"{name} is imported"
    with pytest.raises(PatchError, match=f"{name} is imported.*Unsloth replaces"):
        adapter.enable("k1-in-reward")
    assert adapter.enabled_mode() is None
    for mode in ("k1-rtg-loss", "k1-in-reward"):
        tiny = build_tiny_trainer(PolicySpec(), kl_mode=mode, beta=0.04, reward_funcs=reward)
        with pytest.raises(PatchError, match=f"Unsloth \\({name} is imported\\)"):
            run(tiny)


def test_a_trainer_generated_by_unsloth_is_refused_by_name(monkeypatch, reward):
    """Unsloth's generated trainer (a GRPOTrainer copy in unsloth_compiled_cache) is refused at its first batch even
    when Unsloth itself is not importable any more."""
    import trl

    monkeypatch.setattr(trl_config, "unsloth_presence", lambda: None)
    generated = type("UnslothGRPOTrainer", (trl.GRPOTrainer,), {"__module__": "unsloth_compiled_cache.UnslothGRPO"})
    adapter.enable("k1-rtg-loss")
    tiny = build_tiny_trainer(PolicySpec(), trainer_class=generated, beta=0.04, reward_funcs=reward)
    with pytest.raises(PatchError, match="the trainer is Unsloth's unsloth_compiled_cache.UnslothGRPO.UnslothGRPOTrainer"):
        run(tiny)
    adapter.disable()
    assert torch.isfinite(run(tiny))  # unpatched, Unsloth's trainer runs as Unsloth ships it


def test_rloo_under_a_mode_says_once_that_it_is_not_patched(caplog):
    from kl_patches.integrations.trl import patches

    patches._RLOO_SAID.clear()
    adapter.enable("k1-rtg-loss")
    with caplog.at_level("WARNING", logger="kl_patches.trl"):
        build_tiny_trainer(PolicySpec(), trainer="rloo")  # (build_tiny_trainer silences warnings; the log stays)
        build_tiny_trainer(PolicySpec(), trainer="rloo")
    said = [r for r in caplog.records if "does NOT patch trl.RLOOTrainer" in r.getMessage()]
    assert len(said) == 1 and "mode 'k1-rtg-loss'" in said[0].getMessage()
    adapter.disable()
    import trl

    assert not hasattr(trl.RLOOTrainer.__init__, "__kl_patches__")  # restored
