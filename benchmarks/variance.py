"""How many sampled responses each KL gradient estimator needs: mean squared error against grad KL_seq, exactly.

For an estimator whose batch of n responses is made of n/G independent groups of G (G = 1, or 2 for the
leave-one-out baselines), the per-group gradient g_j is computed for every enumerated group j of a tiny policy,
so its mean m = E[g], its bias b = m - grad KL_seq and its variance v = E|g - m|^2 are exact, and

    MSE(n) = |b|^2 + v * G / n          (exact for i.i.d. groups)

Reported relative to |grad KL_seq|^2, over a grid of policies: the relative variance of one response, the relative
squared bias, MSE(n) for n = 2..4096, and the number of responses needed to reach a relative MSE of 0.1 and 0.01
(infinite when the bias alone exceeds it). Estimators: the exact ones (sequence k1 in reward, reward-to-go, each
with and without the leave-one-out baseline; k3 in reward and in loss; off-policy k1-rtg-loss with per-decision
weights, with and without truncation and baseline) and the biased ones (library defaults and upstream fixes),
plus each installed library's loss paths through its adapter (``_libraries``: verl and OpenRLHF, groups of 2).

    python benchmarks/variance.py            # core + every library installed in this interpreter
    python benchmarks/variance.py --quick    # one policy (smoke test)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = "variance"
SAMPLE_SIZES = tuple(2 ** k for k in range(1, 13))
TARGETS = (0.1, 0.01)
GROUP_SIZES = (2, 4, 8, 16)  # group sizes reported for the leave-one-out estimators
PLOTTED_GROUPS = (1, 8)  # MSE(n) curves: uncoupled estimators and leave-one-out groups of 8 (GRPO-like)  # relative MSE levels for "responses needed"
SEQUENCE_K1 = "k1 in reward, sequence sum, no baseline"  # the yardstick of the target
RTG_LOSS = "kl-patches k1-rtg-loss (reward-to-go, no baseline: the default)"
RTG_SEQUENCE_LOO = "k1 reward-to-go + sequence leave-one-out (k1-rtg-loss baseline=\"sequence-loo\")"


@dataclass
class Estimator:
    library: str
    name: str
    loss: Callable  # AuditBatch -> (G,) per-group losses
    group_size: int
    regime: str  # "on" or "off"
    exact: bool  # exact in expectation by construction (the benchmark reports the measured bias anyway)
    mode: str = "library"
    context: Callable | None = None  # -> context manager yielding the loss (a library in the right patch state)
    u_statistic: bool = True  # leave-one-out form: Hoeffding's formula extends groups of 2 to any group size

    def active(self):
        return contextlib.nullcontext(self.loss) if self.context is None else self.context()


def _rtg(baseline: str, truncation: float | None = None):
    from kl_patches import terms

    def loss(batch):
        per_row = terms.kl_rtg_loss(
            batch.logp, batch.ref_logp, batch.mask, beta=1.0,
            behaviour_logp=None if batch.on_policy else batch.behaviour_logp,
            group_ids=batch.group_ids if baseline != "none" else None, baseline=baseline,
            truncation=None if batch.on_policy else truncation, reduction="none",
        )
        return per_row.reshape(-1, batch.group_size).mean(-1)

    return loss


def core_estimators() -> list[Estimator]:
    from kl_patches.audit import reference as ref

    cells = {cell.configuration: cell for cell in ref.CELLS}
    on = [
        Estimator("core", SEQUENCE_K1, cells["k1 in reward (sequence sum)"].loss, 1, "on", True),
        Estimator("core", "k1 in reward, sequence sum + leave-one-out (kl-patches k1-in-reward)",
                  cells["k1-in-reward (kl-patches)"].loss, 2, "on", True, "k1-in-reward"),
        Estimator("core", RTG_LOSS, _rtg("none"), 1, "on", True, "k1-rtg-loss"),
        Estimator("core", RTG_SEQUENCE_LOO, _rtg("sequence-loo"), 2, "on", True, "k1-rtg-loss"),
        Estimator("core", "k3 in reward and in loss", cells["k3 in reward and in loss"].loss, 1, "on", True),
        Estimator("core", "k3 in loss (GRPO default)", cells["k3 in loss (GRPO default)"].loss, 1, "on", False),
        Estimator("core", "k1 in loss", cells["k1 in loss"].loss, 1, "on", False),
        Estimator("core", "k2-gradient in loss (verl k3+)",
                  cells["k3 value, k2 gradient (straight-through)"].loss, 1, "on", False),
        Estimator("core", "k3 in reward", cells["k3 in reward"].loss, 1, "on", False),
    ]
    off = [
        Estimator("core", "off-policy k1-rtg-loss, per-decision weights, no baseline (kl-patches default)",
                  _rtg("none"), 1, "off", True, "k1-rtg-loss"),
        Estimator("core", "off-policy k1-rtg-loss, per-decision weights + sequence leave-one-out",
                  _rtg("sequence-loo"), 2, "off", True, "k1-rtg-loss"),
        Estimator("core", f"off-policy k1-rtg-loss, weights truncated at {ref.TRUNCATION:g} + leave-one-out",
                  _rtg("leave-one-out", ref.TRUNCATION), 2, "off", False, "k1-rtg-loss"),
        Estimator("core", "off-policy k1-rtg-loss, weights truncated at 2 + leave-one-out",
                  _rtg("leave-one-out", 2.0), 2, "off", False, "k1-rtg-loss"),
        Estimator("core", "off-policy k1-in-reward (token ratios only)", cells["k1-in-reward (kl-patches)"].loss, 2,
                  "off", False, "k1-in-reward"),
        Estimator("core", "off-policy reward-to-go with token-only ratios",
                  cells["reward-to-go with token-only ratios"].loss, 1, "off", False),
        Estimator("core", "off-policy k3 in loss (GRPO default)", cells["k3 in loss (GRPO default)"].loss, 1,
                  "off", False),
    ]
    return on + off


def library_estimators(library: str) -> list[Estimator]:
    """The library's real loss paths (``_libraries``), per group of 2 responses (one library call per enumerated
    group). Their group estimators are not assumed to be U-statistics (GRPO / whitening statistics may not be),
    so only groups of 2, enumerated exactly, are reported for them."""
    import _libraries
    from kl_patches.audit import per_group

    estimators = []
    for path in _libraries.checked_paths(library, group=2):
        def context(path=path):
            @contextlib.contextmanager
            def grouped():
                with path.active() as loss:
                    yield per_group(loss)

            return grouped()

        for regime in ("on", "off"):
            name = path.name if regime == "on" else f"off-policy {path.name}"
            estimators.append(Estimator(library, name, None, 2, regime, False, path.mode, context=context,
                                        u_statistic=False))
    return estimators


def grid(quick: bool, library: str = "core"):
    """Policies: libraries get the vocabulary-3, horizon-3 ones (225 enumerated groups of 2, one library call each)."""
    from kl_patches.audit import PolicySpec

    if quick:
        return [PolicySpec(vocab=3, horizon=2 if library != "core" else 3, seed=0)]
    shapes = ((3, 3), (3, 4), (4, 3)) if library == "core" else ((3, 3),)
    seeds = (0,) if library == "core" else (0, 1, 2)  # core: one seed (2 shared cores; was 3)
    return [PolicySpec(vocab=v, horizon=h, seed=s, distance=d, staleness=0.3)
            for s in seeds for v, h in shapes for d in (0.5, 1.0)]


def group_gradients(problem, loss_fn, group_size: int):
    """(per-group gradients (J, P), group weights (J,)) over every ordered group of ``group_size`` responses."""
    import torch

    from kl_patches.audit.engine import enumerated_logprobs, groups_batch, sampling_groups

    parameters = problem.parameters()
    logp, ref_logp, behaviour_logp, weights = enumerated_logprobs(problem)
    members, group_weights, exact = sampling_groups(weights, group_size, max_groups=10 ** 9, samples=0, seed=0)
    assert exact
    groups = members.shape[0]
    batch = groups_batch(problem, members, logp, ref_logp, behaviour_logp)
    losses = loss_fn(batch)
    try:  # one vectorised backward per group (vmap over the backward pass)
        grads = torch.autograd.grad(losses, parameters, grad_outputs=torch.eye(groups, dtype=losses.dtype),
                                    is_grads_batched=True, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros(groups, *p.shape, dtype=losses.dtype))
                          .reshape(groups, -1) for g, p in zip(grads, parameters)], dim=1)
    except RuntimeError:  # an op without a batching rule (library code): one backward per group
        rows_out = []
        for j in range(groups):
            grads = torch.autograd.grad(losses[j], parameters, retain_graph=True, allow_unused=True)
            rows_out.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                       for g, p in zip(grads, parameters)]))
        flat = torch.stack(rows_out)
    return flat.detach(), group_weights


def moments(problem, estimator: Estimator, truth) -> dict:
    """Relative squared bias and the variance of one response's share of the estimate, per group size.

    Uncoupled estimators (G = 1): the variance of one response's gradient. Leave-one-out estimators: the group
    estimate of G responses is the U-statistic of order 2 whose kernel h(y_i, y_j) is the estimate of the group
    {y_i, y_j} (both are means over pairs of (1/2)[a_i - B_i c_j + a_j - B_j c_i]), so Hoeffding's formula gives
    its exact variance from the enumerated pairs: Var(U_G) = 2 / (G (G - 1)) * (2 (G - 2) zeta1 + zeta2), with
    zeta1 = Var(E[h | y_i]) and zeta2 = Var(h). ``check_hoeffding`` verifies it against enumerated groups of 3."""
    with estimator.active() as loss:
        grads, weights = group_gradients(problem, loss, estimator.group_size)
    mean = (weights[:, None] * grads).sum(0)
    scale = float(truth.pow(2).sum())
    bias2 = float((mean - truth).pow(2).sum()) / scale
    if not estimator.u_statistic:
        variance = float((weights * (grads - mean).pow(2).sum(1)).sum()) / scale
        return {"bias2": bias2, "variance": {estimator.group_size: estimator.group_size * variance}}
    if estimator.group_size == 1:
        variance = float((weights * (grads - mean).pow(2).sum(1)).sum()) / scale
        return {"bias2": bias2, "variance": {1: variance}}
    zeta1, zeta2 = hoeffding_zetas(grads, weights, mean)
    return {"bias2": bias2, "variance": {g: g * u_variance(zeta1 / scale, zeta2 / scale, g) for g in GROUP_SIZES}}


def hoeffding_zetas(grads, weights, mean):
    """zeta1 = Var(E[h(y_i, y_j) | y_i]) and zeta2 = Var(h) (traces) from every ordered pair's estimate."""
    n = int(round(weights.shape[0] ** 0.5))
    pair = grads.reshape(n, n, -1)
    probs = weights.reshape(n, n).sum(1)  # marginal of the first member
    conditional = (probs[None, :, None] * pair).sum(1)  # E[h | y_i] for every y_i
    zeta1 = float((probs * (conditional - mean).pow(2).sum(1)).sum())
    zeta2 = float((weights * (grads - mean).pow(2).sum(1)).sum())
    return zeta1, zeta2


