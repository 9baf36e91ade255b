"""The audit through OpenRLHF's own code: the table `kl-patches check --library openrlhf` prints."""

import time

import pytest

from kl_patches.audit import PolicySpec
from kl_patches.integrations.openrlhf import audit as oaudit
from kl_patches.integrations.openrlhf.placeholders import active_placeholders
from kl_patches.modes import KLModeError
from kl_patches.patching import installed_version
from kl_patches.audit.tolerances import EXACT_TOLERANCE

#: An enumerated step audit is exact at float64 rounding over a few hundred batches (the engine's own threshold).
EXACT = EXACT_TOLERANCE


@pytest.fixture(scope="module")
def timed_records():
    start = time.perf_counter()
    records = oaudit.audit(PolicySpec())
    return records, time.perf_counter() - start


@pytest.fixture(scope="module")
def records(timed_records):
    return timed_records[0]


def by_name(records):
    return {(r.configuration, r.policy): r for r in records}


def test_every_cell_with_library_metadata_and_only_step_cells_say_exact(records):
    library_cells = [cell for cell in oaudit.CELLS if oaudit.available(cell)]
    direct = [cell for cell in library_cells if cell.direct is not None]
    step_records = [r for r in records if r.spec.get("step")]
    assert len(records) - len(step_records) == 2 * len(direct)  # only the direct function call is loss-level
    assert len(step_records) == 2 * (len(library_cells) - len(direct)) + sum(len(c.quick) for c in oaudit.STEP_CELLS)
    for record in records:
        assert record.library == "openrlhf" and record.library_version == installed_version("openrlhf")
        assert not record.user_config and record.spec["argv"] is not None
        for name in active_placeholders():
            assert any(f"placeholder module used for {name}" in note for note in record.notes)
        if record.verdict == "exact":
            assert record.spec.get("step"), record  # an exact verdict comes from OpenRLHF's step only
        assert (record.fix is None) == (record.verdict != "biased") or record.verdict == "exact"


def test_k1_rtg_loss_is_exact_through_ppo_train(records):
    named = by_name(records)
    for name, policy in [
        ("--algo.kl.mode k1-rtg-loss (micro-batch 1: accumulation 2)", "on"),
        ("--algo.kl.mode k1-rtg-loss (micro-batch 1: accumulation 2)", "off"),
        ("--algo.kl.mode k1-rtg-loss --ds.packing_samples --train.dynamic_batch_enable, 2 ranks", "off"),
    ]:
        record = named[(name, policy)]
        assert record.verdict == "exact" and record.rel_err < EXACT and record.stderr is None, record
    mismatch = [r for r in records if "vLLM/actor mismatch" in r.configuration]
    assert {(("without" in r.configuration), r.verdict) for r in mismatch} == {(False, "exact"), (True, "biased")}
    wrong_mu = next(r for r in mismatch if "without" in r.configuration)
    assert wrong_mu.rel_err > 1e-3 and "is_correction_level token" in wrong_mu.fix


def test_the_token_mean_modes_are_not_certified(records):
    named = by_name(records)
    in_reward = named[("--algo.kl.mode k1-in-reward (rloo)", "on")]
    assert in_reward.verdict == "biased" and "ratio estimator" in in_reward.reason  # OpenRLHF's realised-token mean
    grpo = named[("--algo.kl.use_loss --algo.kl.estimator k3 (GRPO)", "on")]
    assert grpo.verdict == "biased" and grpo.rel_err > 0.05


def test_the_unpatched_library_is_biased_everywhere(records):
    named = by_name(records)
    assert named[("--algo.kl.use_loss --algo.kl.estimator k1", "on")].rel_err > 0.5  # no KL force, only noise
    assert 0.1 < named[("--algo.kl.use_loss --algo.kl.estimator k3 (GRPO)", "on")].rel_err < 0.7
    library = [r for r in records if r.mode == "library"]
    assert len(library) >= 28 and all(r.verdict == "biased" for r in library)


def test_check_stays_fast(timed_records):
    _, seconds = timed_records
    assert seconds < 60, f"kl-patches check --library openrlhf took {seconds:.1f} s"


def test_user_command_lines_are_audited_through_the_step():
    exact = oaudit.audit(PolicySpec(), args=[
        "--algo.kl.mode", "k1-rtg-loss", "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt",
        "4", "--rollout.batch_size", "8", "--train.batch_size", "16", "--train.micro_batch_size", "2",
        "--algo.advantage.is_correction_level", "token", "--ds.packing_samples", "--train.dynamic_batch_enable",
        "--vllm.num_engines", "2", "--actor.num_gpus_per_node", "2"])
    assert [r.spec["regime"] for r in exact] == ["on", "off", "mismatch"]
    assert all(r.verdict == "exact" and r.rel_err < EXACT and r.user_config for r in exact), exact
    no_correction = oaudit.audit(PolicySpec(), args=[
        "--algo.kl.mode", "k1-rtg-loss", "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt",
        "4", "--vllm.num_engines", "1"])
    regimes = {r.spec["regime"]: r for r in no_correction}
    assert regimes["on"].verdict == "exact" and regimes["mismatch"].verdict == "biased"
    assert "is_correction_level" in regimes["mismatch"].reason


@pytest.mark.parametrize("flags,needle", [
    (["--train.async_enable"], "--train.async_enable"),
    (["--algo.dynamic_filtering_enable", "--algo.dynamic_filtering_range", "0.1", "0.9", "--reward.remote_url",
      "http://rm"],
     "--algo.dynamic_filtering_enable"),
    (["--rollout.top_p", "0.9"], "--rollout.top_p 0.9"),
])
def test_user_command_lines_the_run_cannot_make_exact_are_never_certified(flags, needle):
    records = oaudit.audit(PolicySpec(), args=["--algo.kl.mode", "k1-rtg-loss", "--algo.advantage.estimator",
                                               "group_norm", "--rollout.n_samples_per_prompt", "4", *flags])
    assert records and all(r.verdict != "exact" and r.user_config for r in records)
    assert any(needle in r.reason for r in records)


def test_library_mode_user_lines_are_never_certified():
    records = oaudit.audit(PolicySpec(), args=["--algo.advantage.estimator", "group_norm",
                                               "--rollout.n_samples_per_prompt", "4"])
    assert records and all(r.verdict != "exact" for r in records)
    grpo = oaudit.audit(PolicySpec(), args=["--algo.kl.use_loss", "--algo.kl.estimator", "k3",
                                            "--algo.advantage.estimator", "group_norm",
                                            "--rollout.n_samples_per_prompt", "4"])
    assert grpo and all(r.verdict == "biased" and "k1-rtg-loss" in r.fix for r in grpo)


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


def test_the_cli_exits_1_for_a_run_it_cannot_make_exact(capsys):
    from kl_patches.cli import main

    code = main(["check", "--library", "openrlhf", "--", "--algo.kl.mode", "k1-rtg-loss",
                 "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4",
                 "--train.async_enable"])
    out = capsys.readouterr().out
    assert code == 1 and "not covered" in out and "is_correction_level token" in out
