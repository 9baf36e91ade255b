"""Exact expectations over every response (or every group of responses) of an enumerable policy.

For a loss estimator l(batch), the audit computes E_{y ~ mu}[grad l(y)] = sum_y mu(y) grad l(y) exactly
(mu = pi_theta on-policy, a behaviour policy off-policy), with the probability weights detached, and
compares it with grad KL_seq computed by autograd on the enumerated KL(pi_theta || pi_ref). Everything runs
in float64; a cell is exact when the relative error is at float64 rounding level (< EXACT_TOLERANCE).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, TypeAlias

import torch

from kl_patches.audit.policies import EnumerablePolicy, PolicySpec, build_policy, enumerate_responses

Tensor: TypeAlias = torch.Tensor

#: Relative error below which a cell is "exact": float64 rounding over a few thousand terms is ~1e-14;
#: every biased cell of the taxonomy is above 1e-3 on the default policies.
EXACT_TOLERANCE = 1e-10

#: Enumerate groups while there are at most this many; sample (with a standard error) above it.
MAX_ENUMERATED_GROUPS = 50_000


@dataclass
class AuditProblem:
    """A policy, a reference, an optional behaviour policy (None = on-policy) and every response."""

    spec: PolicySpec
    policy: EnumerablePolicy
    reference: EnumerablePolicy
    behaviour: EnumerablePolicy | None
    tokens: Tensor
    mask: Tensor

    @property
    def on_policy(self) -> bool:
        return self.behaviour is None

    @property
    def policy_label(self) -> str:
        return "on" if self.on_policy else "off"

    def with_behaviour(self, behaviour: EnumerablePolicy | None) -> "AuditProblem":
        return replace(self, behaviour=behaviour)

    def parameters(self) -> list[Tensor]:
        return [p for p in self.policy.parameters() if p.requires_grad]


def build_problem(spec: PolicySpec, off_policy: bool = False) -> AuditProblem:
    """The core's tiny policy for ``spec``: pi_theta, pi_ref = pi_theta + distance * noise and, off-policy,
    a stale behaviour policy mu = pi_theta + staleness * noise."""
    policy = build_policy(spec)
    reference = policy.perturbed(spec.distance, seed=spec.seed + 1_000)
    behaviour = policy.perturbed(spec.staleness, seed=spec.seed + 2_000) if off_policy else None
    tokens, mask = enumerate_responses(spec.vocab, spec.horizon, eos_id=spec.eos_id)
    return AuditProblem(spec, policy, reference, behaviour, tokens, mask)


@dataclass
class AuditBatch:
    """What a loss estimator sees: a training batch of ``num_groups`` groups of ``group_size`` responses.

    ``logp`` is attached to the policy's parameters; ``ref_logp`` and ``behaviour_logp`` are detached
    (``behaviour_logp`` equals ``logp.detach()`` on-policy). ``rows`` index the enumerated responses.
    """

    tokens: Tensor
    mask: Tensor
    logp: Tensor
    ref_logp: Tensor
    behaviour_logp: Tensor
    group_ids: Tensor
    rows: Tensor
    group_size: int
    on_policy: bool

    @property
    def num_groups(self) -> int:
        return self.tokens.shape[0] // self.group_size

    def group(self, index: int) -> "AuditBatch":
        """The batch of group ``index`` alone (group id 0)."""
        part = slice(index * self.group_size, (index + 1) * self.group_size)
        return AuditBatch(
            self.tokens[part], self.mask[part], self.logp[part], self.ref_logp[part],
            self.behaviour_logp[part], torch.zeros(self.group_size, dtype=torch.long), self.rows[part],
            self.group_size, self.on_policy,
        )


LossFn = Callable[[AuditBatch], Tensor]


def per_group(scalar_loss: Callable[[AuditBatch], Tensor], *, order_invariant: bool = False) -> LossFn:
    """Turn a loss of one training batch (a scalar, e.g. a library's loss function) into the audit's
    per-group form by calling it on each group separately.

    ``order_invariant=True`` computes each *set* of responses once: the enumerated groups are ordered tuples, and
    when the library's computation on a group is invariant to the order of its rows (normalisers, group statistics
    over a uid, leave-one-out baselines, batch whitening), a group and its permutations give the same loss. The
    adapter's tests must check this against the plain form."""

    def loss(batch: AuditBatch) -> Tensor:
        return torch.stack([scalar_loss(batch.group(g)).reshape(()) for g in range(batch.num_groups)])

    def cached(batch: AuditBatch) -> Tensor:
        cache: dict[tuple, Tensor] = {}
        size = batch.group_size
        out = []
        for g in range(batch.num_groups):
            key = tuple(sorted(batch.rows[g * size:(g + 1) * size].tolist()))
            if key not in cache:
                cache[key] = scalar_loss(batch.group(g)).reshape(())
            out.append(cache[key])
        return torch.stack(out)

    return cached if order_invariant else loss


