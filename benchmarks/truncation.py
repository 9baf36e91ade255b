"""Exact versus truncated per-decision weights in off-policy k1-rtg-loss: bias, variance and MSE on long responses.

A synthetic long-horizon policy, sampled (not enumerated): A actions at each of L positions, with a per-position
logit table, pi_t = softmax(theta_t), independent across positions (the gradient structure of a long response
without the cost of a model). The reference is pi_ref = softmax(theta_t + REF_NOISE * eps_t); the sampler is a stale
copy mu = softmax(theta_t + s * eps'_t), s calibrated so that the per-token log-ratio log pi/mu of a sampled token
has standard deviation sigma (PPO mini-batch staleness: 0.005 - 0.1). Because positions are independent, the
truth is analytic: grad_{theta_t} KL(pi || pi_ref) over the whole response = pi_t * (l_t - KL_t), l_t = log pi_t -
log pi_ref_t, and the score of a sampled token is e_{y_t} - pi_t, so each response's gradient estimate
sum_t (e_{y_t} - pi_t) c_t is formed in closed form from the coefficients c_t that ``kl_patches.terms
.rtg_coefficients`` computes (the library's own code, with its ``truncation``).

Per (length L, spread sigma, truncation c in {1, 2, 5, inf}), from M responses (common random numbers across c):

* relative bias |E[g_c] - grad KL| / |grad KL|, estimated either as the mean of g_c - g_inf (g_inf is exact in
  expectation by construction; the difference has little variance while few weights are truncated) or directly
  against the analytic gradient (better when the exact weights' variance explodes), whichever has the smaller
  standard error, debiased for its noise;
* relative variance of one response's estimate, and the relative MSE of a batch of 256 responses,
  bias^2 + variance / 256;
* ``kl_patches.statistics.importance_weight_stats`` on batches of 256 (ESS fraction, truncated fraction, and the
  fraction of weights at the float32 cap): median over batches.

    python benchmarks/truncation.py            # full grid
    python benchmarks/truncation.py --quick    # one length, two spreads (smoke test)
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = "truncation"
ACTIONS = 4
REF_NOISE = 0.3
BATCH = 256
TRUNCATIONS = (1.0, 2.0, 5.0, math.inf)
# responses per cell: min(2048, TOKENS // length) (the machine has 2 cores shared by ~6 agents)
FULL = dict(lengths=(256, 1024, 4096), sigmas=(0.005, 0.01, 0.05, 0.1), responses=2048, tokens=524_288, seeds=(0,))
QUICK = dict(lengths=(256,), sigmas=(0.01, 0.1), responses=512, tokens=131_072, seeds=(0,))


def label(c: float) -> str:
    return "exact (no truncation)" if math.isinf(c) else f"truncated at c = {c:g}"


class LongPolicy:
    """pi, pi_ref, mu as (L, A) log-prob tables; sample responses from mu."""

    def __init__(self, length: int, sigma: float, seed: int):
        import torch

        generator = torch.Generator().manual_seed(seed)
        theta = torch.randn(length, ACTIONS, generator=generator, dtype=torch.float64)
        ref_noise = torch.randn(length, ACTIONS, generator=generator, dtype=torch.float64)
        mu_noise = torch.randn(length, ACTIONS, generator=generator, dtype=torch.float64)
        self.log_pi = torch.log_softmax(theta, -1)
        self.log_ref = torch.log_softmax(theta + REF_NOISE * ref_noise, -1)
        scale = 1.0
        for _ in range(3):  # calibrate the mu noise so the sampled log-ratio has standard deviation sigma
            self.log_mu = torch.log_softmax(theta + scale * sigma * mu_noise, -1)
            measured = self.spread()
            scale *= sigma / measured
        self.log_mu = torch.log_softmax(theta + scale * sigma * mu_noise, -1)
        self.sigma = self.spread()
        self.length = length
        self.generator = torch.Generator().manual_seed(seed + 1)

    def spread(self) -> float:
        """sqrt of the mean over positions of Var_{a ~ mu_t}(log pi_t(a) - log mu_t(a))."""
        ratio = self.log_pi - self.log_mu
        mu = self.log_mu.exp()
        mean = (mu * ratio).sum(-1, keepdim=True)
        return float(((mu * (ratio - mean) ** 2).sum(-1)).mean().sqrt())

    def truth(self):
        pi = self.log_pi.exp()
        l = self.log_pi - self.log_ref
        kl = (pi * l).sum(-1, keepdim=True)
        return pi * (l - kl)  # (L, A)

    def sample(self, n: int):
        import torch

        probs = self.log_mu.exp()
        return torch.multinomial(probs, n, replacement=True, generator=self.generator).T.contiguous()  # (n, L)


def measure(policy: LongPolicy, responses: int, chunk: int = 256) -> dict:
    """Per truncation c: sums over the responses of g_c, |g_c|^2, g_c - g_inf, |g_c - g_inf|^2; weight stats."""
    import torch

    from kl_patches import statistics, terms

    L = policy.length
    pi = policy.log_pi.exp()
    sums = {c: torch.zeros(L, ACTIONS, dtype=torch.float64) for c in TRUNCATIONS}
    squares = {c: 0.0 for c in TRUNCATIONS}
    diff_sums = {c: torch.zeros(L, ACTIONS, dtype=torch.float64) for c in TRUNCATIONS}
    diff_squares = {c: 0.0 for c in TRUNCATIONS}
    diff_square_list = {c: [] for c in TRUNCATIONS}
    stats = {c: [] for c in TRUNCATIONS}
    mask = torch.ones(chunk, L, dtype=torch.bool)
    positions = torch.arange(L)
    for start in range(0, responses, chunk):
        tokens = policy.sample(chunk)
        logp = policy.log_pi[positions, tokens]
        ref = policy.log_ref[positions, tokens]
        beh = policy.log_mu[positions, tokens]
        onehot = torch.nn.functional.one_hot(tokens, ACTIONS).to(torch.float64)
        score = onehot - pi  # (n, L, A)
        score_norm2 = score.pow(2).sum(-1)  # (n, L)
        grads = {}
        for c in TRUNCATIONS:
            coeff = terms.rtg_coefficients(logp, ref, mask, behaviour_logp=beh, baseline="none",
                                           truncation=None if math.isinf(c) else c)
            grads[c] = coeff
            sums[c] += torch.einsum("nl,nla->la", coeff, score)
            squares[c] += float((coeff.pow(2) * score_norm2).sum())
            stats[c].append(statistics.importance_weight_stats(
                logp.float(), beh.float(), mask, truncation=None if math.isinf(c) else c))
        for c in TRUNCATIONS:
            d = grads[c] - grads[math.inf]
            diff_sums[c] += torch.einsum("nl,nla->la", d, score)
            per = (d.pow(2) * score_norm2).sum(-1)
            diff_squares[c] += float(per.sum())
            diff_square_list[c].append(per)
    truth = policy.truth()
    scale = float(truth.pow(2).sum())
    out = {}  # exact weights: measured directly against the analytic gradient (unbiased by construction)
    for c in TRUNCATIONS:
        mean = sums[c] / responses
        variance = squares[c] / responses - float(mean.pow(2).sum())
        dmean = diff_sums[c] / responses
        dvar = max(diff_squares[c] / responses - float(dmean.pow(2).sum()), 0.0)
        # |E g_c - grad KL|^2 two ways, debiased for the noise: through the difference to the exact weights on the
        # same samples (low noise while few weights are truncated), or directly against the analytic truth (low
        # noise when the exact weights' variance explodes); the one with the smaller standard error is reported
        via_difference = (max(float(dmean.pow(2).sum()) - dvar / responses, 0.0), dvar / responses)
        direct = (max(float((mean - truth).pow(2).sum()) - variance / responses, 0.0), variance / responses)
        bias2, noise = direct if math.isinf(c) else min(via_difference, direct, key=lambda pair: pair[1])
        se_bias = math.sqrt(noise / scale)
        out[c] = {
            "relative_bias": math.sqrt(bias2 / scale), "relative_bias_se": se_bias,
            "relative_variance_per_response": variance / scale,
            "relative_mse_batch": (bias2 + variance / BATCH) / scale,
            "ess": [s["ess"] for s in stats[c]], "truncated_fraction": [s["truncated_fraction"] for s in stats[c]],
            "capped_fraction_float32": [s["capped_fraction"] for s in stats[c]],
            "max_log_weight": [s["max_log_weight"] for s in stats[c]],
        }
    return out


def run(rows: _common.Rows, grid: dict) -> None:
    for length in grid["lengths"]:
        for sigma in grid["sigmas"]:
            for seed in grid["seeds"]:
                started = time.perf_counter()
                policy = LongPolicy(length, sigma, seed)
                responses = min(grid["responses"], grid["tokens"] // length)
                result = measure(policy, responses)
                exact_mse = result[math.inf]["relative_mse_batch"]
                for c, values in result.items():
                    config = {"length": length, "sigma": sigma, "measured_sigma": round(policy.sigma, 6),
                              "truncation": "inf" if math.isinf(c) else c, "responses": responses,
                              "batch": BATCH, "actions": ACTIONS, "ref_noise": REF_NOISE, "seed": seed}
                    common = dict(what="truncation", library="core", configuration=label(c), x_name="length",
                                  x=length, config=config)
                    for metric in ("relative_bias", "relative_bias_se", "relative_variance_per_response",
                                   "relative_mse_batch"):
                        rows.add(metric=metric, unit="|grad KL|", values=values[metric], **common)
                    rows.add(metric="mse_vs_exact", unit="ratio", values=values["relative_mse_batch"] / exact_mse,
                             **common)
                    # the bias is not resolved when it is below ~2 standard errors: an upper bound on the MSE
                    upper = (values["relative_bias"] + 2 * values["relative_bias_se"]) ** 2 + (
                        values["relative_mse_batch"] - values["relative_bias"] ** 2)
                    rows.add(metric="relative_mse_batch_upper", unit="|grad KL|^2", values=upper, **common)
                    for metric in ("ess", "truncated_fraction", "capped_fraction_float32", "max_log_weight"):
                        rows.add(metric=metric, unit="fraction" if metric != "max_log_weight" else "nats",
                                 values=values[metric], **common)
                    print(f"[{SCRIPT}] L={length:5d} sigma={sigma:<6g} {label(c):22s} ESS "
                          f"{_common.quantiles(values['ess'])[0]:.3f} truncated "
                          f"{_common.quantiles(values['truncated_fraction'])[0]:.3f} rel. bias "
                          f"{values['relative_bias']:.3g} (se {values['relative_bias_se']:.2g}) rel. MSE@{BATCH} "
                          f"{values['relative_mse_batch']:.3g}")
                print(f"[{SCRIPT}] L={length} sigma={sigma}: {time.perf_counter() - started:.1f} s")


def recommendation(rows: list[dict]) -> list[dict]:
    """Per (length, sigma): the truncation with the lowest MSE at the batch, and the exact run's ESS."""
    cells = {}
    for r in rows:
        if r["what"] != "truncation":
            continue
        config = _common.json.loads(r["config"])
        cells.setdefault((int(config["length"]), float(config["sigma"])), {}).setdefault(
            r["configuration"], {})[r["metric"]] = float(r["median"])
    out = []
    for (length, sigma), by_config in sorted(cells.items()):
        best = min(by_config, key=lambda name: by_config[name]["relative_mse_batch"])
        out.append({"length": length, "sigma": sigma, "best": best,
                    "ess": by_config[label(math.inf)]["ess"], "by_config": by_config})
    return out


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["what"] == "truncation"]
    if not mine:
        return []
    sigmas = sorted({float(_common.json.loads(r["config"])["sigma"]) for r in mine})
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    colours = plt.get_cmap("viridis")
    for index, sigma in enumerate(sigmas):
        for c, style in zip(TRUNCATIONS, ("-", "--", "-.", ":")):
            line = sorted((r for r in mine if float(_common.json.loads(r["config"])["sigma"]) == sigma
                           and r["configuration"] == label(c)), key=lambda r: int(r["x"]))
            for axis, metric in zip(axes, ("relative_bias", "relative_mse_batch", "ess")):
                points = [(int(r["x"]), float(r["median"])) for r in line if r["metric"] == metric]
                if not points or (metric == "ess" and not math.isinf(c)) or (
                        metric == "relative_bias" and math.isinf(c)):  # exact: unbiased by construction
                    continue
                axis.plot(*zip(*points), style, marker="o", color=colours(index / max(len(sigmas) - 1, 1)),
                          label=f"sigma {sigma:g}, {label(c)}" if metric != "ess" else f"sigma {sigma:g}")
    titles = {0: "relative bias |E g - grad KL| / |grad KL| (truncated; +- se in the CSV)", 1: f"relative MSE, batch of {BATCH} responses",
              2: "ESS fraction of the prefix weights (exact)"}
    for i, axis in enumerate(axes):
        axis.set_xscale("log", base=2)
        axis.set_yscale("symlog", linthresh=1e-3) if i == 0 else axis.set_yscale("log")
        axis.set_xlabel("response length")
        axis.set_title(titles[i], fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[1].legend(fontsize=6, ncol=2)
    axes[2].legend(fontsize=7)
    fig.suptitle("Off-policy k1-rtg-loss: exact vs truncated per-decision weights (sampled, synthetic policy)",
                 fontsize=11)
    fig.tight_layout()
    path = out / "truncation.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    import torch

    torch.set_num_threads(1)
    args = _common.parser(__doc__.split("\n")[0]).parse_args(argv)
    coverage = _common.Coverage(covered=["core"])
    for library in args.libraries or []:
        if library != "core":
            coverage.skip(library, "the truncation study runs on the core's terms only")
    rows = _common.Rows(SCRIPT, args.out)
    if not args.plot_only:
        import warnings

        warnings.simplefilter("ignore")  # cap warnings are counted (capped_fraction_float32), not printed
        run(rows, QUICK if args.quick else FULL)
    _common.finish(rows, coverage, args, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
