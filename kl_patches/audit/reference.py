"""The core's reference configurations: the whole taxonomy of ``kl-gradients.md`` written in plain torch,
plus the two kl-patches modes, each as a loss estimator on an :class:`AuditBatch`.

These are kl-patches' own statements of each configuration (the adapters audit the libraries' real code
paths); they pin the facts of the shared doc so the engine, the modes and the adapters share one ground truth.
Every loss returns one value per group: the loss that group would produce as a training batch on its own,
with a per-sequence (batch-constant) normaliser unless the configuration says otherwise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, TypeAlias

import torch

from kl_patches import estimators, terms
from kl_patches.audit.cells import Cell
from kl_patches.audit.engine import AuditBatch, AuditProblem, build_problem, exact_kl_gradient
from kl_patches.audit.policies import PolicySpec
from kl_patches.audit.records import AuditRecord, audit_record
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY

Tensor: TypeAlias = torch.Tensor

TRUNCATION = 1.0  # the truncation level audited for the truncated k1-rtg-loss cell


def group_mean(per_row: Tensor, batch: AuditBatch) -> Tensor:
    """Mean over each group's responses: the batch-constant (per-sequence) normaliser."""
    return per_row.reshape(batch.num_groups, batch.group_size).mean(dim=-1)


def token_ratio(batch: AuditBatch) -> Tensor:
    """pi/mu per token, differentiable (PPO's ratio; 1 with gradient g_t on-policy)."""
    return estimators.masked(torch.exp(batch.logp - batch.behaviour_logp), batch.mask)


def policy_gradient(batch: AuditBatch, advantage: Tensor, per_sequence_mean: bool = False) -> Tensor:
    """-sum_t ratio_t * A (PPO surrogate without clipping; the clip is inactive at the sampling policy)."""
    if advantage.dim() == 1:
        advantage = advantage[:, None]
    per_token = -token_ratio(batch) * advantage.detach()
    per_row = estimators.masked(per_token, batch.mask).sum(-1)
    if per_sequence_mean:  # seq-mean-token-mean: weight 1/|y_i|
        per_row = per_row / batch.mask.sum(-1).clamp(min=1)
    return group_mean(per_row, batch)


def estimate(name: str, batch: AuditBatch) -> Tensor:
    return estimators.ESTIMATORS[name](batch.logp, batch.ref_logp, batch.mask)


def in_loss(name: str, per_sequence_mean: bool = False) -> Callable[[AuditBatch], Tensor]:
    def loss(batch: AuditBatch) -> Tensor:
        per_row = estimate(name, batch).sum(-1)
        if per_sequence_mean:
            per_row = per_row / batch.mask.sum(-1).clamp(min=1)
        return group_mean(per_row, batch)

    return loss


def in_reward(name: str, reward_to_go: bool = False, per_sequence_mean: bool = False):
    def loss(batch: AuditBatch) -> Tensor:
        # in-reward estimates use the sampling log-probs, as the libraries do (old / rollout log-probs)
        values = estimators.ESTIMATORS[name](batch.behaviour_logp, batch.ref_logp, batch.mask)
        advantage = -(terms.reverse_cumsum(values) if reward_to_go else values.sum(-1))
        return policy_gradient(batch, advantage, per_sequence_mean)

    return loss


def straight_through_k2(batch: AuditBatch) -> Tensor:
    """verl ``k3+``: k3's value with k2's gradient."""
    value, grad = estimate("k3", batch), estimate("k2", batch)
    return group_mean((value.detach() + grad - grad.detach()).sum(-1), batch)


def token_ratio_k3(batch: AuditBatch) -> Tensor:
    """TRL ``use_bias_correction_kl``: k3 times the differentiable token ratio."""
    return group_mean((estimate("k3", batch) * token_ratio(batch)).sum(-1), batch)


def detached_ratio_k2(batch: AuditBatch) -> Tensor:
    """OpenRLHF ``unbiased_gradient``: k2 gradient times the detached token ratio clamped at 10."""
    value, grad = estimate("k3", batch), estimate("k2", batch)
    straight = value.detach() + grad - grad.detach()
    return group_mean((straight * token_ratio(batch).detach().clamp(max=10.0)).sum(-1), batch)


