"""Which OpenRLHF releases kl-patches claims, and that the claim is what CI runs: SUPPORTED, the per-release table,
pip's ``[openrlhf]`` extra, the install recipe and the nox sessions agree; the installed release is one of them."""

import importlib.metadata
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from kl_patches.integrations import openrlhf as adapter
from kl_patches.integrations.openrlhf import compat
from kl_patches.patching import installed_version, version_supported

ROOT = Path(__file__).resolve().parents[3]
#: Every OpenRLHF release on PyPI from 0.8.0 on (pip index versions openrlhf, 2026-12-02).
RELEASES = ("0.8.0 0.8.0.post1 0.8.1 0.8.1.post1 0.8.2 0.8.3 0.8.4 0.8.5 0.8.6 0.8.7 0.8.8 0.8.9 0.8.9.post1 0.8.10 "
            "0.8.11 0.9.0 0.9.1 0.9.1.post1 0.9.2 0.9.3 0.9.4 0.9.5 0.9.6 0.9.7 0.9.8 0.9.9 0.9.10 0.10.0 0.10.1 "
            "0.10.1.post1 0.10.1.post2 0.10.2 0.10.3 0.10.4 0.11.0 0.11.1 0.11.2").split()


def test_supported_is_the_table_of_release_lines():
    assert adapter.SUPPORTED == " || ".join(row.specifier for row in compat.FLAVOURS)


def test_the_installed_release_is_supported_and_has_its_row():
    version = installed_version("openrlhf")
    assert version_supported(version, adapter.SUPPORTED)
    row = compat.flavour()
    assert row.contains(version)
    assert (row.flat is None) == (Version(version) >= Version("0.11"))  # 0.9.3: flat flags


def test_pips_extra_admits_exactly_the_supported_releases():
    [requirement] = [Requirement(r) for r in importlib.metadata.requires("kl-patches")
                     if Requirement(r).name == "openrlhf"]
    admitted = [v for v in RELEASES if requirement.specifier.contains(v, prereleases=True)]
    assert admitted == [v for v in RELEASES if version_supported(v, adapter.SUPPORTED)]
    assert admitted == ["0.9.3", "0.11.0", "0.11.1", "0.11.2"]


def test_ci_installs_one_release_of_each_line_and_runs_a_session_for_it():
    recipe = (ROOT / "ci" / "install-openrlhf.sh").read_text()
    installed_by_ci = re.findall(r"^\s+(\d+\.\d+\.\d+)\)", recipe, flags=re.M)
    assert sorted(row.name for row in compat.FLAVOURS) == sorted(
        next(row.name for row in compat.FLAVOURS if row.contains(v)) for v in installed_by_ci)
    noxfile = (ROOT / "noxfile.py").read_text()
    for version in installed_by_ci:  # the default (0.11.2) runs in the `openrlhf` session, the others by name
        assert version == "0.11.2" or f'library_session(session, "openrlhf", "{version}")' in noxfile
    assert '"openrlhf-0.9"' in noxfile.split("nox.options.sessions")[1].split("\n")[0]


def test_flags_are_translated_into_the_releases_idiom():
    row = compat.FLAVOURS[0]  # 0.9: flat
    assert compat.translate_argv(["--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--x"], row) == [
        "--use_kl_loss", "--kl_estimator", "k3", "--x"]
    assert compat.translate_argv(["--algo.advantage.is_correction_level", "token"], row) == [
        "--enable_vllm_is_correction"]
    assert compat.translate_argv(["--algo.kl.unbiased_gradient"], row) is None  # 0.9 has no such option
    assert compat.translate_argv(["--actor.loss_agg_mode", "seq-mean-token-mean"], row) is None
    assert compat.to_flags("add --algo.kl.use_loss; --rollout.top_p 0.9", row) == "add --use_kl_loss; --top_p 0.9"
    assert compat.flag("algo.kl.mode", row) == "--kl_mode"
    newest = compat.FLAVOURS[-1]
    assert compat.translate_argv(["--algo.kl.use_loss"], newest) == ["--algo.kl.use_loss"]
    assert compat.to_flags("--algo.kl.use_loss", newest) == "--algo.kl.use_loss"


def test_the_nested_view_reads_and_writes_the_flat_namespace():
    import copy
    from types import SimpleNamespace

    flat = SimpleNamespace(use_kl_loss=False, train_batch_size=8, kl_estimator="k3")
    view = compat.nested(flat)
    assert view.algo.kl.use_loss is False and view.train.batch_size == 8 and view.algo.kl.unbiased_gradient is False
    view.train.batch_size = 4
    assert flat.train_batch_size == 4 and compat.flat(view) is flat
    with pytest.raises(AttributeError):
        _ = view.algo.kl.not_an_option
    assert getattr(view.train, "not_an_option", "default") == "default"
    clone = copy.deepcopy(view)
    clone.train.batch_size = 2
    assert flat.train_batch_size == 4 and compat.flat(clone).train_batch_size == 2