def u_variance(zeta1: float, zeta2: float, group: int) -> float:
    return 2.0 / (group * (group - 1)) * (2.0 * (group - 2) * zeta1 + zeta2)


def check_hoeffding(estimator: Estimator) -> float:
    """Relative difference between the Hoeffding variance for groups of 3 and the variance over every enumerated
    group of 3 (the estimate's formula must hold for the variance table to be exact)."""
    from kl_patches.audit import PolicySpec, build_problem

    problem = build_problem(PolicySpec(vocab=3, horizon=2, seed=3), off_policy=estimator.regime == "off")
    grads2, weights2 = group_gradients(problem, estimator.loss, 2)
    # (core estimators only: a library path's loss lives in its ``active()`` context)
    mean = (weights2[:, None] * grads2).sum(0)
    zeta1, zeta2 = hoeffding_zetas(grads2, weights2, mean)
    grads3, weights3 = group_gradients(problem, estimator.loss, 3)
    mean3 = (weights3[:, None] * grads3).sum(0)
    enumerated = float((weights3 * (grads3 - mean3).pow(2).sum(1)).sum())
    return abs(enumerated - u_variance(zeta1, zeta2, 3)) / enumerated


def needed(bias2: float, variance: float, target: float) -> float:
    """Smallest n with bias2 + variance / n <= target (inf when the bias alone is too large)."""
    if bias2 >= target:
        return math.inf
    return max(1.0, variance / (target - bias2))


