"""Unsloth (``unsloth`` / ``unsloth_zoo``): audited, not patched.

On a GPU, Unsloth replaces TRL's ``GRPOTrainer`` with a generated ``UnslothGRPOTrainer`` whose loss is
``unsloth_zoo.rl_replacements.grpo_compute_loss`` (k3 in the loss), inlined into generated code that a patch of
TRL's ``_compute_loss`` never reaches. kl-patches therefore refuses its modes wherever Unsloth is importable or
imported (:func:`kl_patches.integrations.trl.config.unsloth_presence`), and ``kl-patches check --library unsloth``
audits Unsloth's own loss function with the exact engine (:mod:`.audit`).

Importing this module imports neither Unsloth nor torch.
"""

from __future__ import annotations

#: The Unsloth releases whose loss function the audit was run on (unsloth_zoo's version).
AUDITED = "2026.10.9"

__all__ = ["AUDITED"]
