"""The exact gradient audit: enumerate every response of a tiny policy and compare E[grad loss] to grad KL_seq."""

from kl_patches.audit.cells import GROUP_SIZE, Cell
from kl_patches.audit.engine import (
    EXACT_TOLERANCE,
    AuditBatch,
    AuditProblem,
    GradientComparison,
    accumulated_grad,
    build_problem,
    compare,
    exact_kl_gradient,
    expected_gradient,
    expected_step_gradient,
    flat_grad,
    per_group,
    step_batch,
)
from kl_patches.audit.policies import (
    EnumerablePolicy,
    PolicySpec,
    TabularPolicy,
    TinyTransformerPolicy,
    enumerate_responses,
)
from kl_patches.audit.records import AuditRecord, audit_record

__all__ = [
    "EXACT_TOLERANCE",
    "GROUP_SIZE",
    "Cell",
    "AuditBatch",
    "AuditProblem",
    "AuditRecord",
    "EnumerablePolicy",
    "GradientComparison",
    "PolicySpec",
    "TabularPolicy",
    "TinyTransformerPolicy",
    "audit_record",
    "build_problem",
    "compare",
    "enumerate_responses",
    "exact_kl_gradient",
    "expected_gradient",
    "expected_step_gradient",
    "flat_grad",
    "accumulated_grad",
    "per_group",
    "step_batch",
]