def labelled(estimator: Estimator, group: int) -> str:
    return estimator.name if estimator.group_size == 1 else f"{estimator.name} [groups of {group}]"


def run(rows: _common.Rows, estimators: list[Estimator], specs, library: str) -> None:
    from kl_patches.audit import build_problem, exact_kl_gradient

    for estimator in estimators:
        if estimator.group_size == 2 and estimator.u_statistic:
            error = check_hoeffding(estimator)
            if error > 1e-8:
                raise RuntimeError(f"Hoeffding's variance formula does not match enumerated groups of 3 for "
                                   f"{estimator.name!r} (relative difference {error:.2e})")
    results = {e.name: [] for e in estimators}
    for spec in specs:
        for regime in ("on", "off"):
            mine = [e for e in estimators if e.regime == regime]
            if not mine:
                continue
            problem = build_problem(spec, off_policy=regime == "off")
            truth = exact_kl_gradient(problem).detach()
            for estimator in mine:
                results[estimator.name].append((spec, moments(problem, estimator, truth)))
    yardstick = {id(spec): (m["bias2"], m["variance"][1]) for spec, m in results.get(SEQUENCE_K1, [])}
    for estimator in estimators:
        entries = results[estimator.name]
        if not entries:
            continue
        groups = sorted(entries[0][1]["variance"])
        for group in groups:
            name = labelled(estimator, group)
            config = {"regime": estimator.regime, "group_size": group, "mode": estimator.mode,
                      "exact_by_construction": estimator.exact, "policies": len(entries),
                      "estimator": estimator.name}
            common = dict(what="variance", library=library, configuration=name, config=config,
                          x_name="policy", x=estimator.regime)
            variances = [m["variance"][group] for _, m in entries]
            rows.add(metric="relative_variance_per_response", unit="|grad KL|^2", values=variances, **common)
            rows.add(metric="relative_bias2", unit="|grad KL|^2", values=[m["bias2"] for _, m in entries],
                     **common)
            for target in TARGETS:
                counts = [needed(m["bias2"], m["variance"][group], target) for _, m in entries]
                rows.add(metric=f"responses_for_rel_mse_{target:g}", unit="responses", values=counts, **common)
                if estimator.regime == "on" and yardstick:
                    ratios = [needed(m["bias2"], m["variance"][group], target) / needed(*yardstick[id(spec)], target)
                              for spec, m in entries if id(spec) in yardstick]
                    rows.add(metric=f"responses_vs_sequence_k1_{target:g}", unit="ratio", values=ratios, **common)
            for n in SAMPLE_SIZES:
                if n < group or group not in PLOTTED_GROUPS:
                    continue
                rows.add(what="variance-mse", library=library, configuration=name, metric="relative_mse",
                         unit="|grad KL|^2", values=[m["bias2"] + m["variance"][group] / n for _, m in entries],
                         x_name="responses", x=n, config={"regime": estimator.regime, "group_size": group})
            print(f"[{SCRIPT}] {library} {estimator.regime:3s} {name[:90]:90s} rel. var "
                  f"{_common.quantiles(variances)[0]:9.3g}  rel. bias^2 "
                  f"{_common.quantiles([m['bias2'] for _, m in entries])[0]:9.3g}")


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    curves = [r for r in rows if r["what"] == "variance-mse"]
    if not curves:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), sharey=True)
    colours = plt.get_cmap("tab20")
    for axis, regime in zip(axes, ("on", "off")):
        names = list(dict.fromkeys((r["library"], r["configuration"]) for r in curves
                                   if _common.json.loads(r["config"])["regime"] == regime))
        for index, (library, name) in enumerate(names):
            line = [r for r in curves if r["library"] == library and r["configuration"] == name]
            xs = [float(r["x"]) for r in line]
            label = name if library == "core" else f"{library}: {name}"
            bold = "kl-patches" in name
            axis.plot(xs, [float(r["median"]) for r in line], "-" if library == "core" else ":",
                      color=colours(index % 20), linewidth=2.2 if bold else 1.2, label=label)
        for target in TARGETS:
            axis.axhline(target, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sampled responses per gradient estimate (n)")
        axis.set_title(f"{regime}-policy samples", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper right")
    axes[0].set_ylabel("MSE(n) / |grad KL_seq|^2  (median over policies)")
    fig.suptitle("Mean squared error of the KL gradient: exact bias^2 + variance/n by enumeration", fontsize=11)
    fig.tight_layout()
    path = out / "variance.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------------------------
# Baselines of k1-rtg-loss, compared exactly (issue 9)
# ----------------------------------------------------------------------------------------------------------------
#
# The position-wise leave-one-out baseline (mean reward-to-go of the *other members still generating* at t) is a
# ratio of sums over the group, not a pair U-statistic, so Hoeffding's formula does not apply. Here every
# estimator's group estimate is computed on every *multiset* of G enumerated responses (weighted by its multinomial
# probability: the group estimate is symmetric in its members), which is exact; where there are too many multisets
# (groups of 8/16 on the larger policies) groups are sampled i.i.d. and the variance carries a standard error.
# Gradients live in an orthonormal basis of the span of the score vectors (and, for the Rao-Blackwellised
# estimator, of the per-position KL gradients): norms and inner products are those of the parameter space.

BASELINE_ESTIMATORS = ("sequence k1 in reward", "none", "sequence-loo", "position-loo", "rao-blackwellised")
BASELINE_LABELS = {
    "sequence k1 in reward": "k1 in reward, sequence sum, no baseline (yardstick)",
    "none": "k1-rtg-loss, baseline \"none\" (default)",
    "sequence-loo": "k1-rtg-loss, baseline \"sequence-loo\"",
    "position-loo": "k1-rtg-loss, baseline \"position-loo\"",
    "rao-blackwellised": "Rao-Blackwellised k1 (full-vocabulary per-position KL + reward-to-go of it; reference row)",
}
UNCOUPLED = ("sequence k1 in reward", "none", "rao-blackwellised")  # no group statistic: G only divides
MAX_MULTISETS = 130_000  # groups of 2 and 4 enumerated on every policy of the grid
SAMPLED_GROUPS = 5_000


def full_vocab_logprobs(policy, tokens):
    """log pi(.|s_t) over the whole vocabulary at every position, (N, T, V): the tabular policy only."""
    import torch

    return torch.log_softmax(policy.logits[policy.prefix_codes(tokens)], dim=-1)


def baseline_basis(problem):
    """Per-(response, position) score vectors and per-position KL gradients in coordinates of one orthonormal
    basis of their span: (scores (N, T, k), kl_grads (N, T, k) or None, per-position KL (N, T) or None)."""
    import torch

    from kl_patches.audit.policies import TabularPolicy

    parameters = problem.parameters()
    mask = problem.mask
    logp = problem.policy.token_logprobs(problem.tokens, mask)
    n, t = logp.shape
    vectors = []

    def grad(value):
        grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, parameters)])

    size = sum(p.numel() for p in parameters)
    zero = torch.zeros(size, dtype=torch.float64)
    scores = [grad(logp[i, s]) if mask[i, s] else zero for i in range(n) for s in range(t)]
    vectors += scores
    kl_grads = position_kl = None
    if isinstance(problem.policy, TabularPolicy):
        log_pi = full_vocab_logprobs(problem.policy, problem.tokens)
        with torch.no_grad():
            log_ref = full_vocab_logprobs(problem.reference, problem.tokens)
        kl = (log_pi.exp() * (log_pi - log_ref)).sum(-1)  # KL(pi(.|s_t) || pi_ref(.|s_t)), (N, T)
        kl_grads = [grad(kl[i, s]) if mask[i, s] else zero for i in range(n) for s in range(t)]
        vectors += kl_grads
        position_kl = torch.where(mask, kl.detach(), torch.zeros((), dtype=kl.dtype))
    matrix = torch.stack(vectors)  # (m, P)
    q, r = torch.linalg.qr(matrix.T)  # matrix = r.T q.T: coordinates r.T in the orthonormal basis q
    coords = r.T
    score_coords = coords[: n * t].reshape(n, t, -1)
    kl_coords = None if kl_grads is None else coords[n * t:].reshape(n, t, -1)
    return score_coords, kl_coords, position_kl, q


