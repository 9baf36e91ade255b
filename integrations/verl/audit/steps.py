"""Step-level audit cells: verl's whole actor update (``harness.StepHarness``) on an enumerated generation batch.

Every kl-patches configuration is audited here, through the step, with the user's settings: balancing, rank
partition (dp simulated), micro-batching (fixed or dynamic sizes), the normaliser, and the log-probs the run
takes as mu. The declared ``scale`` is the constant the configuration multiplies grad KL_seq by: for k1-rtg-loss
``kl_loss_coef x rows / C`` with C the fixed normaliser of ``kl.fixed_normalizer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from kl_patches.audit import AuditRecord, PolicySpec, audit_record, build_problem, exact_kl_gradient
from kl_patches.audit.cells import Cell
from kl_patches.audit.records import NOT_COVERED
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY

from kl_patches.integrations.verl.config import LOSS_OVERRIDES, check_trainer_config, lookup
from kl_patches.integrations.verl.compat import FLASH_ATTN_NOTE, loss_agg_modes
from kl_patches.integrations.verl.kl import fixed_normalizer

#: the step audit's generation batch: one prompt x STEP_GROUP_SIZE responses (every ordered batch enumerated)
STEP_GROUP_SIZE = 2
STEP_GROUPS = 1
#: the step audit's horizon cap: every ordered batch of the whole step is enumerated (7 responses at vocab 3)
STEP_HORIZON = 2


def step_spec(spec: PolicySpec) -> PolicySpec:
    """The policy the step audit enumerates: ``spec`` with the horizon capped at :data:`STEP_HORIZON` (recorded)."""
    return replace(spec, horizon=min(spec.horizon, STEP_HORIZON))

#: the overrides every step cell starts from: verl's defaults, with a tiny batch matching the enumeration
BASE = (
    "data.train_batch_size=1", "actor_rollout_ref.actor.ppo_mini_batch_size=1",
    f"actor_rollout_ref.rollout.n={STEP_GROUP_SIZE}", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1", "algorithm.adv_estimator=grpo",
)
#: the engine's log-probs as mu: verl 0.9's default, not 0.8's (its rollout.calculate_log_probs defaults to False)
ENGINE_LOGP = ("actor_rollout_ref.rollout.calculate_log_probs=True",)
RTG = ("actor_rollout_ref.actor.use_kl_loss=True", "actor_rollout_ref.actor.kl_loss_type=k1-rtg-loss",
       "actor_rollout_ref.actor.kl_loss_coef=1.0", *ENGINE_LOGP)
IN_REWARD = ("algorithm.use_kl_in_reward=True", "algorithm.kl_penalty=k1-in-reward", "algorithm.kl_ctrl.kl_coef=1.0")
DYNAMIC = ("actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=True",
           "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=3")
NO_ENGINE_LOGP = ("actor_rollout_ref.rollout.calculate_log_probs=False",)  # after RTG: the later override wins


@dataclass(frozen=True)
class StepCell(Cell):
    overrides: tuple[str, ...]
    mode: str
    reason_on: str
    reason_off: str
    fix_on: str | None = None
    fix_off: str | None = None
    dp_size: int = 1
    mismatch: float = 0.0
    notes: tuple[str, ...] = field(default_factory=tuple)


_DEFAULTS: list = []


def compose(overrides: Sequence[str], horizon: int):
    """verl's ppo_trainer with ``overrides`` and ``data.max_response_length`` = the audit's horizon, validated by
    kl-patches' driver checks (which install the workers' fixed settings). verl's defaults are composed by hydra
    once per process; the overrides are applied with hydra's own override parser (as for a dumped config)."""
    import copy

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    from kl_patches.integrations.verl.audit.user import load_user_config

    if not _DEFAULTS:
        _DEFAULTS.append(load_user_config(None, []))
    config = copy.deepcopy(_DEFAULTS[0])
    for override in OverridesParser.create().parse_overrides([*overrides, f"data.max_response_length={horizon}"]):
        with open_dict(config):
            OmegaConf.update(config, override.key_or_group, override.value(), merge=True)
    check_trainer_config(config)
    return config


