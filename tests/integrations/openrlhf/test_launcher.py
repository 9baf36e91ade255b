"""The entry point: validation before any work, the runtime environment, and the hand-over to OpenRLHF's main."""

import importlib.metadata
import importlib.util
import os
import pytest

from kl_patches.integrations.openrlhf import compat, config, launcher
from kl_patches.modes import KLModeError

# Flags are written as 0.11 spells them; flags() / said() give the installed release's spelling (0.9.3: flat flags).
flags, said = compat.translate_argv, compat.to_flags
MODELS = flags(["--actor.model_name_or_path", "m", "--reward.model_name_or_path", "r"])


def test_strip_mode_removes_both_spellings_only():
    mode = config.mode_flag()
    argv = ["--a", "1", mode, "k1-rtg-loss", f"{mode}=k1-in-reward", *flags(["--algo.kl.use_loss"])]
    assert config.strip_mode(argv) == ["--a", "1", *flags(["--algo.kl.use_loss"])]


def test_k1_rtg_loss_turns_on_the_kl_loss_and_says_so():
    plan = config.plan([*MODELS, *flags(["--algo.kl.mode", "k1-rtg-loss", "--algo.kl.estimator", "k3"])])
    assert plan.mode == "k1-rtg-loss" and plan.args.algo.kl.use_loss
    assert plan.argv == [*MODELS, *flags(["--algo.kl.estimator", "k3", "--algo.kl.use_loss"])]
    assert any(said("--algo.kl.use_loss turned on") in note for note in plan.notes)
    assert any("ignored by k1-rtg-loss" in note for note in plan.notes)


def test_k1_in_reward_notes_the_estimator_override_and_off_policy_training():
    plan = config.plan([*MODELS, *flags(["--algo.kl.mode", "k1-in-reward", "--algo.kl.estimator", "k3"])])
    # OpenRLHF keeps its flags; the patch forces k1
    assert plan.argv == [*MODELS, *flags(["--algo.kl.estimator", "k3"])]
    assert any("k3 is overridden" in note for note in plan.notes)
    assert any("8 optimizer steps" in note and "k1-rtg-loss" in note for note in plan.notes)  # 1024 / 128
    assert any("whitens the advantages" in note for note in plan.notes)  # default estimator gae


@pytest.mark.parametrize("argv,match", [
    (["--algo.kl.mode", "k1-rtg-loss", "--algo.kl.init_coef", "0"], "--algo.kl.init_coef 0"),
    (["--algo.kl.mode", "k1-in-reward", "--algo.kl.init_coef", "0"], "--algo.kl.init_coef 0"),
    (["--algo.kl.mode", "k1-in-reward", "--algo.kl.use_loss"], "drop --algo.kl.use_loss"),
])
def test_incompatible_combinations_are_refused(argv, match):
    with pytest.raises(KLModeError, match=said(match)):  # named in the installed release's flags
        config.plan([*MODELS, *flags(argv)])


def test_unknown_mode_and_unknown_argument_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        config.plan([*MODELS, config.mode_flag(), "k3"])
    assert "invalid choice: 'k3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        config.plan([*MODELS, "--algo.kl.not_a_flag", "1"])


def test_help_lists_openrlhf_arguments_and_the_mode(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert said("--algo.kl.mode {library,k1-in-reward,k1-rtg-loss}") in out and said("--algo.kl.init_coef") in out


def test_runtime_environment():
    env = launcher.build_runtime_env("k1-rtg-loss", {"NCCL_DEBUG": "INFO"})
    assert env["env_vars"]["KL_PATCHES_MODE"] == "k1-rtg-loss" and env["env_vars"]["NCCL_DEBUG"] == "INFO"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "true"
    assert env["worker_process_setup_hook"] == "kl_patches.integrations.openrlhf.ray_hooks.setup_worker"
    library = launcher.build_runtime_env("library", {})
    assert "KL_PATCHES_MODE" not in library["env_vars"] and "worker_process_setup_hook" not in library


@pytest.fixture
def captured(monkeypatch):
    """Stops main at the two things it starts: Ray and OpenRLHF's own main."""
    import ray

    calls = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.setdefault("ray_init", kwargs))

    monkeypatch.setattr(launcher, "run_openrlhf_main", lambda argv: calls.setdefault("openrlhf_argv", list(argv)))
    saved = os.environ.pop("KL_PATCHES_MODE", None)  # main() sets it for the processes it starts
    yield calls
    os.environ.pop("KL_PATCHES_MODE", None)
    if saved is not None:
        os.environ["KL_PATCHES_MODE"] = saved


def test_main_patches_starts_ray_with_the_hook_and_runs_openrlhf(captured):
    from kl_patches.integrations.openrlhf import enabled_mode

    assert launcher.main([*MODELS, config.mode_flag(), "k1-rtg-loss"]) == 0
    assert enabled_mode() == "k1-rtg-loss" and os.environ["KL_PATCHES_MODE"] == "k1-rtg-loss"
    assert captured["ray_init"]["runtime_env"] == launcher.build_runtime_env("k1-rtg-loss")
    assert captured["openrlhf_argv"] == [*MODELS, *flags(["--algo.kl.use_loss"])]