def k3_reward_and_loss(batch: AuditBatch) -> Tensor:
    return in_reward("k3")(batch) + in_loss("k3")(batch)


def mode_k1_in_reward(batch: AuditBatch) -> Tensor:
    advantage = terms.kl_advantage(batch.behaviour_logp, batch.ref_logp, batch.mask, beta=1.0,
                                   group_ids=batch.group_ids)
    return policy_gradient(batch, advantage)


def mode_k1_rtg_loss(truncation: float | None = None, per_sequence_mean: bool = False,
                     baseline: str = terms.DEFAULT_RTG_BASELINE):
    def loss(batch: AuditBatch) -> Tensor:
        per_row = terms.kl_rtg_loss(
            batch.logp, batch.ref_logp, batch.mask, beta=1.0, group_ids=batch.group_ids, baseline=baseline,
            behaviour_logp=None if batch.on_policy else batch.behaviour_logp,
            truncation=None if batch.on_policy else truncation, reduction="none",
        )
        if per_sequence_mean:
            per_row = per_row / batch.mask.sum(-1).clamp(min=1)
        return group_mean(per_row, batch)

    return loss


def token_only_ratio_rtg(batch: AuditBatch) -> Tensor:
    """Reward-to-go with per-token ratios only (no prefix product): corrects each action, not the prefix."""
    log_ratio = estimators.masked_log_ratio(batch.logp.detach(), batch.ref_logp, batch.mask)
    rho = token_ratio(batch).detach()
    coefficient = terms.reverse_cumsum(rho * log_ratio)
    per_row = (estimators.masked(batch.logp, batch.mask) * coefficient).sum(-1)
    return group_mean(per_row, batch)


@dataclass(frozen=True)
class ReferenceCell(Cell):
    estimator: str
    placement: str
    loss: Callable[[AuditBatch], Tensor]
    reason_on: str
    reason_off: str
    mode: str = LIBRARY
    group_size: int = 1
    fix: str | None = f"kl-patches mode {K1_RTG_LOSS} (or {K1_IN_REWARD} on-policy)"


OFF_NO_WEIGHTS = "off-policy the samples come from mu and nothing reweights them, so it is not even that gradient"

