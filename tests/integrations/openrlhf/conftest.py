"""OpenRLHF adapter tests: they need OpenRLHF installed (ci/install-openrlhf.sh). On machines without flash_attn /
vLLM (CPU CI) the adapter's placeholders stand in for them, installed explicitly here (never for a real package)."""

from __future__ import annotations

import pytest

from kl_patches.integrations.openrlhf.placeholders import install_placeholders

install_placeholders()

import openrlhf.trainer.ppo_utils.experience_maker  # noqa: E402,F401  (import errors fail the session loudly)
import openrlhf.trainer.ray.ppo_actor  # noqa: E402,F401


@pytest.fixture(autouse=True)
def unpatched():
    """Every test starts and ends with OpenRLHF unpatched."""
    from kl_patches.integrations.openrlhf import disable

    disable()
    yield
    disable()


@pytest.fixture(scope="session")
def on_problem():
    from kl_patches.audit import PolicySpec, build_problem

    return build_problem(PolicySpec(), off_policy=False)


@pytest.fixture(scope="session")
def off_problem():
    from kl_patches.audit import PolicySpec, build_problem

    return build_problem(PolicySpec(), off_policy=True)
