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
from typing import Any, Callable, Protocol, Sequence, Union, runtime_checkable

import wrapt
from packaging.specifiers import SpecifierSet
from packaging.version import Version

#: Set on every replacement object; read from the owner's own ``__dict__`` so a subclass of a patched class
#: does not look patched itself.
MARKER = "__kl_patches__"


class PatchError(RuntimeError):
    """A correctness patch could not be applied (unsupported version, moved or renamed target)."""


#: A replacement factory: ``factory(original) -> replacement`` (the one shape every target uses).
Factory = Callable[[Any], Any]


@runtime_checkable
class Primitive(Protocol):
    """What every patch primitive (:class:`Patch`, :class:`Rebind`, :class:`DeferredPatch`) provides.

    ``apply()`` and ``revert()`` return True when they changed something in this process, False when there was
    nothing to do (already patched / nothing applied); both are idempotent. ``apply()`` raises :class:`PatchError`
    when the library does not have what it expects."""

    def apply(self) -> bool: ...

    def revert(self) -> bool: ...


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_version(library: str, supported: str, distribution: str | None = None) -> str:
    """The installed version of ``library``; PatchError when it is missing or outside ``supported``."""
    version = installed_version(distribution or library)
    if version is None:
        raise PatchError(f"{library} is not installed; kl-patches supports {library}{supported}: "
                         f"pip install '{library}{supported}'")
    if Version(version) not in SpecifierSet(supported, prereleases=True):
        raise PatchError(
            f"{library} {version} is not supported by kl-patches (supported: {library}{supported}); "
            f"refusing to patch rather than risk the library's biased KL path. Pin a verified release "
            f"(pip install '{library}{supported}'), upgrade kl-patches if it verifies {library} {version}, or run "
            f"with the KL mode 'library' ({library}'s own KL, nothing patched)"
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
        name = getattr(self.owner, "__qualname__", getattr(self.owner, "__name__", self.owner))
        return f"{getattr(self.owner, '__module__', '')}.{name}.{self.attribute}".lstrip(".")

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
    rebound: list[tuple[Any, str]] = field(default_factory=list, init=False)

    def apply(self) -> bool:
        before = len(self.rebound)
        for name, module in list(sys.modules.items()):
            if module is None or not (name == self.prefix or name.startswith(self.prefix + ".")):
                continue
            for attribute, value in list(vars(module).items()):
                if value is self.original:
                    setattr(module, attribute, self.replacement)
                    self.rebound.append((module, attribute))
        return len(self.rebound) > before

    def revert(self) -> bool:
        changed = bool(self.rebound)
        for module, attribute in reversed(self.rebound):
            if vars(module).get(attribute) is self.replacement:
                setattr(module, attribute, self.original)
        self.rebound.clear()
        # Modules imported while the patch was on bound the replacement themselves: restore them too.
        return Rebind(self.prefix, self.replacement, self.original).apply() or changed


class DeferredPatch:
    """A :class:`Patch` of ``module.owner.attribute`` (``owner`` a class name, or None for the module itself),
    applied now when ``module`` is loaded, else the moment it is imported (wrapt post-import hook), so enabling
    a mode never imports heavy modules a process may not need. With ``rebind`` (a package prefix), every
    ``from module import attribute`` copy under it is rebound too (:class:`Rebind`) once the patch is on."""

    def __init__(self, module: str, owner: str | None, attribute: str, make_replacement: Factory,
                 library: str, version: str = "unknown", rebind: str | None = None) -> None:
        self.module, self.owner, self.attribute = module, owner, attribute
        self.make_replacement, self.library, self.version = make_replacement, library, version
        self.rebind_prefix = rebind
        self.patch: Patch | None = None
        self.rebind: Rebind | None = None
        self.armed = False

    def _apply_to(self, module: Any) -> None:
        if not self.armed or self.patch is not None:
            return
        owner = module if self.owner is None else getattr(module, self.owner, None)
        if owner is None:
            raise PatchError(f"{self.library} {self.version}: expected {self.module}.{self.owner}; it is missing, "
                             f"so kl-patches cannot reach its KL code")
        patch = Patch(owner, self.attribute, self.make_replacement, self.library, self.version)
        if patch.apply() and self.rebind_prefix is not None:
            self.rebind = Rebind(self.rebind_prefix, patch.original, patch.replacement)
            self.rebind.apply()
        self.patch = patch

    def apply(self) -> bool:
        """True: armed (patched now, or when the module is imported)."""
        if self.armed:
            return False
        self.armed = True
        loaded = sys.modules.get(self.module)
        if loaded is not None:
            self._apply_to(loaded)
        else:
            wrapt.register_post_import_hook(self._apply_to, self.module)
        return True

    def revert(self) -> bool:
        changed = self.armed
        self.armed = False  # a hook still registered with wrapt becomes a no-op
        if self.rebind is not None:
            self.rebind.revert()
            self.rebind = None
        if self.patch is not None:
            self.patch.revert()
            self.patch = None
        return changed


#: Every primitive :meth:`Integration.build_patches` may return.
AnyPatch = Union[Patch, Rebind, DeferredPatch]


@dataclass(frozen=True)
class Target:
    """One row of an adapter's declarative table of patch targets (its ``patches.TARGETS``).

    ``module.owner.attribute`` (``owner`` a class name, None for the module itself) is replaced by
    ``factory(original)``; ``factory`` is a callable or the name of a method of the adapter's
    :class:`Integration`. ``answers`` names the upstream defect (issue / PR / document section) the patch answers
    and ``remove_when`` when it can go. ``rebind`` (a package prefix) also rebinds every ``from x import f`` copy;
    ``deferred`` patches when the module is imported instead of importing it now; ``modes`` limits the target to
    those modes (None: every mode)."""

    module: str
    owner: str | None
    attribute: str
    factory: Union[str, Factory]
    answers: str
    remove_when: str
    rebind: str | None = None
    deferred: bool = False
    modes: tuple[str, ...] | None = None

    @property
    def path(self) -> str:
        return ".".join(part for part in (self.module, self.owner, self.attribute) if part)

    def row(self) -> dict[str, Any]:
        """The target's columns, as ``kl-patches status`` shows them."""
        return {"target": self.path, "answers": self.answers, "remove_when": self.remove_when,
                "rebind": self.rebind, "deferred": self.deferred,
                "modes": list(self.modes) if self.modes is not None else None}


def describe_target(patch: Any) -> str:
    if isinstance(patch, Patch):
        return patch.target
    if isinstance(patch, DeferredPatch):
        state = "applied" if patch.patch is not None else "waiting for the module to load"
        path = ".".join(part for part in (patch.module, patch.owner, patch.attribute) if part)
        rebound = f", {len(patch.rebind.rebound)} copies rebound" if patch.rebind is not None else ""
        return f"{path} ({state}{rebound})"
    if isinstance(patch, Rebind):
        return f"copies of {getattr(patch.original, '__qualname__', patch.original)} under {patch.prefix} " \
               f"({len(patch.rebound)} rebound)"
    return repr(patch)


def _returns(replacement: Any) -> Factory:
    """A factory that installs an object built in advance (so a :class:`Rebind` can point copies at it)."""
    return lambda _original: replacement


#: Every adapter's Integration, in creation order (an adapter creates its own when it is imported).
INTEGRATIONS: list["Integration"] = []


class Integration:
    """One library's adapter: ``enable(mode)`` / ``disable()``, idempotent and all-or-nothing.

    Subclasses set ``library``, ``distribution``, ``supported`` and ``targets`` (the adapter's table of
    :class:`Target` rows); the default :meth:`build_patches` turns the rows that apply to a mode into patch
    primitives (override it to add checks, then call ``super()``). ``accepted_modes`` limits the modes
    ``enable`` takes (:meth:`mode_refusal` says why another is refused). The active mode is readable by the
    replacements through :attr:`mode`, so one set of replacement functions serves every mode.
    """

    library: str = ""
    distribution: str = ""
    supported: str = ""
    targets: Sequence[Target] = ()
    accepted_modes: tuple[str, ...] | None = None  # None: every kl-patches mode
    #: The primitive a ``deferred`` target becomes (an adapter may use a subclass).
    deferred_patch: type[DeferredPatch] = DeferredPatch

    def __init__(self) -> None:
        self.mode: str | None = None
        self._applied: list[AnyPatch] = []
        self._lock = threading.RLock()
        INTEGRATIONS.append(self)

    def applied_targets(self) -> list[str]:
        """What is patched in this process now, one line per target (``kl-patches status``)."""
        return [describe_target(patch) for patch in self._applied]

    def target_table(self) -> list[dict[str, Any]]:
        """The adapter's declared targets with their columns (``kl-patches status``)."""
        return [target.row() for target in self.targets]

    @property
    def version(self) -> str:
        return installed_version(self.distribution or self.library) or "not installed"

    def check_version(self) -> str:
        return require_version(self.library, self.supported, self.distribution or self.library)

    def factory(self, target: Target) -> Factory:
        return getattr(self, target.factory) if isinstance(target.factory, str) else target.factory

    def build_patches(self, mode: str) -> list[AnyPatch]:
        """The primitives for ``mode``, in table order: a deferred target becomes a :attr:`deferred_patch`; any
        other imports its module now and becomes a :class:`Patch`, followed by a :class:`Rebind` of its copies
        when the row asks for one."""
        import importlib

        patches: list[AnyPatch] = []
        for target in self.targets:
            if target.modes is not None and mode not in target.modes:
                continue
            factory = self.factory(target)
            if target.deferred:
                patches.append(self.deferred_patch(target.module, target.owner, target.attribute, factory,
                                                   self.library, rebind=target.rebind))
                continue
            module = importlib.import_module(target.module)
            owner = module if target.owner is None else getattr(module, target.owner, None)
            if owner is None:
                raise PatchError(f"{self.library} {self.version}: expected {target.module}.{target.owner}; it is "
                                 f"missing, so kl-patches cannot reach its KL code")
            if target.rebind is None:
                patches.append(Patch(owner, target.attribute, factory, self.library))
                continue
            original = vars(owner).get(target.attribute)
            if original is None:
                raise PatchError(f"{self.library} {self.version}: expected {target.path}; it is missing")
            replacement = factory(original)  # one object: the patch installs it, the rebind points copies at it
            patches.append(Patch(owner, target.attribute, _returns(replacement), self.library))
            patches.append(Rebind(target.rebind, original, replacement))
        return patches

    def enabled_mode(self) -> str | None:
        return self.mode

    def mode_refusal(self, mode: str) -> str:
        """Why ``enable(mode)`` is refused when ``mode`` is not in :attr:`accepted_modes` (and what to do)."""
        return (f"kl-patches' {self.library} adapter accepts the modes {', '.join(self.accepted_modes or ())}, "
                f"not {mode!r}")

    def enable(self, mode: str) -> bool:
        from kl_patches.modes import KLModeError, validate_mode

        validate_mode(mode)
        if self.accepted_modes is not None and mode not in self.accepted_modes:
            raise KLModeError(self.mode_refusal(mode))
        with self._lock:
            if self.mode == mode:
                return False
            if self.mode is not None:
                self.disable()
            version = self.check_version()
            applied: list[AnyPatch] = []
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
