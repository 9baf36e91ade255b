"""The audit through OpenRLHF's own code: the table `kl-patches check --library openrlhf` prints."""

import pytest

from kl_patches.audit import PolicySpec
from kl_patches.integrations.openrlhf import audit as oaudit
from kl_patches.integrations.openrlhf.placeholders import active_placeholders
from kl_patches.modes import KLModeError
from kl_patches.patching import installed_version


@pytest.fixture(scope="module")
def records():
    return oaudit.audit(PolicySpec())


def verdicts(records, mode=None):
    return {(r.configuration, r.policy): r.verdict for r in records if mode is None or r.mode == mode}


def test_every_cell_on_and_off_policy_with_library_metadata(records):
    assert len(records) == 2 * len([cell for cell in oaudit.CELLS if oaudit.available(cell)])
    if installed_version("openrlhf") == "0.11.2":  # the CI version has every configuration
        assert len(records) == 2 * len(oaudit.CELLS)
    assert {r.policy for r in records} == {"on", "off"}
    for record in records:
        assert record.library == "openrlhf" and record.library_version == installed_version("openrlhf")
        assert record.verdict in ("exact", "biased") and record.rel_err is not None and not record.user_config
        assert record.spec["group_size"] == 2 and record.spec["argv"] is not None
        for name in active_placeholders():
            assert any(f"placeholder module used for {name}" in note for note in record.notes)
        assert (record.fix is None) == (record.verdict == "exact")


def test_the_kl_patches_modes(records):
    modes = verdicts(records)
    for record in records:
        if record.mode == "k1-rtg-loss":
            assert record.verdict == "exact" and record.rel_err < 1e-12, record
    assert modes[("--algo.kl.mode k1-in-reward (rloo, --algo.kl.estimator k3)", "on")] == "exact"
    assert modes[("--algo.kl.mode k1-in-reward (group_norm)", "on")] == "exact"
    # exact on-policy only: OpenRLHF's token-level PPO ratio does not reweight the prefix
    assert modes[("--algo.kl.mode k1-in-reward (group_norm)", "off")] == "biased"
    # the mode does not fix an advantage estimator that whitens the KL with batch statistics
    assert modes[("--algo.kl.mode k1-in-reward (gae)", "on")] == "biased"


def test_the_unpatched_library(records):
    modes = verdicts(records, "library")
    for estimator in ("rloo", "group_norm", "dr_grpo"):
        assert modes[(f"--algo.advantage.estimator {estimator}", "on")] == "exact"
        assert modes[(f"--algo.advantage.estimator {estimator}", "off")] == "biased"
    biased_everywhere = [c for c in modes if "use_loss" in c[0] or "without log_probs_old" in c[0] or "k2" in c[0]
                         or "k3 (rloo)" in c[0] or "seq-mean" in c[0] or "gae" in c[0]]
    assert len(biased_everywhere) >= (20 if installed_version("openrlhf") == "0.11.2" else 12)
    assert all(modes[c] == "biased" for c in biased_everywhere)
    by_name = {(r.configuration, r.policy): r for r in records}
    # the taxonomy's numbers, measured through OpenRLHF's training_step: k1 in loss has no KL force at all
    assert by_name[("--algo.kl.use_loss --algo.kl.estimator k1", "on")].norm_ratio < 1e-12
    assert 0.1 < by_name[("--algo.kl.use_loss --algo.kl.estimator k3 (GRPO)", "on")].rel_err < 0.7


def test_user_command_line_records():
    on_only = oaudit.audit(PolicySpec(), args=["--algo.advantage.estimator", "group_norm",
                                                "--rollout.n_samples_per_prompt", "4", "--rollout.batch_size", "32",
                                                "--train.batch_size", "128"])
    assert [(r.policy, r.verdict, r.user_config) for r in on_only] == [("on", "exact", True)]
    grpo = oaudit.audit(PolicySpec(), args=["--algo.kl.use_loss", "--algo.kl.estimator", "k3",
                                             "--algo.advantage.estimator", "group_norm",
                                             "--rollout.n_samples_per_prompt", "4"])
    assert [(r.policy, r.verdict) for r in grpo] == [("on", "biased"), ("off", "biased")]
    assert all(r.fix == "--algo.kl.mode k1-rtg-loss" and r.user_config for r in grpo)
    assert "32 optimizer steps" in grpo[1].reason
    fixed = oaudit.audit(PolicySpec(), args=["--algo.kl.use_loss", "--algo.kl.estimator", "k3",
                                              "--algo.advantage.estimator", "group_norm",
                                              "--rollout.n_samples_per_prompt", "4", "--algo.kl.mode", "k1-rtg-loss"])
    assert [(r.policy, r.verdict, r.mode) for r in fixed] == [("on", "exact", "k1-rtg-loss"),
                                                              ("off", "exact", "k1-rtg-loss")]
    in_reward = oaudit.audit(PolicySpec(), args=["--algo.advantage.estimator", "group_norm",
                                                  "--rollout.n_samples_per_prompt", "4", "--algo.kl.mode",
                                                  "k1-in-reward"])
    assert [(r.policy, r.verdict) for r in in_reward] == [("on", "exact"), ("off", "biased")]
    assert "k1-rtg-loss" in in_reward[1].reason and "off-policy" in in_reward[1].reason


def test_user_command_line_errors_and_kl_off():
    with pytest.raises(KLModeError, match="init_coef 0"):
        oaudit.audit(PolicySpec(), args=["--algo.kl.init_coef", "0", "--algo.kl.mode", "k1-in-reward"])
    with pytest.raises(KLModeError, match="drop --algo.kl.use_loss"):
        oaudit.audit(PolicySpec(), args=["--algo.kl.use_loss", "--algo.kl.mode", "k1-in-reward"])
    with pytest.raises(KLModeError, match="rejected"):
        oaudit.audit(PolicySpec(), args=["--algo.kl.mode", "k3-in-loss"])
    with pytest.raises(KLModeError, match="requires n_samples_per_prompt > 1"):
        oaudit.audit(PolicySpec(), args=["--algo.advantage.estimator", "rloo"])
    [off] = oaudit.audit(PolicySpec(), args=["--algo.kl.init_coef", "0"])
    assert off.verdict == "not covered" and off.user_config
    with pytest.raises(ValueError, match="no configuration file format"):
        oaudit.audit(PolicySpec(), config="ppo.yaml")


def test_audit_restores_the_mode_the_process_had():
    from kl_patches.integrations import openrlhf as adapter

    adapter.enable("k1-in-reward")
    oaudit.audit(PolicySpec(), args=["--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt",
                                     "2", "--algo.kl.mode", "k1-rtg-loss", "--algo.kl.use_loss"])
    assert adapter.enabled_mode() == "k1-in-reward"