CELLS: tuple[ReferenceCell, ...] = (
    ReferenceCell("k1 in loss", "k1", "loss", in_loss("k1"),
                  "E[sum_t g_t] = 0: no KL force at all, only noise.",
                  "E_mu[sum_t g_t]: no KL force; off-policy a spurious pull toward mu."),
    ReferenceCell("k2 in loss", "k2", "loss", in_loss("k2"),
                  "E[sum_t l_t g_t]: the own-token term only, missing the future-token KL.",
                  f"own-token term only; {OFF_NO_WEIGHTS}."),
    ReferenceCell("k3 in loss (GRPO default)", "k3", "loss", in_loss("k3"),
                  "E[sum_t (1 - e^{-l_t}) g_t]: the per-position forward-KL gradient.",
                  f"per-position forward-KL gradient; {OFF_NO_WEIGHTS}."),
    ReferenceCell("k3 value, k2 gradient (straight-through)", "k2-grad", "loss", straight_through_k2,
                  "E[sum_t l_t g_t]: own-token term only (verl k3+), missing the future-token KL.",
                  f"own-token term only; {OFF_NO_WEIGHTS}."),
    ReferenceCell("k3 x token ratio (bias-corrected k3)", "k3", "loss", token_ratio_k3,
                  "on-policy E[sum_t l_t g_t]: own-token term only (TRL use_bias_correction_kl).",
                  "token ratios correct the action at the visited prefix, not the prefix distribution, "
                  "and the future-token KL is still missing."),
    ReferenceCell("k2 gradient x detached token ratio", "k2-grad", "loss", detached_ratio_k2,
                  "E[sum_t l_t g_t]: own-token term only (OpenRLHF unbiased_gradient).",
                  "own-token term with token ratios only: misses the future-token KL and the prefix weights."),
    ReferenceCell("k1 in reward (sequence sum)", "k1", "reward", in_reward("k1"),
                  "E[sum_t g_t sum_t' l_t']: the score-function gradient of KL_seq, exact.",
                  "token-level PPO ratios correct each action but not the prefix distribution: biased off-policy."),
    ReferenceCell("k1 in reward (reward-to-go)", "k1", "reward", in_reward("k1", reward_to_go=True),
                  "E[sum_t g_t sum_{t'>=t} l_t']: exact, with lower variance than the sequence sum.",
                  "token-level PPO ratios correct each action but not the prefix distribution: biased off-policy."),
    ReferenceCell("k2 in reward", "k2", "reward", in_reward("k2"),
                  "E[G * sum_t l_t^2/2]: the gradient of E[sum k2], a different divergence.",
                  "the gradient of a different divergence, with token ratios only."),
    ReferenceCell("k3 in reward", "k3", "reward", in_reward("k3"),
                  "grad KL_seq + E[G sum_t (e^{-l_t} - 1)]: near pi_ref the regulariser nearly cancels.",
                  "the pathwise part of E[sum k3] is missing and token ratios do not fix the prefix."),
    ReferenceCell("k3 in reward and in loss", "k3", "reward+loss", k3_reward_and_loss,
                  "the full gradient of E[sum k3] = grad KL_seq: exact (higher variance).",
                  "the reward part is reweighted per token only and the loss part not at all: biased off-policy."),
    ReferenceCell("k1 in reward, seq-mean-token-mean", "k1", "reward", in_reward("k1", per_sequence_mean=True),
                  "weights response i by 1/|y_i|: the gradient of a length-weighted objective, "
                  "biased once lengths differ.",
                  "length-weighted and reweighted per token only.",
                  fix="a batch-constant normaliser (token sum / sequence mean), or kl-patches k1-rtg-loss"),
    ReferenceCell("k3 in loss, seq-mean-token-mean", "k3", "loss", in_loss("k3", per_sequence_mean=True),
                  "per-position forward-KL gradient, length-weighted.",
                  f"per-position forward-KL gradient, length-weighted; {OFF_NO_WEIGHTS}."),
    ReferenceCell("reward-to-go with token-only ratios", "k1", "loss", token_only_ratio_rtg,
                  "on-policy the ratios are 1: the reward-to-go score-function gradient, exact.",
                  "per-token ratios correct the action at the visited prefix but not the prefix distribution."),
    ReferenceCell("k1-rtg-loss, seq-mean-token-mean normaliser", "k1", "loss",
                  mode_k1_rtg_loss(per_sequence_mean=True),
                  "the right coefficients but a per-sequence 1/|y_i| normaliser: length-weighted, biased.",
                  "the right coefficients but a per-sequence 1/|y_i| normaliser: length-weighted, biased.",
                  mode=K1_RTG_LOSS, group_size=2, fix="use a batch-constant normaliser"),
    ReferenceCell("k1-rtg-loss, truncated weights", "k1", "loss", mode_k1_rtg_loss(truncation=TRUNCATION),
                  "on-policy all weights are 1, below the truncation: exact.",
                  f"prefix weights truncated at {TRUNCATION}: bounded bias for bounded variance.",
                  mode=K1_RTG_LOSS, group_size=2, fix="untruncated per-decision weights (truncation=None)"),
    ReferenceCell("k1-in-reward (kl-patches)", "k1", "reward", mode_k1_in_reward,
                  "sequence k1 with a leave-one-out baseline in the advantage: exact.",
                  "token-level PPO ratios correct each action but not the prefix distribution; "
                  f"off-policy use {K1_RTG_LOSS}.",
                  mode=K1_IN_REWARD, group_size=2, fix=f"kl-patches mode {K1_RTG_LOSS}"),
    ReferenceCell("k1-rtg-loss (kl-patches)", "k1", "loss", mode_k1_rtg_loss(),
                  "reward-to-go score-function surrogate (no baseline, the measured default): exact.",
                  "per-decision prefix weights rho_{1:t'} make the reward-to-go surrogate exact under mu.",
                  mode=K1_RTG_LOSS, group_size=2),
    ReferenceCell("k1-rtg-loss, sequence leave-one-out baseline", "k1", "loss",
                  mode_k1_rtg_loss(baseline="sequence-loo"),
                  "the others' mean weighted sequence KL as baseline (whole group): exact.",
                  "the others' mean weighted sequence KL, times rho_{1:t}: exact under mu.",
                  mode=K1_RTG_LOSS, group_size=2),
    ReferenceCell("k1-rtg-loss, position leave-one-out baseline", "k1", "loss",
                  mode_k1_rtg_loss(baseline="position-loo"),
                  "the others' mean reward-to-go at the same position as baseline (whole group): exact.",
                  "the others' mean weighted reward-to-go at the same position, times rho_{1:t}: exact under mu.",
                  mode=K1_RTG_LOSS, group_size=2),
)


