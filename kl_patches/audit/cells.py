"""What every adapter's audit table shares: the group size of its cells and the :class:`Cell` base.

A *cell* is one configuration a ``kl-patches check`` table audits: its name as the user writes it, the library
settings that produce it, and what each regime should give (the reason and the fix, on- and off-policy).
Adapters subclass :class:`Cell` with their own settings (flags, hydra overrides, a trainer config) and keep the
audit loop; the core supplies the name and how the on/off-policy texts are read.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Responses per prompt in every library's formula cells: group-coupled estimators (GRPO, RLOO, leave-one-out
#: baselines, batch whitening) need at least 2, and groups of 2 keep exact enumeration cheap (225 ordered groups
#: for the default spec; TRL needs num_generations >= 2).
GROUP_SIZE = 2


@dataclass(frozen=True)
class Cell:
    """One audited configuration. Subclasses add the library's settings and, as fields, ``reason_on`` /
    ``reason_off`` and either ``fix`` (both regimes) or ``fix_on`` / ``fix_off``."""

    configuration: str  # as the user writes it (flags, overrides, a config name)

    def reason(self, on_policy: bool) -> str:
        """The cell's reason in the regime (on- or off-policy)."""
        return str(getattr(self, "reason_on" if on_policy else "reason_off", ""))

    def fix_for(self, on_policy: bool) -> str | None:
        """The cell's fix in the regime: ``fix_on`` / ``fix_off`` when the subclass splits it, else ``fix``."""
        name = "fix_on" if on_policy else "fix_off"
        fix = getattr(self, name) if hasattr(self, name) else getattr(self, "fix", None)
        return None if fix is None else str(fix)
