"""k1-rtg-loss through OpenRLHF's real ppo_train: every step cell, the normaliser, the metrics in the status."""

import pytest
import torch

from kl_patches import terms
from kl_patches.audit import PolicySpec, build_problem
from kl_patches.audit.engine import step_batch
from kl_patches.integrations import openrlhf as adapter
from kl_patches.integrations.openrlhf import audit as oaudit
from kl_patches.integrations.openrlhf.audit import cells
from kl_patches.integrations.openrlhf.kl import fixed_normalizer
from kl_patches.audit.tolerances import EXACT_TOLERANCE, LIBRARY_TRAINER

#: Exact = float64 rounding over the enumerated batches (the engine's EXACT_TOLERANCE).
EXACT = EXACT_TOLERANCE
#: One generation batch summed two ways (OpenRLHF's step vs the core formula): float64 rounding of a few terms.
SAME_BATCH = LIBRARY_TRAINER


@pytest.mark.parametrize("cell", [c for c in cells.STEP_CELLS if c.mode == "k1-rtg-loss"
                                  and "without" not in c.configuration], ids=lambda c: c.configuration[:60])
def test_every_k1_rtg_loss_step_cell_is_exact(cell):
    for regime in cell.regimes:
        record = oaudit.audit_step_cell(PolicySpec(), cell, regime)
        assert record.verdict == "exact" and record.rel_err < EXACT, record


def batch_and_args(extra=(), off_policy=True, rows=(0, 1, 2, 2)):
    problem = build_problem(oaudit.step_spec(PolicySpec()), off_policy=off_policy)
    batch = step_batch(problem, torch.tensor(rows), 2)
    args = oaudit.audit_args((*cells.STEP_BASE, *cells.RTG, *extra))
    return problem, batch, args


@pytest.mark.parametrize("extra,setup", [
    ((), oaudit.StepSetup()),
    ((*cells.DYNAMIC, "--actor.num_gpus_per_node", "2"), oaudit.StepSetup(ranks=2)),
    (("--train.micro_batch_size", "1", "--train.batch_size", "2", "--train.max_epochs", "2"), oaudit.StepSetup()),
])
def test_each_generation_batch_gives_the_core_surrogate_over_C(extra, setup):
    """Not only in expectation: on one generation batch, OpenRLHF's step accumulates exactly
    beta/C * sum of the core surrogate over every response it trains on (epochs x rows)."""
    problem, batch, args = batch_and_args(extra, rows=(0, 2, 1, 1))
    adapter.enable("k1-rtg-loss")
    total, steps = oaudit.ppo_step(batch, args, problem.policy, setup, kl_coef=0.7)
    epochs = args.train.max_epochs
    assert len(steps) == epochs * 4 // args.train.batch_size
    surrogate = terms.kl_rtg_loss(batch.logp, batch.ref_logp, batch.mask, beta=0.7,
                                  behaviour_logp=batch.behaviour_logp, normalizer=fixed_normalizer(args))
    (expected,) = torch.autograd.grad(epochs * surrogate, [problem.policy.logits])
    torch.testing.assert_close(total, expected.reshape(-1), **SAME_BATCH)


def test_the_normaliser_is_the_configured_constant_not_the_token_count():
    """Two batches with different token counts: the KL gradient per response is the same beta/C multiple."""
    problem, short, args = batch_and_args(rows=(0, 0, 0, 0))  # four 1-token responses
    long = step_batch(problem, torch.tensor([2, 2, 2, 2]), 2)  # four 2-token responses
    assert short.mask.sum() == 4 and long.mask.sum() == 8
    adapter.enable("k1-rtg-loss")
    assert fixed_normalizer(args) == 4 * 2  # --train.batch_size x --rollout.max_new_tokens
    for batch in (short, long):
        total, _ = oaudit.ppo_step(batch, args, problem.policy)
        per_row = terms.kl_rtg_loss(batch.logp, batch.ref_logp, batch.mask, beta=1.0,
                                    behaviour_logp=batch.behaviour_logp, normalizer=8.0, reduction="none")
        (expected,) = torch.autograd.grad(per_row.sum() / 8.0, [problem.policy.logits])
        torch.testing.assert_close(total, expected.reshape(-1), **SAME_BATCH)


def test_metrics_reach_openrlhfs_status(monkeypatch):
    problem, batch, args = batch_and_args(cells.CORRECTION)
    adapter.enable("k1-rtg-loss")
    seen = []
    from openrlhf.trainer.ray import ppo_actor

    original = ppo_actor.ActorPPOTrainer.training_step

    def spy(self, *a, **k):
        status = original(self, *a, **k)
        seen.append(status)
        return status

    monkeypatch.setattr(ppo_actor.ActorPPOTrainer, "training_step", spy)
    oaudit.ppo_step(batch, args, problem.policy, oaudit.StepSetup(actor_log_probs="current"))
    metrics = seen[0]["metrics"]
    for name in ("sequence_kl", "ess", "truncated_fraction", "capped_fraction", "mu_source"):
        assert f"kl_patches/{name}" in metrics
    assert float(metrics["kl_patches/mu_source"]) == 1.0  # vLLM's rollout_log_probs were mu
    assert 0 < float(metrics["kl_patches/ess"]) <= 1 and float(metrics["kl_patches/truncated_fraction"]) == 0


def test_without_rollout_log_probs_mu_is_the_actor_and_is_logged(caplog):
    problem, batch, args = batch_and_args()
    adapter.enable("k1-rtg-loss")
    from kl_patches.integrations.openrlhf import patches

    patches._warned.clear()
    oaudit.ppo_step(batch, args, problem.policy)
    assert "mu is the actor's recomputation" in caplog.text


def test_async_without_the_samplers_log_probs_is_refused_in_the_worker():
    from kl_patches.modes import KLModeError

    problem, batch, args = batch_and_args(("--train.async_enable",))
    adapter.enable("k1-rtg-loss")
    with pytest.raises(KLModeError, match="is_correction_level token"):
        oaudit.ppo_step(batch, args, problem.policy, oaudit.StepSetup(actor_log_probs="current"))


def test_truncation_is_read_in_the_worker_and_counted(monkeypatch):
    from kl_patches.integrations.openrlhf.kl import TRUNCATION_ENV

    monkeypatch.setenv(TRUNCATION_ENV, "1.01")
    problem, batch, args = batch_and_args(cells.CORRECTION)
    adapter.enable("k1-rtg-loss")
    total, _ = oaudit.ppo_step(batch, args, problem.policy, oaudit.StepSetup(actor_log_probs="current"))
    surrogate = terms.kl_rtg_loss(batch.logp, batch.ref_logp, batch.mask, beta=1.0, truncation=1.01,
                                  behaviour_logp=batch.behaviour_logp, normalizer=fixed_normalizer(args))
    (expected,) = torch.autograd.grad(surrogate, [problem.policy.logits])
    torch.testing.assert_close(total, expected.reshape(-1), **SAME_BATCH)
