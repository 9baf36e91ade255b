"""Which TRL configurations the audit runs, and what each should give.

A :class:`Cell` is a configuration (trainer, settings, kl-patches mode) and the *regimes* it is audited in:

* ``on``: rows sampled from the policy; ``off``: sampled from a stale policy mu whose log-probs TRL keeps as
  ``old_per_token_logps`` (generation ahead of optimisation, or ``num_iterations > 1``);
* ``vllm``: TRL's vLLM branch with importance-sampling correction, the sampler equal to the policy;
  ``vllm-mismatch``: the sampler is a perturbed policy whose log-probs vLLM reports (sampler != trainer);
  ``vllm-uncorrected``: the same mismatch with ``vllm_importance_sampling_correction=False``.

and the *driver*: ``step`` (GRPOTrainer's real training step on each enumerated generation batch:
:func:`.harness.step_fn`) or ``loss`` (``compute_loss`` on each enumerated group as one micro-batch). Every
kl-patches cell whose verdict can be ``exact`` in the default table is a step cell or says it is a loss cell in
its configuration name; a configuration kl-patches refuses at start is measured with the refusal bypassed and
reported ``biased`` with the refusal as its reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kl_patches.audit import AuditRecord, PolicySpec
from kl_patches.audit.cells import Cell as CellBase
from kl_patches.audit.engine import exact_kl_gradient
from kl_patches.audit.records import BIASED, EXACT, NOT_COVERED, audit_record
from kl_patches.modes import ENV_VAR, K1_IN_REWARD, K1_RTG_LOSS, LIBRARY

from kl_patches.integrations.trl import config as trl_config
from kl_patches.integrations.trl import kl
from kl_patches.integrations.trl.audit.harness import (
    AUDIT_BETA,
    FLOAT64_NOTE,
    GROUP_SIZE,
    LIBRARY_NAME,
    MODEL_NOTE,
    NUM_ITEMS_NOTE,
    ZERO_REWARD_NOTE,
    build_tiny_trainer,
    fixed_num_items,
    optimisation_steps,
    per_group_loss_fn,
    step_fn,
    step_num_groups,
)

FIX_ON = f"kl_mode: {K1_RTG_LOSS}  (or {ENV_VAR}={K1_RTG_LOSS}; kl_mode: {K1_IN_REWARD} on-policy)"
FIX_OFF = f"kl_mode: {K1_RTG_LOSS}  (or {ENV_VAR}={K1_RTG_LOSS})"
FIX_VLLM = "vllm_importance_sampling_correction: true (kl-patches then takes vLLM's sampling log-probs as mu)"

REGIMES = ("on", "off", "vllm", "vllm-mismatch", "vllm-uncorrected")
OFF_POLICY_REGIMES = ("off", "vllm-mismatch", "vllm-uncorrected")

#: The step driver's batch layouts (per process): the smallest that keep the structure under audit.
#: On-policy: a generation batch of one group of 2, split into 2 micro-batches of 1 row accumulated in one
#: optimisation step (a group split across micro-batches; TRL shuffles the rows first).
STEP_ON = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "steps_per_generation": 2}
#: Off-policy (generation ahead of optimisation): the same batch split over 2 optimisation steps, so TRL keeps
#: old_per_token_logps (mu's, in the audit) and each step sees half a group.
STEP_AHEAD = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "steps_per_generation": 2}
#: Off-policy through reuse: one micro-batch of one group, used num_iterations=2 times.
STEP_REUSE = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "steps_per_generation": 1,
              "num_iterations": 2}
#: The step cells enumerate every ordered generation batch: horizon 2 keeps that at 7^2 = 49 batches (V=3).
STEP_HORIZON = 2

VLLM_FLOAT64_NOTE = ("vLLM's per-token log-probs travel as Python floats that TRL turns into tensors; the audit "
                     "builds them in float64 (torch default dtype float64 during the step) so exactness is judged at "
                     "float64 rounding")
LOSS_NOTE = "through compute_loss on each enumerated group as one micro-batch (loss driver)"


@dataclass(frozen=True)
class Cell(CellBase):
    """One audited configuration: a name, the trainer, its settings, the mode, the regimes and the driver."""

    trainer: str = "grpo"
    settings: dict = field(default_factory=dict)
    mode: str = LIBRARY
    regimes: tuple[str, ...] = ("on", "off")
    driver: str = "loss"  # "loss" or "step"
    layouts: dict = field(default_factory=dict)  # regime -> step layout override


def step_layout(regime: str, settings: dict) -> dict:
    """The step driver's batch layout for a regime (user settings may already ask for reuse / generation ahead)."""
    if regime == "off":
        return STEP_REUSE if settings.get("num_iterations", 1) > 1 else STEP_AHEAD
    return STEP_ON