def flat_grad(output: Tensor, parameters: list[Tensor], retain_graph: bool = False) -> Tensor:
    """d output / d parameters, flattened into one vector (zeros for parameters the output does not use)."""
    grads = torch.autograd.grad(output, parameters, allow_unused=True, retain_graph=retain_graph)
    return torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters)
    ])


def sequence_logprobs(policy: EnumerablePolicy, problem: AuditProblem) -> Tensor:
    return policy.token_logprobs(problem.tokens, problem.mask).sum(dim=-1)


def exact_kl_gradient(problem: AuditProblem) -> Tensor:
    """grad_theta KL(pi_theta || pi_ref) over whole responses, by autograd on the enumerated sum."""
    seq_logp = sequence_logprobs(problem.policy, problem)
    with torch.no_grad():
        ref_seq = sequence_logprobs(problem.reference, problem)
    kl = (seq_logp.exp() * (seq_logp - ref_seq)).sum()
    return flat_grad(kl, problem.parameters())


def exact_kl_value(problem: AuditProblem) -> float:
    with torch.no_grad():
        seq_logp = sequence_logprobs(problem.policy, problem)
        ref_seq = sequence_logprobs(problem.reference, problem)
        return float((seq_logp.exp() * (seq_logp - ref_seq)).sum())


def sampling_groups(weights: Tensor, group_size: int, max_groups: int, samples: int, seed: int):
    """(members (G, group_size), weights (G,), exact): every ordered group when there are at most
    ``max_groups``, else ``samples`` groups drawn i.i.d. with weight 1/samples each."""
    n = weights.shape[0]
    if n ** group_size <= max_groups:
        members = torch.tensor(list(itertools.product(range(n), repeat=group_size)), dtype=torch.long)
        members = members.reshape(-1, group_size)
        group_weights = weights[members].prod(dim=-1)
        return members, group_weights, True
    generator = torch.Generator().manual_seed(seed)
    members = torch.multinomial(weights, samples * group_size, replacement=True, generator=generator)
    members = members.reshape(samples, group_size)
    return members, torch.full((samples,), 1.0 / samples, dtype=weights.dtype), False


def enumerated_logprobs(problem: AuditProblem) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token log-probs of every response under the policy (attached), the reference and the sampling
    policy (detached), and each response's sampling probability (detached)."""
    logp = problem.policy.token_logprobs(problem.tokens, problem.mask)
    with torch.no_grad():
        ref_logp = problem.reference.token_logprobs(problem.tokens, problem.mask)
        sampler = problem.policy if problem.on_policy else problem.behaviour
        assert sampler is not None  # an off-policy problem carries its behaviour policy
        behaviour_logp = sampler.token_logprobs(problem.tokens, problem.mask)
    return logp, ref_logp, behaviour_logp, behaviour_logp.sum(dim=-1).exp()