def baseline_coefficients(kind, lp, rf, mk, bh, gid, position_kl):
    """(score coefficients (rows, T), direct coefficients of the per-position KL gradients (rows, T) or None)."""
    import torch

    from kl_patches import terms

    if kind == "sequence k1 in reward":
        seq = terms.masked_log_ratio(lp, rf, mk).sum(-1)
        return terms.masked(seq[:, None].expand_as(lp).clone(), mk), None
    if kind == "rao-blackwellised":
        # grad E[sum_t KL_t(s_t)] = E[sum_t grad KL_t(s_t) + sum_t grad log pi(y_t|s_t) sum_{t'>t} KL_t'(s_t')];
        # off-policy the term at t' carries rho_{1:t'-1} (the prefix that reached s_t').
        if bh is None:
            before = mk.to(lp.dtype)
        else:
            rho = terms.prefix_importance_weights(lp, bh, mk)
            before = torch.cat([torch.ones_like(rho[:, :1]), rho[:, :-1]], dim=1) * mk
        weighted = before * position_kl
        after = terms.reverse_cumsum(weighted) - weighted  # strictly after t
        return terms.masked(after, mk), before
    return terms.rtg_coefficients(lp, rf, mk, behaviour_logp=bh, group_ids=gid, baseline=kind), None