# --------------------------------------------------------------------------------------------------------------
# Step cells: the whole generation batch through a training step that sorts rows by length and splits them into
# micro-batches (verl balance_batch, dynamic batch sizes), accumulating micro-batch gradients. They show what a
# run adds to the formula (kl-gradients.md section 8): statistics and normalisers taken inside the step.
# --------------------------------------------------------------------------------------------------------------

STEP_GROUP_SIZE = 3  # one group of 3 responses per generation batch
STEP_MICRO_BATCH = 2  # micro-batches of 2 after sorting by length: the shortest two share one
#: Step cells enumerate every ordered batch: vocabulary 2 (one token and EOS), horizon 3 gives 4 responses of
#: lengths 1, 2, 3, 3 and 4^3 = 64 batches per cell, enough for length sorting to matter.
STEP_VOCAB, STEP_HORIZON = 2, 3


@dataclass(frozen=True)
class StepCell(Cell):
    statistics: str  # "whole-batch" (group_statistics before the split) or "micro-batch" (inside each split)
    baseline: str
    normalizer: str  # "fixed" (sequences x max length) or "tokens" (the realised token count)
    reason_on: str
    reason_off: str
    fix: str | None = None
    mode: str = K1_RTG_LOSS


def step_function(problem: AuditProblem, cell: StepCell):
    """The cell's training step on a whole generation batch: statistics, sort by length, micro-batch, accumulate."""
    from kl_patches import statistics
    from kl_patches.audit.engine import flat_grad

    parameters = problem.parameters()
    length = problem.tokens.shape[1]

    def step(batch: AuditBatch) -> Tensor:
        with warnings.catch_warnings():
            # micro-batches of one row have no leave-one-out baseline: the very defect this cell measures
            warnings.simplefilter("ignore", terms.KLPatchesWarning)
            return accumulate(batch)

    def accumulate(batch: AuditBatch) -> Tensor:
        behaviour = None if batch.on_policy else batch.behaviour_logp
        whole = statistics.group_statistics(batch.behaviour_logp, batch.ref_logp, batch.mask, batch.group_ids,
                                            rtg_baseline=cell.baseline)
        fixed = statistics.FixedNormalizer(length).constant(batch.tokens.shape[0])
        order = torch.argsort(batch.mask.sum(-1), stable=True)
        total = 0.0
        for rows in order.split(STEP_MICRO_BATCH):
            baseline = whole.select(rows).rtg_baseline if cell.statistics == "whole-batch" else cell.baseline
            loss = terms.kl_rtg_loss(
                batch.logp[rows], batch.ref_logp[rows], batch.mask[rows], beta=1.0, group_ids=batch.group_ids[rows],
                baseline=baseline, behaviour_logp=None if behaviour is None else behaviour[rows],
                normalizer=fixed if cell.normalizer == "fixed" else "tokens")
            if cell.normalizer == "tokens":  # each micro-batch's share of the step, as token-mean libraries weight it
                loss = loss * batch.mask[rows].sum() / batch.mask.sum().clamp(min=1)
            total = total + loss
        return flat_grad(total, parameters)

    return step


