"""The command line, the JSON schema, import hygiene and the KL_PATCHES_MODE autoloader, in subprocesses."""

import json
import os
import subprocess
import sys

import pytest

RECORD_KEYS = {"library", "library_version", "configuration", "mode", "estimator", "placement", "policy",
               "rel_err", "cosine", "norm_ratio", "verdict", "reason", "spec", "fix"}


# Outside the repository: `python -c` puts the working directory first on sys.path, and the source tree's
# kl_patches/ lacks the integrations/ that the installed package maps into it.
OUTSIDE = os.path.dirname(sys.executable)


def run(*args, env=None, check=False):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=check,
                          env={**os.environ, **(env or {})}, cwd=OUTSIDE)


def test_check_core_json_records():
    result = run("-m", "kl_patches", "check", "--library", "core", "--json", "--seed", "4", "--horizon", "2")
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert records and all(RECORD_KEYS <= set(r) for r in records)
    assert {r["policy"] for r in records} == {"on", "off"}
    assert all(r["library"] == "core" and r["spec"]["seed"] == 4 and r["spec"]["horizon"] == 2 for r in records)
    verdicts = {(r["configuration"], r["policy"]): r["verdict"] for r in records}
    assert verdicts[("k1-rtg-loss (kl-patches)", "off")] == "exact"
    assert verdicts[("k3 in loss (GRPO default)", "on")] == "biased"
    assert all(r["verdict"] in ("exact", "biased") for r in records)


def test_check_table_and_console_script():
    exe = os.path.join(os.path.dirname(sys.executable), "kl-patches")
    result = subprocess.run([exe, "check", "--library", "core"], capture_output=True, text=True, cwd=OUTSIDE)
    assert result.returncode == 0, result.stderr
    assert "k1-rtg-loss (kl-patches)" in result.stdout and "exact" in result.stdout and "biased" in result.stdout
    assert "cells audited" in result.stdout


def test_modes_command():
    result = run("-m", "kl_patches", "modes", "--json")
    assert [m["mode"] for m in json.loads(result.stdout)] == ["library", "k1-in-reward", "k1-rtg-loss"]


@pytest.mark.parametrize("args, message", [
    (["check", "--vocab", "1"], "vocab must be >= 2"),
    (["check", "--library", "core", "--config", "x.yaml"], "need --library trl, verl or openrlhf"),
    (["check", "--distance", "0"], "distance must be > 0"),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    result = run("-m", "kl_patches", *args)
    assert result.returncode == 2 and message in result.stderr


def test_missing_library_exits_2_and_says_how_to_install():
    missing = [lib for lib in ("trl", "verl", "openrlhf") if run("-c", f"import {lib}").returncode != 0]
    if not missing:
        pytest.skip("every library is installed in this environment")
    result = run("-m", "kl_patches", "check", "--library", missing[0])
    assert result.returncode == 2 and f"kl-patches[{missing[0]}]" in result.stdout


def test_import_is_cheap_and_library_free():
    code = ("import sys, kl_patches, kl_patches.modes, kl_patches.patching, kl_patches.integrations; "
            "bad = [m for m in ('torch', 'trl', 'verl', 'openrlhf', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    result = run("-c", code)
    assert result.returncode == 0, result.stdout + result.stderr
    heavy = run("-c", "import sys, kl_patches; kl_patches.kl_rtg_loss; import kl_patches.audit.reference; "
                      "sys.exit(any(m in sys.modules for m in ('trl', 'verl', 'openrlhf')))")
    assert heavy.returncode == 0, heavy.stderr


def test_autoload_pth_is_inert_without_the_variable_and_strict_with_it():
    probe = "import sys; print('kl_patches._autoload' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "KL_PATCHES_MODE"}
    off = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=OUTSIDE)
    assert off.stdout.strip() == "False"
    on = run("-c", probe, env={"KL_PATCHES_MODE": "k1-rtg-loss"})
    assert on.stdout.strip() == "True"
    bad = run("-c", probe, env={"KL_PATCHES_MODE": "k4"})
    assert "unknown KL mode 'k4'" in bad.stderr and bad.returncode == 0  # start-up itself goes on ...
    # ... but the libraries it would patch refuse to import (stand-in module names: the core session has none).
    refuse = ("import sys, types, wrapt\n"
              "module = types.ModuleType('trl'); sys.modules['trl'] = module\n"
              "try:\n    wrapt.notify_module_loaded(module)\nexcept Exception as e:\n    print('refused:', e)\n")
    refused = run("-c", refuse, env={"KL_PATCHES_MODE": "k4"})
    assert "refused: " in refused.stdout and "unknown KL mode 'k4'" in refused.stdout
