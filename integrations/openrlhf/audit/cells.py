"""The configurations ``kl-patches check --library openrlhf`` audits, and what each should give.

* :data:`CELLS` -- OpenRLHF's own KL options (``library`` mode), each with the reason it is biased; ``audit`` runs
  them as one-prompt step cells (the reason gains the step's token-count normaliser). The one direct function call
  (``compute_approx_kl`` without ``log_probs_old``) is audited at the loss and can never certify.
* :data:`STEP_CELLS` -- kl-patches' modes and reference configurations through OpenRLHF's real ``ppo_train``
  (:mod:`.harness`: replay buffer, shuffle, packing, dynamic batching, accumulation, ranks, the normaliser, the
  log-probs taken as mu). Every "exact" in the table comes from a step cell.
"""

from __future__ import annotations

from dataclasses import dataclass

from kl_patches.audit.cells import Cell as CellBase
from kl_patches.integrations.openrlhf.audit.harness import GROUP_SIZE, StepSetup
from kl_patches.modes import K1_IN_REWARD, K1_RTG_LOSS, LIBRARY

OFF_RATIO = ("the PPO ratio pi/mu is per token: it corrects the action at the visited prefix, not the prefix "
             "distribution, and clipping drops tokens whose ratio left the trust region")
WHITEN = ("the advantages, KL included, are whitened with the batch's own token mean and std: sample-dependent "
          "statistics (a bias that shrinks with the batch; beta is rescaled by 1/std)")
OWN_TOKEN = "E[sum_t l_t g_t]: the own-token term only, missing the future-token KL"
RATIO = ("through OpenRLHF's step the loss is divided by the step's realised token count (iter_grad_accum_global_norm"
         " / get_loss_batch_info): a ratio estimator, biased by O(1/N)")


def _reward(adv: str, extra: tuple[str, ...] = (), estimator: str = "k1") -> tuple[str, ...]:
    return ("--algo.advantage.estimator", adv, "--algo.kl.estimator", estimator, "--rollout.n_samples_per_prompt",
            str(GROUP_SIZE), *extra)


def _loss(estimator: str, unbiased: bool) -> tuple[str, ...]:
    return (*_reward("group_norm", estimator=estimator), "--algo.kl.use_loss",
            *(("--algo.kl.unbiased_gradient",) if unbiased else ()))


@dataclass(frozen=True)
class Cell(CellBase):
    argv: tuple[str, ...]
    estimator: str
    placement: str
    reason_on: str
    reason_off: str
    mode: str = LIBRARY
    direct: tuple | None = None  # (estimator, unbiased_gradient, with_old) for a direct compute_approx_kl cell
    fix: str | None = "--algo.kl.mode k1-rtg-loss"


OFF_RATIO = ("the PPO ratio pi/mu is per token: it corrects the action at the visited prefix, not the prefix "
             "distribution, and clipping drops tokens whose ratio left the trust region")
WHITEN = ("the advantages, KL included, are whitened with the batch's own token mean and std: sample-dependent "
          "statistics (a bias that shrinks with the batch; beta is rescaled by 1/std)")
OWN_TOKEN = "E[sum_t l_t g_t]: the own-token term only, missing the future-token KL"


def _reward(adv: str, extra: tuple[str, ...] = (), estimator: str = "k1") -> tuple[str, ...]:
    return ("--algo.advantage.estimator", adv, "--algo.kl.estimator", estimator, "--rollout.n_samples_per_prompt",
            str(GROUP_SIZE), *extra)


def _loss(estimator: str, unbiased: bool) -> tuple[str, ...]:
    return (*_reward("group_norm", estimator=estimator), "--algo.kl.use_loss",
            *(("--algo.kl.unbiased_gradient",) if unbiased else ()))


RTG_EXACT = ("k1 per-token reward, reward-to-go (gamma = 1), untouched by the estimator: the exact score-function "
             "gradient")

