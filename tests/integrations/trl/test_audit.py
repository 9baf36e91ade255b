"""The exact audit through TRL's own trainers (``kl-patches check --library trl``): unpatched configurations, RLOO,
the kl-patches modes through GRPOTrainer's training step and per loss type, trainers it cannot cover, and the user's
own YAML configuration (``--config``) resolved exactly as the trainer resolves it."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from kl_patches.integrations.trl import audit as trl_audit
from kl_patches.modes import KLModeError
from kl_patches.audit.tolerances import EXACT_TOLERANCE

OUTSIDE = os.path.dirname(sys.executable)  # not the source tree: kl_patches.integrations exists installed only
EXACT = EXACT_TOLERANCE  # float64 rounding over the enumeration; biased cells are above 1e-3


@pytest.fixture(scope="module")
def records():
    return trl_audit.audit()


def by(records, configuration, policy="on"):
    found = [r for r in records if r.configuration == configuration and r.policy == policy]
    assert len(found) == 1, (configuration, policy, [r.configuration for r in records])
    return found[0]


def test_every_record_has_the_core_schema(records):
    import trl

    assert records and all(r.library == "trl" and r.library_version == trl.__version__ for r in records)
    audited = [r for r in records if r.verdict != "not covered"]
    assert all(r.spec["group_size"] == 2 and r.spec["vocab"] == 3 and r.spec["horizon"] == 2 for r in audited)
    assert all(any("float64" in note for note in r.notes) for r in audited)
    assert {r.mode for r in records} == {"library", "k1-in-reward", "k1-rtg-loss"}
    assert not any(r.user_config for r in records)


def test_unpatched_grpo_is_biased_in_every_configuration(records):
    grpo = [r for r in records if r.mode == "library" and r.configuration.startswith("GRPO")]
    assert len(grpo) >= 13
    for record in grpo:
        assert record.verdict == "biased" and record.rel_err > 1e-3, record
        assert "kl_mode: k1-rtg-loss" in record.fix and "KL_PATCHES_MODE=k1-rtg-loss" in record.fix
    defaults = [r for r in grpo if r.configuration.startswith("GRPO defaults")]
    assert {r.policy for r in defaults} == {"on", "off"}
    errors = {round(by(records, name).rel_err, 6) for name in (
        defaults[0].configuration, "GRPO use_bias_correction_kl=False", "GRPO importance_sampling_level=sequence")}
    assert len(errors) == 3
    assert "6586" in by(records, "GRPO importance_sampling_level=sequence").reason


def test_rloo_is_exact_on_policy_only(records):
    name = next(r.configuration for r in records if r.configuration.startswith("RLOO"))
    assert by(records, name, "on").verdict == "exact" and by(records, name, "on").rel_err < EXACT
    assert by(records, name, "off").verdict == "biased"


def test_the_default_mode_is_exact_through_the_step_on_and_off_policy(records):
    steps = [r for r in records if r.spec.get("step")]
    assert {(r.mode, r.spec["regime"]) for r in steps} == {("k1-rtg-loss", "on"), ("k1-rtg-loss", "vllm-mismatch"),
                                                           ("k1-in-reward", "on")}
    for record in steps:
        assert record.verdict == "exact" and record.rel_err < EXACT and abs(record.norm_ratio - 1) < EXACT, record
        assert "training step" in record.reason
    assert {r.policy for r in steps if r.mode == "k1-rtg-loss"} == {"on", "off"}


def test_every_mode_is_exact_for_every_loss_type_it_accepts(records):
    loss = [r for r in records if r.mode != "library" and not r.spec.get("step") and "refused" not in r.reason]
    assert {r.spec["settings"]["loss_type"] for r in loss if r.mode == "k1-rtg-loss"} == {
        "grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo"}
    assert {r.spec["settings"]["loss_type"] for r in loss if r.mode == "k1-in-reward"} == {
        "grpo", "sapo", "bnpo", "dr_grpo", "dapo", "luspo"}  # cispo (epsilon_high < 1) and vespo are refused
    assert all(r.verdict == "exact" and r.rel_err < EXACT for r in loss), loss


def test_k1_in_reward_off_policy_is_refused_and_reported_biased(records):
    (reward,) = [r for r in records if r.mode == "k1-in-reward" and r.policy == "off"]
    assert reward.verdict == "biased" and reward.rel_err > 1e-2
    assert reward.reason.startswith("refused at start") and reward.fix.startswith("kl_mode: k1-rtg-loss")


def test_trainers_overriding_compute_loss_are_not_covered(records):
    pytest.importorskip("trl.experimental.gmpo")
    gmpo = [r for r in records if "GMPOTrainer" in r.configuration]
    assert len(gmpo) == 1 and gmpo[0].verdict == "not covered" and gmpo[0].rel_err is None


def test_another_policy_size_gives_the_same_verdicts():
    from kl_patches.audit import PolicySpec

    spec = PolicySpec(vocab=4, horizon=2, seed=3, distance=0.7, staleness=0.4)
    cells = {c.configuration: c for c in trl_audit.default_cells()}
    truth = {}
    with trl_audit.single_thread():
        library = trl_audit.audit_cell(spec, cells["GRPO use_bias_correction_kl=False"], "on", truth_cache=truth)
        reward_on = trl_audit.audit_cell(spec, cells["GRPO kl_mode=k1-in-reward, loss_type=grpo, loss"], "on",
                                         truth_cache=truth)
    assert library.verdict == "biased" and reward_on.verdict == "exact"
    assert reward_on.spec["vocab"] == 4 and reward_on.spec["seed"] == 3


# -- the user's configuration -----------------------------------------------------------------------------------

def write(tmp_path, name, values):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model_name_or_path": "Qwen/Qwen2.5-0.5B", "dataset_name": "x", "bf16": True,
                                    "output_dir": str(tmp_path / "out"), "report_to": "wandb", **values}))
    return str(path)


def test_user_config_without_a_mode_resolves_like_the_trainer(tmp_path, monkeypatch):
    monkeypatch.delenv("KL_PATCHES_MODE", raising=False)
    path = write(tmp_path, "grpo.yaml", {"beta": 0.04, "loss_type": "grpo"})
    (record,) = trl_audit.audit(config=path)
    assert record.user_config and record.mode == "k1-rtg-loss" and record.verdict == "exact"
    assert record.spec["step"] is True and "loss_type=grpo" in record.configuration
    assert any("trl grpo" in note for note in record.notes)  # TRL's own script would train its k3: said
    assert any("bf16" in note and "report_to" in note for note in record.notes)  # GPU settings set aside, said so


def test_user_config_in_library_mode_is_biased_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("KL_PATCHES_MODE", raising=False)
    (record,) = trl_audit.audit(config=write(tmp_path, "lib.yaml", {"beta": 0.04, "kl_mode": "library"}))
    assert record.mode == "library" and record.verdict == "biased"
    assert record.fix.startswith("kl_mode: k1-rtg-loss")


def test_explicit_kl_mode_beats_the_environment_in_check_as_in_the_trainer(tmp_path, monkeypatch):
    monkeypatch.setenv("KL_PATCHES_MODE", "k1-in-reward")
    path = write(tmp_path, "x.yaml", {"beta": 0.04, "kl_mode": "k1-rtg-loss"})
    (record,) = trl_audit.audit(config=path)
    assert record.mode == "k1-rtg-loss"
    assert any("overrides KL_PATCHES_MODE='k1-in-reward'" in note for note in record.notes)
    (record,) = trl_audit.audit(config=write(tmp_path, "y.yaml", {"beta": 0.04}))
    assert record.mode == "k1-in-reward" and any("KL_PATCHES_MODE in this environment" in n for n in record.notes)
    import kl_patches.integrations.trl as adapter

    trained = adapter.GRPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, beta=0.04)
    assert trained.kl_mode == record.mode  # the drop-in GRPOConfig trains what check audited


def test_an_off_policy_user_config_is_audited_through_the_step(tmp_path, monkeypatch):
    monkeypatch.delenv("KL_PATCHES_MODE", raising=False)
    records = trl_audit.audit(config=write(tmp_path, "off.yaml", {"beta": 0.04, "num_iterations": 2}))
    assert [(r.policy, r.verdict) for r in records] == [("on", "exact"), ("off", "exact")]
    assert records[1].spec["settings"]["num_iterations"] == 2 and records[1].spec["step"]


def test_k1_in_reward_in_an_off_policy_user_config_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("KL_PATCHES_MODE", raising=False)
    path = write(tmp_path, "reward.yaml", {"beta": 0.04, "kl_mode": "k1-in-reward", "steps_per_generation": 4})
    on, off = trl_audit.audit(config=path)
    assert (on.verdict, off.verdict) == ("biased", "biased")  # the run itself is refused at start
    assert all(r.reason.startswith("refused at start") and r.fix.startswith("kl_mode: k1-rtg-loss") for r in (on, off))


def test_user_sampler_settings_are_audited(tmp_path, monkeypatch):
    monkeypatch.delenv("KL_PATCHES_MODE", raising=False)
    (truncated,) = trl_audit.audit(config=write(tmp_path, "p.yaml", {"beta": 0.04, "top_p": 0.9}))
    assert truncated.verdict == "biased" and "top_p=0.9" in truncated.reason and "top_p=1.0" in truncated.fix
    vllm = trl_audit.audit(config=write(tmp_path, "v.yaml", {"beta": 0.04, "use_vllm": True,
                                                                "vllm_importance_sampling_correction": False}))
    verdicts = {r.spec["regime"]: r.verdict for r in vllm}
    assert verdicts == {"vllm": "exact", "vllm-uncorrected": "biased"}
    assert "vllm_importance_sampling_correction" in [r for r in vllm if r.verdict == "biased"][0].fix


def test_user_config_with_beta_zero_has_an_exactly_zero_kl_gradient(tmp_path):
    (record,) = trl_audit.audit(config=write(tmp_path, "zero.yaml", {"beta": 0.0}))
    assert record.verdict == "exact" and record.norm_ratio == 0.0 and "beta=0" in record.reason


def test_bad_user_input_fails_clearly(tmp_path):
    with pytest.raises(KLModeError, match="k2-in-loss"):
        trl_audit.audit(config=write(tmp_path, "bad.yaml", {"beta": 0.1, "kl_mode": "k2-in-loss"}))
    with pytest.raises(FileNotFoundError):
        trl_audit.audit(config=str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- beta\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        trl_audit.audit(config=str(tmp_path / "list.yaml"))


# -- the command line -------------------------------------------------------------------------------------------

def kl_patches_cli(*args, env=None):
    exe = os.path.join(os.path.dirname(sys.executable), "kl-patches")
    environment = {k: v for k, v in os.environ.items() if k != "KL_PATCHES_MODE"}
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=OUTSIDE, env={**environment, **(env or {})})


def test_cli_check_exits_non_zero_and_prints_the_fix_for_a_biased_config(tmp_path):
    path = write(tmp_path, "grpo.yaml", {"beta": 0.04, "kl_mode": "library"})
    result = kl_patches_cli("check", "--library", "trl", "--config", path)
    assert result.returncode == 1, result.stderr
    assert "biased" in result.stdout and "kl_mode: k1-rtg-loss" in result.stdout


def test_cli_check_passes_a_patched_config_and_emits_json(tmp_path):
    path = write(tmp_path, "grpo.yaml", {"beta": 0.04, "num_iterations": 2})
    result = kl_patches_cli("check", "--library", "trl", "--config", path, "--json",
                            env={"KL_PATCHES_MODE": "k1-rtg-loss"})
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.loads(result.stdout)
    assert [(r["policy"], r["verdict"], r["user_config"]) for r in records] == [("on", "exact", True),
                                                                                  ("off", "exact", True)]


def test_cli_check_of_all_trl_configurations(tmp_path):
    started = time.perf_counter()
    result = kl_patches_cli("check", "--library", "trl", "--json")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert len(records) >= 30 and {r["verdict"] for r in records} >= {"exact", "biased"}
    print(f"kl-patches check --library trl: {seconds:.1f} s")
