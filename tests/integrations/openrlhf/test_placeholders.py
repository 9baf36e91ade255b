import importlib
import importlib.util
import sys

import pytest

from kl_patches.integrations.openrlhf import placeholders


def test_placeholders_stand_in_only_for_missing_packages():
    active = placeholders.install_placeholders()
    for name in placeholders.PLACEHOLDER_MODULES:
        real = not placeholders.is_placeholder(name)
        assert (name in active) != real
    assert placeholders.install_placeholders() == active  # idempotent


@pytest.mark.skipif(not placeholders.is_placeholder("vllm"), reason="vLLM is really installed on this machine")
def test_placeholder_names_raise_when_called_and_unknown_submodules_fail_to_import():
    import vllm
    from flash_attn.bert_padding import pad_input

    with pytest.raises(placeholders.PlaceholderCalled, match="vllm.SamplingParams is a kl-patches placeholder"):
        vllm.SamplingParams(n=1)
    with pytest.raises(placeholders.PlaceholderCalled):
        pad_input(None)
    # OpenRLHF's log_probs_from_logits tries this import and falls back on ImportError.
    with pytest.raises(ImportError):
        importlib.import_module("flash_attn.ops.triton.cross_entropy")
    assert importlib.util.find_spec("vllm") is not None  # transformers' availability probes do not crash
    notes = placeholders.placeholder_notes()
    assert any("vllm" in note for note in notes) and any("flash_attn" in note for note in notes)


def test_remove_and_reinstall(monkeypatch):
    if not placeholders.active_placeholders():
        pytest.skip("no placeholder in use on this machine")
    saved = {name: sys.modules[name] for top in placeholders.active_placeholders()
             for name in placeholders.PLACEHOLDER_MODULES[top]}
    removed = placeholders.remove_placeholders()
    try:
        assert removed and not placeholders.active_placeholders()
        assert all(name not in sys.modules for name in saved)
    finally:
        sys.modules.update(saved)  # OpenRLHF's modules already hold these objects
    assert placeholders.active_placeholders() == removed
