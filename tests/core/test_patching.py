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


def test_every_primitive_satisfies_the_protocol_and_reports_a_change_as_a_bool():
    from kl_patches.patching import DeferredPatch, Primitive

    Trainer = make_target()
    module = types.ModuleType("kl_patches_protocol_demo")
    module.compute_loss = Trainer.compute_loss
    sys.modules[module.__name__] = module
    try:
        patch = Patch(Trainer, "compute_loss", wrap, library="demo")
        assert patch.apply() is True
        rebind = Rebind("kl_patches_protocol_demo", patch.original, patch.replacement)
        deferred = DeferredPatch("kl_patches_never_imported_demo", None, "f", wrap, library="demo")
        for primitive in (patch, rebind, deferred):
            assert isinstance(primitive, Primitive)
        assert rebind.apply() is True and rebind.apply() is False  # nothing left to rebind
        assert deferred.apply() is True and deferred.apply() is False
        assert rebind.revert() is True and module.compute_loss is patch.original
        assert deferred.revert() is True and deferred.revert() is False
        assert patch.revert() is True and patch.revert() is False
    finally:
        del sys.modules[module.__name__]


def test_integration_consumes_a_target_table_with_rebind_deferred_and_modes():
    from kl_patches.modes import KLModeError
    from kl_patches.patching import Target

    owner = types.ModuleType("kl_patches_table_demo")
    owner.kl = lambda: "kl"
    copy = types.ModuleType("kl_patches_table_demo.copy")
    copy.kl = owner.kl
    original = owner.kl
    sys.modules[owner.__name__], sys.modules[copy.__name__] = owner, copy

    class Demo(Integration):
        library = distribution = "pytest"
        supported = ">=1"
        accepted_modes = ("library", "k1-rtg-loss")
        targets = (
            Target(owner.__name__, None, "kl", "_kl", "the demo KL is biased", "never", rebind=owner.__name__),
            Target("kl_patches_table_demo_later", "Trainer", "step", lambda f: f, "a deferred row", "never",
                   deferred=True, modes=("k1-rtg-loss",)),
        )

        def _kl(self, original):
            return lambda: "patched " + original()

    demo = Demo()
    try:
        with pytest.raises(KLModeError, match="accepts the modes library, k1-rtg-loss, not 'k1-in-reward'"):
            demo.enable("k1-in-reward")
        assert demo.enable("library") is True
        assert owner.kl() == "patched kl" and copy.kl is owner.kl  # the copy rebound to the same object
        assert len(demo.applied_targets()) == 2  # the deferred row is not for this mode
        assert [row["target"] for row in demo.target_table()] == ["kl_patches_table_demo.kl",
                                                                  "kl_patches_table_demo_later.Trainer.step"]
        assert demo.enable("k1-rtg-loss") is True and len(demo.applied_targets()) == 3
        assert "waiting for the module to load" in demo.applied_targets()[-1]
        assert demo.disable() is True
        assert owner.kl is original and copy.kl is original
    finally:
        demo.disable()
        del sys.modules[owner.__name__], sys.modules[copy.__name__]


def test_refused_version_says_what_to_do():
    with pytest.raises(PatchError, match=r"Pin a verified release \(pip install 'pytest<1'\).*mode 'library'"):
        require_version("pytest", "<1")


def test_per_group_order_invariant_matches_the_plain_form_and_assert_close_names_the_first_mismatch():
    import torch

    from kl_patches.audit import PolicySpec, build_problem, expected_gradient, per_group
    from kl_patches.audit.tolerances import SAME_OPERATIONS, assert_close

    problem = build_problem(PolicySpec(vocab=3, horizon=2), off_policy=False)
    calls = []

    def scalar(batch):
        calls.append(1)
        return (batch.logp * batch.mask).sum() * batch.ref_logp.sum().detach()

    plain = expected_gradient(problem, per_group(scalar), 2).gradient
    n_plain, calls[:] = len(calls), []
    cached = expected_gradient(problem, per_group(scalar, order_invariant=True), 2).gradient
    assert len(calls) < n_plain
    assert_close(cached, plain, **SAME_OPERATIONS)
    with pytest.raises(AssertionError, match=r"1 of 3 elements differ .* first at \(1,\): actual 2\.5"):
        assert_close(torch.tensor([1.0, 2.5, 3.0]), torch.tensor([1.0, 2.0, 3.0]), rtol=0.0, atol=1e-15)
