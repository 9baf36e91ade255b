"""Reversible, idempotent, version-guarded patches: the one primitive every adapter uses.

Modelled on OpenTelemetry's ``BaseInstrumentor`` (instrument/uninstrument, version range from package
metadata) and wrapt (the original kept on ``__wrapped__``). A patch that cannot be applied raises
:class:`PatchError` naming the library, its installed version and what was expected: kl-patches never
falls back to a library's biased path without saying so.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import wrapt
from packaging.specifiers import SpecifierSet
from packaging.version import Version

#: Set on every replacement object; read from the owner's own ``__dict__`` so a subclass of a patched class
#: does not look patched itself.
MARKER = "__kl_patches__"


class PatchError(RuntimeError):
    """A correctness patch could not be applied (unsupported version, moved or renamed target)."""


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def specifier_union(supported: str) -> list[SpecifierSet]:
    """``supported`` as a list of specifier sets: ``" || "`` joins release lines a single PEP 440 specifier set cannot
    express together (e.g. ``"==0.9.3 || >=0.11.0,<0.12"``); a version is supported when one of them contains it."""
    return [SpecifierSet(part.strip(), prereleases=True) for part in supported.split("||")]


def version_supported(version: str, supported: str) -> bool:
    return any(Version(version) in member for member in specifier_union(supported))


def _bounds(member: SpecifierSet) -> list[Version]:
    return [Version(spec.version.replace(".*", "")) for spec in member
            if spec.operator in ("==", ">=", "<=", "~=", ">")]


def closest_supported(version: str, supported: str) -> str:
    """The member of ``supported`` nearest to ``version``: the fewest major, then minor, then micro releases away
    from one of its bounds; the newer member on a tie. Returned as its specifier string."""
    target = (Version(version).release + (0, 0, 0))[:3]
    members = [part.strip() for part in supported.split("||")]

    def key(index_part: tuple[int, str]) -> tuple:
        index, part = index_part
        bounds = _bounds(SpecifierSet(part, prereleases=True)) or [Version("0")]
        near = min(tuple(abs(a - b) for a, b in zip(target, (v.release + (0, 0, 0))[:3])) for v in bounds)
        newest = max(bounds)
        return (near[0], near[1] if near[0] == 0 else 0, -newest.release[0], -(newest.release + (0,))[1], near[2],
                -index)

    return min(enumerate(members), key=key)[1]


def require_version(library: str, supported: str, distribution: str | None = None) -> str:
    """The installed version of ``library``; PatchError when it is missing or outside ``supported`` (which may join
    release lines with ``||``: the error then names the closest one)."""
    version = installed_version(distribution or library)
    if version is None:
        raise PatchError(f"{library} is not installed; kl-patches supports {library}{supported}")
    if not version_supported(version, supported):
        closest = "" if "||" not in supported else \
            f"; the closest supported release is {library}{closest_supported(version, supported)}"
        raise PatchError(
            f"{library} {version} is not supported by kl-patches (supported: {library}{supported}{closest}); "
            f"refusing to patch rather than risk the library's biased KL path"
        )
    return version


def is_patched(owner: Any, attribute: str) -> bool:
    return bool(getattr(vars(owner).get(attribute), MARKER, False))


@dataclass
class Patch:
    """Replace ``owner.attribute`` (``owner`` a module or class that defines it) with
    ``make_replacement(original)``, keeping the original on ``__wrapped__`` and restoring it by identity."""

    owner: Any
    attribute: str
    make_replacement: Callable[[Any], Any]
    library: str
    version: str = "unknown"
    original: Any = field(default=None, init=False, repr=False)
    replacement: Any = field(default=None, init=False, repr=False)

    @property
    def target(self) -> str:
        return f"{getattr(self.owner, '__module__', '')}.{getattr(self.owner, '__qualname__', getattr(self.owner, '__name__', self.owner))}.{self.attribute}".lstrip(".")

    @property
    def applied(self) -> bool:
        return self.replacement is not None and vars(self.owner).get(self.attribute) is self.replacement

    def apply(self) -> bool:
        current = vars(self.owner).get(self.attribute)
        if current is None:
            raise PatchError(
                f"{self.library} {self.version}: expected {self.target} to exist (defined on the object itself); "
                f"it is missing, so the library changed and kl-patches cannot reach its KL code"
            )
        if getattr(current, MARKER, False):
            return False
        replacement = self.make_replacement(current)
        if callable(current) and callable(replacement):
            functools.update_wrapper(replacement, current)
        replacement.__wrapped__ = current
        setattr(replacement, MARKER, True)
        self.original, self.replacement = current, replacement
        setattr(self.owner, self.attribute, replacement)
        return True

    def revert(self) -> bool:
        if self.replacement is None:
            return False
        if vars(self.owner).get(self.attribute) is self.replacement:
            setattr(self.owner, self.attribute, self.original)
        self.original = self.replacement = None
        return True


@dataclass
class Rebind:
    """Rebind every ``from x import f`` copy of ``original`` found in loaded modules under ``prefix``."""

    prefix: str
    original: Any
    replacement: Any
    rebound: list = field(default_factory=list, init=False)

    def apply(self) -> int:
        for name, module in list(sys.modules.items()):
            if module is None or not (name == self.prefix or name.startswith(self.prefix + ".")):
                continue
            for attribute, value in list(vars(module).items()):
                if value is self.original:
                    setattr(module, attribute, self.replacement)
                    self.rebound.append((module, attribute))
        return len(self.rebound)

    def revert(self) -> None:
        for module, attribute in reversed(self.rebound):
            if vars(module).get(attribute) is self.replacement:
                setattr(module, attribute, self.original)
        self.rebound.clear()
        # Modules imported while the patch was on bound the replacement themselves: restore them too.
        Rebind(self.prefix, self.replacement, self.original).apply()


class DeferredPatch:
    """A :class:`Patch` of ``module.owner.attribute`` (``owner`` a class name, or None for the module itself),
    applied now when ``module`` is loaded, else the moment it is imported (wrapt post-import hook), so enabling
    a mode never imports heavy modules a process may not need."""

    def __init__(self, module: str, owner: str | None, attribute: str, make_replacement: Callable[[Any], Any],
                 library: str, version: str = "unknown") -> None:
        self.module, self.owner, self.attribute = module, owner, attribute
        self.make_replacement, self.library, self.version = make_replacement, library, version
        self.patch: Patch | None = None
        self.armed = False

    def _apply_to(self, module: Any) -> None:
        if not self.armed or self.patch is not None:
            return
        owner = module if self.owner is None else getattr(module, self.owner, None)
        if owner is None:
            raise PatchError(f"{self.library} {self.version}: expected {self.module}.{self.owner}; it is missing, "
                             f"so kl-patches cannot reach its KL code")
        patch = Patch(owner, self.attribute, self.make_replacement, self.library, self.version)
        patch.apply()
        self.patch = patch

    def apply(self) -> None:
        self.armed = True
        loaded = sys.modules.get(self.module)
        if loaded is not None:
            self._apply_to(loaded)
        else:
            wrapt.register_post_import_hook(self._apply_to, self.module)

    def revert(self) -> None:
        self.armed = False  # a hook still registered with wrapt becomes a no-op
        if self.patch is not None:
            self.patch.revert()
            self.patch = None


def describe_target(patch) -> str:
    if isinstance(patch, Patch):
        return patch.target
    if isinstance(patch, DeferredPatch):
        state = "applied" if patch.patch is not None else "waiting for the module to load"
        return f"{patch.module}.{patch.owner}.{patch.attribute} ({state})"
    if isinstance(patch, Rebind):
        return f"copies of {getattr(patch.original, '__qualname__', patch.original)} under {patch.prefix} " \
               f"({len(patch.rebound)} rebound)"
    return repr(patch)


#: Every adapter's Integration, in creation order (an adapter creates its own when it is imported).
INTEGRATIONS: list["Integration"] = []


class Integration:
    """One library's adapter: ``enable(mode)`` / ``disable()``, idempotent and all-or-nothing.

    Subclasses set ``library``, ``distribution`` and ``supported`` and implement :meth:`build_patches`,
    returning the patches (and rebinds) for a mode. The active mode is readable by the replacements through
    :attr:`mode`, so one set of replacement functions serves every mode.
    """

    library: str = ""
    distribution: str = ""
    supported: str = ""

    def __init__(self) -> None:
        self.mode: str | None = None
        self._applied: list = []
        self._lock = threading.RLock()
        INTEGRATIONS.append(self)

    def applied_targets(self) -> list[str]:
        """What is patched in this process now, one line per target (``kl-patches status``)."""
        return [describe_target(patch) for patch in self._applied]

    @property
    def version(self) -> str:
        return installed_version(self.distribution or self.library) or "not installed"

    def check_version(self) -> str:
        return require_version(self.library, self.supported, self.distribution or self.library)

    def build_patches(self, mode: str) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def enabled_mode(self) -> str | None:
        return self.mode

    def enable(self, mode: str) -> bool:
        from kl_patches.modes import validate_mode

        validate_mode(mode)
        with self._lock:
            if self.mode == mode:
                return False
            if self.mode is not None:
                self.disable()
            version = self.check_version()
            applied: list = []
            try:
                for patch in self.build_patches(mode):
                    if isinstance(patch, (Patch, DeferredPatch)):
                        patch.version = version
                    patch.apply()
                    applied.append(patch)
            except BaseException:
                for patch in reversed(applied):
                    patch.revert()
                raise
            self._applied, self.mode = applied, mode
            return True

    def disable(self) -> bool:
        with self._lock:
            if self.mode is None:
                return False
            for patch in reversed(self._applied):
                patch.revert()
            self._applied, self.mode = [], None
            return True
