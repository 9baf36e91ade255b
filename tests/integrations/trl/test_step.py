"""Exactness through GRPOTrainer's real training step (``kl_patches.audit.expected_step_gradient`` over every
enumerated generation batch, TRL's own split / shuffle / buffering / accumulation), every loss type, on- and
off-policy, vLLM emulated with and without a sampler/trainer mismatch; and what the step costs (no extra forward)."""

import pytest
import torch

from kl_patches.audit import PolicySpec
from kl_patches.integrations.trl.audit import build_tiny_trainer, run_step
from kl_patches.integrations.trl.audit.cells import STEP_ON, STEP_REUSE, Cell, audit_cell
from kl_patches.audit.tolerances import EXACT_TOLERANCE

pytestmark = pytest.mark.slow

#: A cell is exact when its relative error is at float64 rounding over the enumeration (~1e-15 measured); the
#: biased cells below are above 1e-3.
EXACT = EXACT_TOLERANCE
SPEC = PolicySpec(horizon=2)
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "luspo", "sapo", "cispo", "vespo")
TRUTH: dict = {}


def step_record(mode, regime, **settings):
    cell = Cell(f"test {mode} {regime} {settings}", settings={"beta": 0.04, **settings}, mode=mode, driver="step",
                regimes=(regime,))
    return audit_cell(SPEC, cell, regime, truth_cache=TRUTH)


def assert_exact(record):
    assert record.verdict == "exact", record
    assert record.rel_err < EXACT and abs(record.norm_ratio - 1.0) < EXACT, record
    assert record.spec["step"] is True and record.spec["num_groups"] >= 1


@pytest.mark.parametrize("regime", ["on", "off"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_k1_rtg_loss_is_exact_through_the_step_for_every_loss_type(loss_type, regime):
    record = step_record("k1-rtg-loss", regime, loss_type=loss_type)
    assert_exact(record)
    assert record.policy == regime


@pytest.mark.parametrize("regime", ["vllm", "vllm-mismatch"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_k1_rtg_loss_is_exact_with_vllm_sampling_log_probs(loss_type, regime):
    """mu = vLLM's per-token sampling log-probs (what TRL's importance-sampling correction trusts), whether the
    sampler equals the trainer or not."""
    assert_exact(step_record("k1-rtg-loss", regime, loss_type=loss_type))


def test_reuse_over_num_iterations_is_exact():
    record = step_record("k1-rtg-loss", "off", num_iterations=2)
    assert record.spec["settings"]["num_iterations"] == 2
    assert_exact(record)


@pytest.mark.parametrize("baseline", ["sequence-loo", "position-loo"])
@pytest.mark.parametrize("regime", ["on", "off"])
def test_optional_whole_batch_baselines_stay_exact(baseline, regime):
    assert_exact(step_record("k1-rtg-loss", regime, kl_rtg_baseline=baseline))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "luspo", "sapo"])
def test_k1_in_reward_is_exact_on_policy_through_the_step(loss_type):
    assert_exact(step_record("k1-in-reward", "on", loss_type=loss_type))


def test_what_the_run_makes_biased_is_reported_biased():
    uncorrected = step_record("k1-rtg-loss", "vllm-uncorrected")  # TRL trusts no sampler log-probs: neither do we
    assert uncorrected.verdict == "biased" and uncorrected.rel_err > 1e-3
    assert "vllm_importance_sampling_correction" in uncorrected.fix
    reward_off = step_record("k1-in-reward", "off")  # refused at start; measured with the refusal bypassed
    assert reward_off.verdict == "biased" and reward_off.rel_err > 1e-2
    assert reward_off.reason.startswith("refused at start") and reward_off.fix.startswith("kl_mode: k1-rtg-loss")


# -- cost ----------------------------------------------------------------------------------------------------------

def count_forwards(tiny, rows):
    trainer = tiny.trainer
    calls = []
    original = type(trainer)._get_per_token_logps_and_entropies

    def counting(self, model, *args, **kwargs):
        calls.append(model is trainer.model)
        return original(self, model, *args, **kwargs)

    type(trainer)._get_per_token_logps_and_entropies = counting
    try:
        run_step(tiny, torch.tensor(rows))
    finally:
        type(trainer)._get_per_token_logps_and_entropies = original
    return sum(calls), len(calls)


@pytest.mark.parametrize("layout", [STEP_ON, STEP_REUSE], ids=["on-policy", "reuse"])
def test_k1_rtg_loss_runs_no_extra_forward(reward, layout):
    """The generation-time forward the old adapter ran for k1-rtg-loss is gone: the patched step runs exactly the
    policy and reference forwards TRL runs unpatched."""
    import trl

    class Counted(trl.GRPOTrainer):
        pass

    unpatched = build_tiny_trainer(SPEC, trainer_class=Counted, beta=0.04, reward_funcs=reward, table=False,
                                   **layout)
    patched = build_tiny_trainer(SPEC, kl_mode="k1-rtg-loss", beta=0.04, reward_funcs=reward, table=False, **layout)
    rows = (1, 5)
    assert count_forwards(patched, rows) == count_forwards(unpatched, rows)


def test_k1_in_reward_runs_one_no_grad_forward_per_generation_batch(reward):
    """k1-in-reward needs every member's sequence KL before TRL splits the batch: one extra policy forward."""
    plain = build_tiny_trainer(SPEC, kl_mode="library", beta=0.04, reward_funcs=reward, table=False, **STEP_ON)
    reward_mode = build_tiny_trainer(SPEC, kl_mode="k1-in-reward", beta=0.04, reward_funcs=reward, table=False,
                                     **STEP_ON)
    (policy_plain, total_plain), (policy_reward, total_reward) = (count_forwards(plain, (1, 5)),
                                                                  count_forwards(reward_mode, (1, 5)))
    assert (policy_reward - policy_plain, total_reward - total_plain) == (1, 1)