def declared_scale(config, rows: int) -> float:
    """The constant verl's step multiplies grad KL_seq by when its KL terms are exact."""
    actor = config.actor_rollout_ref.actor
    scale = 0.0
    if actor.use_kl_loss and actor.kl_loss_type == K1_RTG_LOSS:
        num = int(actor.ppo_mini_batch_size) * int(config.actor_rollout_ref.rollout.n)
        c = fixed_normalizer(actor.loss_agg_mode, num, int(config.data.max_response_length), actor.loss_scale_factor)
        scale += float(actor.kl_loss_coef) * rows / c
    if config.algorithm.use_kl_in_reward and config.algorithm.kl_penalty == K1_IN_REWARD:
        num = int(actor.ppo_mini_batch_size) * int(config.actor_rollout_ref.rollout.n)
        mode = actor.loss_agg_mode
        length = int(config.data.max_response_length)
        # the policy loss's own normaliser, at its configured bound (token-mean's realised count is what's audited)
        c = {"token-mean": num * length, "token-sum": 1.0, "seq-mean-token-sum": num,
             "seq-mean-token-sum-norm": num * (actor.loss_scale_factor or length),
             "seq-mean-token-mean": num * length}[mode]
        scale += float(config.algorithm.kl_ctrl.kl_coef) * rows / c
    return scale


def placement(config) -> str:
    loss = bool(config.actor_rollout_ref.actor.use_kl_loss)
    reward = bool(config.algorithm.use_kl_in_reward)
    return "reward+loss" if loss and reward else ("loss" if loss else "reward")


def run_step_cell(cell: StepCell, spec: PolicySpec, off_policy: bool, version: str, *, config=None,
                  user_config: bool = False, truth=None, problem=None) -> AuditRecord:
    from kl_patches.integrations.verl.audit.harness import StepHarness

    spec = step_spec(spec)
    problem = problem or build_problem(spec, off_policy=off_policy)
    on = problem.on_policy
    try:
        config = config if config is not None else compose([*BASE, *cell.overrides], spec.horizon)
        harness = StepHarness(config, problem, dp_size=cell.dp_size, mismatch=cell.mismatch)
        rows = STEP_GROUPS * STEP_GROUP_SIZE
        record = audit_record(
            problem, None, step_fn=harness.step, num_groups=STEP_GROUPS, group_size=STEP_GROUP_SIZE,
            library="verl", library_version=version, configuration=cell.configuration, estimator="k1",
            placement=placement(config), mode=cell.mode,
            scale=declared_scale(config, rows), truth=truth if truth is not None else exact_kl_gradient(problem),
            reason=cell.reason(on), fix=cell.fix_for(on),
            notes=[STEP_NOTE, *cell.notes], user_config=user_config, dp_size=cell.dp_size, mismatch=cell.mismatch,
            overrides=" ".join(cell.overrides),
        )
        if harness.placeholder_used:
            record.notes.append(FLASH_ATTN_NOTE)
        return record
    except Exception as error:  # a verl path this CPU audit cannot run: say so, never drop the cell
        return AuditRecord(
            library="verl", library_version=version, configuration=cell.configuration, mode=cell.mode,
            estimator="k1", placement="loss", policy=problem.policy_label, rel_err=None, cosine=None,
            norm_ratio=None, verdict=NOT_COVERED, reason=f"verl's step raised {type(error).__name__}: {error}",
            fix=None, spec=spec.as_dict(), user_config=user_config,
        )


STEP_NOTE = ("step audit: verl's driver (validate_config, _balance_batch, apply_kl_penalty, compute_advantage, "
             "dispatch chunks, left_right_2_no_padding) and worker (make_iterator, the engine's global token count, "
             "prepare_micro_batches, ppo_loss, backward per micro-batch, FSDP's average over dp ranks) on one prompt x "
             f"{STEP_GROUP_SIZE} responses, every ordered batch enumerated; KL coefficient 1, zero task reward")

EXACT_RTG = ("k1 reward-to-go surrogate, no cross-row statistic, normaliser fixed from the configuration, mu = the "
             "sampler's log-probs: exact through verl's step.")
EXACT_RTG_OFF = ("per-decision prefix weights from the sampler's log-probs (rollout_log_probs) keep it exact on stale "
                 "batches, through verl's step.")
MISMATCH_FIX = "actor_rollout_ref.rollout.calculate_log_probs=True"
REWARD_FIX_OFF = f"{LOSS_OVERRIDES} algorithm.use_kl_in_reward=False"


