"""Exact audit of verl's KL code paths, through verl's own code on the installed version
(``kl-patches check --library verl``).

* ``harness.py``: verl's actor *step* (driver balancing, rank partition, mini- and micro-batches, the engine's
  normaliser, ppo_loss, accumulation) on an enumerated generation batch -- reused by check, tests, benchmarks;
* ``steps.py``: the kl-patches configurations through that step;
* ``cells.py``: verl's own KL values through verl's loss functions (what an unpatched configuration gives);
* ``user.py``: the user's configuration (``--config`` / hydra overrides).
"""

from __future__ import annotations

from typing import Sequence

from kl_patches.audit import AuditRecord, PolicySpec
from kl_patches.modes import LIBRARY
from kl_patches.patching import installed_version

from kl_patches.integrations.verl.audit.cells import *  # noqa: F401,F403  (the loss-level helpers, public names)
from kl_patches.integrations.verl.audit.cells import (
    KLSettings, ProblemContext, default_cells, ensure_patched, not_covered, run_cell,
)
from kl_patches.integrations.verl.audit.steps import audit_steps, check_step_cells, default_step_cells
from kl_patches.integrations.verl.audit.user import audit_user_config, load_user_config, verl_config_dir  # noqa: F401
from kl_patches.integrations.verl.config import LOSS_VALUE, REWARD_VALUE


def audit(spec: PolicySpec, *, config: str | None = None, args: Sequence[str] = ()) -> list[AuditRecord]:
    """verl's KL configurations through verl's own code (``kl-patches check --library verl``): every
    ``kl_loss_type``, the in-reward KL under each advantage estimator, each ``loss_agg_mode``, then the two
    kl-patches values; on- and off-policy (a stale mini-batch). With ``config`` (a verl YAML) and/or ``args``
    (hydra overrides), the user's configuration instead (``user_config=True``; ``fix`` = the overrides).

    On a verl version kl-patches does not support, verl's own cells are still audited and the kl-patches cells
    are ``not covered`` with the PatchError; a user configuration naming a kl-patches value raises it."""
    from kl_patches.patching import PatchError

    try:
        ensure_patched()
        refused = None
    except PatchError as error:
        refused = error
    version = installed_version("verl") or "unknown"
    if config is not None or args:
        if refused is not None and (any(value in " ".join(args) for value in (LOSS_VALUE, REWARD_VALUE))
                                    or (config is not None and _names_kl_patches_value(config))):
            raise refused
        return audit_user_config(spec, config, args, version)
    records = []
    cells = default_cells()
    for off_policy in (False, True):
        ctx = ProblemContext.build(spec, off_policy)
        for cell in cells:
            if refused is not None and cell.mode != LIBRARY:
                records.append(not_covered(cell, ctx, version, f"{refused}"))
            else:
                records.append(run_cell(cell, ctx, version))
    if refused is None:
        records += audit_steps(spec, version)
    return records


def _names_kl_patches_value(path: str) -> bool:
    with open(path) as handle:
        text = handle.read()
    return LOSS_VALUE in text or REWARD_VALUE in text