def regime_settings(cell: Cell, regime: str) -> dict:
    settings = dict(cell.settings)
    if cell.driver == "step":
        settings.update(cell.layouts.get(regime) or step_layout(regime, settings))
    elif regime == "off":
        settings["num_iterations"] = 2  # TRL keeps old_per_token_logps (the behaviour policy's) and uses them
    return settings


def regime_build(regime: str) -> dict:
    if regime == "off":
        return {"off_policy": True}
    if regime == "vllm":
        return {"vllm": "match"}
    if regime == "vllm-mismatch":
        return {"vllm": "mismatch"}
    if regime == "vllm-uncorrected":
        return {"vllm": "mismatch", "vllm_correction": False}
    return {}


def policy_label(regime: str) -> str:
    return "off" if regime in OFF_POLICY_REGIMES else "on"


# ------------------------------------------------------------------------------------------ what a cell should give


def mode_length(config) -> float:
    return 1.0 if config.loss_type == "luspo" else float(config.max_completion_length)


def nominal_scale(config, trainer: str, num_items: float, group_size: int = GROUP_SIZE) -> float:
    """Unpatched TRL: the constant its configuration multiplies grad KL_seq by (loss driver)."""
    beta = float(config.beta)
    if trainer == "rloo":
        return beta  # sequence mean
    if config.loss_type == "dr_grpo":
        return beta / config.max_completion_length
    if config.loss_type == "luspo":
        return beta
    return beta * group_size / num_items  # token-mean losses: the (fixed) token count


def mode_scale(tiny, driver: str) -> float:
    """A kl-patches mode: beta / L per optimisation step (C = sequences per step x L, L = max_completion_length,
    1 for luspo), times the optimisation steps one generation batch feeds under the step driver."""
    trainer = tiny.trainer
    scale = float(trainer.beta) / mode_length(trainer.args)
    return scale * optimisation_steps(trainer) if driver == "step" else scale


def aggregation_words(loss_type: str) -> str:
    if loss_type in ("grpo", "sapo"):
        return "seq-mean-token-mean (1/|y_i| per response: length-weighted)"
    if loss_type == "bnpo":
        return "token mean over the micro-batch (a sample-dependent normaliser)"
    return {"dr_grpo": "sum / (B x max_completion_length)", "luspo": "token sum, sequence mean"}.get(
        loss_type, "global token mean")


def library_description(config, trainer: str, on_policy: bool) -> tuple[str, str, str]:
    """(estimator, placement, reason) of an unpatched TRL configuration, in the shared doc's terms."""
    if trainer == "rloo":
        reason = ("k1 summed over the response in the reward with RLOO's leave-one-out baseline: the score-function "
                  "gradient of KL_seq" if on_policy else
                  "the KL reward uses the old log-probs and the sequence ratio pi/mu reweights only the score: "
                  "biased off-policy")
        return "k1", "reward", reason
    aggregation = aggregation_words(config.loss_type)
    if config.use_bias_correction_kl and config.importance_sampling_level == "sequence":
        estimator = "k3 x sequence ratio"
        reason = ("k3 times the sequence-level ratio exp(mean_t log-ratio) (use_bias_correction_kl with "
                  "importance_sampling_level=sequence): a spurious (sum_t k3_t/|y|) x sum_t g_t term on top of "
                  "the k3 gradient (TRL issue 6586)")
    elif config.use_bias_correction_kl:
        estimator = "k3 x token ratio"
        reason = ("k3 times the differentiable token ratio (use_bias_correction_kl): on-policy E[sum_t l_t g_t], the "
                  "own-token term only, missing the future-token KL" if on_policy else
                  "k3 times the token ratio: token ratios correct the action at the visited prefix, not the prefix "
                  "distribution, and the future-token KL is still missing")
    else:
        estimator = "k3"
        reason = ("k3 in the loss: E[sum_t (1 - e^{-l_t}) g_t], the per-position forward-KL gradient"
                  + ("" if on_policy else "; nothing reweights the off-policy samples"))
    return estimator, "loss", f"{reason}; aggregated by loss_type={config.loss_type}: {aggregation}"


