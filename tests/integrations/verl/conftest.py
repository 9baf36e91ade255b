"""Shared fixtures for the verl adapter's tests: verl's functions with the plugin's patches in place, and
small right-padded batches in verl's micro-batch layout."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("verl")


@pytest.fixture(scope="session", autouse=True)
def patched():
    """The plugin patched verl on ``import verl``; make sure (idempotent) and hand over the integration."""
    from kl_patches.integrations.verl import INTEGRATION
    from kl_patches.integrations.verl.audit import ensure_patched

    ensure_patched()
    assert INTEGRATION.enabled_mode() == "library"
    return INTEGRATION


def random_batch(seed: int = 0, lengths=(3, 5, 1, 4, 5, 2), group_size: int = 3, horizon: int = 5,
                 staleness: float = 0.3, dtype=torch.float64, requires_grad: bool = True):
    """An AuditBatch-like batch: right-padded responses of the given lengths, groups of ``group_size``,
    stale behaviour (old) log-probs; padded positions hold junk, as a padded tensor may."""
    from kl_patches.audit import AuditBatch

    generator = torch.Generator().manual_seed(seed)
    n = len(lengths)
    mask = torch.arange(horizon)[None, :] < torch.tensor(lengths)[:, None]
    logp = -torch.rand(n, horizon, generator=generator, dtype=dtype) * 3
    ref = logp.detach() + 0.5 * torch.randn(n, horizon, generator=generator, dtype=dtype)
    old = logp.detach() + staleness * torch.randn(n, horizon, generator=generator, dtype=dtype)
    junk = torch.full((n, horizon), 1e3, dtype=dtype)
    logp = torch.where(mask, logp, torch.zeros((), dtype=dtype)).requires_grad_(requires_grad)
    ref, old = torch.where(mask, ref, junk), torch.where(mask, old, -junk)
    tokens = torch.randint(0, 4, (n, horizon), generator=generator) * mask
    group_ids = torch.arange(n) // group_size
    return AuditBatch(tokens, mask, logp, ref, old, group_ids, torch.arange(n), group_size, False)


@pytest.fixture
def make_batch():
    """``random_batch`` (test modules are imported in importlib mode and cannot import this conftest)."""
    return random_batch
