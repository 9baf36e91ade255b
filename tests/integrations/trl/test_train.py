"""A real run: GRPOTrainer.train() for a few steps on CPU (tiny GPT-2, synthetic prompts, rule-based reward), in
each mode and both ways in, with the KL metrics in TRL's own log stream."""

import math

import pytest
import torch

import kl_patches
from kl_patches.integrations.trl.audit import build_model, build_tokenizer

def trl_trains_on_cpu() -> bool:
    """TRL 1.15's fused log-prob kernel exists only with Triton (a GPU): TRL itself cannot train on a CPU there.
    TRL 1.16 has a CPU path and TRL 0.24 uses the model's own forward (the versions CI installs), so these run."""
    from trl.trainer import utils

    from kl_patches.integrations.trl import compat

    return not compat.current().fused_logps or getattr(utils, "_ChunkedLogProbFunction", None) is not None


pytestmark = pytest.mark.skipif(not trl_trains_on_cpu(), reason="this TRL version cannot train on CPU (no Triton)")

VOCAB = 6
PROMPTS = ["t0", "t1 t2", "t3", "t2 t4 t0"]


def reward_t1(completions, completion_ids, **kwargs):
    """Rule-based reward: how often the completion says t1."""
    return [float(sum(1 for token in ids if token == 1)) for ids in completion_ids]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    build_model(VOCAB, horizon=4, seed=0, dtype=torch.float32).save_pretrained(folder)
    build_tokenizer(VOCAB).save_pretrained(folder)
    return str(folder)


def train(model_dir, tmp_path, *, kl_mode=None, patched=None, **settings):
    import trl
    from datasets import Dataset

    import kl_patches.integrations.trl as adapter

    common = dict(output_dir=str(tmp_path / "out"), beta=0.1, learning_rate=5e-2, max_steps=2,
                  per_device_train_batch_size=4, num_generations=2, max_completion_length=4, logging_steps=1,
                  report_to=[], use_cpu=True, bf16=False, save_strategy="no", gradient_checkpointing=False,
                  disable_tqdm=True, seed=0, temperature=1.0)
    common.update(settings)
    if kl_mode is not None:
        config_class, trainer_class, extra = adapter.GRPOConfig, adapter.GRPOTrainer, {"kl_mode": kl_mode}
    else:
        config_class, trainer_class, extra = trl.GRPOConfig, trl.GRPOTrainer, {}
        assert "kl_truncation" not in common
    if patched is not None:
        kl_patches.enable("trl", patched)
    torch.manual_seed(0)
    trainer = trainer_class(model=model_dir, reward_funcs=reward_t1, args=config_class(**common, **extra),
                            train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                            processing_class=build_tokenizer(VOCAB))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.model.parameters()))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, moved


@pytest.mark.parametrize("kl_mode, patched, settings", [
    ("library", None, {}),
    ("k1-in-reward", None, {}),
    ("k1-rtg-loss", None, {}),
    ("k1-rtg-loss", None, {"num_iterations": 2, "loss_type": "grpo"}),  # off-policy: prefix weights in use
    (None, "k1-in-reward", {"loss_type": "bnpo"}),  # TRL's own class, patched in place
    (None, "k1-rtg-loss", {"steps_per_generation": 2}),  # generation ahead of optimisation
], ids=["library", "k1-in-reward", "k1-rtg-loss", "k1-rtg-loss-off-policy", "patched-k1-in-reward",
        "patched-k1-rtg-loss-ahead"])
def test_train_a_few_steps_and_log_the_kl(model_dir, tmp_path, kl_mode, patched, settings):
    logs, moved = train(model_dir, tmp_path, kl_mode=kl_mode, patched=patched, **settings)
    mode = kl_mode or patched
    assert moved and len(logs) == 2
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]) for entry in logs)
    generations = [entry for entry in logs if "reward" in entry]  # steps that generated (and scored) a batch
    assert generations
    for entry in generations:
        assert entry[f"kl_patches/mode/{mode}"] == 1.0
    for entry in logs:  # every optimisation step: TRL's own kl (for dashboards) and kl-patches' metrics
        assert math.isfinite(entry["kl"]) and entry["kl"] >= 0.0
        if mode == "library":
            assert not any(key.startswith("kl_patches/") and "/mode/" not in key for key in entry)
            continue
        assert math.isfinite(entry["kl_patches/sequence_kl"])
        assert 0.0 < entry["kl_patches/ess"] <= 1.0 + 1e-9
        assert entry["kl_patches/truncated_fraction"] == entry["kl_patches/capped_fraction"] == 0.0
        off_policy = settings.get("num_iterations", 1) > 1 or settings.get("steps_per_generation", 1) > 1
        assert entry["kl_patches/mu_source"] == (1.0 if off_policy else 0.0)  # old_per_token_logps / on-policy
        if not off_policy:
            assert entry["kl_patches/ess"] == 1.0
    if mode != "library" and len(generations) == 2:  # after one update the policy has left the reference
        assert generations[1]["kl"] > 0.0


def test_truncation_is_reported(model_dir, tmp_path):
    """kl_truncation from GRPOConfig reaches the metrics: weights above c are counted."""
    logs, moved = train(model_dir, tmp_path, kl_mode="k1-rtg-loss", num_iterations=2, kl_truncation=1.0,
                        learning_rate=0.5)
    assert moved and any(entry["kl_patches/truncated_fraction"] > 0.0 for entry in logs)


def test_a_patched_mode_with_beta_zero_trains_as_trl_does(model_dir, tmp_path):
    with pytest.warns(UserWarning, match="nothing to patch"):
        logs, moved = train(model_dir, tmp_path, kl_mode="k1-rtg-loss", beta=0.0)
    assert moved and all("kl_patches/sequence_kl" not in entry for entry in logs)
