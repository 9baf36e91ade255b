"""Everything that differs between the verl versions kl-patches supports, in one place.

verl 0.8.0 and 0.9.0-0.9.1 share every patched function (``ppo_loss``, ``apply_kl_penalty``,
``compute_advantage``, ``compute_advantage_for_multi_trajectories``, ``kl_penalty``, ``validate_config``:
identical source) and the engine path around them (``engine_workers``, ``prepare_micro_batches``,
``global_batch_info``, ``rollout_log_probs``). What differs:

* where the agent-session trainer defines ``compute_advantage_for_multi_trajectories``: 0.8's
  ``verl.trainer.main_ppo_sync``, 0.9's V1 trainer ``verl.trainer.ppo.v1.utils`` (:data:`VERSION_MODULES`);
* how verl loads kl-patches in its processes: 0.9 imports every ``verl.plugins`` entry point on ``import verl``;
  0.8 has no entry-point discovery and imports the modules named in ``VERL_USE_EXTERNAL_MODULES`` instead
  (:data:`PLUGIN_ENV`);
* 0.8 has no ``loss_agg_mode=token-sum`` and no ``dro`` policy loss (verl's own configuration refuses them).

verl up to 0.7 computes the in-loss KL inline in ``workers/actor/dp_actor.py::DataParallelPPOActor.update_policy``
(its default worker): patching it would mean replacing that whole method, so those versions are refused by name.

The supported set is a union of release lines, which one PEP 440 specifier set cannot express (no "or"):
:data:`SUPPORTED_RANGES` holds one specifier set per line, joined with " || " into :data:`SUPPORTED` (the core's
notation, :func:`kl_patches.patching.version_supported`); :func:`is_supported` / :func:`check_version` test the
union, and pyproject's ``verl`` extra pins their hull (``>=0.8.0,<0.9.2``: no verl release lies between 0.8.0
and 0.9.0); any other version in the hull is refused at run time, by name.
"""

from __future__ import annotations

import contextlib
import functools

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from kl_patches import patching

LIBRARY = "verl"

#: one PEP 440 specifier set per supported release line; each is proven by a nox session
#: (``verl-0.8`` installs 0.8.0, ``verl`` installs 0.9.1; 0.9.0 has the same code in every patched function)
SUPPORTED_RANGES: tuple[str, ...] = (">=0.8.0,<0.8.1", ">=0.9.0,<0.9.2")
#: the union, in the notation every adapter uses (kl_patches.patching.version_supported), as messages and
#: ``kl-patches status`` print it
SUPPORTED = " || ".join(SUPPORTED_RANGES)
#: the releases CI installs: what a refusal offers as the closest supported version
RELEASES: tuple[str, ...] = ("0.8.0", "0.9.1")
#: the pip requirement of the ``verl`` extra (the hull of SUPPORTED_RANGES)
EXTRA = ">=0.8.0,<0.9.2"

#: target modules that exist in some versions only: a version outside the set has no such module
VERSION_MODULES: dict[str, str] = {
    "verl.trainer.ppo.v1.utils": ">=0.9",
    "verl.trainer.main_ppo_sync": "<0.9",
}

#: verl's loss_agg_mode values per release line (``ActorConfig.__post_init__`` refuses the others); 0.8 has no token-sum
LOSS_AGG_MODES: dict[str, tuple[str, ...]] = {
    "0.8": ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"),
    "0.9": ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean"),
}

#: the environment variable through which verl < 0.9 imports kl-patches in every process (verl's own
#: ``VERL_USE_EXTERNAL_MODULES``, read on ``import verl``), and its value
PLUGIN_ENV = "VERL_USE_EXTERNAL_MODULES"
PLUGIN_MODULE = "kl_patches.integrations.verl.plugin"

#: why a version below the supported lines is refused (shown in the PatchError)
OLD_VERSIONS = ("<0.8", "verl up to 0.7 computes the in-loss KL inline in workers/actor/dp_actor.py::"
                "DataParallelPPOActor.update_policy (its default legacy worker), which kl-patches does not patch")


def is_supported(version: str) -> bool:
    return patching.version_supported(version, SUPPORTED)


def closest_supported(version: str) -> str:
    """The verified release nearest ``version``: the same release line when there is one, else the next newer,
    else the newest."""
    v = Version(version)
    releases = [Version(r) for r in RELEASES]
    same_line = [r for r in releases if r.release[:2] == v.release[:2]]
    if same_line:
        return str(min(same_line, key=lambda r: abs(r.micro - v.micro)))
    newer = [r for r in releases if r > v]
    return str(min(newer) if newer else max(releases))


