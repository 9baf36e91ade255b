"""The exact audit through TRL's own trainers: unpatched configurations, RLOO, the kl-patches modes, trainers it
cannot cover, and the user's own YAML configuration (``kl-patches check --library trl --config``)."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from kl_patches.audit import PolicySpec
from kl_patches.integrations.trl import audit as trl_audit
from kl_patches.modes import KLModeError

OUTSIDE = os.path.dirname(sys.executable)  # not the source tree: kl_patches.integrations exists installed only


@pytest.fixture(scope="module")
def records():
    return trl_audit.audit(PolicySpec())


def by(records, configuration, policy="on"):
    found = [r for r in records if r.configuration == configuration and r.policy == policy]
    assert len(found) == 1, (configuration, policy, [r.configuration for r in records])
    return found[0]


def test_every_record_has_the_core_schema(records):
    import trl

    assert records and all(r.library == "trl" and r.library_version == trl.__version__ for r in records)
    audited = [r for r in records if r.verdict != "not covered"]
    assert all(r.spec["group_size"] == 2 and r.spec["vocab"] == 3 and r.spec["horizon"] == 3 for r in audited)
    assert all(any("float64" in note for note in r.notes) for r in audited)
    assert {r.mode for r in records} == {"library", "k1-in-reward", "k1-rtg-loss"}
    assert not any(r.user_config for r in records)


def test_unpatched_grpo_is_biased_in_every_configuration(records):
    grpo = [r for r in records if r.mode == "library" and r.configuration.startswith("GRPO")]
    assert len(grpo) >= 13
    for record in grpo:
        assert record.verdict == "biased" and record.rel_err > 1e-3, record
        assert "kl_mode: k1-" in record.fix and "KL_PATCHES_MODE=k1-" in record.fix
    defaults = [r for r in grpo if r.configuration.startswith("GRPO defaults")]
    assert {r.policy for r in defaults} == {"on", "off"}
    assert by(records, defaults[0].configuration, "off").fix.startswith("kl_mode: k1-rtg-loss")
    # the three KL placements differ (not one number relabelled)
    errors = {round(by(records, name).rel_err, 6) for name in (
        defaults[0].configuration, "GRPO use_bias_correction_kl=False", "GRPO importance_sampling_level=sequence")}
    assert len(errors) == 3
    assert "6586" in by(records, "GRPO importance_sampling_level=sequence").reason


def test_rloo_is_exact_on_policy_only(records):
    name = next(r.configuration for r in records if r.configuration.startswith("RLOO"))
    assert by(records, name, "on").verdict == "exact" and by(records, name, "on").rel_err < 1e-10
    assert by(records, name, "off").verdict == "biased"


def test_every_mode_is_exact_on_policy_for_every_loss_type(records):
    modes = [r for r in records if r.mode != "library" and r.policy == "on"]
    assert len(modes) == 10
    assert all(r.verdict == "exact" and r.rel_err < 1e-10 and abs(r.norm_ratio - 1) < 1e-10 for r in modes), modes


def test_off_policy_k1_rtg_loss_is_exact_and_k1_in_reward_is_not(records):
    rtg = by(records, "GRPO kl_mode=k1-rtg-loss", "off")
    assert rtg.verdict == "exact" and rtg.rel_err < 1e-10 and rtg.fix is None
    reward = by(records, "GRPO kl_mode=k1-in-reward", "off")
    assert reward.verdict == "biased" and reward.rel_err > 1e-2
    assert "on-policy only" in reward.reason and reward.fix.startswith("kl_mode: k1-rtg-loss")


def test_trainers_overriding_compute_loss_are_not_covered(records):
    pytest.importorskip("trl.experimental.gmpo")
    gmpo = [r for r in records if "GMPOTrainer" in r.configuration]
    assert len(gmpo) == 1 and gmpo[0].verdict == "not covered" and gmpo[0].rel_err is None


def test_another_policy_size_gives_the_same_verdicts():
    spec = PolicySpec(vocab=4, horizon=2, seed=3, distance=0.7, staleness=0.4)
    cells = {c.configuration: c for c in trl_audit.default_cells()}
    truth = {}
    with trl_audit.single_thread():
        library = trl_audit.audit_cell(spec, cells["GRPO use_bias_correction_kl=False"], "on", truth_cache=truth)
        rtg_off = trl_audit.audit_cell(spec, cells["GRPO kl_mode=k1-rtg-loss"], "off", truth_cache=truth)
        reward_on = trl_audit.audit_cell(spec, cells["GRPO kl_mode=k1-in-reward, loss_type=grpo"], "on",
                                         truth_cache=truth)
    assert library.verdict == "biased"
    assert rtg_off.verdict == reward_on.verdict == "exact"
    assert rtg_off.spec["vocab"] == 4 and rtg_off.spec["seed"] == 3


# -- the user's configuration -----------------------------------------------------------------------------------

def write(tmp_path, name, values):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model_name_or_path": "Qwen/Qwen2.5-0.5B", "dataset_name": "x", "bf16": True,
                                    "output_dir": str(tmp_path / "out"), "report_to": "wandb", **values}))
    return str(path)


def test_user_config_without_a_mode_is_trl_and_biased(tmp_path, monkeypatch):
    monkeypatch.delenv("KL_PATCHES_MODE", raising=False)
    path = write(tmp_path, "grpo.yaml", {"beta": 0.04, "loss_type": "grpo"})
    (record,) = trl_audit.audit(PolicySpec(), config=path)
    assert record.user_config and record.mode == "library" and record.verdict == "biased"
    assert "loss_type=grpo" in record.configuration
    assert record.fix == "kl_mode: k1-in-reward  (or KL_PATCHES_MODE=k1-in-reward)"
    assert any("bf16" in note and "report_to" in note for note in record.notes)  # GPU settings set aside, said so


def test_an_off_policy_user_config_is_pointed_to_k1_rtg_loss(tmp_path, monkeypatch):
    monkeypatch.delenv("KL_PATCHES_MODE", raising=False)
    on, off = trl_audit.audit(PolicySpec(), config=write(tmp_path, "off.yaml", {"beta": 0.04, "num_iterations": 2}))
    assert (on.policy, on.verdict, off.policy, off.verdict) == ("on", "biased", "off", "biased")
    assert on.fix.startswith("kl_mode: k1-rtg-loss") and off.fix.startswith("kl_mode: k1-rtg-loss")


def test_user_config_with_kl_mode_off_policy(tmp_path):
    path = write(tmp_path, "rtg.yaml", {"beta": 0.04, "kl_mode": "k1-rtg-loss", "num_iterations": 2})
    records = trl_audit.audit(PolicySpec(), config=path)
    assert [(r.policy, r.verdict) for r in records] == [("on", "exact"), ("off", "exact")]
    assert all(r.user_config and r.mode == "k1-rtg-loss" for r in records)
    path = write(tmp_path, "reward.yaml", {"beta": 0.04, "kl_mode": "k1-in-reward", "steps_per_generation": 4})
    on, off = trl_audit.audit(PolicySpec(), config=path)
    assert (on.verdict, off.verdict) == ("exact", "biased") and off.fix.startswith("kl_mode: k1-rtg-loss")


def test_user_mode_from_the_environment_and_from_the_yaml_env_block(tmp_path, monkeypatch):
    monkeypatch.setenv("KL_PATCHES_MODE", "k1-rtg-loss")
    (record,) = trl_audit.audit(PolicySpec(), config=write(tmp_path, "a.yaml", {"beta": 0.1}))
    assert record.mode == "k1-rtg-loss" and record.verdict == "exact"
    assert any("KL_PATCHES_MODE in this environment" in note for note in record.notes)
    monkeypatch.delenv("KL_PATCHES_MODE")
    path = write(tmp_path, "b.yaml", {"beta": 0.1, "env": {"KL_PATCHES_MODE": "k1-in-reward"}})
    (record,) = trl_audit.audit(PolicySpec(), config=path)
    assert record.mode == "k1-in-reward" and record.verdict == "exact"
    assert "KL_PATCHES_MODE" not in os.environ  # TrlParser's env export does not leak into this process


def test_user_config_from_command_line_arguments():
    (record,) = trl_audit.audit(PolicySpec(), args=["--beta", "0.04", "--use_bias_correction_kl", "false"])
    assert record.user_config and record.verdict == "biased" and "use_bias_correction_kl=False" in record.configuration


def test_user_config_with_beta_zero_has_an_exactly_zero_kl_gradient(tmp_path):
    (record,) = trl_audit.audit(PolicySpec(), config=write(tmp_path, "zero.yaml", {"beta": 0.0}))
    assert record.verdict == "exact" and record.norm_ratio == 0.0 and "beta=0" in record.reason


def test_bad_user_input_fails_clearly(tmp_path):
    with pytest.raises(KLModeError, match="k2-in-loss"):
        trl_audit.audit(PolicySpec(), config=write(tmp_path, "bad.yaml", {"beta": 0.1, "kl_mode": "k2-in-loss"}))
    with pytest.raises(FileNotFoundError):
        trl_audit.audit(PolicySpec(), config=str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- beta\n")
    with pytest.raises(ValueError, match="YAML mapping"):
        trl_audit.audit(PolicySpec(), config=str(tmp_path / "list.yaml"))


# -- the command line -------------------------------------------------------------------------------------------

def kl_patches_cli(*args, env=None):
    exe = os.path.join(os.path.dirname(sys.executable), "kl-patches")
    environment = {k: v for k, v in os.environ.items() if k != "KL_PATCHES_MODE"}
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=OUTSIDE, env={**environment, **(env or {})})


def test_cli_check_exits_non_zero_and_prints_the_fix_for_a_biased_config(tmp_path):
    path = write(tmp_path, "grpo.yaml", {"beta": 0.04})
    result = kl_patches_cli("check", "--library", "trl", "--config", path)
    assert result.returncode == 1, result.stderr
    assert "biased" in result.stdout and "kl_mode: k1-in-reward" in result.stdout


def test_cli_check_passes_a_patched_config_and_emits_json(tmp_path):
    path = write(tmp_path, "grpo.yaml", {"beta": 0.04, "num_iterations": 2})
    result = kl_patches_cli("check", "--library", "trl", "--config", path, "--json",
                            env={"KL_PATCHES_MODE": "k1-rtg-loss"})
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.loads(result.stdout)
    assert [(r["policy"], r["verdict"], r["user_config"]) for r in records] == [("on", "exact", True),
                                                                                  ("off", "exact", True)]


def test_cli_check_of_all_trl_configurations_is_fast():
    started = time.perf_counter()
    result = kl_patches_cli("check", "--library", "trl", "--json")
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert len(records) >= 27 and {r["verdict"] for r in records} >= {"exact", "biased"}
    print(f"kl-patches check --library trl: {seconds:.1f} s")
