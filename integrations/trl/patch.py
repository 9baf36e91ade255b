"""Kept for imports written before the adapter layout (issue 16): the targets live in :mod:`.patches`."""

from kl_patches.integrations.trl.patches import INTEGRATION, TRLIntegration  # noqa: F401