def default_step_cells() -> list[StepCell]:
    cells = [
        StepCell("k1-rtg-loss step: balance_batch, micro-batch 1, dp 1", RTG, K1_RTG_LOSS, EXACT_RTG, EXACT_RTG_OFF),
        StepCell("k1-rtg-loss step: balance_batch, micro-batch 2, dp 1",
                 (*RTG, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"), K1_RTG_LOSS, EXACT_RTG,
                 EXACT_RTG_OFF),
        StepCell("k1-rtg-loss step: balance_batch, dp 2", RTG, K1_RTG_LOSS, EXACT_RTG, EXACT_RTG_OFF, dp_size=2),
        StepCell("k1-rtg-loss step: dynamic batch sizes, dp 2", (*RTG, *DYNAMIC), K1_RTG_LOSS, EXACT_RTG,
                 EXACT_RTG_OFF, dp_size=2),
    ]
    for mode in loss_agg_modes()[1:]:
        cells.append(StepCell(f"k1-rtg-loss step: loss_agg_mode={mode}",
                              (*RTG, f"actor_rollout_ref.actor.loss_agg_mode={mode}"), K1_RTG_LOSS, EXACT_RTG,
                              EXACT_RTG_OFF))
    cells += [
        StepCell("k1-rtg-loss step: engine/trainer mismatch 0.1, rollout log-probs", RTG, K1_RTG_LOSS,
                 "the engine's rollout_log_probs are mu: the trainer's differing old_log_probs do not enter the KL "
                 "term: exact.", EXACT_RTG_OFF, mismatch=0.1),
        StepCell("k1-rtg-loss step: engine/trainer mismatch 0.1, no rollout log-probs", (*RTG, *NO_ENGINE_LOGP),
                 K1_RTG_LOSS,
                 "without the engine's log-probs mu is the trainer's recomputation, which differs from the sampler: "
                 "the weights are wrong by the mismatch (the driver warns).",
                 "mu is the trainer's recomputation, not the sampler: biased by the mismatch (the driver warns).",
                 MISMATCH_FIX, MISMATCH_FIX, mismatch=0.1),
        StepCell("k1-in-reward step: grpo, loss_agg_mode=seq-mean-token-sum", (*IN_REWARD,
                 "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum"), K1_IN_REWARD,
                 "sequence k1 with a leave-one-out baseline over the whole uid group (driver), after GRPO's std, "
                 "policy loss normalised by the configured mini-batch size: exact.",
                 "exact on-policy only: the PPO token ratio corrects each action but not the prefix distribution.",
                 None, REWARD_FIX_OFF),
        StepCell("k1-in-reward step: grpo, loss_agg_mode=token-mean", IN_REWARD, K1_IN_REWARD,
                 "the KL part is right, but verl's token-mean policy loss divides by the mini-batch's realised token "
                 "count (batch_num_tokens): a ratio estimator, biased by O(1/batch).",
                 "exact on-policy only, and verl's token-mean divides by the realised token count.",
                 "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum (or " + LOSS_OVERRIDES + ")",
                 REWARD_FIX_OFF),
    ]
    return cells


def check_step_cells() -> list[StepCell]:
    """The few step cells ``kl-patches check --library verl`` runs (every ordered batch of every cell is a whole
    verl step): verl's defaults with dp 2 and an engine/trainer mismatch (rollout log-probs present), dynamic batch
    sizes with another aggregation, k1-in-reward with a configured policy-loss normaliser (about 30 s of CPU
    together). The tests run all of :func:`default_step_cells`; a user configuration that drops the engine's
    log-probs or keeps token-mean under k1-in-reward is audited (and reported biased) by ``--config``."""
    return [
        StepCell("k1-rtg-loss step: verl defaults (balance_batch, token-mean), dp 2, engine/trainer mismatch 0.1, "
                 "rollout log-probs", RTG, K1_RTG_LOSS, EXACT_RTG, EXACT_RTG_OFF, dp_size=2,
                 mismatch=0.1),
        StepCell("k1-rtg-loss step: dynamic batch sizes, dp 2, loss_agg_mode=seq-mean-token-sum-norm",
                 (*RTG, *DYNAMIC, "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm"), K1_RTG_LOSS,
                 EXACT_RTG, EXACT_RTG_OFF, dp_size=2),
        *[cell for cell in default_step_cells() if cell.mode == K1_IN_REWARD and "seq-mean-token-sum" in
          cell.configuration],
    ]


def audit_steps(spec: PolicySpec, version: str, cells: Sequence[StepCell] | None = None) -> list[AuditRecord]:
    records = []
    spec = step_spec(spec)
    for off_policy in (False, True):
        problem = build_problem(spec, off_policy=off_policy)
        truth = exact_kl_gradient(problem)
        for cell in (cells if cells is not None else check_step_cells()):
            records.append(run_step_cell(cell, spec, off_policy, version, truth=truth, problem=problem))
    return records
