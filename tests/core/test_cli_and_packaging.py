"""The command line, the JSON schema, import hygiene and the KL_PATCHES_MODE autoloader, in subprocesses."""

import json
import os
import subprocess
import sys
import textwrap

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
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"kl-patches: error: {missing[0]} is not installed: "
                                     f"pip install 'kl-patches[{missing[0]}]'")


@pytest.mark.parametrize("library", ["trl", "verl"])
def test_missing_config_file_is_reported_before_any_library_is_imported(library, tmp_path):
    """Importing TRL takes seconds: a typo in --config must not wait for it (nor need the library installed)."""
    code = ("import sys\nfrom kl_patches.cli import main\ncode = main(sys.argv[1:])\n"
            "print(sorted(m for m in ('trl', 'verl', 'openrlhf', 'torch') if m in sys.modules))\nsys.exit(code)")
    missing = str(tmp_path / "nope.yaml")
    result = run("-c", code, "check", "--library", library, "--config", missing)
    assert result.returncode == 2
    assert f"kl-patches: error: --config {missing}: no such file" in result.stderr
    assert result.stdout.strip() == "[]"


def test_help_is_plain_text_and_documents_the_arguments_after_dashes():
    top = run("-m", "kl_patches", "--help")
    sub = run("-m", "kl_patches", "check", "--help")
    assert top.returncode == 0 and sub.returncode == 0
    for text in (top.stdout, sub.stdout):
        assert "``" not in text and ":func:" not in text and ":class:" not in text
    assert "kl-patches check" in top.stdout and "exit status" in top.stdout
    flat = " ".join(sub.stdout.split())
    assert "hydra overrides for verl" in flat and "train_ppo_ray arguments for OpenRLHF" in flat


# A stand-in library that talks on stdout when imported, the way DeepSpeed announces its accelerator, in every way
# a library can: Python print, a write to file descriptor 1, C stdio (buffered until exit), a child process.
NOISY_LIBRARY = textwrap.dedent("""
    import ctypes, os, subprocess, sys
    print("[WARNING] noisy: Setting accelerator to CPU")
    os.write(1, b"fd-level chatter\\n")
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).printf(b"C stdio chatter\\n")
    subprocess.run([sys.executable, "-c", "print('child process chatter')"], check=True)
""")

NOISY_DRIVER = textwrap.dedent("""
    import sys, types
    sys.path.insert(0, sys.argv[1])  # holds verl/__init__.py: a stand-in verl that talks when imported
    # Its adapter imports it, talks too, and audits the core reference set so the records are real ones.
    adapter = types.ModuleType("kl_patches.integrations.verl.audit")
    def audit(spec, config=None, args=()):
        import verl  # noqa: F401
        print("adapter chatter")
        from kl_patches.audit.reference import run_reference
        return run_reference(spec)
    adapter.audit = audit
    sys.modules[adapter.__name__] = adapter
    from kl_patches.cli import main
    sys.exit(main(["check", "--library", "verl", "--json", "--horizon", "2"]))
""")


def test_json_stdout_is_only_the_document_whatever_libraries_print(tmp_path):
    (tmp_path / "verl").mkdir()
    (tmp_path / "verl" / "__init__.py").write_text(NOISY_LIBRARY)
    result = run("-c", NOISY_DRIVER, str(tmp_path))
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)  # the whole of stdout, nothing before or after the document
    assert records and all(RECORD_KEYS <= set(r) for r in records)
    for chatter in ("Setting accelerator to CPU", "fd-level chatter", "child process chatter", "adapter chatter"):
        assert chatter in result.stderr and chatter not in result.stdout
    if sys.platform.startswith("linux"):
        assert "C stdio chatter" in result.stderr


def test_json_pipes_into_a_json_parser():
    """The README's promise, as a shell pipeline: `kl-patches check --json | <a JSON reader>`."""
    pipeline = (f"{sys.executable} -m kl_patches check --library core --json --horizon 2 | "
                f"{sys.executable} -c 'import json, sys; print(len(json.load(sys.stdin)))'")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True, cwd=OUTSIDE)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0


@pytest.mark.parametrize("args", [["check", "--library", "core", "--json"], ["check", "--library", "core"],
                                  ["modes"], ["--help"]])
def test_a_reader_that_leaves_early_is_not_an_error(args):
    """`kl-patches check --json | head`: the reader has gone before anything is written; exit 0, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        writer = subprocess.run([sys.executable, "-m", "kl_patches", *args], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, cwd=OUTSIDE, timeout=300)
    finally:
        os.close(write_end)
    assert writer.returncode == 0, writer.stderr
    assert writer.stderr == ""


def test_readme_test_command_is_what_ci_runs():
    """The README's Testing section and .ci/run state the same command (CI runs the README, literally)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    readme, ci = os.path.join(root, "README.md"), os.path.join(root, ".ci", "run")
    if not (os.path.isfile(readme) and os.path.isfile(ci)):
        pytest.skip("not a source checkout")
    command = "python3 -m pip install nox && python3 -m nox"
    text = open(readme).read()
    assert "## Testing" in text and command in text.split("## Testing", 1)[1]
    assert command in [line.strip() for line in open(ci)]


def test_status_reports_every_library_and_the_environment(monkeypatch, capsys):
    import json as _json

    from kl_patches.cli import main

    monkeypatch.setenv("KL_PATCHES_MODE", "k1-rtg-loss")
    assert main(["status", "--json"]) == 0
    rows = _json.loads(capsys.readouterr().out)
    assert [r["library"] for r in rows] == ["trl", "verl", "openrlhf"]
    assert all(r["environment"] == "k1-rtg-loss" and r["supported"] for r in rows)
    assert all(r["mode"] is None and r["targets"] == [] for r in rows if r["installed"] is None)
    assert main(["status"]) == 0
    assert "KL_PATCHES_MODE: k1-rtg-loss" in capsys.readouterr().out
