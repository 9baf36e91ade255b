"""What differs between the TRL lines kl-patches supports, in one table; everything else is shared.

Each :class:`Line` is one range of TRL releases whose ``GRPOTrainer`` kl-patches was verified on (its tests and
the exact step audit run in CI against exactly that line: the ``trl`` and ``trl-0.24`` nox sessions). The
differences kl-patches has to know about are few, and all of them are read here:

* which ``loss_type`` values exist, and how ``_compute_loss`` normalises them (``dapo``: 0.24 divides by the
  generation batch's token count; 1.15+ rescales it to one accumulation window; 0.24 divides ``grpo``/``bnpo``/
  ``dr_grpo`` by the accumulation steps in eval too);
* whether TRL's own k3 is multiplied by the token ratio (``use_bias_correction_kl``, 1.x only; 0.24 is plain k3);
* what ``_get_per_token_logps_and_entropies`` accepts and returns (0.24: ``(logps, entropies)``, a fixed set of
  multimodal keywords; 1.15+: a third value and more keywords);
* where vLLM's per-token sampling log-probs are: 1.15+ keeps them in the batch (``sampling_per_token_logps``);
  0.24 keeps only the clamped ratio, so kl-patches captures them from ``_generate`` while TRL scores the batch;
* what ``_generate_single_turn`` returns (the audit's generation stand-in answers in the line's own shape).

Importing this module imports neither TRL nor torch.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from kl_patches.integrations.trl import SUPPORTED, SUPPORTED_LINES
from kl_patches import patching
from kl_patches.patching import PatchError

LIBRARY = "trl"


@dataclass(frozen=True)
class Line:
    name: str  # the release CI installs for this line
    specifier: str  # the releases this line covers (a member of SUPPORTED_LINES)
    loss_types: tuple[str, ...]
    bias_correction_kl: bool  # TRL has use_bias_correction_kl (k3 x token ratio, default True)
    dapo_window: bool  # dapo's normaliser is rescaled to one accumulation window (x steps / steps_per_generation)
    eval_divides_by_accumulation: bool  # grpo/bnpo/dr_grpo divide by the accumulation steps in eval too
    logps_values: int  # values _get_per_token_logps_and_entropies returns
    sampling_logps_in_batch: bool  # vLLM's sampling log-probs are in the generation batch
    generate_returns: str  # what _generate_single_turn returns: "completions" or "prompt-completions"
    fused_logps: bool  # log-probs through TRL's fused LM-head kernel (1.15 needs Triton for it; 1.16 has a CPU path)


LINES = (
    Line("0.24.0", SUPPORTED_LINES[0], loss_types=("grpo", "bnpo", "dr_grpo", "dapo"), bias_correction_kl=False,
         dapo_window=False, eval_divides_by_accumulation=True, logps_values=2, sampling_logps_in_batch=False,
         generate_returns="prompt-completions", fused_logps=False),
    Line("1.16.0", SUPPORTED_LINES[1], loss_types=("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo",
                                                   "luspo"),
         bias_correction_kl=True, dapo_window=True, eval_divides_by_accumulation=False, logps_values=3,
         sampling_logps_in_batch=True, generate_returns="completions", fused_logps=True),
)


def installed_loss_types(*candidates: str) -> tuple[str, ...]:
    """``candidates`` that the installed TRL line has (tests parametrise over the installed version with it)."""
    return tuple(loss_type for loss_type in candidates if loss_type in current().loss_types)


def _key(version: Version) -> tuple[int, int, int]:
    release = (*version.release, 0, 0)
    return release[0], release[1], release[2]


def line_of(version: str) -> Line | None:
    parsed = Version(version)
    for line in LINES:
        if parsed in SpecifierSet(line.specifier, prereleases=True):
            return line
    return None


def closest_line(version: str) -> Line:
    """The supported line nearest to ``version`` (by release number), for the refusal message."""
    target = _key(Version(version))

    def distance(line: Line) -> tuple:
        lowest = _key(Version(line.name))
        return tuple(abs(a - b) for a, b in zip(target, lowest))

    return min(LINES, key=distance)


def check_version(version: str | None) -> str:
    """``version`` when one of :data:`LINES` covers it; else PatchError naming it and the closest supported one."""
    if version is None:
        raise PatchError(f"trl is not installed; kl-patches supports trl {SUPPORTED} "
                         f"(verified: {', '.join(line.name for line in LINES)})")
    if line_of(version) is None or not patching.version_supported(version, SUPPORTED):
        closest = closest_line(version)
        raise PatchError(
            f"trl {version} is not supported by kl-patches (supported: trl {SUPPORTED}); the closest supported "
            f"version is trl {closest.name} (pip install 'trl=={closest.name}'). Refusing to patch rather than risk "
            f"the library's biased KL path")
    return version


def require() -> str:
    """The installed TRL's version; PatchError (naming it and the closest supported one) outside every line."""
    return check_version(patching.installed_version(LIBRARY))


@functools.lru_cache(maxsize=None)
def _current(version: str) -> Line:
    return line_of(check_version(version))


def current() -> Line:
    """The line of the installed TRL, read at every call site that differs between lines (cached per version)."""
    from kl_patches.integrations.trl import kl

    return _current(kl.trl_version())


@functools.lru_cache(maxsize=None)
def logps_parameters(cls) -> frozenset[str] | None:
    """The keyword arguments ``cls._get_per_token_logps_and_entropies`` accepts (None: any)."""
    try:
        signature = inspect.signature(cls._get_per_token_logps_and_entropies)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return frozenset(signature.parameters)


def accepted(trainer, kwargs: dict) -> dict:
    """``kwargs`` reduced to what this TRL's ``_get_per_token_logps_and_entropies`` accepts; a key it does not
    accept must be None (else the forward would silently drop an input)."""
    names = logps_parameters(type(trainer))
    if names is None:
        return kwargs
    dropped = [key for key, value in kwargs.items() if key not in names and value is not None]
    if dropped:
        raise PatchError(f"trl {patching.installed_version(LIBRARY)}: _get_per_token_logps_and_entropies takes no "
                         f"{', '.join(dropped)}; kl-patches cannot recompute these log-probs")
    return {key: value for key, value in kwargs.items() if key in names}