STEP_CELLS: tuple[StepCell, ...] = (
    StepCell("step: k1-rtg-loss, length-sorted micro-batches, fixed normaliser (kl-patches)", "whole-batch", "none",
             "fixed", "no cross-row statistic and a constant normaliser: any order and split give the same gradient.",
             "per-decision weights per row, a constant normaliser: exact whatever the split."),
    StepCell("step: position leave-one-out from the whole batch, length-sorted micro-batches", "whole-batch",
             "position-loo", "fixed", "the baseline is computed before the split and travels with the rows: exact.",
             "the baseline is computed before the split and travels with the rows: exact under mu."),
    StepCell("step: leave-one-out inside each length-sorted micro-batch", "micro-batch", "sequence-loo", "fixed",
             "which rows share a micro-batch depends on their lengths, so the baseline depends on the sample.",
             "which rows share a micro-batch depends on their lengths, so the baseline depends on the sample.",
             fix="compute baselines over the whole generation batch (kl_patches.statistics.group_statistics)"),
    StepCell("step: realised token count as normaliser", "whole-batch", "none", "tokens",
             "dividing by the batch's realised token count is a ratio estimator: biased by O(1/N).",
             "dividing by the batch's realised token count is a ratio estimator: biased by O(1/N).",
             fix="a normaliser fixed before sampling (sequences x max length)"),
)


def run_steps(spec: PolicySpec, regimes: tuple[str, ...] = ("on", "off")) -> list[AuditRecord]:
    """Audit every step cell on the spec's policy kind, seed and horizon (capped at :data:`STEP_HORIZON`), with
    vocabulary :data:`STEP_VOCAB`."""
    from dataclasses import replace

    import kl_patches

    step_spec = replace(spec, vocab=STEP_VOCAB, horizon=min(spec.horizon, STEP_HORIZON))
    records = []
    for regime in regimes:
        problem = build_problem(step_spec, off_policy=regime == "off")
        truth = exact_kl_gradient(problem)
        mean_length = _expected_length(problem)
        for cell in STEP_CELLS:
            fixed = cell.normalizer == "fixed"
            records.append(audit_record(
                problem, None, step_fn=step_function(problem, cell), num_groups=1, group_size=STEP_GROUP_SIZE,
                library="core", library_version=kl_patches.__version__, configuration=cell.configuration,
                estimator="k1", placement="loss", mode=cell.mode, truth=truth, fix=cell.fix,
                scale=1.0 / (problem.tokens.shape[1] if fixed else mean_length),
                reason=cell.reason(regime == "on"),
                micro_batch=STEP_MICRO_BATCH, order="sorted by length",
            ))
    return records


def _expected_length(problem: AuditProblem) -> float:
    """E[|y|] under the sampling policy: the nominal constant a realised-token normaliser stands for."""
    from kl_patches.audit.engine import enumerated_logprobs

    with torch.no_grad():
        *_, weights = enumerated_logprobs(problem)
    return float((weights * problem.mask.sum(-1).to(weights.dtype)).sum())


def run_reference(spec: PolicySpec, cells: tuple[ReferenceCell, ...] = CELLS,
                  regimes: tuple[str, ...] = ("on", "off"), steps: bool = True) -> list[AuditRecord]:
    """Audit every reference cell on the policy ``spec``, on- and off-policy, then (``steps``) the step cells."""
    import kl_patches

    records = []
    for regime in regimes:
        problem: AuditProblem = build_problem(spec, off_policy=regime == "off")
        truth = exact_kl_gradient(problem)
        for cell in cells:
            records.append(audit_record(
                problem, cell.loss, library="core", library_version=kl_patches.__version__,
                configuration=cell.configuration, estimator=cell.estimator, placement=cell.placement,
                mode=cell.mode, group_size=cell.group_size, truth=truth, fix=cell.fix,
                reason=cell.reason(regime == "on"),
            ))
    if steps:
        records.extend(run_steps(spec, regimes))
    return records
