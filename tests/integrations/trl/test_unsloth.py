"""Unsloth: never a silent k3. With Unsloth present a kl-patches mode stops with a message naming Unsloth (the
in-process cases are in test_guards.py); ``kl-patches check --library unsloth`` audits Unsloth's own loss where
Unsloth is installed (not in CI: its install needs --no-deps, docs/trl.md says what was verified and where)."""

import importlib.util
import os
import subprocess
import sys

import pytest

OUTSIDE = os.path.dirname(sys.executable)


def fake_unsloth(tmp_path):
    """An importable ``unsloth`` package that, like the real one, imports TRL's trainers when imported."""
    package = tmp_path / "unsloth"
    package.mkdir()
    (package / "__init__.py").write_text("import trl\nfrom trl import GRPOTrainer\n")
    return str(tmp_path)


def run(code, *, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "KL_PATCHES_MODE"}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=OUTSIDE)


@pytest.mark.parametrize("mode", ["k1-rtg-loss", "k1-in-reward"])
def test_kl_patches_mode_in_the_environment_stops_an_unsloth_process_naming_unsloth(tmp_path, mode):
    result = run("import unsloth\nprint('trained')", env_extra={"KL_PATCHES_MODE": mode,
                                                                 "PYTHONPATH": fake_unsloth(tmp_path)})
    assert result.returncode != 0 and "trained" not in result.stdout
    assert f"kl-patches mode '{mode}': unsloth is" in result.stderr
    assert "Unsloth replaces TRL's GRPOTrainer" in result.stderr and "kl_mode=library" in result.stderr


def test_library_mode_in_the_environment_lets_unsloth_run(tmp_path):
    result = run("import unsloth\nprint('trained')", env_extra={"KL_PATCHES_MODE": "library",
                                                                 "PYTHONPATH": fake_unsloth(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "trained"


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="Unsloth is installed here")
def test_check_library_unsloth_without_unsloth_says_how_to_get_it():
    exe = os.path.join(os.path.dirname(sys.executable), "kl-patches")
    result = subprocess.run([exe, "check", "--library", "unsloth"], capture_output=True, text=True, cwd=OUTSIDE)
    assert result.returncode == 2 and "unsloth is not installed: pip install unsloth" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="Unsloth not installed (not in CI)")
def test_check_library_unsloth_reports_its_k3_biased():  # pragma: no cover - run by hand next to Unsloth
    from kl_patches.integrations.unsloth.audit import audit

    records = audit()
    audited = [r for r in records if r.verdict != "not covered"]
    assert len(audited) == 12 and all(r.verdict == "biased" and r.rel_err > 1e-2 for r in audited)
    assert [r.verdict for r in records if r.mode != "library"] == ["not covered"]
