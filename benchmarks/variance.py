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
RTG_LOSS = "kl-patches k1-rtg-loss (reward-to-go + leave-one-out)"


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
            group_ids=batch.group_ids if baseline == "leave-one-out" else None, baseline=baseline,
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
        Estimator("core", "k1 reward-to-go, no baseline", _rtg("none"), 1, "on", True, "k1-rtg-loss"),
        Estimator("core", RTG_LOSS, _rtg("leave-one-out"), 2, "on", True, "k1-rtg-loss"),
        Estimator("core", "k3 in reward and in loss", cells["k3 in reward and in loss"].loss, 1, "on", True),
        Estimator("core", "k3 in loss (GRPO default)", cells["k3 in loss (GRPO default)"].loss, 1, "on", False),
        Estimator("core", "k1 in loss", cells["k1 in loss"].loss, 1, "on", False),
        Estimator("core", "k2-gradient in loss (verl k3+)",
                  cells["k3 value, k2 gradient (straight-through)"].loss, 1, "on", False),
        Estimator("core", "k3 in reward", cells["k3 in reward"].loss, 1, "on", False),
    ]
    off = [
        Estimator("core", "off-policy k1-rtg-loss, per-decision weights + leave-one-out (kl-patches)",
                  _rtg("leave-one-out"), 2, "off", True, "k1-rtg-loss"),
        Estimator("core", "off-policy k1-rtg-loss, per-decision weights, no baseline", _rtg("none"), 1, "off", True,
                  "k1-rtg-loss"),
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
    return [PolicySpec(vocab=v, horizon=h, seed=s, distance=d, staleness=0.3)
            for s in (0, 1, 2) for v, h in shapes for d in (0.5, 1.0)]


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


def main(argv=None) -> int:
    import torch

    torch.set_num_threads(1)
    args = _common.parser(__doc__.split("\n")[0]).parse_args(argv)
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
            print(f"[{SCRIPT}] {library}: {time.perf_counter() - started:.1f} s")
    _common.finish(rows, coverage, args, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
