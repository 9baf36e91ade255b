"""Shared fixtures for the TRL adapter tests: single-threaded torch (the tensors are tiny), TRL's patch always
undone after a test, and helpers to build tiny real trainers."""

import warnings

import pytest
import torch

import kl_patches
from kl_patches.audit import PolicySpec

warnings.filterwarnings("ignore", message=".*TRLExperimentalWarning.*")


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with TRL unpatched."""
    kl_patches.disable("trl")
    yield
    kl_patches.disable("trl")


@pytest.fixture
def spec():
    return PolicySpec()


def count_t0(completions, completion_ids, **kwargs):
    """A rule-based task reward: the number of t0 tokens (non-zero advantages, so the policy-gradient part of the
    loss is exercised too)."""
    return [float(sum(1 for token in ids if token == 0)) for ids in completion_ids]


@pytest.fixture
def reward():
    return count_t0
