"""The patch primitive: identity-restoring, idempotent, subclass-safe, version-guarded, all-or-nothing."""

import sys
import types

import pytest

from kl_patches.patching import MARKER, Integration, Patch, PatchError, Rebind, is_patched, require_version


def make_target():
    class Trainer:
        def compute_loss(self):
            return "original"

    return Trainer


def wrap(original):
    def replacement(self):
        return "patched:" + original(self)

    return replacement


def test_apply_revert_restores_identity_and_is_idempotent():
    Trainer = make_target()
    original = Trainer.__dict__["compute_loss"]
    patch = Patch(Trainer, "compute_loss", wrap, library="demo")
    assert patch.apply() is True
    assert Trainer().compute_loss() == "patched:original"
    assert Trainer.compute_loss.__wrapped__ is original and getattr(Trainer.compute_loss, MARKER)
    assert Patch(Trainer, "compute_loss", wrap, library="demo").apply() is False  # already patched
    assert Trainer().compute_loss() == "patched:original"  # not wrapped twice
    assert patch.revert() is True
    assert Trainer.__dict__["compute_loss"] is original
    assert patch.revert() is False


def test_subclass_of_a_patched_class_does_not_look_patched():
    Trainer = make_target()

    class Custom(Trainer):
        def compute_loss(self):
            return "custom"

    Patch(Trainer, "compute_loss", wrap, library="demo").apply()
    assert is_patched(Trainer, "compute_loss") and not is_patched(Custom, "compute_loss")
    assert Custom().compute_loss() == "custom"


def test_missing_target_raises_naming_library_and_version():
    Trainer = make_target()
    patch = Patch(Trainer, "_compute_loss", wrap, library="trl", version="9.9.9")
    with pytest.raises(PatchError, match=r"trl 9\.9\.9: expected .*_compute_loss"):
        patch.apply()


def test_rebind_copies_imported_by_name_and_revert():
    original = lambda: "original"  # noqa: E731
    replacement = lambda: "patched"  # noqa: E731
    module = types.ModuleType("demo_pkg.copies")
    module.kl_penalty = original
    sys.modules["demo_pkg.copies"] = module
    try:
        rebind = Rebind("demo_pkg", original, replacement)
        assert rebind.apply() == 1 and module.kl_penalty is replacement
        rebind.revert()
        assert module.kl_penalty is original
    finally:
        del sys.modules["demo_pkg.copies"]


def test_require_version():
    assert require_version("pytest", ">=1")
    with pytest.raises(PatchError, match=r"pytest .* is not supported by kl-patches \(supported: pytest<1\)"):
        require_version("pytest", "<1")
    with pytest.raises(PatchError, match="not installed"):
        require_version("surely-not-installed-lib", ">=1")


class Demo(Integration):
    library = distribution = "pytest"
    supported = ">=1"

    def __init__(self, target, fail_second=False):
        super().__init__()
        self.target, self.fail_second = target, fail_second

    def build_patches(self, mode):
        patches = [Patch(self.target, "compute_loss", wrap, library="pytest")]
        if self.fail_second:
            patches.append(Patch(self.target, "moved_function", wrap, library="pytest"))
        return patches


def test_integration_enable_disable_modes():
    Trainer = make_target()
    original = Trainer.__dict__["compute_loss"]
    demo = Demo(Trainer)
    assert demo.enable("k1-rtg-loss") is True and demo.enabled_mode() == "k1-rtg-loss"
    assert demo.enable("k1-rtg-loss") is False
    assert demo.enable("k1-in-reward") is True  # switching modes re-patches once
    assert Trainer().compute_loss() == "patched:original"
    assert demo.disable() is True and Trainer.__dict__["compute_loss"] is original
    assert demo.disable() is False
    with pytest.raises(ValueError, match="unknown KL mode 'k4'"):
        demo.enable("k4")


def test_integration_is_all_or_nothing():
    Trainer = make_target()
    original = Trainer.__dict__["compute_loss"]
    with pytest.raises(PatchError, match="moved_function"):
        Demo(Trainer, fail_second=True).enable("k1-rtg-loss")
    assert Trainer.__dict__["compute_loss"] is original


def test_integration_refuses_unsupported_versions():
    class Old(Demo):
        supported = "<1"

    Trainer = make_target()
    with pytest.raises(PatchError, match="not supported"):
        Old(Trainer).enable("k1-rtg-loss")
    assert not is_patched(Trainer, "compute_loss")


def test_rebind_revert_also_restores_copies_bound_while_patched():
    original = lambda: "original"  # noqa: E731
    replacement = lambda: "patched"  # noqa: E731
    early = types.ModuleType("demo_pkg2.early")
    early.f = original
    sys.modules["demo_pkg2.early"] = early
    try:
        rebind = Rebind("demo_pkg2", original, replacement)
        rebind.apply()
        late = types.ModuleType("demo_pkg2.late")  # imported while patched: `from x import f` got the replacement
        late.f = replacement
        sys.modules["demo_pkg2.late"] = late
        rebind.revert()
        assert early.f is original and late.f is original
    finally:
        sys.modules.pop("demo_pkg2.early", None)
        sys.modules.pop("demo_pkg2.late", None)


def test_deferred_patch_applies_when_the_module_is_imported_and_reverts():
    import wrapt

    from kl_patches.patching import DeferredPatch

    Trainer = make_target()
    original = Trainer.__dict__["compute_loss"]
    deferred = DeferredPatch("demo_deferred_mod", "Trainer", "compute_loss", wrap, library="demo", version="1.0")
    deferred.apply()
    assert deferred.patch is None  # not imported yet: nothing touched
    module = types.ModuleType("demo_deferred_mod")
    module.Trainer = Trainer
    sys.modules["demo_deferred_mod"] = module
    try:
        wrapt.notify_module_loaded(module)
        assert Trainer().compute_loss() == "patched:original"
        deferred.revert()
        assert Trainer.__dict__["compute_loss"] is original
        missing = DeferredPatch("demo_deferred_mod", "Gone", "compute_loss", wrap, library="demo", version="1.0")
        with pytest.raises(PatchError, match=r"demo 1\.0: expected demo_deferred_mod\.Gone"):
            missing.apply()
    finally:
        del sys.modules["demo_deferred_mod"]
