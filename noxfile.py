"""Test sessions: the core alone (no RL library installed), then one virtual environment per library,
because their pins conflict (verl 0.9 needs transformers < 5.11, OpenRLHF 0.11 pins 5.15).

    python3 -m pip install nox && python3 -m nox        # everything, as CI runs it (.ci/run; the README's command)
    python3 -m nox -s core                              # one session
    python3 -m nox -s lint                              # ruff + mypy (first: fast)

Python 3.11 only: the package declares >= 3.10 (its sources compile on 3.10), but CI tests 3.11, the one
interpreter its torch wheels exist for. docs/testing.md says how to test elsewhere, and on GPU machines.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "core", "trl", "trl-0.24", "verl", "verl-0.8", "openrlhf", "openrlhf-0.9"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
# The torch version of the test environments, never a pin in the package itself. Which build (CPU, CUDA) pip
# installs is pip's choice; PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/<cpu|cu128> chooses it.
CONSTRAINTS = ("-c", "ci/constraints.txt")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (the whole tree but benchmarks/) and mypy (the core, kl_patches/); configured in pyproject.toml. No torch
    is installed: third-party imports are Any to mypy, so the session takes well under a minute."""
    session.install("ruff==0.17.6", "mypy==2.4.1")  # pinned: a new release may flag new things; bump on purpose
    session.run("ruff", "check", ".")
    session.run("mypy")


def install_torch(session: nox.Session) -> None:
    session.install(*CONSTRAINTS, "torch==2.13.0")


@nox.session(python=PYTHON)
def core(session: nox.Session) -> None:
    """The library-agnostic core, with none of trl / verl / openrlhf installed, and the benchmarks' quick modes."""
    install_torch(session)
    session.install(*CONSTRAINTS, ".[test]")
    session.run("python", "-c", "import importlib.util as u, sys; "
                "sys.exit(any(u.find_spec(m) for m in ('trl', 'verl', 'openrlhf')))")
    session.run("pytest", "tests/core", "tests/benchmarks", *session.posargs)


def library_session(session: nox.Session, library: str, *install_args: str) -> None:
    install_torch(session)
    # Each library's install recipe lives in ci/install-<library>.sh (CPU-only workarounds included); install_args
    # choose the release for the sessions of older release lines (trl-0.24, verl-0.8, openrlhf-0.9).
    session.run("bash", f"ci/install-{library}.sh", *install_args, external=True)
    session.install(*CONSTRAINTS, ".[test]")
    session.run("pytest", f"tests/integrations/{library}", *session.posargs)


@nox.session(python=PYTHON)
def trl(session: nox.Session) -> None:
    library_session(session, "trl")


@nox.session(python=PYTHON, name="trl-0.24")
def trl_0_24(session: nox.Session) -> None:
    """TRL 0.24.0, the newest release Unsloth and LLaMA-Factory allow (trl<=0.24.0): the same tests."""
    library_session(session, "trl", "0.24.0")


@nox.session(python=PYTHON)
def verl(session: nox.Session) -> None:
    library_session(session, "verl")


@nox.session(python=PYTHON, name="verl-0.8")
def verl_0_8(session: nox.Session) -> None:
    """The same tests against verl 0.8.0 (pinned by rLLM and agent-lightning)."""
    library_session(session, "verl", "0.8.0")


@nox.session(python=PYTHON)
def openrlhf(session: nox.Session) -> None:
    library_session(session, "openrlhf")


@nox.session(python=PYTHON, name="openrlhf-0.9")
def openrlhf_0_9(session: nox.Session) -> None:
    """OpenRLHF 0.9.3 (flat flags, 0.9's training_step): the same tests, run against that release."""
    library_session(session, "openrlhf", "0.9.3")