def test_main_library_mode_leaves_everything_to_openrlhf(captured):
    from kl_patches.integrations.openrlhf import enabled_mode

    assert launcher.main([*MODELS]) == 0
    assert "ray_init" not in captured and enabled_mode() is None and "KL_PATCHES_MODE" not in os.environ
    assert captured["openrlhf_argv"] == MODELS


def test_main_refuses_bad_combinations_before_any_work(captured, capsys):
    assert launcher.main([*MODELS, *flags(["--algo.kl.mode", "k1-in-reward", "--algo.kl.use_loss"])]) == 2
    assert captured == {} and said("drop --algo.kl.use_loss") in capsys.readouterr().err


def test_run_openrlhf_main_runs_train_ppo_ray_as_main_with_the_arguments(monkeypatch):
    seen = {}

    def fake_run_module(name, run_name=None, alter_sys=False):
        import sys

        seen.update(name=name, run_name=run_name, argv=list(sys.argv))

    monkeypatch.setattr(launcher.runpy, "run_module", fake_run_module)
    launcher.run_openrlhf_main(["--x", "1"])
    assert seen == {"name": "openrlhf.cli.train_ppo_ray", "run_name": "__main__", "argv": ["train_ppo_ray", "--x", "1"]}


def test_console_script_and_module_entry_points_point_at_the_launcher():
    [script] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "kl-patches-openrlhf"]
    assert script.load() is launcher.main
    assert importlib.util.find_spec("kl_patches.integrations.openrlhf.__main__") is not None


def test_an_explicit_library_flag_beats_an_inherited_kl_patches_mode(captured, monkeypatch):
    import warnings

    from kl_patches import modes
    from kl_patches.integrations.openrlhf import enable, enabled_mode

    monkeypatch.setattr(modes, "_CONFLICTS_SAID", set())
    os.environ["KL_PATCHES_MODE"] = "k1-rtg-loss"
    enable("k1-rtg-loss")  # as the .pth autoloader would have, on importing OpenRLHF
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        assert launcher.main([*MODELS, config.mode_flag(), "library"]) == 0
    assert enabled_mode() is None and "KL_PATCHES_MODE" not in os.environ and "ray_init" not in captured
    conflicts = [w for w in said if "overrides KL_PATCHES_MODE" in str(w.message)]
    assert len(conflicts) == 1  # said once


def test_kl_patches_mode_applies_when_no_flag_is_given(captured):
    os.environ["KL_PATCHES_MODE"] = "k1-rtg-loss"
    plan = config.plan([*MODELS])
    assert plan.mode == "k1-rtg-loss" and plan.origin == "KL_PATCHES_MODE"


@pytest.mark.parametrize("extra,needle", [
    (["--train.async_enable"], "--train.async_enable"),
    (["--algo.dynamic_filtering_enable", "--reward.remote_url", "http://rm", "--rollout.n_samples_per_prompt", "2",
      "--algo.advantage.estimator", "rloo"],
     "--algo.dynamic_filtering_enable"),
    (["--rollout.top_p", "0.9"], "--rollout.top_p 0.9"),
])
def test_launch_refuses_what_cannot_be_exact(extra, needle):
    with pytest.raises(KLModeError, match=said(needle)):  # the flag, named as the installed release spells it
        config.plan([*MODELS, *flags(["--algo.kl.mode", "k1-rtg-loss", *extra])])


def test_async_with_the_samplers_log_probs_and_sync_without_them():
    ok = config.plan([*MODELS, *flags(["--algo.kl.mode", "k1-rtg-loss", "--train.async_enable",
                                       "--algo.advantage.is_correction_level", "token"])])
    assert ok.mu_source == "rollout_log_probs" and not ok.refused
    sync = config.plan([*MODELS, config.mode_flag(), "k1-rtg-loss"])
    assert sync.mu_source == "action_log_probs"
    assert any(note.startswith("warning:") and said("--algo.advantage.is_correction_level token") in note
               for note in sync.notes)
    assert any(said("KL normaliser C = --train.batch_size 128") in note for note in sync.notes)


def test_truncation_flag_reaches_the_workers(captured):
    from kl_patches.integrations.openrlhf.kl import TRUNCATION_ENV

    try:
        assert launcher.main([*MODELS, *flags(["--algo.kl.mode", "k1-rtg-loss", "--algo.kl.truncation", "2"])]) == 0
        assert captured["ray_init"]["runtime_env"]["env_vars"][TRUNCATION_ENV] == "2.0"
        assert said("--algo.kl.truncation") not in captured["openrlhf_argv"]
    finally:
        os.environ.pop(TRUNCATION_ENV, None)
    with pytest.raises(KLModeError, match="only applies to"):
        config.plan([*MODELS, *flags(["--algo.kl.mode", "k1-in-reward", "--algo.kl.truncation", "2"])])