MU_WORDS = {
    "on": "on-policy: no weights (TRL keeps no old log-probs)",
    "off": "mu = TRL's old_per_token_logps (the stale policy that sampled)",
    "vllm": "mu = vLLM's sampling log-probs, as TRL's importance-sampling correction trusts them",
    "vllm-mismatch": "mu = vLLM's sampling log-probs (a sampler != trainer), as TRL's importance-sampling correction "
                     "trusts them",
    "vllm-uncorrected": "TRL trusts no sampler log-probs without vllm_importance_sampling_correction, and neither "
                        "does kl-patches: the sampler/trainer mismatch is left uncorrected",
}


def mode_description(mode: str, regime: str, loss_type: str, driver: str) -> tuple[str, str, str, str | None]:
    """(estimator, placement, reason, fix) of a kl-patches mode inside GRPOTrainer."""
    where = "through GRPOTrainer's training step" if driver == "step" else "through compute_loss"
    normaliser = "C = sequences per optimisation step x " + ("1 (luspo)" if loss_type == "luspo" else
                                                               "max_completion_length") + ", fixed before sampling"
    if mode == K1_IN_REWARD:
        if regime == "on":
            return ("k1", "reward", "sequence k1 minus a whole-generation-batch leave-one-out baseline, added to TRL's "
                    f"advantages after reward scaling, TRL's loss_type={loss_type} aggregation rescaled to {normaliser}"
                    f", {where}", None)
        return ("k1", "reward", "refused at start by kl-patches (PatchError: k1-in-reward is exact on-policy only; "
                "TRL's token ratio corrects each action, not the prefix distribution); measured with the refusal "
                "bypassed", FIX_OFF)
    reason = (f"reward-to-go k1 surrogate, no baseline (no cross-row statistic), per-decision weights against "
              f"{MU_WORDS[regime]}; {normaliser}; TRL's k3 term removed; {where}")
    return "k1", "loss", reason, FIX_VLLM if regime == "vllm-uncorrected" else None


# ------------------------------------------------------------------------------------------ the cells


def default_cells() -> list[Cell]:
    """``kl-patches check --library trl``: TRL's own configurations through the loss (biased, bar RLOO on-policy),
    the modes for every loss type through the loss, and the modes through the real step on- and off-policy and with
    vLLM emulated (sampler != trainer)."""
    beta = {"beta": AUDIT_BETA}
    cells = [
        Cell(f"GRPO defaults, beta={AUDIT_BETA} (loss_type=dapo, use_bias_correction_kl=True)", settings=beta),
        Cell("GRPO use_bias_correction_kl=False", settings={**beta, "use_bias_correction_kl": False}),
        Cell("GRPO importance_sampling_level=sequence", settings={**beta, "importance_sampling_level": "sequence"}),
    ]
    for loss_type in ("grpo", "bnpo", "dr_grpo", "luspo", "sapo", "cispo", "vespo"):
        cells.append(Cell(f"GRPO loss_type={loss_type}", settings={**beta, "loss_type": loss_type}, regimes=("on",)))
    cells.append(Cell("RLOO defaults (beta=0.05, k1 in reward)", trainer="rloo"))
    # The modes through GRPOTrainer's real step.
    cells.append(Cell(f"GRPO kl_mode={K1_RTG_LOSS} (default), step", settings=beta, mode=K1_RTG_LOSS, driver="step",
                      regimes=("on", "vllm-mismatch")))
    cells.append(Cell(f"GRPO kl_mode={K1_IN_REWARD}, step", settings=beta, mode=K1_IN_REWARD, driver="step",
                      regimes=("on",)))
    # The modes for every loss type through the loss (the loss type only shapes TRL's aggregation).
    for loss_type in kl.KNOWN_LOSS_TYPES:
        settings = {**beta, "loss_type": loss_type}
        cells.append(Cell(f"GRPO kl_mode={K1_RTG_LOSS}, loss_type={loss_type}, loss", settings=settings,
                          mode=K1_RTG_LOSS, regimes=("on",)))
        if not trl_config.refusals(make_args(settings), K1_IN_REWARD):
            cells.append(Cell(f"GRPO kl_mode={K1_IN_REWARD}, loss_type={loss_type}, loss", settings=settings,
                              mode=K1_IN_REWARD, regimes=("on",)))
    cells.append(Cell(f"GRPO kl_mode={K1_IN_REWARD}, num_iterations=2 (refused), loss", settings=beta,
                      mode=K1_IN_REWARD, regimes=("off",)))
    return cells


