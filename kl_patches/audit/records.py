"""The audit's output: one record per (configuration, policy regime), as rendered by ``kl-patches check``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from kl_patches.audit.engine import (
    AuditProblem,
    LossFn,
    StepFn,
    compare,
    exact_kl_gradient,
    expected_gradient,
    expected_step_gradient,
)

EXACT, BIASED, NOT_COVERED = "exact", "biased", "not covered"


@dataclass
class AuditRecord:
    library: str  # "core" for the reference set
    library_version: str
    configuration: str  # a short, flag-like name of what was run
    mode: str  # kl-patches mode, "library" for an unpatched configuration
    estimator: str  # k1, k2, k3, k2-grad (straight-through), ...
    placement: str  # reward, loss, reward+loss
    policy: str  # "on" or "off"
    rel_err: float | None
    cosine: float | None
    norm_ratio: float | None
    verdict: str  # exact, biased, or "not covered" (a code path kl-patches cannot audit or patch)
    reason: str  # one sentence: what the gradient actually is
    fix: str | None = None  # the flag / override / mode that makes it exact
    spec: dict = field(default_factory=dict)  # everything needed to rerun the cell
    notes: list[str] = field(default_factory=list)  # e.g. placeholder modules used
    stderr: float | None = None  # when the expectation was sampled rather than enumerated
    user_config: bool = False  # audited from the user's own configuration

    def as_dict(self) -> dict:
        return asdict(self)


def audit_record(
    problem: AuditProblem,
    loss_fn: LossFn | None,
    *,
    library: str,
    library_version: str,
    configuration: str,
    estimator: str,
    placement: str,
    reason: str,
    mode: str = "library",
    group_size: int = 1,
    scale: float = 1.0,
    fix: str | None = None,
    notes: list[str] | None = None,
    user_config: bool = False,
    truth=None,
    step_fn: StepFn | None = None,
    num_groups: int = 1,
    **spec_extra,
) -> AuditRecord:
    """Run one audit cell: exact E[grad loss] against grad KL_seq, as a record. ``reason`` describes the
    gradient when biased; an exact cell's reason says why it is exact.

    With ``step_fn`` (and ``loss_fn=None``) the cell audits a whole training step: the library's own update on a
    generation batch of ``num_groups`` groups of ``group_size`` (see :func:`expected_step_gradient`)."""
    truth = exact_kl_gradient(problem) if truth is None else truth
    if step_fn is not None:
        if loss_fn is not None:
            raise ValueError("pass loss_fn or step_fn, not both")
        estimate = expected_step_gradient(problem, step_fn, num_groups=num_groups, group_size=group_size)
        spec_extra = {"step": True, "num_groups": num_groups, **spec_extra}
    elif loss_fn is None:
        raise ValueError("pass loss_fn or step_fn")
    else:
        estimate = expected_gradient(problem, loss_fn, group_size)
    result = compare(estimate, truth, scale)
    spec = {**problem.spec.as_dict(), "group_size": group_size, "scale": scale, **spec_extra}
    return AuditRecord(
        library=library, library_version=library_version, configuration=configuration, mode=mode,
        estimator=estimator, placement=placement, policy=problem.policy_label, rel_err=result.rel_err,
        cosine=result.cosine, norm_ratio=result.norm_ratio, verdict=EXACT if result.exact else BIASED,
        reason=reason, fix=None if result.exact else fix, spec=spec, notes=list(notes or []),
        stderr=result.stderr, user_config=user_config,
    )
