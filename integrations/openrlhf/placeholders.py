"""Placeholder ``flash_attn`` and ``vllm`` modules for machines that cannot install them (CPU-only CI).

OpenRLHF imports both at module level (``openrlhf.models.ring_attn_utils``, ``openrlhf.trainer.ray.vllm_engine``)
although its KL code never calls them. :func:`install_placeholders` registers, for each one that is *not*
installed, a module whose names raise :class:`PlaceholderCalled` when used, so the real KL code paths import and
run. It is never called implicitly (importing kl-patches does not do it), it never shadows a real installation,
and every audit record made with a placeholder says so in its notes.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

#: module -> names OpenRLHF imports from it at module level (0.9 - 0.11). Parents come before children.
PLACEHOLDER_MODULES: dict[str, dict[str, tuple[str, ...]]] = {
    "flash_attn": {
        "flash_attn": (),
        "flash_attn.bert_padding": ("index_first_axis", "pad_input", "rearrange", "unpad_input"),
        "flash_attn.utils": (),
        "flash_attn.utils.distributed": ("all_gather",),
    },
    "vllm": {
        "vllm": ("LLM", "SamplingParams"),
        "vllm.inputs": ("TokensPrompt",),
        "vllm.utils": ("random_uuid",),
    },
}

MARKER = "__kl_patches_placeholder__"


class PlaceholderCalled(RuntimeError):
    """A placeholder stood in for a package that is not installed, and the code tried to use it."""


def _placeholder(module: str, name: str):
    def placeholder(*_args, **_kwargs):
        raise PlaceholderCalled(
            f"{module}.{name} is a kl-patches placeholder: {module.split('.')[0]} is not installed on this machine "
            f"(install_placeholders() only lets OpenRLHF's KL code import; nothing else of it can run)"
        )

    placeholder.__name__ = placeholder.__qualname__ = name
    placeholder.__module__ = module
    return placeholder


def _module(name: str, names: tuple[str, ...], package: bool) -> types.ModuleType:
    spec = importlib.machinery.ModuleSpec(name, loader=None, is_package=package)
    module = importlib.util.module_from_spec(spec)
    if package:
        module.__path__ = []  # a package with no submodules on disk: `import flash_attn.ops...` fails normally
    module.__version__ = "0+kl-patches-placeholder"
    setattr(module, MARKER, True)
    for attribute in names:
        setattr(module, attribute, _placeholder(name, attribute))
    return module


def is_placeholder(name: str) -> bool:
    return bool(getattr(sys.modules.get(name), MARKER, False))


def active_placeholders() -> list[str]:
    """The top-level packages currently replaced by placeholders in this process."""
    return [top for top in PLACEHOLDER_MODULES if is_placeholder(top)]


def install_placeholders() -> list[str]:
    """Register placeholders for each of ``flash_attn`` / ``vllm`` that is not installed; returns the names now
    replaced by placeholders (empty on a machine that has the real packages: those are never touched)."""
    for top, modules in PLACEHOLDER_MODULES.items():
        if is_placeholder(top) or importlib.util.find_spec(top) is not None:
            continue
        children = {name for name in modules for other in modules if other.startswith(name + ".")}
        created = {name: _module(name, names, package=name in children) for name, names in modules.items()}
        for name, module in created.items():
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(created[parent], child, module)
            sys.modules[name] = module
    return active_placeholders()


def remove_placeholders() -> list[str]:
    """Unregister every placeholder module (tests); returns the top-level names removed."""
    removed = active_placeholders()
    for top in removed:
        for name in PLACEHOLDER_MODULES[top]:
            if getattr(sys.modules.get(name), MARKER, False):
                del sys.modules[name]
    return removed


def placeholder_notes() -> list[str]:
    """One audit-record note per placeholder in use."""
    return [
        f"placeholder module used for {top} (not installed here; its names raise if called, "
        f"and OpenRLHF's KL code calls none of them)"
        for top in active_placeholders()
    ]
