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


_CONFLICTS_SAID: set[tuple[str, str, str]] = set()


def resolve_mode(explicit: str | None, where: str, *, default: str | None = None,
                 environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """The one precedence rule of every adapter: an explicit configuration beats ``KL_PATCHES_MODE``, which beats
    ``default``. Returns ``(mode, origin)`` with origin ``where`` (e.g. "GRPOConfig.kl_mode"), ``KL_PATCHES_MODE``
    or "default". A conflict (both set, different) is said once per process, as a warning naming both."""
    import warnings

    from_env = mode_from_env(environ)
    if explicit is not None:
        explicit = validate_mode(explicit)
        if from_env is not None and from_env != explicit:
            key = (where, explicit, from_env)
            if key not in _CONFLICTS_SAID:
                _CONFLICTS_SAID.add(key)
                warnings.warn(f"{where}={explicit!r} overrides {ENV_VAR}={from_env!r} (an explicit configuration "
                              f"beats the environment)", UserWarning, stacklevel=2)
        return explicit, where
    if from_env is not None:
        return from_env, ENV_VAR
    return (validate_mode(default) if default is not None else None), "default"