CELLS: tuple[Cell, ...] = (
    Cell("--algo.advantage.estimator gae (OpenRLHF default; gamma = lambd = 1, critic values 0)", _reward("gae"),
         "k1", "reward", f"reward-to-go, but {WHITEN}.", f"{OFF_RATIO}; and {WHITEN}.",
         fix="--algo.advantage.estimator rloo / group_norm / dr_grpo, or --algo.kl.mode k1-rtg-loss"),
    Cell("--algo.advantage.estimator reinforce", _reward("reinforce"), "k1", "reward",
         f"reward-to-go, but {WHITEN}.", f"{OFF_RATIO}; and {WHITEN}.",
         fix="--algo.advantage.estimator rloo / group_norm / dr_grpo, or --algo.kl.mode k1-rtg-loss"),
    Cell("--algo.advantage.estimator reinforce_baseline", _reward("reinforce_baseline"), "k1", "reward",
         f"reward-to-go, but {WHITEN}.", f"{OFF_RATIO}; and {WHITEN}.",
         fix="--algo.advantage.estimator rloo / group_norm / dr_grpo, or --algo.kl.mode k1-rtg-loss"),
    Cell("--algo.advantage.estimator rloo", _reward("rloo"), "k1", "reward", f"{RTG_EXACT}.", f"{OFF_RATIO}."),
    Cell("--algo.advantage.estimator group_norm", _reward("group_norm"), "k1", "reward",
         f"{RTG_EXACT} (the group std divides the task reward only).", f"{OFF_RATIO}."),
    Cell("--algo.advantage.estimator dr_grpo", _reward("dr_grpo"), "k1", "reward", f"{RTG_EXACT}.", f"{OFF_RATIO}."),
    Cell("--algo.kl.estimator k2 (rloo)", _reward("rloo", estimator="k2"), "k2", "reward",
         "E[G * sum_t l_t^2/2]: the gradient of a different divergence.", f"a different divergence; {OFF_RATIO}.",
         fix="--algo.kl.estimator k1, or --algo.kl.mode k1-in-reward / k1-rtg-loss"),
    Cell("--algo.kl.estimator k3 (rloo)", _reward("rloo", estimator="k3"), "k3", "reward",
         "grad KL_seq + E[G sum_t (e^{-l_t} - 1)]: near pi_ref the regulariser nearly cancels.",
         f"the pathwise part of E[sum k3] is missing; {OFF_RATIO}.",
         fix="--algo.kl.estimator k1, or --algo.kl.mode k1-in-reward / k1-rtg-loss"),
    Cell("--actor.loss_agg_mode seq-mean-token-mean (rloo)", _reward("rloo", ("--actor.loss_agg_mode",
                                                                                "seq-mean-token-mean")),
         "k1", "reward", "each response weighted by 1/|y|: a length-weighted objective.",
         f"length-weighted; {OFF_RATIO}.", fix="--actor.loss_agg_mode token-mean, or --algo.kl.mode k1-rtg-loss"),
    Cell("--algo.kl.use_loss --algo.kl.estimator k1", _loss("k1", False), "k1", "loss",
         "E[sum_t g_t] = 0: no KL force at all, only noise.", "no KL force; off-policy a spurious pull toward mu."),
    Cell("--algo.kl.use_loss --algo.kl.estimator k2", _loss("k2", False), "k2", "loss", f"{OWN_TOKEN}.",
         f"{OWN_TOKEN}; nothing reweights the samples from mu."),
    Cell("--algo.kl.use_loss --algo.kl.estimator k3 (GRPO)", _loss("k3", False), "k3", "loss",
         "E[sum_t (1 - e^{-l_t}) g_t]: the per-position forward-KL gradient.",
         "per-position forward-KL gradient; nothing reweights the samples from mu."),
    Cell("--algo.kl.use_loss --algo.kl.estimator k1 --algo.kl.unbiased_gradient", _loss("k1", True), "k2-grad",
         "loss", f"{OWN_TOKEN} (k2 gradient x detached token ratio).",
         "own-token term with token ratios (clamped at 10) only: misses the future-token KL and the prefix weights."),
    Cell("--algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.unbiased_gradient", _loss("k3", True), "k2-grad",
         "loss", f"{OWN_TOKEN} (k3 value, k2 gradient x detached token ratio).",
         "own-token term with token ratios (clamped at 10) only: misses the future-token KL and the prefix weights."),
    Cell("compute_approx_kl(k3, unbiased_gradient=True) without log_probs_old", (), "k2-grad", "loss",
         f"{OWN_TOKEN} (weight 1).", "own-token term and no importance weight at all.",
         direct=("k3", True, False)),
)