def groups_batch(problem: AuditProblem, members: Tensor, logp: Tensor, ref_logp: Tensor,
                 behaviour_logp: Tensor) -> AuditBatch:
    """The training batch holding the groups ``members`` (G, group_size) of enumerated responses."""
    rows = members.reshape(-1)
    group_size = members.shape[1]
    return AuditBatch(
        tokens=problem.tokens[rows], mask=problem.mask[rows], logp=logp[rows], ref_logp=ref_logp[rows],
        behaviour_logp=(logp.detach() if problem.on_policy else behaviour_logp)[rows],
        group_ids=torch.arange(members.shape[0]).repeat_interleave(group_size), rows=rows,
        group_size=group_size, on_policy=problem.on_policy,
    )


@dataclass
class ExpectedGradient:
    gradient: Tensor
    exact: bool  # enumerated (True) or sampled (False)
    stderr: Tensor | None  # per-coordinate standard error when sampled


def expected_gradient(
    problem: AuditProblem,
    loss_fn: LossFn,
    group_size: int = 1,
    *,
    max_groups: int = MAX_ENUMERATED_GROUPS,
    samples: int = 20_000,
    chunks: int = 20,
    seed: int = 0,
) -> ExpectedGradient:
    """E[grad loss_fn] over groups of ``group_size`` responses drawn i.i.d. from the sampling policy."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    parameters = problem.parameters()
    logp, ref_logp, behaviour_logp, weights = enumerated_logprobs(problem)
    total = float(weights.sum())
    if abs(total - 1.0) > 1e-9:
        raise RuntimeError(f"sampling probabilities sum to {total}, not 1: the response set is incomplete")
    members, group_weights, exact = sampling_groups(weights, group_size, max_groups, samples, seed)
    num_groups = members.shape[0]
    batch = groups_batch(problem, members, logp, ref_logp, behaviour_logp)
    losses = loss_fn(batch)
    if losses.shape != (num_groups,):
        raise ValueError(f"loss_fn must return one loss per group, shape ({num_groups},), got {tuple(losses.shape)}")
    if exact:
        return ExpectedGradient(flat_grad((group_weights * losses).sum(), parameters), True, None)
    # Sampled: the mean of ``chunks`` independent estimates and its standard error.
    pieces = torch.stack([
        flat_grad(part.sum() * chunks, parameters, retain_graph=True)
        for part in (group_weights * losses).chunk(chunks)
    ])
    return ExpectedGradient(pieces.mean(0), False, pieces.std(0, unbiased=True) / math.sqrt(pieces.shape[0]))


StepFn = Callable[[AuditBatch], Tensor]


def accumulated_grad(parameters: list[Tensor], reset: bool = True) -> Tensor:
    """The gradient a library step left in ``.grad`` (after its own backward calls), flattened; then zeroed."""
    flat = torch.cat([
        (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters
    ])
    if reset:
        for p in parameters:
            p.grad = None
    return flat


def step_batch(problem: AuditProblem, rows: Tensor, group_size: int,
               detached: tuple[Tensor, Tensor] | None = None) -> AuditBatch:
    """A fresh training batch of the enumerated responses ``rows`` (groups of ``group_size`` consecutive rows),
    with ``logp`` recomputed on its own graph: a step function may backpropagate through it freely.
    ``detached``: the (reference, behaviour) log-probs of every enumerated response, when already computed."""
    tokens, mask = problem.tokens[rows], problem.mask[rows]
    logp = problem.policy.token_logprobs(tokens, mask)
    if detached is None:
        with torch.no_grad():
            ref_logp = problem.reference.token_logprobs(tokens, mask)
            behaviour = problem.behaviour
            assert problem.on_policy or behaviour is not None  # an off-policy problem carries its behaviour policy
            behaviour_logp = (logp.detach() if problem.on_policy
                              else behaviour.token_logprobs(tokens, mask))  # type: ignore[union-attr]
    else:
        ref_logp = detached[0][rows]
        behaviour_logp = logp.detach() if problem.on_policy else detached[1][rows]
    return AuditBatch(tokens, mask, logp, ref_logp, behaviour_logp,
                      torch.arange(rows.numel() // group_size).repeat_interleave(group_size), rows,
                      group_size, problem.on_policy)


def expected_step_gradient(
    problem: AuditProblem,
    step_fn: StepFn,
    *,
    num_groups: int = 1,
    group_size: int = 1,
    max_batches: int = 5_000,
    samples: int = 2_000,
    seed: int = 0,
) -> ExpectedGradient:
    """E[the gradient of one training *step*] over generation batches of ``num_groups`` i.i.d. groups of
    ``group_size`` responses.

    ``step_fn`` gets the whole generation batch (an :class:`AuditBatch`, rows grouped consecutively) and returns
    the flat gradient the library's step accumulates on ``problem.parameters()`` -- through the library's own
    shuffling, balancing, micro-batch split, normaliser and accumulation (use :func:`accumulated_grad` after the
    library's own ``backward`` calls). Every ordered batch is enumerated while there are at most ``max_batches``
    (exact); above that, ``samples`` batches are drawn and a standard error is returned.
    """
    if num_groups < 1 or group_size < 1:
        raise ValueError(f"num_groups and group_size must be >= 1, got {num_groups} and {group_size}")
    parameters = problem.parameters()
    with torch.no_grad():
        _, ref_logp, behaviour_logp, weights = enumerated_logprobs(problem)
    size = num_groups * group_size
    members, batch_weights, exact = sampling_groups(weights, size, max_batches, samples, seed)
    gradients = []
    total = None
    for rows, weight in zip(members, batch_weights):
        gradient = step_fn(step_batch(problem, rows, group_size, (ref_logp, behaviour_logp))).detach()
        if gradient.shape != (sum(p.numel() for p in parameters),):
            raise ValueError(f"step_fn must return the flat gradient of the policy's parameters, got "
                             f"shape {tuple(gradient.shape)}")
        if exact:
            total = weight * gradient if total is None else total + weight * gradient
        else:
            gradients.append(gradient)
    if exact:
        return ExpectedGradient(total, True, None)
    stacked = torch.stack(gradients)
    return ExpectedGradient(stacked.mean(0), False, stacked.std(0, unbiased=True) / math.sqrt(stacked.shape[0]))


@dataclass
class GradientComparison:
    rel_err: float
    cosine: float
    norm_ratio: float
    stderr: float | None = None  # standard error of rel_err's numerator / |truth| when sampled

    @property
    def exact(self) -> bool:
        if self.stderr is not None:  # sampled: "exact" means indistinguishable from zero bias
            return self.rel_err <= 4.0 * self.stderr
        return self.rel_err < EXACT_TOLERANCE


def compare(estimate: Tensor | ExpectedGradient, truth: Tensor, scale: float = 1.0) -> GradientComparison:
    """Relative error, cosine and norm ratio of ``estimate / scale`` against ``truth``.

    ``scale`` is the constant the configuration multiplies the KL gradient by (e.g. 1/C for a fixed token
    normaliser C): exactness is about the gradient the objective asks for, up to that declared constant."""
    stderr = None
    if isinstance(estimate, ExpectedGradient):
        if estimate.stderr is not None:
            stderr = float(estimate.stderr.norm() / scale / truth.norm())
        estimate = estimate.gradient
    estimate = estimate / scale
    truth_norm = truth.norm()
    if float(truth_norm) == 0.0:
        raise ValueError("the true KL gradient is zero (pi_theta == pi_ref): increase the distance")
    rel_err = float((estimate - truth).norm() / truth_norm)
    est_norm = estimate.norm()
    cosine = float(estimate @ truth / (est_norm * truth_norm)) if float(est_norm) > 0 else 0.0
    return GradientComparison(rel_err, cosine, float(est_norm / truth_norm), stderr)
