"""k1-rtg-loss through verl's whole actor step (``audit.harness.StepHarness``): exact by enumeration with balancing,
dynamic batch sizes, dp = 2 simulated, every loss_agg_mode, on- and off-policy, an emulated engine/trainer mismatch;
and the micro-batch size / dynamic batch sizes do not change the accumulated KL gradient at all."""

from __future__ import annotations

import pytest
import torch

from kl_patches.audit import PolicySpec, build_problem
from kl_patches.audit.engine import step_batch
from kl_patches.audit.tolerances import ENUMERATION_REL, SPLIT_INVARIANCE

SPEC = PolicySpec(vocab=3, horizon=2)
#: rounding only: the accumulated gradients of two splits differ by summation order, never by a statistic
#: (SPLIT_INVARIANCE); an enumerated expectation against the exact gradient: ENUMERATION_REL
EXACT = ENUMERATION_REL


def harness(overrides, problem, dp_size=1, mismatch=0.0):
    from kl_patches.integrations.verl.audit.harness import StepHarness
    from kl_patches.integrations.verl.audit.steps import BASE, compose

    return StepHarness(compose([*BASE, *overrides], problem.spec.horizon), problem, dp_size=dp_size, mismatch=mismatch)


RTG = ("actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss",
       "actor_rollout_ref.actor.kl_loss_coef=1.0")
FOUR = ("actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2", "data.train_batch_size=2")


@pytest.mark.parametrize("off_policy", [False, True])
def test_micro_batch_size_and_dynamic_batch_sizes_do_not_change_the_kl_gradient(off_policy):
    """Two prompts x 4 responses of mixed lengths, balance_batch on: every micro-batch size, dynamic batch sizes
    and dp = 1 / 2 accumulate the same KL gradient (to rounding; verl's low_var_kl is invariant the same way)."""
    spec = PolicySpec(vocab=4, horizon=3)
    problem = build_problem(spec, off_policy=off_policy)
    rows = torch.tensor([0, 5, 9, 13, 2, 17, 30, 7])
    variants = {
        "micro 1": ((*RTG, *FOUR, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"), 1),
        "micro 2": ((*RTG, *FOUR, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"), 1),
        "micro 8": ((*RTG, *FOUR, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8"), 1),
        "micro 4, no balancing": ((*RTG, *FOUR, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
                                   "trainer.balance_batch=False"), 1),
        "dynamic, 5 tokens": ((*RTG, *FOUR, "actor_rollout_ref.actor.use_dynamic_bsz=True",
                               "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
                               "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=5"), 1),
        "dp 2, micro 1": ((*RTG, *FOUR, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"), 2),
        "dp 2, dynamic": ((*RTG, *FOUR, "actor_rollout_ref.actor.use_dynamic_bsz=True",
                           "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
                           "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4"), 2),
    }
    grads = {}
    micro_counts = {}
    for name, (overrides, dp) in variants.items():
        h = harness(overrides, problem, dp_size=dp)
        grads[name] = h.step(step_batch(problem, rows, 4))
        micro_counts[name] = len(h.last_metrics)
    reference = grads["micro 1"]
    assert reference.norm() > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference, **SPLIT_INVARIANCE, msg=name)
    # the variants really split differently
    assert micro_counts["micro 1"] == 8 and micro_counts["micro 8"] == 1 and micro_counts["dp 2, micro 1"] == 8
    assert 1 < micro_counts["dynamic, 5 tokens"] < 8


def step_records(cells, off_policy):
    from kl_patches.integrations.verl.audit.steps import run_step_cell

    return [run_step_cell(cell, SPEC, off_policy, "test") for cell in cells]


@pytest.fixture(scope="module")
def default_records():
    from kl_patches.integrations.verl.audit.steps import default_step_cells

    cells = default_step_cells()
    return {off: {r.configuration: r for r in step_records(cells, off)} for off in (False, True)}


def test_k1_rtg_loss_is_exact_through_the_step_everywhere(default_records):
    for off, records in default_records.items():
        for name, record in records.items():
            if not name.startswith("k1-rtg-loss") or "no rollout log-probs" in name:
                continue
            assert record.verdict == "exact" and record.rel_err < EXACT, (off, name, record.reason, record.rel_err)
            assert record.spec["step"] is True


def test_engine_trainer_mismatch_is_biased_without_the_engines_log_probs(default_records):
    for records in default_records.values():
        record = records["k1-rtg-loss step: engine/trainer mismatch 0.1, no rollout log-probs"]
        assert record.verdict == "biased" and record.rel_err > 0.01
        assert record.fix == "actor_rollout_ref.rollout.calculate_log_probs=True"


def test_k1_in_reward_through_the_step(default_records):
    on, off = default_records[False], default_records[True]
    exact = "k1-in-reward step: grpo, loss_agg_mode=seq-mean-token-sum"
    realised = "k1-in-reward step: grpo, loss_agg_mode=token-mean"
    assert on[exact].verdict == "exact", on[exact].rel_err
    assert off[exact].verdict == "biased" and "k1-rtg-loss" in off[exact].fix
    assert on[realised].verdict == "biased" and "seq-mean-token-sum" in on[realised].fix
