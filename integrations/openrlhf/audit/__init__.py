"""``kl-patches check --library openrlhf``: the exact audit of OpenRLHF's KL through OpenRLHF's own code.

``harness`` drives OpenRLHF (its loss for one group; its whole ``ppo_train`` step on a generation batch), ``cells``
lists the configurations, ``user`` maps a ``train_ppo_ray`` command line onto the step harness. :func:`audit` is
what the CLI calls. The names the benchmarks and tests use are re-exported here.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kl_patches.audit import AuditRecord, PolicySpec, audit_record, build_problem, exact_kl_gradient
from kl_patches.audit.engine import enumerated_logprobs
from kl_patches.audit.records import NOT_COVERED
from kl_patches.integrations.openrlhf.audit.cells import CELLS, STEP_CELLS, STEP_HORIZON, STEP_VOCAB, Cell, StepCell
from kl_patches.integrations.openrlhf.audit.harness import (AUDIT_PROMPT, BASE_ARGV, GROUP_SIZE, LIBRARY_NAME,
                                                            KeepFloat64, StepSetup, audit_args, direct_kl_loss, keep64,
                                                            minimal_trainer, openrlhf_loss, per_group_loss, plain,
                                                            policy_loss_kwargs, ppo_step, ppo_step_fn, reward_path,
                                                            rollout_args, training_loss)
from kl_patches.modes import K1_RTG_LOSS, LIBRARY
from kl_patches.patching import installed_version

__all__ = ["audit", "audit_step_cell", "step_spec", "available", "CELLS", "STEP_CELLS", "Cell", "StepCell",
           "StepSetup", "GROUP_SIZE", "audit_args", "openrlhf_loss", "per_group_loss", "reward_path", "training_loss",
           "minimal_trainer", "keep64", "plain", "ppo_step", "ppo_step_fn", "rollout_args", "policy_loss_kwargs",
           "direct_kl_loss", "KeepFloat64", "AUDIT_PROMPT", "BASE_ARGV"]

NOTES = (
    "compute_approx_kl without log_probs_old: OpenRLHF's function and aggregate_loss called directly on one group "
    "(a loss-level cell; it never certifies), beta = 1",
)
STEP_NOTES = (
    "every configuration: OpenRLHF's ActorPPOTrainer.ppo_train on a whole generation batch (NaiveReplayBuffer, "
    "shuffling "    "DataLoader, packing, setup_dynamic_batch, balance_experiences, iter_grad_accum_global_norm, training_step, "
    "PolicyLoss); ranks run as threads with in-process collectives; only DeepSpeed is emulated (backward / gas, "
    "optimizer step = the ranks' averaged gradient, weights not moved); make_experience's two KL lines are mirrored "
    "(it needs Ray actor groups); beta = 1, task reward 0",
    "steps use vocab 2 (incl. EOS), horizon 2, 1 or 2 prompts x 2 responses: every ordered generation batch "
    "enumerated; scale = optimizer steps x sequences per step / C (k1-rtg-loss) or optimizer steps / E_mu[|y|] (a "
    "token mean's expected normaliser)",
)


def step_spec(spec: PolicySpec) -> PolicySpec:
    """The step cells' policy: ``spec``'s kind, seed, distance and staleness on responses small enough that every
    ordered generation batch of 2 x 2 responses is enumerated."""
    return PolicySpec(kind=spec.kind, vocab=STEP_VOCAB, horizon=STEP_HORIZON, seed=spec.seed, distance=spec.distance,
                      staleness=spec.staleness)


@functools.lru_cache(maxsize=1)
def _known_flags() -> frozenset[str]:
    from kl_patches.integrations.openrlhf import config

    return frozenset(option for action in config.openrlhf_parser()._actions for option in action.option_strings)


def available(cell) -> bool:
    """Whether the installed OpenRLHF has the cell's flags (and, for a direct call, compute_approx_kl's arguments)."""
    import inspect

    if getattr(cell, "direct", None) is not None:
        from openrlhf.models import utils

        return "log_probs_old" in inspect.signature(vars(utils)["compute_approx_kl"]).parameters
    return all(item in _known_flags() for item in cell.argv if item.startswith("--"))


@dataclass
class _Session:
    notes: list[str] = field(default_factory=list)
    previous_mode: str | None = None


@contextlib.contextmanager
def _session():
    """Placeholders (only where flash_attn / vllm are missing) and the caller's mode, restored afterwards."""
    from kl_patches.integrations.openrlhf import disable, enable, enabled_mode
    from kl_patches.integrations.openrlhf.audit.harness import _openrlhf
    from kl_patches.integrations.openrlhf.placeholders import install_placeholders, placeholder_notes

    install_placeholders()
    session = _Session(notes=placeholder_notes(), previous_mode=enabled_mode())
    _openrlhf()
    try:
        yield session
    finally:
        disable()
        if session.previous_mode is not None:
            enable(session.previous_mode)


def mode_applied(mode: str) -> None:
    from kl_patches.integrations.openrlhf import disable, enable

    if mode == LIBRARY:
        disable()
    else:
        enable(mode)