def make_args(settings: dict):
    """A namespace with TRL GRPOConfig's defaults for the fields the refusal checks read, updated by ``settings``."""
    import types

    defaults = dict(top_p=1.0, top_k=0, min_p=None, generation_kwargs=None, mask_truncated_completions=False,
                    num_iterations=1, steps_per_generation=1, gradient_accumulation_steps=1, use_vllm=False,
                    loss_type="dapo", epsilon_high=None, epsilon=0.2, top_entropy_quantile=1.0, delta=None,
                    vllm_importance_sampling_correction=True)
    merged = {**defaults, **settings}
    if merged["epsilon_high"] is None:
        merged["epsilon_high"] = merged["epsilon"]
    return types.SimpleNamespace(**merged)


@contextlib.contextmanager
def float64_default(enabled: bool):
    if not enabled:
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def audit_cell(spec: PolicySpec, cell: Cell, regime: str, *, truth_cache: dict | None = None, config=None,
               user_config: bool = False, extra_notes: Sequence[str] = (), off_policy_config: bool = False,
               refused_by_config: Sequence = ()) -> AuditRecord:
    """Audit one configuration in one regime through the real trainer. ``config``: a parsed GRPOConfig used as is
    (its batch layout replaced by the step driver's). ``off_policy_config``: the configuration trains off-policy,
    so its fix is the off-policy-exact mode even for the on-policy record. ``refused_by_config``: refusals of the
    user's whole configuration (e.g. k1-in-reward with num_iterations > 1): every regime's record says so."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {', '.join(REGIMES)}")
    step = cell.driver == "step"
    if step:
        spec = dataclasses.replace(spec, horizon=min(spec.horizon, STEP_HORIZON))
    settings = regime_settings(cell, regime)
    kl_mode = None if cell.mode == LIBRARY else cell.mode
    if config is not None:
        config = dataclasses.replace(config, **{k: v for k, v in settings.items() if k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "num_iterations")},
            generation_batch_size=None, max_completion_length=spec.horizon)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = build_tiny_trainer(spec, trainer=cell.trainer, kl_mode=kl_mode, config=config, table=not step,
                                  **regime_build(regime), **({} if config is not None else settings))
    trainer = tiny.trainer
    args = trainer.args
    notes = [FLOAT64_NOTE, ZERO_REWARD_NOTE, MODEL_NOTE]
    refused = []
    if cell.mode != LIBRARY:
        refused = trl_config.refusals(args, cell.mode, vocab_size=spec.vocab, use_vllm=bool(trainer.use_vllm),
                                      trainer_attrs={"loss_type": trainer.loss_type,
                                                     "epsilon_high": getattr(trainer, "epsilon_high", None)})
        refused = list(refused_by_config) + [r for r in refused if r not in refused_by_config]
        if refused:  # measure what the run would have trained on, had kl-patches let it start
            setattr(trainer, trl_config.CHECKED_FLAG, cell.mode)
    key = (spec, regime in OFF_POLICY_REGIMES)
    truth = None if truth_cache is None else truth_cache.get(key)
    if truth is None:
        truth = exact_kl_gradient(tiny.problem)
        if truth_cache is not None:
            truth_cache[key] = truth
    if cell.mode == LIBRARY:
        estimator, placement, reason = library_description(args, cell.trainer, regime == "on")
        fix = FIX_ON if regime == "on" and not off_policy_config else FIX_OFF
        if cell.trainer == "rloo" and regime != "on":
            fix = f"GRPOTrainer with {FIX_OFF}"
    else:
        estimator, placement, reason, fix = mode_description(cell.mode, regime, args.loss_type, cell.driver)
        if refused:
            reason = "refused at start by kl-patches: " + " ".join(r.message(cell.mode, kl.trl_version())
                                                                   for r in refused) + " Measured with the refusal bypassed"
            fix = refused[0].fix
    common = dict(library=LIBRARY_NAME, library_version=kl.trl_version(), configuration=cell.configuration
                  + ("" if cell.regimes == ("on",) or regime in ("on", "off") else f" [{regime}]"),
                  estimator=estimator, placement=placement, reason=reason, mode=cell.mode, group_size=GROUP_SIZE,
                  fix=fix, user_config=user_config, truth=truth, trainer=type(trainer).__name__,
                  model="GPT2LMHeadModel (1 layer, hidden 16, float64)", regime=regime,
                  settings={k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                            for k, v in settings.items()})
    vllm = regime.startswith("vllm")
    if vllm:
        notes.append(VLLM_FLOAT64_NOTE)
    if step:
        with float64_default(vllm):
            record = audit_record(tiny.problem, None, step_fn=step_fn(tiny), num_groups=step_num_groups(trainer),
                                  scale=mode_scale(tiny, "step") if cell.mode != LIBRARY else float(args.beta),
                                  notes=[*notes, *extra_notes], **common)
    else:
        num_items = fixed_num_items(tiny.problem)
        scale = nominal_scale(args, cell.trainer, num_items) if cell.mode == LIBRARY else mode_scale(tiny, "loss")
        notes += [NUM_ITEMS_NOTE if cell.mode == LIBRARY else LOSS_NOTE]
        with float64_default(vllm):
            record = audit_record(tiny.problem, per_group_loss_fn(tiny, num_items), scale=scale,
                                  notes=[*notes, *extra_notes], num_items_in_batch=num_items, **common)
    if refused:  # never certify what the run refuses
        record.verdict, record.fix = BIASED, refused[0].fix
    if record.policy != policy_label(regime):
        record.policy = policy_label(regime)
    return record


def not_covered_records() -> list[AuditRecord]:
    """Trainers that override ``_compute_loss`` with their own KL code: kl-patches' GRPO patch does not reach them
    (and refuses them in a patched mode rather than train on their KL)."""
    import importlib

    import trl

    records = []
    candidates = [("trl.experimental.gmpo", "GMPOTrainer")]
    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name, class_name in candidates:
            try:
                cls = getattr(importlib.import_module(module_name), class_name)
            except (ImportError, AttributeError):
                continue
            seen.add(cls)
    seen.update(cls for cls in all_subclasses(trl.GRPOTrainer) if not getattr(cls, kl.OWNER_FLAG, False))
    for cls in sorted(seen, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        if "_compute_loss" not in vars(cls) or not issubclass(cls, trl.GRPOTrainer):
            continue
        records.append(AuditRecord(
            library=LIBRARY_NAME, library_version=kl.trl_version(),
            configuration=f"{cls.__module__}.{cls.__qualname__}",
            mode=LIBRARY, estimator="own", placement="loss", policy="on", rel_err=None, cosine=None, norm_ratio=None,
            verdict=NOT_COVERED,
            reason=f"{cls.__qualname__} overrides GRPOTrainer._compute_loss with its own KL block: kl-patches' GRPO "
                   f"patch does not reach it (a patched mode raises PatchError on it instead of training)",
            fix="use GRPOTrainer with kl_mode, or beta=0", spec={}, notes=[],
        ))
    return records


def all_subclasses(cls) -> set:
    found = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= all_subclasses(sub)
    return found