# ------------------------------------------------------------------------------------------------- step cells

#: The step cells' generation batch: 2 prompts x 2 responses of at most 2 tokens (vocab 2 incl. EOS: 3 responses of
#: lengths 1, 2, 2; 81 ordered batches, all enumerated).
STEP_VOCAB, STEP_HORIZON, STEP_GROUPS = 2, 2, 2
STEP_BASE = ("--rollout.n_samples_per_prompt", str(GROUP_SIZE), "--rollout.batch_size", str(STEP_GROUPS),
             "--rollout.max_new_tokens", str(STEP_HORIZON), "--train.batch_size", "4", "--train.micro_batch_size", "2",
             "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "1")
RTG = ("--algo.kl.use_loss", "--algo.advantage.estimator", "group_norm")
PACKED = ("--ds.packing_samples", "--vllm.num_engines", "1")
DYNAMIC = (*PACKED, "--train.dynamic_batch_enable", "--train.max_tokens_per_gpu", "4")
CORRECTION = ("--algo.advantage.is_correction_level", "token")
MISMATCH = StepSetup(actor_log_probs="current")

RTG_EXACT_STEP = ("k1 reward-to-go surrogate, mu = the sampler's log-probs, no cross-row statistic, KL normaliser "
                  "C = --train.batch_size x --rollout.max_new_tokens fixed before sampling: exact through the step")
MU_ACTOR = ("mu is action_log_probs, the actor's recomputation with the current weights, not the sampler: the "
            "importance weights correct towards the wrong policy")


@dataclass(frozen=True)
class StepCell(CellBase):
    argv: tuple[str, ...]
    mode: str
    estimator: str
    placement: str
    reason_on: str
    reason_off: str
    setup: StepSetup = StepSetup()
    fix: str | None = "--algo.kl.mode k1-rtg-loss"
    regimes: tuple[str, ...] = ("on", "off")
    quick: tuple[str, ...] = ()  # the regimes `kl-patches check --library openrlhf` runs (the tests run all)
    groups: int = STEP_GROUPS  # prompts in the generation batch (1: 9 ordered batches, 2: 81)


#: One prompt x 2 responses, --train.batch_size 2, --train.micro_batch_size 1: gradient accumulation 2 on one rank (or
#: one micro-batch on each of 2 ranks); 9 ordered generation batches, for the quick table.
ONE = ("--rollout.batch_size", "1", "--train.batch_size", "2", "--train.micro_batch_size", "1")
TWO_RANKS = ("--actor.num_gpus_per_node", "2")
WRONG_MU_FIX = ("--algo.advantage.is_correction_level token (vLLM records its log-probs; the launcher refuses async "
                "without it and warns in sync runs)")

STEP_CELLS: tuple[StepCell, ...] = (
    # the quick table: one prompt per generation batch
    StepCell("--algo.kl.mode k1-rtg-loss (micro-batch 1: accumulation 2)", (*RTG, *ONE), K1_RTG_LOSS, "k1", "loss",
             f"{RTG_EXACT_STEP}.", f"{RTG_EXACT_STEP}; per-decision prefix weights rho_1:t.", quick=("on", "off"),
             groups=1),
    StepCell("--algo.kl.mode k1-rtg-loss --ds.packing_samples --train.dynamic_batch_enable, 2 ranks",
             (*RTG, *ONE, *DYNAMIC, *TWO_RANKS), K1_RTG_LOSS, "k1", "loss",
             f"{RTG_EXACT_STEP}; dynamic batching on 2 ranks changes nothing.",
             f"{RTG_EXACT_STEP}; dynamic batching on 2 ranks changes nothing.", StepSetup(ranks=2), quick=("off",),
             groups=1),
    StepCell("--algo.kl.mode k1-rtg-loss --algo.advantage.is_correction_level token, vLLM/actor mismatch (or "
             "--train.async_enable)", (*RTG, *ONE, *CORRECTION), K1_RTG_LOSS, "k1", "loss", f"{RTG_EXACT_STEP}.",
             f"{RTG_EXACT_STEP}: the weights use vLLM's rollout_log_probs although the actor recomputed others.",
             MISMATCH, regimes=("off",), quick=("off",), groups=1),
    StepCell("--algo.kl.mode k1-rtg-loss without is_correction, vLLM/actor mismatch (or --train.async_enable)",
             (*RTG, *ONE), K1_RTG_LOSS, "k1", "loss", "", f"{MU_ACTOR}.", MISMATCH, fix=WRONG_MU_FIX,
             regimes=("off",), quick=("off",), groups=1),
    StepCell("--algo.kl.mode k1-in-reward (rloo)", ("--algo.advantage.estimator", "rloo", *ONE), K1_IN_REWARD, "k1",
             "reward", f"k1 reward-to-go is the exact gradient per response, but {RATIO}.",
             f"{OFF_RATIO}; and {RATIO}.", quick=("on",), groups=1),
    # the tests: two prompts per generation batch (the replay buffer shuffles across groups, dynamic batches mix them)
    StepCell("--algo.kl.mode k1-rtg-loss (2 prompts, train batch 4, micro-batch 2: accumulation 2)", RTG,
             K1_RTG_LOSS, "k1", "loss", f"{RTG_EXACT_STEP}.", f"{RTG_EXACT_STEP}."),
    StepCell("--algo.kl.mode k1-rtg-loss --ds.packing_samples --train.dynamic_batch_enable, 2 prompts, 2 ranks",
             (*RTG, *DYNAMIC, *TWO_RANKS), K1_RTG_LOSS, "k1", "loss",
             f"{RTG_EXACT_STEP}; dynamic batches grouped by length on 2 ranks change nothing.",
             f"{RTG_EXACT_STEP}; dynamic batches on 2 ranks change nothing.", StepSetup(ranks=2)),
    StepCell("--algo.kl.mode k1-rtg-loss --train.micro_batch_size 1 --train.batch_size 2 --train.max_epochs 2, "
             "2 prompts, 2 ranks", (*RTG, "--train.micro_batch_size", "1", "--train.batch_size", "2",
                                    "--train.max_epochs", "2", *TWO_RANKS), K1_RTG_LOSS, "k1", "loss",
             f"{RTG_EXACT_STEP}; 4 optimizer steps.", f"{RTG_EXACT_STEP}; 4 optimizer steps.", StepSetup(ranks=2)),
    StepCell("--algo.kl.mode k1-rtg-loss --ds.packing_samples, 2 prompts, async with correction",
             (*RTG, *PACKED, *CORRECTION, "--train.async_enable"), K1_RTG_LOSS, "k1", "loss", f"{RTG_EXACT_STEP}.",
             f"{RTG_EXACT_STEP}.", MISMATCH),
    StepCell("--algo.advantage.estimator rloo (k1 in the reward), 2 prompts", ("--algo.advantage.estimator", "rloo"),
             LIBRARY, "k1", "reward", f"k1 reward-to-go, but {RATIO}.", f"{OFF_RATIO}; and {RATIO}."),
)