def _loss_record(problem, truth, cell: Cell, notes: list[str]) -> AuditRecord:
    loss = per_group_loss(direct_kl_loss(*cell.direct)) if cell.direct is not None else \
        per_group_loss(openrlhf_loss(audit_args(cell.argv)))
    record = audit_record(
        problem, loss, library=LIBRARY_NAME, library_version=installed_version(LIBRARY_NAME) or "?",
        configuration=cell.configuration, estimator=cell.estimator, placement=cell.placement,
        reason=cell.reason(problem.on_policy), mode=cell.mode, group_size=GROUP_SIZE,
        truth=truth, fix=cell.fix, notes=list(notes), argv=list(cell.argv))
    if record.verdict == "exact":  # only a step audit may certify a configuration
        record.verdict, record.fix = NOT_COVERED, None
        record.reason = "exact at the loss level only; not audited through OpenRLHF's step."
    return record


def library_step_cell(cell: Cell) -> StepCell:
    """One of OpenRLHF's own KL options as a step cell: one prompt x 2 responses through ``ppo_train``."""
    from kl_patches.integrations.openrlhf.audit.cells import ONE, RATIO

    return StepCell(cell.configuration, (*cell.argv, *ONE), cell.mode, cell.estimator, cell.placement,
                    f"{cell.reason_on.rstrip('.')}; and {RATIO}.", f"{cell.reason_off.rstrip('.')}; and {RATIO}.",
                    fix=cell.fix, quick=("on", "off"), groups=1)


def expected_length(problem) -> float:
    with torch.no_grad():
        _, _, _, weights = enumerated_logprobs(problem)
    return float((weights * problem.mask.sum(1).to(weights.dtype)).sum())


def step_scale(args, mode: str, problem, rows: int) -> float:
    """The constant the step multiplies grad KL by when it is exact: k1-rtg-loss sums beta/C over every response of
    every optimizer step; a token mean divides each step by about sequences x E_mu[|y|]."""
    from kl_patches.integrations.openrlhf.kl import fixed_normalizer

    steps = args.train.max_epochs * (rows // args.train.batch_size)
    if mode == K1_RTG_LOSS:
        return steps * args.train.batch_size / fixed_normalizer(args)
    return steps / expected_length(problem)


def audit_step_cell(spec: PolicySpec, cell: StepCell, regime: str, *, notes: Sequence[str] = (),
                    configuration: str | None = None, user_config: bool = False, fix: str | None = None,
                    reason: str | None = None, argv: Sequence[str] | None = None) -> AuditRecord:
    """One step cell in one regime ("on": the sampler is pi; "off": a stale sampler mu), through ``ppo_train``."""
    from kl_patches.integrations.openrlhf.audit.cells import STEP_BASE

    problem = build_problem(step_spec(spec), off_policy=regime == "off")
    args = audit_args((*STEP_BASE, *cell.argv))
    mode_applied(cell.mode)
    rows = cell.groups * GROUP_SIZE
    return audit_record(
        problem, None, step_fn=ppo_step_fn(problem, args, cell.setup), num_groups=cell.groups, group_size=GROUP_SIZE,
        scale=step_scale(args, cell.mode, problem, rows), library=LIBRARY_NAME,
        library_version=installed_version(LIBRARY_NAME) or "?", configuration=configuration or cell.configuration,
        estimator=cell.estimator, placement=cell.placement,
        reason=reason or cell.reason(regime == "on"), mode=cell.mode,
        fix=fix if fix is not None else cell.fix, notes=[*STEP_NOTES, *notes], user_config=user_config,
        argv=list(cell.argv if argv is None else argv), setup={"ranks": cell.setup.ranks,
                                                               "actor_log_probs": cell.setup.actor_log_probs},
    )


def audit(spec: PolicySpec, *, config: str | None = None, args: Sequence[str] = (), full: bool = False
          ) -> list[AuditRecord]:
    """OpenRLHF's configurations: its own KL options at the loss level, then the step cells (kl-patches' modes and
    the reference library ones) through ``ppo_train``, on- and off-policy; ``full`` adds the slower step cells. With
    ``args`` (a ``train_ppo_ray`` command line, kl-patches' flags allowed), the records of that configuration
    (``user_config=True``). OpenRLHF has no configuration file: ``config`` is refused."""
    if config is not None:
        raise ValueError("OpenRLHF has no configuration file format: pass the train_ppo_ray command line as args")
    with _session() as session:
        if args:
            from kl_patches.integrations.openrlhf.audit.user import audit_user

            return audit_user(spec, list(args), session.notes)
        records = []
        for cell in filter(available, CELLS):
            if cell.direct is not None:  # a function call, not a configuration: audited at the loss
                for regime in ("on", "off"):
                    problem = build_problem(step_spec(spec), off_policy=regime == "off")
                    mode_applied(LIBRARY)
                    records.append(_loss_record(problem, exact_kl_gradient(problem), cell,
                                                [*NOTES, *session.notes]))
                continue
            step_cell = library_step_cell(cell)
            for regime in step_cell.quick:
                records.append(audit_step_cell(spec, step_cell, regime, notes=session.notes))
        for cell in filter(available, STEP_CELLS):
            for regime in cell.regimes if full else cell.quick:
                records.append(audit_step_cell(spec, cell, regime, notes=session.notes))
        return records