def check_version(version: str | None = None) -> str:
    """The installed verl version; PatchError naming it and the closest supported release when it is outside
    :data:`SUPPORTED` (or verl is not installed)."""
    version = version if version is not None else patching.installed_version(LIBRARY)
    if version is None:
        raise patching.PatchError(f"verl is not installed; kl-patches supports verl {SUPPORTED}: "
                                  f"pip install 'kl-patches[verl]'")
    if is_supported(version):
        return version
    closest = closest_supported(version)
    why = f" {OLD_VERSIONS[1]}." if Version(version) in SpecifierSet(OLD_VERSIONS[0]) else ""
    raise patching.PatchError(
        f"verl {version} is not supported by kl-patches (supported: verl {SUPPORTED}); the closest supported "
        f"version is verl {closest} (pip install 'verl=={closest}').{why} Refusing to patch rather than risk "
        f"verl's biased KL path; verl's own KL values (kl-patches mode 'library') keep working unpatched"
    )


def has_module(module: str, version: str) -> bool:
    """Whether ``module`` (a target module) exists in verl ``version``."""
    spec = VERSION_MODULES.get(module)
    if spec is None:
        return True
    try:
        return Version(version) in SpecifierSet(spec, prereleases=True)
    except InvalidVersion:  # verl not installed: every row (enable() refuses before patching anyway)
        return True


def line(version: str) -> str:
    """The release line ("0.8", "0.9") of a version."""
    return ".".join(str(part) for part in Version(version).release[:2])


@functools.lru_cache(maxsize=None)
def loss_agg_modes() -> tuple[str, ...]:
    """The loss_agg_mode values the installed verl accepts, token-mean (its default) first: asked of verl's own
    ``ActorConfig`` (:data:`LOSS_AGG_MODES` records the answer per release line; a test compares them)."""
    from verl.workers.config import ActorConfig

    accepted = []
    for mode in LOSS_AGG_MODES["0.9"]:
        try:
            ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=mode)
        except ValueError:
            continue
        accepted.append(mode)
    return tuple(accepted)


def loads_entry_points(version: str) -> bool:
    """verl 0.9 imports the ``verl.plugins`` entry points on ``import verl``; 0.8 only ``VERL_USE_EXTERNAL_MODULES``."""
    return Version(version) >= Version("0.9.0")


# ------------------------------------------------------------------ verl 0.8 on a machine without flash-attn

#: the note step records carry when :func:`flash_attn_placeholder` was in place
FLASH_ATTN_NOTE = ("placeholder module used for flash_attn: verl 0.8's unpad_input (left_right_2_no_padding) imports "
                   "flash_attn.bert_padding, a CUDA-only package absent here; the step ran with pure-torch "
                   "equivalents of its unpad_input / pad_input / index_first_axis (verl 0.9's own CPU fallbacks)")


def needs_flash_attn_placeholder() -> bool:
    """verl < 0.9 has no CPU fallback for flash_attn.bert_padding; True when it would be needed and is missing."""
    import importlib.util

    import verl.utils.attention_utils as attention_utils

    if hasattr(attention_utils, "_fallback_unpad_input"):  # verl 0.9 falls back by itself
        return False
    try:
        return importlib.util.find_spec("flash_attn") is None
    except ValueError:  # a flash_attn entry without a spec in sys.modules (e.g. another placeholder)
        return False


@contextlib.contextmanager
def flash_attn_placeholder():
    """While the step audit runs verl 0.8's padding code on a CPU machine: a ``flash_attn.bert_padding`` module of
    pure-torch equivalents in ``sys.modules`` (only when the real package is absent), removed afterwards so no
    other code mistakes it for flash-attn. Yields whether it was used."""
    if not needs_flash_attn_placeholder():
        yield False
        return
    import sys
    import types

    import torch
    import torch.nn.functional as F

    def index_first_axis(tensor, indices):
        return tensor[indices]

    def pad_input(hidden_states, indices, batch, seqlen):
        output = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
        output[indices] = hidden_states
        return output.view(batch, seqlen, *hidden_states.shape[1:])

    def unpad_input(hidden_states, attention_mask, unused_mask=None):
        masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
        seqlens = masks.sum(dim=-1, dtype=torch.int32)
        used = attention_mask.sum(dim=-1, dtype=torch.int32)
        indices = torch.nonzero(masks.flatten(), as_tuple=False).flatten()
        cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
        flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
        return index_first_axis(flat, indices), indices, cu_seqlens, seqlens.max().item(), used

    def rearrange(*args, **kwargs):
        raise NotImplementedError("kl-patches' flash_attn placeholder has no rearrange (the step audit needs none)")

    package = types.ModuleType("flash_attn")
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.index_first_axis, padding.pad_input, padding.unpad_input = index_first_axis, pad_input, unpad_input
    padding.rearrange = rearrange
    package.bert_padding = padding
    saved = {name: sys.modules.get(name) for name in ("flash_attn", "flash_attn.bert_padding")}
    sys.modules.update({"flash_attn": package, "flash_attn.bert_padding": padding})
    try:
        yield True
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
