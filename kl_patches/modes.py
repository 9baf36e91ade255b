"""The one vocabulary of KL modes shared by every adapter, the CLI and the environment variable."""

from __future__ import annotations

import os
from typing import Mapping

ENV_VAR = "KL_PATCHES_MODE"

LIBRARY = "library"
K1_IN_REWARD = "k1-in-reward"
K1_RTG_LOSS = "k1-rtg-loss"

#: ``library`` leaves the library alone; the other two give the exact gradient of beta * KL(pi || pi_ref)
#: over whole responses.
MODES = (LIBRARY, K1_IN_REWARD, K1_RTG_LOSS)

DESCRIPTIONS = {
    LIBRARY: "the library's own KL handling, unchanged",
    K1_IN_REWARD: "sequence-level k1 folded into the advantage with a leave-one-out baseline "
    "(exact on-policy; never divided by a reward std)",
    K1_RTG_LOSS: "loss-side surrogate sum_t log pi_t * sg(sum_{t'>=t} rho_{1:t'} l_t' - rho_{1:t} b) "
    "(exact on- and off-policy with per-decision importance weights)",
}


class KLModeError(ValueError):
    """An unknown KL mode or an incompatible combination of flags."""


def validate_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode not in MODES:
        raise KLModeError(f"unknown KL mode {mode!r}; choose one of: {', '.join(MODES)}")
    return mode


def mode_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The mode named by ``KL_PATCHES_MODE``, None when unset or empty; an unknown value raises."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not value:
        return None
    try:
        return validate_mode(value)
    except KLModeError as err:
        raise KLModeError(f"{ENV_VAR}={value!r}: {err}") from None