def multisets(n: int, group: int):
    """Every multiset of ``group`` of n items (sorted tuples) and its multinomial coefficient."""
    import itertools

    import torch

    members = torch.tensor(list(itertools.combinations_with_replacement(range(n), group)), dtype=torch.long)
    counts = torch.zeros(members.shape[0], n, dtype=torch.float64).scatter_add_(
        1, members, torch.ones(members.shape, dtype=torch.float64))
    log_coef = math.lgamma(group + 1) - torch.lgamma(counts + 1).sum(1)
    return members, log_coef


def baseline_moments(problem, kinds, groups, seed: int = 0, basis=None) -> dict:
    """{(kind, G): (relative variance per response, its standard error, relative bias^2, exact?)}: the variance of
    the mean of one group's G estimates, times G (responses needed scale with it), relative to |grad KL|^2."""
    import torch

    from kl_patches.audit.engine import enumerated_logprobs

    truth = exact_kl_gradient_detached(problem)
    scale = float(truth.pow(2).sum())
    scores, kl_grads, position_kl, q = basis or baseline_basis(problem)
    q_truth = q.T @ truth  # grad KL_seq lies in the span of the score vectors (checked)
    if float((q @ q_truth - truth).norm()) > 1e-9 * float(truth.norm()):
        raise RuntimeError("grad KL_seq is not in the span of the score vectors")
    logp, ref_logp, behaviour_logp, weights = enumerated_logprobs(problem)
    logp = logp.detach()
    n = logp.shape[0]
    out = {}
    for group in groups:
        count = math.comb(n + group - 1, group)
        exact = count <= MAX_MULTISETS
        if exact:
            members, log_coef = multisets(n, group)
            group_weights = torch.exp(log_coef + torch.log(weights)[members].sum(1))
        else:
            generator = torch.Generator().manual_seed(seed + group)
            members = torch.multinomial(weights, SAMPLED_GROUPS * group, replacement=True,
                                        generator=generator).reshape(SAMPLED_GROUPS, group)
            group_weights = torch.full((SAMPLED_GROUPS,), 1.0 / SAMPLED_GROUPS, dtype=torch.float64)
        for kind in kinds:
            if kind == "rao-blackwellised" and kl_grads is None:
                continue
            if kind in UNCOUPLED and group != groups[0] and (kind, groups[0]) in out:
                out[(kind, group)] = out[(kind, groups[0])]
                continue
            estimates = []
            step = max(1, 8_000 // group)
            for start in range(0, members.shape[0], step):
                chunk = members[start:start + step]
                rows = chunk.reshape(-1)
                gid = torch.arange(chunk.shape[0]).repeat_interleave(group)
                bh = None if problem.on_policy else behaviour_logp[rows]
                score_c, direct_c = baseline_coefficients(kind, logp[rows], ref_logp[rows], problem.mask[rows], bh,
                                                          gid, None if position_kl is None else position_kl[rows])
                g = torch.einsum("rt,rtk->rk", score_c, scores[rows])
                if direct_c is not None:
                    g = g + torch.einsum("rt,rtk->rk", direct_c, kl_grads[rows])
                estimates.append(g.reshape(chunk.shape[0], group, -1).mean(1))
            estimates = torch.cat(estimates)
            mean = (group_weights[:, None] * estimates).sum(0)
            deviations = (estimates - mean).pow(2).sum(1)
            variance = float((group_weights * deviations).sum())
            if exact:
                error = 0.0
            else:
                variance *= SAMPLED_GROUPS / (SAMPLED_GROUPS - 1)
                error = float(deviations.std()) / math.sqrt(SAMPLED_GROUPS)
            bias2 = float((mean - q_truth).pow(2).sum()) / scale
            out[(kind, group)] = (group * variance / scale, group * error / scale, bias2, exact)
    return out


def exact_kl_gradient_detached(problem):
    from kl_patches.audit import exact_kl_gradient

    return exact_kl_gradient(problem).detach()


def baseline_grid(quick: bool):
    from kl_patches.audit import PolicySpec

    if quick:
        return [PolicySpec(vocab=3, horizon=3, seed=0)]
    return [PolicySpec(vocab=v, horizon=h, seed=s, distance=d, staleness=0.3)
            for s in (0, 1, 2) for v, h in ((3, 3), (3, 4), (4, 3)) for d in (0.5, 1.0)]


def check_multisets() -> float:
    """The multiset enumeration against Hoeffding's formula on the sequence-loo baseline (a pair U-statistic),
    groups of 3 and 4, on and off policy: the relative difference (must be at rounding level)."""
    from kl_patches.audit import PolicySpec, build_problem

    worst = 0.0
    for off in (False, True):
        problem = build_problem(PolicySpec(vocab=3, horizon=2, seed=3), off_policy=off)
        truth = exact_kl_gradient_detached(problem)
        scale = float(truth.pow(2).sum())
        grads, weights = group_gradients(problem, _rtg("sequence-loo"), 2)
        zeta1, zeta2 = hoeffding_zetas(grads, weights, (weights[:, None] * grads).sum(0))
        mine = baseline_moments(problem, ("sequence-loo",), (3, 4))
        for group in (3, 4):
            hoeffding = group * u_variance(zeta1, zeta2, group) / scale
            worst = max(worst, abs(mine[("sequence-loo", group)][0] - hoeffding) / hoeffding)
    if worst > 1e-8:
        raise RuntimeError(f"multiset enumeration disagrees with Hoeffding's formula: {worst:.2e}")
    return worst


def run_baselines(rows: _common.Rows, quick: bool) -> None:
    from kl_patches.audit import build_problem

    print(f"[{SCRIPT}] baselines: multiset enumeration matches Hoeffding's formula to {check_multisets():.1e}")
    groups = (2, 4) if quick else GROUP_SIZES
    specs = baseline_grid(quick)
    results = {}
    for regime in ("on", "off"):
        for spec in specs:
            problem = build_problem(spec, off_policy=regime == "off")
            started = time.perf_counter()
            moments_ = baseline_moments(problem, BASELINE_ESTIMATORS, groups, seed=spec.seed)
            print(f"[{SCRIPT}] baselines {regime} V={spec.vocab} T={spec.horizon} seed={spec.seed} "
                  f"d={spec.distance}: {time.perf_counter() - started:.1f} s")
            for key, value in moments_.items():
                results.setdefault((regime, *key), []).append(value)
    for (regime, kind, group), values in results.items():
        yard_kind = "sequence k1 in reward" if regime == "on" else "none"
        yard = results.get((regime, yard_kind, group))
        common = dict(what="variance-baselines", library="core", configuration=BASELINE_LABELS[kind],
                      x_name="group_size", x=group,
                      config={"regime": regime, "group_size": group, "baseline": kind, "policies": len(values),
                              "exact_fraction": sum(v[3] for v in values) / len(values),
                              "yardstick": BASELINE_LABELS[yard_kind],
                              "sampled_groups": SAMPLED_GROUPS, "max_multisets": MAX_MULTISETS})
        rows.add(metric="relative_variance_per_response", unit="|grad KL|^2", values=[v[0] for v in values], **common)
        rows.add(metric="relative_variance_se", unit="|grad KL|^2", values=[v[1] for v in values], **common)
        rows.add(metric="relative_bias2", unit="|grad KL|^2", values=[v[2] for v in values], **common)
        ratios = [v[0] / y[0] for v, y in zip(values, yard)]
        # all of these are unbiased (bias^2 ~ 1e-30): responses needed for any MSE target scale with the variance
        rows.add(metric="responses_vs_yardstick", unit="ratio", values=ratios, **common)
        if regime == "off":
            rows.add(metric="responses_vs_none", unit="ratio", values=ratios, **common)
        none = results.get((regime, "none", group))
        if none is not None:
            worse = sum(v[0] > n_[0] * (1 + 1e-9) + 2 * (v[1] + n_[1]) for v, n_ in zip(values, none))
            rows.add(metric="policies_worse_than_none", unit="policies", values=[worse], **common)
        print(f"[{SCRIPT}] baselines {regime:3s} G={group:2d} {kind:22s} responses vs {yard_kind}: "
              f"{_common.quantiles(ratios)[0]:.3f} [{_common.quantiles(ratios)[1]:.3f}, "
              f"{_common.quantiles(ratios)[2]:.3f}]  max bias^2 {max(v[2] for v in values):.1e}")


def main(argv=None) -> int:
    import torch

    torch.set_num_threads(1)
    parser = _common.parser(__doc__.split("\n")[0])
    parser.add_argument("--no-baselines", action="store_true", help="skip the k1-rtg-loss baseline comparison")
    args = parser.parse_args(argv)
    coverage, adapters = _common.resolve_coverage(args.libraries)
    rows = _common.Rows(SCRIPT, args.out)
    if not args.plot_only:
        for library in list(coverage.covered):
            started = time.perf_counter()
            try:
                estimators = core_estimators() if library == "core" else library_estimators(library)
                run(rows, estimators, grid(args.quick, library), library)
            except Exception as err:  # noqa: BLE001 - reported as skipped, never silently
                coverage.skip(library, f"{type(err).__name__}: {err}")
                continue
            if library == "core" and not args.no_baselines:
                run_baselines(rows, args.quick)
            print(f"[{SCRIPT}] {library}: {time.perf_counter() - started:.1f} s")
    _common.finish(rows, coverage, args, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
