"""kl_mode as an ordinary GRPOConfig field: defaults, validation when the config is built, TRL's own parsers."""

import pytest
import yaml

import kl_patches.integrations.trl as adapter
from kl_patches.modes import MODES, KLModeError


def test_default_mode_is_k1_rtg_loss(tmp_path, monkeypatch):
    monkeypatch.delenv("KL_PATCHES_MODE", raising=False)
    args = adapter.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert (args.kl_mode, args.kl_mode_origin) == ("k1-rtg-loss", "default")
    assert (args.kl_truncation, args.kl_rtg_baseline) == (None, "none")
    assert isinstance(args, __import__("trl").GRPOConfig)


def test_explicit_kl_mode_beats_the_environment_which_beats_the_default(tmp_path, monkeypatch):
    import warnings

    from kl_patches import modes

    monkeypatch.setattr(modes, "_CONFLICTS_SAID", set())
    monkeypatch.setenv("KL_PATCHES_MODE", "k1-in-reward")
    args = adapter.GRPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert (args.kl_mode, args.kl_mode_origin) == ("k1-in-reward", "KL_PATCHES_MODE")
    with pytest.warns(UserWarning, match="overrides KL_PATCHES_MODE") as caught:
        args = adapter.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, kl_mode="library")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # the conflict is said once, not twice
            adapter.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, kl_mode="library")
    assert (args.kl_mode, args.kl_mode_origin) == ("library", "GRPOConfig.kl_mode")
    assert len([w for w in caught if "overrides" in str(w.message)]) == 1


@pytest.mark.parametrize("field, bad", [("kl_truncation", 0.5), ("kl_rtg_baseline", "mean")])
def test_bad_kl_settings_fail_when_the_config_is_built(tmp_path, field, bad):
    with pytest.raises(ValueError):
        adapter.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, **{field: bad})


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_accepted(tmp_path, mode):
    assert adapter.GRPOConfig(output_dir=str(tmp_path), kl_mode=mode, use_cpu=True).kl_mode == mode


@pytest.mark.parametrize("bad", ["k3", "K1-in-reward", "", 1])
def test_unknown_mode_fails_when_the_config_is_built(tmp_path, bad):
    with pytest.raises(KLModeError, match="unknown KL mode"):
        adapter.GRPOConfig(output_dir=str(tmp_path), kl_mode=bad, use_cpu=True)


def test_trl_parser_reads_kl_mode_from_the_command_line(tmp_path):
    from trl import TrlParser

    (args,) = TrlParser((adapter.GRPOConfig,)).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--kl_mode", "k1-rtg-loss", "--beta", "0.1", "--use_cpu", "true"])
    assert (args.kl_mode, args.beta) == ("k1-rtg-loss", 0.1)


def test_trl_parser_rejects_an_unknown_mode_on_the_command_line(tmp_path, capsys):
    from trl import TrlParser

    with pytest.raises(SystemExit):
        TrlParser((adapter.GRPOConfig,)).parse_args_and_config(["--output_dir", str(tmp_path), "--kl_mode", "k2"])
    assert "invalid choice" in capsys.readouterr().err


def test_trl_parser_reads_kl_mode_from_a_yaml_config(tmp_path):
    from trl import TrlParser

    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "beta": 0.04, "kl_mode": "library",
                                    "use_cpu": True, "model_name_or_path": "ignored", "kl_truncation": 10.0,
                                    "kl_rtg_baseline": "sequence-loo"}))
    args, remaining = TrlParser((adapter.GRPOConfig,)).parse_args_and_config(
        ["--config", str(path)], return_remaining_strings=True)
    assert args.kl_mode == "library" and args.beta == 0.04
    assert (args.kl_truncation, args.kl_rtg_baseline) == (10.0, "sequence-loo")
    assert "--model_name_or_path" in remaining


def test_yaml_with_an_unknown_mode_fails_in_validation(tmp_path):
    from trl import TrlParser

    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "kl_mode": "k3-in-loss", "use_cpu": True}))
    with pytest.raises(KLModeError, match="k3-in-loss"):
        TrlParser((adapter.GRPOConfig,)).parse_args_and_config(["--config", str(path)])


def test_hf_argument_parser_help_lists_the_modes(tmp_path):
    from transformers import HfArgumentParser

    help_text = HfArgumentParser((adapter.GRPOConfig,)).format_help()
    assert "--kl_mode" in help_text and all(mode in help_text for mode in MODES)


def test_supported_range_is_declared_once():
    from kl_patches.integrations.trl import kl

    assert adapter.SUPPORTED == kl.SUPPORTED
    from packaging.specifiers import SpecifierSet
    import trl

    from kl_patches.patching import version_supported

    assert version_supported(trl.__version__, adapter.SUPPORTED)
    assert adapter.SUPPORTED == " || ".join(adapter.SUPPORTED_LINES)  # the notation every adapter uses
    import importlib.metadata

    from packaging.requirements import Requirement

    requirements = [Requirement(r) for r in importlib.metadata.requires("kl-patches")]
    extra = [r for r in requirements if r.name == "trl" and r.marker and r.marker.evaluate({"extra": "trl"})]
    assert len(extra) == 1 and extra[0].specifier == SpecifierSet(adapter.EXTRA)  # pip's [trl] extra agrees


#: Every TRL release on PyPI from 0.18 (the oldest Unsloth or LLaMA-Factory allow) to the newest.
RELEASES = ("0.18.0 0.18.1 0.18.2 0.19.0 0.19.1 0.20.0 0.21.0 0.22.0 0.22.1 0.22.2 0.23.0 0.23.1 0.24.0 0.25.0 0.25.1 "
            "0.26.0 0.26.1 0.26.2 0.27.0 0.27.1 0.27.2 0.28.0 0.29.0 0.29.1 1.0.0 1.1.0 1.2.0 1.3.0 1.4.0 1.5.0 1.5.1 "
            "1.6.0 1.7.0 1.7.1 1.8.0 1.9.0 1.9.1 1.9.2 1.10.0 1.11.0 1.12.0 1.13.0 1.14.0 1.14.1 1.14.2 1.15.0 "
            "1.16.0 1.17.0 2.0.0").split()


def test_the_single_specifier_is_exactly_the_union_of_the_verified_lines():
    """pip's [trl] extra (one PEP 440 specifier) admits exactly the releases of SUPPORTED_LINES; every other release
    is refused by name with the closest supported version."""
    from packaging.specifiers import SpecifierSet

    from kl_patches.integrations.trl import compat
    from kl_patches.patching import PatchError

    from kl_patches.patching import version_supported

    union = SpecifierSet(adapter.EXTRA)
    for release in RELEASES:
        in_a_line = any(release in SpecifierSet(line) for line in adapter.SUPPORTED_LINES)
        assert (release in union) == in_a_line == version_supported(release, adapter.SUPPORTED), release
        if in_a_line:
            assert compat.check_version(release) == release
        else:
            with pytest.raises(PatchError, match=rf"trl {release} is not supported.*closest supported version is "
                                                 rf"trl (0\.24\.0|1\.16\.0)"):
                compat.check_version(release)
    assert compat.closest_line("0.23.1").name == "0.24.0" and compat.closest_line("1.14.2").name == "1.16.0"
    assert [line.specifier for line in compat.LINES] == list(adapter.SUPPORTED_LINES)


def test_importing_the_adapter_imports_no_library():
    import subprocess
    import sys

    code = ("import sys, kl_patches.integrations.trl as a; "
            "print(any(m in sys.modules for m in ('trl', 'torch', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
