"""Render docs/results.md (and the README's short RESULTS block) from the benchmark CSVs: every figure in it is read
from benchmarks/results/*.csv, and every claim it states is computed from them (pass or fail, with the number).

    python benchmarks/report.py            # run_all.py calls it last
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

DOC = _common.HERE.parent / "docs" / "results.md"
IMAGES = "benchmarks/results"  # image links relative to the repository root (the README's picture)
README = _common.HERE.parent / "README.md"
README_BEGIN, README_END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"
README_IMAGE = "bias_table_core.png"  # the README's one picture; the full section lives in docs/results.md


def load(out: Path, script: str) -> list[dict]:
    return _common.read_rows(out / f"{script}.csv")


def fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "never"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) < 1e-2:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{max(digits, 3)}g}"


def times(ratio: float) -> str:
    """A ratio as "3,180×" / "110×" / "1.27×"."""
    if math.isnan(ratio):
        return "n/a"
    if math.isinf(ratio):
        return "∞×"
    return f"{ratio:,.0f}×" if ratio >= 100 else f"{ratio:.3g}×"


def med(row: dict | None, key: str = "median") -> float:
    return math.nan if row is None else float(row[key])


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def index(rows: list[dict], *keys: str) -> dict:
    found = {}
    for row in rows:
        found[tuple(row[k] for k in keys)] = row
    return found


def versions_line(rows: list[dict]) -> str:
    merged = {}
    for row in rows:
        merged.update(json.loads(row["versions"]))
    return ", ".join(f"{k} {v}" for k, v in sorted(merged.items()))


# ----------------------------------------------------------------------------------------------------------------

def section_bias(out: Path) -> list[str]:
    rows = load(out, "bias_table")
    if not rows:
        return ["*No bias_table.csv: run `python benchmarks/bias_table.py`.*"]
    text = []
    cells = index([r for r in rows if r["what"] == "bias"], "library", "configuration", "x", "metric")
    for library in ordered(r["library"] for r in rows if r["what"] == "bias"):
        configurations = list(dict.fromkeys(r["configuration"] for r in rows
                                            if r["what"] == "bias" and r["library"] == library))
        first = next(r for r in rows if r["what"] == "bias" and r["library"] == library)
        meta = json.loads(first["config"])
        text.append(f"**{library} {meta.get('library_version', '')}** — {meta['policies']} policies per regime "
                    f"(median over the grid; worst in brackets):\n")
        lines = []
        for configuration in configurations:
            line = [configuration.replace("|", "/"),
                    json.loads(next(r for r in rows if r["what"] == "bias" and r["library"] == library
                                    and r["configuration"] == configuration)["config"])["mode"]]
            for policy in ("on", "off"):
                rel = cells.get((library, configuration, policy, "rel_err"))
                if rel is None:
                    covered = cells.get((library, configuration, policy, "not_covered"))
                    line += ["not covered" if covered else "—", "", ""]
                    continue
                worst = cells[(library, configuration, policy, "rel_err_worst")]
                cosine = cells[(library, configuration, policy, "cosine")]
                cosine_worst = cells[(library, configuration, policy, "cosine_worst")]
                exact = cells[(library, configuration, policy, "exact_fraction")]
                line += [f"{fmt(med(rel))} [{fmt(med(worst))}]", f"{med(cosine):.3f} [{med(cosine_worst):.3f}]",
                         f"{100 * med(exact):.0f}%"]
            lines.append(line)
        text.append(table(["configuration", "mode", "on: rel_err", "on: cosine", "on: exact",
                           "off: rel_err", "off: cosine", "off: exact"], lines))
        text.append("")
        text.append(bias_claims(rows, library))
        text.append(f"\n![bias table {library}]({IMAGES}/bias_table_{library}.png)\n")
    timing = [r for r in rows if r["what"] == "bias_audit_time"]
    if timing:
        text.append("Audit time per policy (all configurations, on and off): " + ", ".join(
            f"{r['library']} {float(r['median']):.2f} s" for r in timing) + ".")
    return text


def bias_claims(rows: list[dict], library: str) -> str:
    """Per kl-patches mode and per regime: how many of its configurations are exact in every policy of the grid
    (exceptions named when few); for the unpatched configurations: biased everywhere / exact everywhere / mixed."""
    bias = [r for r in rows if r["what"] == "bias" and r["library"] == library]
    exact = {(r["configuration"], r["x"]): float(r["median"]) for r in bias if r["metric"] == "exact_fraction"}
    worst = {(r["configuration"], r["x"]): float(r["median"]) for r in bias if r["metric"] == "rel_err_worst"}
    low = {(r["configuration"], r["x"]): float(r["p20"]) for r in bias if r["metric"] == "rel_err"}
    modes = {r["configuration"]: json.loads(r["config"])["mode"] for r in bias}

    def names(items: list[str]) -> str:
        return "; ".join(items) if len(items) <= 3 else f"{len(items)} configurations, see the table"

    claims = []
    for mode in sorted({m for m in modes.values() if m != "library"}):
        parts = []
        for policy in ("on", "off"):
            cells = [c for (c, p) in exact if p == policy and modes[c] == mode]
            good = [c for c in cells if exact[(c, policy)] == 1.0]
            bad = [c for c in cells if exact[(c, policy)] < 1.0]
            part = f"{policy}-policy {len(good)} of {len(cells)} exact in every policy"
            if good:
                part += f" (worst relative error {fmt(max(worst[(c, policy)] for c in good))})"
            if bad:
                part += f"; not exact: {names(bad)}"
            parts.append(part)
        claims.append(f"kl-patches {mode} configurations: " + "; ".join(parts) + ".")
    for policy in ("on", "off"):
        unpatched = [c for (c, p) in exact if p == policy and modes[c] == "library"]
        biased = [c for c in unpatched if exact[(c, policy)] == 0.0]
        exact_all = [c for c in unpatched if exact[(c, policy)] == 1.0]
        mixed = len(unpatched) - len(biased) - len(exact_all)
        text = (f"Unpatched, {policy}-policy: {len(biased)} of {len(unpatched)} configurations biased in every policy "
                f"(p20 of their relative errors ≥ {fmt(min((low[(c, policy)] for c in biased), default=math.nan))})")
        if exact_all:
            text += f"; exact in every policy: {names(exact_all)}"
        if mixed:
            text += f"; {mixed} mixed"
        claims.append(text + ".")
    return "\n".join(f"* {claim}" for claim in claims)


# ----------------------------------------------------------------------------------------------------------------

def section_convergence(out: Path) -> list[str]:
    rows = load(out, "convergence")
    if not rows:
        return ["*No convergence.csv: run `python benchmarks/convergence.py`.*"]
    text = []
    finals = {}
    labels = {}
    for row in rows:
        if not row["what"].startswith("convergence-") or row["what"] == "convergence-optimum":
            continue
        key = (row["library"], row["configuration"], row["what"], row["metric"])
        if key not in finals or int(row["x"]) > int(finals[key]["x"]):
            finals[key] = row
        labels[(row["library"], row["configuration"])] = json.loads(row["config"]).get("label", row["configuration"])
    settings = next((json.loads(r["config"]) for r in rows if r["what"] == "convergence-optimum"), {})
    optimum = defaultdict(list)
    for r in rows:
        if r["what"] == "convergence-optimum" and r["library"] == "core":
            optimum[r["metric"]].append(float(r["median"]))
    whats = ["convergence-sampled-on", "convergence-sampled-stale", "convergence-exact-on", "convergence-exact-stale"]
    steps = settings.get("steps", "?")
    text.append(
        f"Vocabulary {settings.get('vocab')} (EOS included), horizon {settings.get('horizon')}, beta = "
        f"{settings.get('beta')}, reward = {settings.get('reward')}; {steps} SGD steps from pi_ref, "
        f"{settings.get('batch')} sampled responses per step (groups of {settings.get('group')}), step size "
        f"{settings.get('lr')}/(1 + t/{settings.get('tau')}) (sampled) or {settings.get('exact_lr')} (exact); stale = "
        f"behaviour snapshot refreshed every {settings.get('lag')} steps. pi* has KL(pi* || pi_ref) = "
        f"{fmt(sum(optimum['kl_to_reference']) / max(len(optimum['kl_to_reference']), 1))} and E[R] = "
        f"{fmt(sum(optimum['expected_reward']) / max(len(optimum['expected_reward']), 1))} (mean over seeds; "
        f"pi_ref: E[R] = {fmt(sum(optimum['reference_reward']) / max(len(optimum['reference_reward']), 1))}).\n")
    lines = []
    for library, configuration in labels:
        line = [labels[(library, configuration)] if library == "core" else f"{library}: {configuration}"]
        for what in whats:
            row = finals.get((library, configuration, what, "kl_to_optimum"))
            line.append("—" if row is None else f"{fmt(med(row))} [{fmt(med(row, 'p20'))}, {fmt(med(row, 'p80'))}]")
        for metric in ("kl_to_reference", "expected_reward"):
            line.append(fmt(med(finals.get((library, configuration, "convergence-exact-on", metric)))))
        lines.append(line)
    text.append(f"Final KL(pi_theta || pi*) after {steps} steps (median over seeds [p20, p80]), and the exact-gradient "
                "on-policy run's final KL to pi_ref and E[R]:\n")
    text.append(table(["configuration", "sampled, on", "sampled, stale", "exact, on", "exact, stale",
                       "KL(pi||pi_ref) (exact, on)", "E[R] (exact, on)"], lines))
    text.append("")
    text.append(convergence_claims(finals, labels))
    text.append(f"\n![convergence, sampled]({IMAGES}/convergence_sampled.png)\n")
    text.append(f"![convergence, exact gradient]({IMAGES}/convergence_exact.png)\n")
    return text


def convergence_claims(finals: dict, labels: dict) -> str:
    claims = []
    reference = "k3 in loss (GRPO default)"
    for what, name in (("convergence-sampled-on", "sampled, on-policy"),
                       ("convergence-sampled-stale", "sampled, stale samples"),
                       ("convergence-exact-on", "exact gradient, on-policy"),
                       ("convergence-exact-stale", "exact gradient, stale samples")):
        base = finals.get(("core", reference, what, "kl_to_optimum"))
        if base is None:
            continue
        parts = []
        for mode_name in ("k1-in-reward (kl-patches)", "k1-rtg-loss (kl-patches)"):
            row = finals.get(("core", mode_name, what, "kl_to_optimum"))
            if row is None:
                continue
            ratio = med(base) / med(row) if med(row) > 0 else math.inf
            verdict = "meets" if ratio >= 100 else "misses"
            parts.append(f"{labels[('core', mode_name)]}: {fmt(med(row))}, {times(ratio)} smaller ({verdict} 100×)")
        claims.append(f"{name}: k3 in loss ends at KL(pi||pi*) = {fmt(med(base))}; " + "; ".join(parts) + ".")
        drift = []
        for config in ("k1 in loss", "k3 in reward"):
            row = finals.get(("core", config, what, "kl_to_optimum"))
            reward = finals.get(("core", config, what, "expected_reward"))
            kl_ref = finals.get(("core", config, what, "kl_to_reference"))
            if row is not None:
                drift.append(f"{config} ends at KL(pi||pi*) = {fmt(med(row))} with KL(pi||pi_ref) = "
                             f"{fmt(med(kl_ref))} and E[R] = {fmt(med(reward))}")
        if drift:
            claims[-1] += " " + "; ".join(drift) + "."
    for library in sorted({key[0] for key in finals} - {"core"}):
        configurations = list(dict.fromkeys(key[1] for key in finals if key[0] == library))
        for what, name in (("convergence-sampled-on", "sampled, on-policy"),
                           ("convergence-sampled-stale", "sampled, stale samples")):
            default = finals.get((library, configurations[0], what, "kl_to_optimum"))
            parts = []
            for configuration in configurations[1:]:
                row = finals.get((library, configuration, what, "kl_to_optimum"))
                if row is not None and default is not None:
                    parts.append(f"{configuration}: {fmt(med(row))} ({times(med(default) / med(row))} smaller)")
            if default is not None:
                claims.append(f"{library}, {name}: {configurations[0]} ends at KL(pi||pi*) = {fmt(med(default))}; "
                              + "; ".join(parts) + ".")
    return "\n".join(f"* {claim}" for claim in claims)


# ----------------------------------------------------------------------------------------------------------------

OVERHEAD_TITLES = {
    "tensors": "KL term on precomputed log-prob tensors (the KL alone: worst case for a ratio)",
    "lm-head": "whole step with log-probs from a small LM head",
    "tensors-loss-side": "loss side, precomputed log-prob tensors",
    "lm-head-loss-side": "loss side, log-probs from a small LM head",
    "tensors-reward-side": "reward side, precomputed log-prob tensors",
    "lm-head-reward-side": "reward side, log-probs from a small LM head",
    "trl-scoring": "GRPOTrainer._generate_and_score_completions (scoring a fixed generation batch)",
    "trl-loss": "GRPOTrainer.compute_loss + backward",
    "trl-step": "scoring + compute_loss + backward (generation excluded)",
}


def kib(value: float) -> str:
    return f"{value / 2 ** 20:.1f} MiB" if value >= 2 ** 20 else f"{value / 1024:.0f} KiB"


def ordered(libraries) -> list[str]:
    """core first, then the libraries in their usual order."""
    found = set(libraries)
    return [lib for lib in ("core", *_common.LIBRARIES) if lib in found]


def overhead_title(what: str) -> str:
    """The title of an overhead measurement; TRL's carry their batch size as a ``-b<N>`` suffix."""
    import re

    name = what.replace("overhead-", "")
    match = re.fullmatch(r"(.*)-b(\d+)", name)
    if match:
        return f"{OVERHEAD_TITLES.get(match.group(1), match.group(1))}, batch {match.group(2)}"
    return OVERHEAD_TITLES.get(name, what)


def section_overhead(out: Path) -> list[str]:
    rows = load(out, "overhead")
    if not rows:
        return ["*No overhead.csv: run `python benchmarks/overhead.py`.*"]
    text = []
    data = index(rows, "library", "what", "configuration", "x", "metric")
    for library in ordered(r["library"] for r in rows if r["what"].startswith("overhead-")):
        for what in dict.fromkeys(r["what"] for r in rows if r["library"] == library
                                  and r["what"].startswith("overhead-")):
            variants = list(dict.fromkeys(r["configuration"] for r in rows
                                          if r["library"] == library and r["what"] == what))
            baseline = variants[0]
            xs = list(dict.fromkeys(r["x"] for r in rows if r["library"] == library and r["what"] == what))
            config = json.loads(next(r for r in rows if r["library"] == library and r["what"] == what)["config"])
            lines = []
            for x in xs:
                line = [x, f"{fmt(med(data.get((library, what, baseline, x, 'time'))), 3)} ms"]
                for variant in variants[1:]:
                    time_ratio = data.get((library, what, variant, x, "time_ratio_vs_unpatched"))
                    line.append(f"{fmt(med(time_ratio), 3)} [{fmt(med(time_ratio, 'p20'), 3)}, "
                                f"{fmt(med(time_ratio, 'p80'), 3)}]")
                for variant in variants[1:]:
                    parts = []
                    for metric in ("saved_bytes", "peak_rss", "cuda_peak_bytes"):
                        a, b = data.get((library, what, variant, x, metric)), data.get((library, what, baseline, x, metric))
                        if a is None or b is None or med(b) == 0:
                            continue
                        delta = med(a) - med(b)
                        parts.append(f"{fmt(med(a) / med(b), 3)} ({'+' if delta >= 0 else '−'}{kib(abs(delta))})")
                    line.append(" / ".join(parts) or "—")
                lines.append(line)
            header = ["T", f"{baseline} time"] + [f"{v}: time ratio [p20, p80]" for v in variants[1:]] + \
                     [f"{v}: memory ratio (delta) saved / peak" for v in variants[1:]]
            counts = sorted({int(json.loads(r["config"]).get("repetitions", 0)) for r in rows
                             if r["library"] == library and r["what"] == what})
            counted = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
            text.append(f"**{library}: {overhead_title(what)}** (batch "
                        f"{config.get('batch')}, {counted} interleaved repetitions per length, "
                        f"{config.get('threads')} threads):\n")
            text.append(table(header, lines))
            text.append("")
        text.append(f"![overhead {library}]({IMAGES}/overhead_{library}.png)\n")
    text.append(overhead_claims(rows))
    checks = [r for r in rows if r["what"] == "check_time"]
    if checks:
        text.append("\n`kl-patches check --library <lib>` wall time in a fresh process (library import included, "
                    "median of the runs):\n")
        text.append(table(["library", "time", "target", "exit codes"], [
            [r["library"], f"{float(r['median']):.1f} s", f"< {json.loads(r['config'])['target_s']:g} s",
             str(json.loads(r["config"])["exit_codes"])] for r in checks]))
    return text


def overhead_claims(rows: list[dict]) -> str:
    """Per library and measurement: each patched variant's time ratio range over the lengths, next to the noise
    floor (the A/A control's p20-p80 band where it was measured), with a verdict that needs the band: "met" when
    every length's p80 is within the target, "not met" when some length's p20 is above it, else "within noise";
    memory ratios with their absolute deltas."""
    claims = []
    timed = [r for r in rows if r["what"].startswith("overhead-") and r["metric"] == "time_ratio_vs_unpatched"]
    pairs = list(dict.fromkeys((r["library"], r["what"]) for r in timed))
    for library, what in sorted(pairs, key=lambda pair: ("core", *_common.LIBRARIES).index(pair[0])):
        mine = [r for r in rows if r["library"] == library and r["what"] == what]
        variants = list(dict.fromkeys(r["configuration"] for r in mine))
        baseline = variants[0]
        control = [r for r in mine if "A/A control" in r["configuration"] and r["metric"] == "time_ratio_vs_unpatched"]
        floor = (f"noise floor (A/A control) p20–p80 {fmt(min(med(r, 'p20') for r in control), 3)}–"
                 f"{fmt(max(med(r, 'p80') for r in control), 3)}") if control else "no A/A control measured"
        control_ci = [r for r in mine if "A/A control" in r["configuration"] and r["metric"] == "time_ratio_ci90"]
        if control_ci:
            floor += (f", its 90 % CI of the median within {fmt(min(med(r, 'p20') for r in control_ci), 3)}–"
                      f"{fmt(max(med(r, 'p80') for r in control_ci), 3)}")
        for variant in variants[1:]:
            if variant == "no KL" or "A/A control" in variant:  # reference points, not kl-patches modes
                continue
            line = [r for r in mine if r["configuration"] == variant and r["metric"] == "time_ratio_vs_unpatched"]
            ratios = [med(r) for r in line]
            # the verdict reads the 90 % confidence interval of the median where it was recorded (it narrows with
            # repetitions), else the p20-p80 band of single repetitions
            ci = [r for r in mine if r["configuration"] == variant and r["metric"] == "time_ratio_ci90"]
            bounded = ci or line
            high = max(med(r, "p80") for r in bounded)
            low = max(med(r, "p20") for r in bounded)
            verdict = "met" if high <= 1.03 else ("not met" if low > 1.03 else "within noise")
            memory = []
            for r in mine:
                if r["configuration"] == variant and r["metric"] in ("saved_bytes", "peak_rss", "cuda_peak_bytes"):
                    base = next((b for b in mine if b["configuration"] == baseline and b["metric"] == r["metric"]
                                 and b["x"] == r["x"]), None)
                    if base is not None and float(base["median"]) > 0:
                        memory.append((float(r["median"]) / float(base["median"]),
                                       float(r["median"]) - float(base["median"]), r["metric"]))
            text = (f"{library}, {overhead_title(what)}, {variant}: time ratio "
                    f"{fmt(min(ratios), 3)}–{fmt(max(ratios), 3)} over the lengths ("
                    f"{'90 % CI of the median' if ci else 'p80'} up to {fmt(high, 3)}; "
                    f"{floor}): target ≤ 1.03 {verdict}")
            if memory:
                worst = max(memory)
                text += (f"; memory ratio {fmt(min(m[0] for m in memory), 3)}–{fmt(worst[0], 3)} (largest delta "
                         f"{'+' if max(m[1] for m in memory) >= 0 else '−'}{kib(abs(max(m[1] for m in memory)))}; "
                         f"target ≤ 1.01: {'met' if worst[0] <= 1.01 else 'not met'})")
            claims.append(text + ".")
    for library in ordered(r["library"] for r in rows if r["what"].startswith("work-")):
        claims.append(f"{library}, the work of one step counted (deterministic, no noise floor; ranges over the "
                      f"grid): {work_summary(rows, library)}. A mode that adds no forward has FLOPs 1.0000×.")
    gpu = [r for r in rows if r["what"].startswith("overhead-gpu-")]
    if not gpu:
        claims.append("GPU path: not measured here (no CUDA device on the machine that produced these CSVs; "
                      "`python benchmarks/overhead.py` runs it with synchronised timers and torch.cuda memory stats "
                      "where CUDA exists).")
    return "\n".join(f"* {claim}" for claim in claims)


# ----------------------------------------------------------------------------------------------------------------

def section_variance(out: Path) -> list[str]:
    rows = load(out, "variance")
    if not rows:
        return ["*No variance.csv: run `python benchmarks/variance.py`.*"]
    data = index([r for r in rows if r["what"] == "variance"], "library", "configuration", "metric")
    lines = []
    for library, configuration in dict.fromkeys((r["library"], r["configuration"]) for r in rows
                                                if r["what"] == "variance"):
        get = lambda metric: data.get((library, configuration, metric))  # noqa: E731
        regime = json.loads(get("relative_bias2")["config"])["regime"]
        ratio = get("responses_vs_sequence_k1_0.01")
        lines.append([configuration if library == "core" else f"{library}: {configuration}", regime,
                      fmt(med(get("relative_variance_per_response")), 3), fmt(med(get("relative_bias2"))),
                      fmt(med(get("responses_for_rel_mse_0.1")), 3), fmt(med(get("responses_for_rel_mse_0.01")), 3),
                      "—" if ratio is None else f"{fmt(med(ratio), 3)} [{fmt(med(ratio, 'p80'), 3)}]"])
    policies = json.loads(rows[0]["config"]).get("policies", "?")
    text = [f"Median over {policies} policies of: the variance of one response's share of the gradient estimate "
            "(v), the squared bias (b²), both relative to |grad KL_seq|², and the responses n needed for a relative "
            "MSE b² + v/n of 0.1 and 0.01 (\"never\" when b² alone exceeds it); last column: n(0.01) relative to "
            "sequence-level k1 in reward without a baseline on the same policy (median [p80]).\n",
            table(["estimator", "samples", "v", "b²", "n for 0.1", "n for 0.01", "n vs sequence k1"], lines), "",
            variance_claims(data), f"\n![variance]({IMAGES}/variance.png)\n"]
    return text


def variance_claims(data: dict) -> str:
    claims = []
    from variance import RTG_LOSS, RTG_SEQUENCE_LOO, SEQUENCE_K1  # noqa: PLC0415 - the names the rows were written with

    row = data.get(("core", RTG_LOSS, "responses_vs_sequence_k1_0.01"))
    if row is not None:
        claims.append(f"k1-rtg-loss as shipped (no baseline) needs {times(med(row))} the responses of {SEQUENCE_K1} "
                      f"(median; p80 {fmt(med(row, 'p80'), 3)}): target (≤ 1) "
                      f"{'met' if med(row) <= 1 else 'not met'} at the median, "
                      f"{'met' if med(row, 'p80') <= 1 else 'not met'} at p80.")
    for group in (2, 4, 8, 16):
        row = data.get(("core", f"{RTG_SEQUENCE_LOO} [groups of {group}]", "responses_vs_sequence_k1_0.01"))
        if row is not None:
            claims.append(f"with the sequence leave-one-out baseline in groups of {group}: {times(med(row))} "
                          f"(p80 {fmt(med(row, 'p80'), 3)}).")
    return "\n".join(f"* {claim}" for claim in claims)


def section_baselines(out: Path) -> list[str]:
    """The k1-rtg-loss baselines compared exactly (variance.py, what = variance-baselines)."""
    rows = [r for r in load(out, "variance") if r["what"] == "variance-baselines"]
    if not rows:
        return ["*No baseline comparison in variance.csv: run `python benchmarks/variance.py`.*"]
    data = index(rows, "configuration", "x", "metric", "config")
    by = {}
    for r in rows:
        config = json.loads(r["config"])
        by[(config["regime"], config["baseline"], int(r["x"]), r["metric"])] = (r, config)
    baselines = list(dict.fromkeys(json.loads(r["config"])["baseline"] for r in rows))
    groups = sorted({int(r["x"]) for r in rows})
    labels = {json.loads(r["config"])["baseline"]: r["configuration"] for r in rows}
    text = []

    def bias_max(regime, exact):
        values = [med(r, key) for (rg, b, g, m), (r, c) in by.items() for key in ("median", "p80")
                  if rg == regime and m == "relative_bias2" and b != "sequence k1 in reward"
                  and (c.get("exact_fraction", 1.0) == 1.0) == exact]
        return max(values, default=math.nan)

    for regime, yard in (("on", "sequence k1 in reward"), ("off", "none")):
        lines = []
        for baseline in baselines:
            line = [labels[baseline]]
            for group in groups:
                entry = by.get((regime, baseline, group, "responses_vs_yardstick"))
                if entry is None:
                    line.append("—")
                    continue
                r, config = entry
                exact = config.get("exact_fraction", 1.0)
                mark = "" if exact == 1.0 else (" (sampled groups)" if exact == 0 else f" ({exact:.0%} enumerated)")
                line.append(f"{fmt(med(r), 3)} [{fmt(med(r, 'p20'), 3)}, {fmt(med(r, 'p80'), 3)}]{mark}")
            worse = by.get((regime, baseline, 4, "policies_worse_than_none"))
            line.append("—" if worse is None or baseline == "none" else
                        f"{int(med(worse[0]))} of {worse[1]['policies']}")
            lines.append(line)
        policies = next(c for (rg, _, _, _), (_, c) in by.items() if rg == regime)["policies"]
        text.append(f"**{regime}-policy** ({policies} policies; responses needed relative to "
                    f"{labels[yard] if regime == 'on' else labels['none']}, median [p20, p80]; relative bias² of the "
                    f"k1-rtg-loss and Rao-Blackwellised rows (p80 over the grid) ≤ {fmt(bias_max(regime, True))} where groups are "
                    f"enumerated and ≤ {fmt(bias_max(regime, False))} (sampling noise) where they are sampled"
                    + ("; sequence k1 in reward is biased off-policy" if regime == "off" else "") + "):\n")
        text.append(table(["estimator"] + [f"groups of {g}" for g in groups] + ["policies worse than none (G=4)"],
                          lines))
        text.append("")
    text.append(baseline_claims(by, labels))
    return text


def baseline_claims(by: dict, labels: dict) -> str:
    claims = []
    on = {b: med(r) for (rg, b, g, m), (r, _) in by.items() if rg == "on" and g == 4 and m == "responses_vs_yardstick"}
    off = {b: med(r) for (rg, b, g, m), (r, _) in by.items() if rg == "off" and g == 4 and m == "responses_vs_yardstick"}
    loo = [b for b in ("sequence-loo", "position-loo") if b in on]
    if "none" in on:
        best_loo = min(loo, key=on.get) if loo else None
        claims.append(
            f"Groups of 4, on-policy, responses needed vs sequence k1 in reward (median over the grid): "
            + ", ".join(f"{b} {fmt(on[b], 3)}×" for b in on if b != "sequence k1 in reward")
            + f". The default \"none\" is {'below' if all(on['none'] < on[b] for b in loo) else 'not below'} every "
            f"leave-one-out baseline (best of them: {best_loo} {fmt(on.get(best_loo, math.nan), 3)}×); issue 9's "
            f"target ≤ 0.6× is {'met' if on['none'] <= 0.6 else 'not met'} by the default ({fmt(on['none'], 3)}×).")
    if "none" in off:
        claims.append("Groups of 4, off-policy (per-decision weights), responses needed vs no baseline: "
                      + ", ".join(f"{b} {fmt(off[b], 3)}×" for b in off if b not in ("none", "sequence k1 in reward"))
                      + ". " + ("Every leave-one-out baseline needs more responses than none: the default stays "
                                "\"none\"." if all(off[b] > 1 for b in loo) else
                                "Some leave-one-out baseline needs fewer responses than none off-policy."))
    for g in (8, 16):
        values = {b: med(r) for (rg, b, gg, m), (r, _) in by.items()
                  if rg == "on" and gg == g and m == "responses_vs_yardstick"}
        if "none" in values and loo:
            claims.append(f"Groups of {g}, on-policy: " + ", ".join(f"{b} {fmt(values[b], 3)}×" for b in values
                                                                     if b != "sequence k1 in reward") + ".")
    if "rao-blackwellised" in on:
        claims.append(
            f"The Rao-Blackwellised estimator (Amini et al. 2025, arXiv 2504.10637: the exact per-position KL over "
            f"the vocabulary, its analytic gradient, plus the score times the reward-to-go of the later positions' "
            f"KLs) needs {fmt(on['rao-blackwellised'], 3)}× on-policy and {fmt(off.get('rao-blackwellised', math.nan), 3)}× "
            "of none off-policy here: by far the lowest variance, but it is a reference row, not an option. It needs "
            "the full-vocabulary log-probs of pi_theta *and* pi_ref at every response position inside the loss "
            "(B×T×V values: 8×2048×152k in bf16 is ~5 GB for the reference alone, or a second reference forward in "
            "the loss), and a backward through the full softmax of the KL term, where the libraries only carry "
            "the sampled tokens' log-probs; on a 3-4 token vocabulary the per-position KL is almost the whole "
            "variance, so the gain on a real vocabulary is not measured here.")
    return "\n".join(f"* {claim}" for claim in claims)


# ----------------------------------------------------------------------------------------------------------------

STEPS_AVERAGED = 100  # the long-run criterion: the gradient averaged over this many steps of the batch


def section_truncation(out: Path) -> list[str]:
    rows = [r for r in load(out, "truncation") if r["what"] == "truncation"]
    if not rows:
        return ["*No truncation.csv: run `python benchmarks/truncation.py`.*"]
    cells = {}
    for r in rows:
        config = json.loads(r["config"])
        cells.setdefault((int(config["length"]), float(config["sigma"])), {"config": config}).setdefault(
            r["configuration"], {})[r["metric"]] = r
    names = ["truncated at c = 1", "truncated at c = 2", "truncated at c = 5", "exact (no truncation)"]
    short = {n: n.replace("truncated at ", "").replace("exact (no truncation)", "exact") for n in names}

    def mse(cell, name, steps, upper=False):
        variance_term = med(cell[name]["relative_mse_batch"]) - med(cell[name]["relative_bias"]) ** 2
        if name == names[-1]:  # exact weights: unbiased by construction; the measured bias is noise around 0
            return variance_term / steps
        bias = med(cell[name]["relative_bias"]) + (2 * med(cell[name]["relative_bias_se"]) if upper else 0.0)
        return bias ** 2 + variance_term / steps

    lines, best = [], {}
    for (length, sigma), cell in sorted(cells.items()):
        exact = cell["exact (no truncation)"]
        line = [str(length), f"{sigma:g}", str(cell["config"]["responses"]), fmt(med(exact["ess"]), 3)]
        for name in names[:3]:
            c = cell[name]
            line.append(f"{fmt(100 * med(c['truncated_fraction']), 2)} % / {fmt(med(c['relative_bias']), 2)} "
                        f"(±{fmt(med(c['relative_bias_se']), 2)}) / {fmt(med(c['mse_vs_exact']), 3)}")
        line.append(fmt(mse(cell, names[-1], 1), 3))
        for steps in (1, STEPS_AVERAGED):
            winner = min(names, key=lambda n: mse(cell, n, steps))
            if mse(cell, winner, steps) > 0.99 * mse(cell, names[-1], steps):
                winner = names[-1]  # within 1 %: no reason to leave the exact default
            # a truncation counts as the winner only if it still wins with its bias at the upper bound
            resolved = winner.startswith("exact") or mse(cell, winner, steps, upper=True) < mse(
                cell, names[-1], steps)
            best[(length, sigma, steps)] = (winner, med(exact["ess"]), resolved)
            line.append(short[winner] + ("" if resolved else " (bias not resolved)"))
        lines.append(line)
    config = next(iter(cells.values()))["config"]
    batch = config["batch"]
    text = [f"Synthetic policy: {config['actions']} actions per position, positions independent, pi_ref at logit "
            f"noise {config['ref_noise']}, mu calibrated to the per-token log-ratio spread sigma (measured spreads "
            f"in the CSV); k1-rtg-loss through `kl_patches.terms.rtg_coefficients`. Per truncation c: truncated "
            "fraction of the prefix weights / relative bias |E g_c − ∇KL| / |∇KL| (± its standard error) / relative "
            f"MSE at a batch of {batch} divided by the exact weights' MSE; ESS = `importance_weight_stats` of the "
            "exact weights (median over batches). Best at one step = lowest bias² + v/"
            f"{batch}; best over {STEPS_AVERAGED} steps = lowest bias² + v/({batch}·{STEPS_AVERAGED}) (the "
            "variance averages out over SGD steps, the bias does not: it is what moves the end point); \"bias not "
            "resolved\" where the truncation would lose to exact weights with its bias at bias + 2 se.\n",
            table(["length", "sigma", "responses", "ESS (exact)", "c = 1", "c = 2", "c = 5",
                   f"exact: rel. MSE at {batch}", "best, one step", f"best, {STEPS_AVERAGED} steps"], lines), ""]
    long_run = {k[:2]: v for k, v in best.items() if k[2] == STEPS_AVERAGED}
    exact_cells = [k for k, (w, _, _) in long_run.items() if w.startswith("exact")]
    trunc_cells = [k for k, (w, _, r) in long_run.items() if not w.startswith("exact") and r]
    unresolved = [k for k, (w, _, r) in long_run.items() if not r]
    c1_bias = [med(cell["truncated at c = 1"]["relative_bias"]) for cell in cells.values()
               if med(cell["exact (no truncation)"]["ess"]) >= 0.95]
    ess_exact = min((long_run[k][1] for k in exact_cells), default=math.nan)
    ess_trunc = max((long_run[k][1] for k in trunc_cells), default=math.nan)
    claims = [
        f"Over {STEPS_AVERAGED} steps, exact weights are best in {len(exact_cells)} of {len(long_run)} cells "
        f"(ESS down to {fmt(ess_exact, 3)}); a truncation is best, with its bias resolved, in {len(trunc_cells)} "
        f"cells (ESS up to {fmt(ess_trunc, 3)}); {len(unresolved)} cells have a truncation ahead only at its bias "
        "estimate, not at its upper bound.",
        f"c = 1 truncates about half of all weights even when mu ≈ pi (rho fluctuates around 1): relative bias "
        f"{fmt(min(c1_bias, default=math.nan), 2)}–{fmt(max(c1_bias, default=math.nan), 2)} at ESS ≥ 0.95, where the "
        "exact weights cost almost nothing; at a single step of a long response its variance cut still wins, because "
        "one step's gradient estimate is noise-dominated.",
        "Recommendation (rule of thumb on the logged `kl_patches/ess`, the ESS fraction of the prefix weights): "
        f"keep the product default, no truncation (exact). Exact weights are measured best down to an ESS of "
        f"{fmt(ess_exact, 3)}; a truncation is measurably better (its bias resolved) only at an ESS of "
        f"{fmt(ess_trunc, 3)} or less (" + ", ".join(sorted({short[long_run[k][0]] for k in trunc_cells}))
        + f" there), where sigma²·T ≫ 1 and the exact weights' relative MSE at a batch of {batch} reaches "
        f"{fmt(max((mse(cells[k], names[-1], 1) for k in trunc_cells), default=math.nan), 3)}; in between, the "
        "bias a truncation adds is not resolved by these samples, so there is no measured reason to leave the "
        "exact default. When the ESS falls below ~0.01, set `truncation` (c = 2 loses less to bias than c = 1 "
        "where the ESS is still high) or, better, refresh the samples (fewer PPO epochs / mini-batches per "
        "generation) so the ESS comes back up.",
    ]
    text.append("\n".join(f"* {c}" for c in claims))
    text.append(f"\n![truncation]({IMAGES}/truncation.png)\n")
    return text


def section_regimes(out: Path) -> list[str]:
    rows = [r for r in load(out, "convergence") if r["what"].startswith("regime-")]
    if not rows:
        return ["*No regime rows in convergence.csv: run `python benchmarks/convergence.py`.*"]
    finals = {}
    for r in rows:
        key = (r["what"], r["configuration"], r["metric"])
        if key not in finals or int(r["x"]) > int(finals[key]["x"]):
            finals[key] = r
    regimes = list(dict.fromkeys(r["what"].split("-", 1)[1].rsplit("-", 1)[0] for r in rows))
    config = json.loads(rows[0]["config"])
    text = [f"{config['steps']} steps from pi_ref, {config['seeds']} seeds, the task-reward gradient exact "
            "(enumerated) in every run so that only the KL term differs; *exact* = the audit engine's expected KL "
            f"gradient (constant step size), *sampled* = {config['batch']} responses per step from the sampler "
            "(step size decaying). mu = sampler: the KL term is given the sampler's log-probs; mu = trainer: the "
            "trainer's recomputation with its current weights (ratio 1: what a library uses as old log-probs when "
            "the engine's are not passed through). Final KL(pi||pi*) median [p20, p80], and the exact run's final "
            "KL(pi||pi_ref) and E[R]:\n"]
    moved_all = []
    for regime in regimes:
        title = json.loads(next(r for r in rows if r["what"].startswith(f"regime-{regime}-"))["config"])["title"]
        labels = list(dict.fromkeys(r["configuration"] for r in rows if r["what"] == f"regime-{regime}-exact"))
        lines = []
        for label in labels:
            line = [label]
            for dynamics in ("exact", "sampled"):
                r = finals.get((f"regime-{regime}-{dynamics}", label, "kl_to_optimum"))
                line.append("—" if r is None else f"{fmt(med(r))} [{fmt(med(r, 'p20'))}, {fmt(med(r, 'p80'))}]")
            for metric in ("kl_to_reference", "expected_reward"):
                line.append(fmt(med(finals.get((f"regime-{regime}-exact", label, metric))), 3))
            lines.append(line)
        text.append(f"**{title}**\n")
        text.append(table(["configuration", "exact: KL(pi||pi*)", "sampled: KL(pi||pi*)", "KL(pi||pi_ref) (exact)",
                           "E[R] (exact)"], lines))
        text.append(f"\n![regime {regime}]({IMAGES}/convergence_regime_{regime}.png)\n")
        exact_ref = finals.get((f"regime-{regime}-exact", "kl-patches k1-rtg-loss, mu = sampler", "kl_to_optimum"))
        if exact_ref is not None:
            floor = med(exact_ref)
            moved = [(label, med(finals[(f"regime-{regime}-exact", label, "kl_to_optimum")])) for label in labels
                     if med(finals[(f"regime-{regime}-exact", label, "kl_to_optimum")]) > max(10 * floor, 1e-4)]
            moved_all.append((regime, title, floor, moved))
    claims = []
    for regime, title, floor, moved in moved_all:
        if moved:
            claims.append(f"{title}: kl-patches k1-rtg-loss with the sampler's log-probs ends at KL(pi||pi*) = "
                          f"{fmt(floor)} (exact dynamics); ≥ 10× further from pi*: "
                          + "; ".join(f"{label} ({fmt(value)})" for label, value in moved) + ".")
        else:
            claims.append(f"{title}: no configuration ends ≥ 10× further from pi* than k1-rtg-loss with the sampler's "
                          f"log-probs ({fmt(floor)}).")
    # the end point of each configuration against its own on-policy end point (lag 1): did the regime move it?
    shifts = {}
    for regime in regimes:
        if regime == "lag-1":
            continue
        for label in dict.fromkeys(r["configuration"] for r in rows if r["what"] == f"regime-{regime}-exact"):
            here = finals.get((f"regime-{regime}-exact", label, "kl_to_optimum"))
            base = finals.get(("regime-lag-1-exact", label, "kl_to_optimum"))
            if base is None and "mu = trainer" in label:  # on-policy, the trainer's log-probs are the sampler's
                base = finals.get(("regime-lag-1-exact", label.replace("trainer recomputation", "sampler"),
                                   "kl_to_optimum"))
            if here is None or base is None:
                continue
            moved = med(here) > 2 * med(base) + 1e-4
            reward = med(finals[(f"regime-{regime}-exact", label, "expected_reward")]) - med(
                finals.get(("regime-lag-1-exact", label, "expected_reward"), here))
            shifts[(regime, label)] = (moved, med(here), med(base), reward)
    systematic = [r for r in regimes if r in ("noise", "temperature", "top-p")]
    lagged = [r for r in regimes if r.startswith("lag-") and r != "lag-1"] + [r for r in regimes if r == "async"]
    for regime in systematic + lagged:
        moved = [(label, here, base) for (rg, label), (m, here, base, _) in shifts.items() if rg == regime and m]
        kept = [label for (rg, label), (m, *_rest) in shifts.items() if rg == regime and not m]
        if moved:
            claims.append(f"{regime}: end point moved (final KL(pi||pi*) > 2× its own on-policy end point + 1e-4) for "
                          + "; ".join(f"{label} {fmt(base)} → {fmt(here)}" for label, here, base in moved)
                          + (f"; unchanged for {len(kept)} configuration(s)" if kept else "; no configuration unchanged")
                          + (f" ({'; '.join(kept)})" if 0 < len(kept) <= 4 else "") + ".")
        else:
            claims.append(f"{regime}: every configuration ends where it ends on-policy (within 2× + 1e-4).")
    lag_moved = sorted({label for (rg, label), (m, *_r) in shifts.items() if rg in lagged and m})
    rtg_lag_kept = not any(m for (rg, label), (m, *_r) in shifts.items()
                           if rg in lagged and label.startswith("kl-patches k1-rtg-loss"))
    sys_moved_sampler = [rg for (rg, label), (m, *_r) in shifts.items()
                         if rg in systematic and m and label == "kl-patches k1-rtg-loss, mu = sampler"]
    sys_moved_trainer = [rg for (rg, label), (m, *_r) in shifts.items()
                         if rg in systematic and m and label == "kl-patches k1-rtg-loss, mu = trainer recomputation"]
    paragraph = (
        "**When exactness changes where training ends, and when only the path.** "
        + ("With a lagged sampler (a snapshot refreshed every k steps, or asynchronous generation at a fixed lag) "
           "the sampler becomes the trainer's policy as training settles, so the off-policy error of a biased "
           "estimator vanishes at the fixed point: "
           + ("in these runs every configuration ends where it ends on-policy, and exactness only changes the path. "
              if not lag_moved else
              f"in these runs {'every k1-rtg-loss row' if rtg_lag_kept else 'most rows'} ended where it ends "
              f"on-policy, but {'; '.join(lag_moved)} did not: a biased off-policy gradient also changes the "
              "dynamics (with the step size used here their KL(pi||pi*) rises again after the first steps instead of "
              "settling; see the plots), "
              "so with a lag exactness changes where a run is after a given number of steps even when the fixed "
              "point itself is shared. ")
           if lagged else "")
        + ("A systematic mismatch (engine numerics, a sampler-only temperature, top-p) does not vanish: "
           "the estimators that ignore the sampler, and k1-rtg-loss given the trainer's recomputation instead of "
           "the sampler's log-probs, "
           + (f"converge to a different point ({', '.join(sorted(set(sys_moved_trainer)))} for the recomputation). "
              if sys_moved_trainer else "end at a point the table above quantifies. ")
           + ("k1-rtg-loss with the sampler's log-probs keeps its end point"
              + (f" except under {', '.join(sorted(set(sys_moved_sampler)))}, where the sampler's support is "
                 "truncated and no importance weight can restore the missing tokens" if sys_moved_sampler else "")
              + ". ")
           if systematic else "")
        + "The unpatched in-loss estimators (k3, k2-gradient) are biased even on-policy, so they end away from pi* "
          "in every regime; what the sampler regimes add is that correcting the estimator is not enough unless "
          "mu is the distribution that actually sampled the tokens.")
    text.append("\n".join(f"* {c}" for c in claims))
    text.append("")
    text.append(paragraph)
    return text


def section_trl(out: Path) -> list[str]:
    rows = load(out, "trl_run")
    mine = [r for r in rows if r["what"] == "trl_run"]
    if not mine:
        return ["*No trl_run.csv rows: run `python benchmarks/trl_run.py` in an environment with TRL and kl-patches.*"]
    config = json.loads(next(r for r in rows if r["what"] == "trl_run-time")["config"])
    last = max(int(r["x"]) for r in mine)
    finals = index([r for r in mine if int(r["x"]) == last], "configuration", "metric")
    optimum = defaultdict(list)
    for r in rows:
        if r["what"] == "trl_run-optimum":
            optimum[r["metric"]].append(float(r["median"]))
    lines = []
    for name in dict.fromkeys(r["configuration"] for r in mine):
        line = [name]
        for metric in ("expected_reward", "kl_to_reference", "objective", "kl_to_optimum"):
            row = finals.get((name, metric))
            line.append(f"{fmt(med(row), 3)} [{fmt(med(row, 'p20'), 3)}, {fmt(med(row, 'p80'), 3)}]")
        lines.append(line)
    spread = lambda values: (f"{fmt(_common.quantiles(values)[0], 3)} [{fmt(_common.quantiles(values)[1], 3)}, "  # noqa: E731
                             f"{fmt(_common.quantiles(values)[2], 3)}]") if values else "n/a"
    lines.append(["pi* (the optimum, per seed)", spread(optimum["expected_reward"]), spread(optimum["kl_to_reference"]),
                  spread(optimum["objective"]), "0"])
    versions = json.loads(mine[0]["versions"])
    return [f"trl {versions.get('trl')}, {config['steps']} steps, {config['seeds']} seeds, beta = {config['beta']}, "
            f"learning rate {config['learning_rate']}, {config['batch']} completions per step "
            f"({config['num_generations']} per prompt), completions ≤ {config['completion_length']} tokens, "
            f"model: {config['model']}. Metrics are exact (every completion enumerated) after the last step; "
            "median over seeds [p20, p80]:\n",
            table(["configuration", "E[R]", "KL(pi||pi_ref)", "E[R] - beta KL", "KL(pi||pi*)"], lines),
            "", trl_claims(mine, config["seeds"]), f"\n![TRL GRPOTrainer run]({IMAGES}/trl_run.png)\n"]


def trl_claims(mine: list[dict], seeds: int) -> str:
    """Per seed, which configuration ends with the highest objective and the lowest KL(pi||pi*)."""
    last = max(int(r["x"]) for r in mine)
    names = list(dict.fromkeys(r["configuration"] for r in mine))
    claims = []
    for metric, better in (("objective", max), ("kl_to_optimum", min)):
        # per-seed values are not in the CSV (median/p20/p80 over seeds are); compare the medians
        values = {name: med(next(r for r in mine if r["configuration"] == name and r["metric"] == metric
                                 and int(r["x"]) == last)) for name in names}
        best = better(values, key=values.get)
        claims.append(f"{metric.replace('_', ' ')} after {last} steps (median over {seeds} seeds): best {best} "
                      f"({fmt(values[best], 4)}); " + ", ".join(f"{n} {fmt(v, 4)}" for n, v in values.items()
                                                                  if n != best) + ".")
    return "\n".join(f"* {claim}" for claim in claims)


def render(out: Path) -> str:
    every = []
    for script in ("bias_table", "convergence", "overhead", "variance", "trl_run", "truncation"):
        every += load(out, script)
    machine = every[0]["machine"] if every else "unknown"
    parts = [
        "## Results",
        "",
        "<!-- Generated by `python benchmarks/report.py` from benchmarks/results/*.csv: do not edit by hand. -->",
        "",
        "Every number below is in `benchmarks/results/*.csv` (one row per measurement: what, library, "
        "configuration, metric, unit, x, median, p20, p80, config JSON, machine, versions) and is regenerated, "
        "with the plots and this section, by",
        "",
        "```bash",
        "python benchmarks/run_all.py --python trl=$TRL_VENV/bin/python --python verl=$VERL_VENV/bin/python \\",
        "    --python openrlhf=$OPENRLHF_VENV/bin/python",
        "```",
        "",
        "from an environment with kl-patches and matplotlib (the per-library parts run in each library's own "
        "environment; without `--python` it uses the nox sessions' `.nox/<lib>` environments, and skips — and "
        "lists — libraries it finds no environment for). Each script also runs alone (`python "
        "benchmarks/<script>.py`, `--quick` for a smoke run) and covers core plus every library installed in "
        "its interpreter.",
        "",
        f"Machine: {machine}. Versions: {versions_line(every)}.",
        "",
        "### 1. The exact audit over a grid of policies (`benchmarks/bias_table.py`)",
        "",
        "Relative error ‖E[ĝ] − ∇KL_seq‖ / ‖∇KL_seq‖ and cosine of each configuration's expected KL gradient, by "
        "exact enumeration over every response (groups of 2 for leave-one-out baselines), on tabular and "
        "transformer policies over seeds, vocabulary sizes, horizons, distances to the reference and staleness of "
        "the behaviour policy. Exact = relative error < 1e-10.",
        "",
        *section_bias(out),
        "",
        "### 2. Convergence to the known optimum (`benchmarks/convergence.py`)",
        "",
        "Maximise E[R] − β·KL(π‖π_ref) with a tabular policy whose optimum π* ∝ π_ref·exp(R/β) is known by "
        "enumeration. Every configuration gets the same exact task-reward gradient (REINFORCE with a leave-one-out "
        "baseline, per-decision importance weights on stale samples) plus β times its own KL loss; *sampled* = SGD "
        "on sampled batches, *exact* = the infinite-batch limit (the audit engine's expected gradient), clearly a "
        "different experiment.",
        "",
        *section_convergence(out),
        "",
        "#### Regimes: lag, a systematic sampler/trainer mismatch, asynchronous generation",
        "",
        *section_regimes(out),
        "",
        "### 3. Overhead (`benchmarks/overhead.py`)",
        "",
        "One loss + backward step, patched versus unpatched, timed interleaved in one process, every variant once "
        "per repetition in a fresh random order, every measurement with an A/A control. Core: unpatched = k3 written as TRL / verl write it; \"unpatched (A/A "
        "control)\" = the same step in a second slot, whose p20–p80 band is the noise floor quoted next to each "
        "ratio; \"no KL\" bounds the KL's whole cost. A target is \"met\" only when the p80 of the ratio is within "
        "it, \"within noise\" when the band straddles it. Time ratio = "
        "median over repetitions of (variant time / unpatched time) measured back to back. Memory: bytes the "
        "autograd graph saves for backward (`torch.autograd.graph.saved_tensors_hooks`, unique storages) / peak "
        "RSS increase of the step in a fresh subprocess (VmHWM after resetting it via /proc/self/clear_refs). "
        "Libraries: each library's own loss code through the adapters (verl, OpenRLHF: the library's default KL "
        "against the kl-patches mode replacing it; TRL: `trl.GRPOTrainer` against kl-patches' `GRPOTrainer` on a "
        "small Llama, generation replaced by a fixed batch, on-policy with TRL's defaults, lengths 128–2048 and "
        "batches 8 and 64, TRL's own trainer in a second slot as the A/A control). k1-rtg-loss adds no forward to "
        "TRL's step (its default baseline needs no other row); k1-in-reward runs one extra no-grad policy forward "
        "per generation batch on-policy (TRL computes no old log-probs then, and the whole-batch sequence KL of "
        "every group member is needed before the batch is split), which its scoring ratio shows; generation, "
        "which dominates a real step, is excluded here. TRL's points are timed in blocks, each on freshly built "
        "trainers (two identical trainers differ by up to a few % through their memory layout, the size of the "
        "effect sought), with the 90 % CI of the median resampling whole blocks; a point repeats until the A/A "
        "control's CI lies within ±3 % and every mode's CI lies wholly within or wholly above 1.03, or its time "
        "budget runs out (then \"within noise\"); a mode decided \"not met\" leaves the rotation. The verl / "
        "OpenRLHF LM-head points repeat under the same rule (instances kept).",
        "",
        *section_overhead(out),
        "",
        "### 4. Variance: how many responses each estimator needs (`benchmarks/variance.py`)",
        "",
        "Per-group gradients over every enumerated group give the exact mean and variance of each estimator, so "
        "MSE(n) = bias² + variance·G/n exactly for n/G independent groups of G; for the leave-one-out estimators "
        "the group estimate is a U-statistic of the enumerated pairs and Hoeffding's formula gives the exact "
        "variance for any group size (checked against enumerated groups of 3 on every run).",
        "",
        *section_variance(out),
        "",
        "#### The baseline of k1-rtg-loss, compared exactly",
        "",
        "Each estimator's group estimate on every multiset of G enumerated responses (weighted by its multinomial "
        "probability; the position-wise leave-one-out mean over the *other members still generating* at t is not "
        "a pair U-statistic, so Hoeffding's formula cannot be used for it), checked against Hoeffding's formula "
        "on the sequence baseline on every run; groups whose multisets are too many are sampled (5,000 groups, "
        "standard error in the CSV). Variance per response relative to the yardstick on the same policy: the "
        "ratio of responses needed for any MSE target, since every row is unbiased.",
        "",
        *section_baselines(out),
        "",
        "### 5. A real TRL run (`benchmarks/trl_run.py`)",
        "",
        *section_trl(out),
        "",
        "### 6. Exact versus truncated importance weights on long responses (`benchmarks/truncation.py`)",
        "",
        *section_truncation(out),
        "",
    ]
    return "\n".join(parts)


#: the README's cost lines: (library, measurement prefix, what it is)
COST_LINES = (
    ("trl", "overhead-trl-step-b", "TRL's on-policy step (scoring + compute_loss + backward, generation excluded)"),
    ("core", "overhead-lm-head", "core step with an LM head"),
    ("verl", "overhead-lm-head-loss-side", "verl's actor loss with an LM head"),
    ("openrlhf", "overhead-lm-head-loss-side", "OpenRLHF's actor loss with an LM head"),
)


def cost_summary(rows: list[dict]) -> list[str]:
    """One line per measured library: each mode's median time ratio to the unpatched step (range over lengths and
    batches) next to the A/A control's p20-p80 band, the noise floor the ratio has to be read against."""
    lines = []
    for library, prefix, title in COST_LINES:
        mine = [r for r in rows if r["library"] == library and r["what"].startswith(prefix)
                and r["metric"] == "time_ratio_vs_unpatched"]
        if not mine:
            continue
        control = [r for r in mine if "A/A control" in r["configuration"]]
        floor = (f"A/A control: median {fmt(min(med(r) for r in control), 3)}–{fmt(max(med(r) for r in control), 3)}×, "
                 f"single repetitions p20–p80 {fmt(min(med(r, 'p20') for r in control), 3)}–"
                 f"{fmt(max(med(r, 'p80') for r in control), 3)}" if control else "no A/A control measured")
        control_ci = [r for r in rows if r["library"] == library and r["what"].startswith(prefix)
                      and r["metric"] == "time_ratio_ci90" and "A/A control" in r["configuration"]]
        if control_ci:
            floor += (f", 90 % CI of its median within {fmt(min(med(r, 'p20') for r in control_ci), 3)}–"
                      f"{fmt(max(med(r, 'p80') for r in control_ci), 3)}")
        parts = []
        for mode in ("k1-rtg-loss", "k1-in-reward"):
            line = [r for r in mine if r["configuration"].split(":")[0] == mode]
            if line:
                low, high = min(med(r) for r in line), max(med(r) for r in line)
                ci = [r for r in rows if r["library"] == library and r["what"].startswith(prefix)
                      and r["metric"] == "time_ratio_ci90" and r["configuration"].split(":")[0] == mode]
                bound = f" (90 % CI of the median ≤ {fmt(max(med(r, 'p80') for r in ci), 3)})" if ci else ""
                parts.append((f"{mode} {fmt(low, 3)}–{fmt(high, 3)}×" if fmt(low, 3) != fmt(high, 3)
                              else f"{mode} {fmt(low, 3)}×") + bound)
        xs = sorted({int(float(r["x"])) for r in mine})
        batches = sorted({json.loads(r["config"]).get("batch") for r in mine})
        lines.append(f"* {title}: {', '.join(parts)} ({floor}; lengths {xs[0]}–{xs[-1]}, batch "
                     f"{'/'.join(str(b) for b in batches)})")
        points = point_verdicts(rows, library, prefix, "k1-rtg-loss")
        if points:
            lines.append(f"  k1-rtg-loss per point, median [90 % CI] against ≤ 1.03 (A/A control's CI): {points}")
        work = work_summary(rows, library)
        if work:
            lines.append(f"  counted, not timed (no noise): {work}")
    return lines


def point_verdicts(rows: list[dict], library: str, prefix: str, mode: str) -> str:
    """Per (batch, length) point of a grid: the mode's median step ratio with its 90 % CI and verdict, beside the
    A/A control's CI (a point whose control CI leaves +-3 % has a noise floor above the effect sought)."""
    ci = [r for r in rows if r["library"] == library and r["what"].startswith(prefix)
          and r["metric"] == "time_ratio_ci90"]
    parts = []
    for r in sorted((r for r in ci if r["configuration"] == mode),
                    key=lambda r: (json.loads(r["config"]).get("batch", 0), float(r["x"]))):
        batch = json.loads(r["config"]).get("batch")
        if batch is None:
            return ""
        control = next((c for c in ci if "A/A control" in c["configuration"] and c["x"] == r["x"]
                        and c["what"] == r["what"]), None)
        low, high = med(r, "p20"), med(r, "p80")
        verdict = "met" if high <= 1.03 else ("not met" if low > 1.03 else "within noise")
        floor = f" (A/A [{med(control, 'p20'):.3f}, {med(control, 'p80'):.3f}])" if control else ""
        parts.append(f"B {batch} T {int(float(r['x']))}: {med(r):.3f}× [{low:.3f}, {high:.3f}] {verdict}{floor}")
    return "; ".join(parts)


def work_summary(rows: list[dict], library: str) -> str:
    """Per mode, the range over the grid of its counted work relative to the unpatched step: FLOPs, tensor
    elements written, aten operators dispatched (``work-*`` rows of benchmarks/overhead.py)."""
    parts = []
    for mode in ("k1-rtg-loss", "k1-in-reward"):
        numbers = []
        for metric, name in (("flops", "FLOPs"), ("elements", "elements written"), ("ops", "aten ops")):
            values = [med(r) for r in rows if r["library"] == library and r["what"].startswith("work-")
                      and r["configuration"] == mode and r["metric"] == f"{metric}_ratio_vs_unpatched"]
            if values:
                low, high = min(values), max(values)
                numbers.append(f"{name} {low:.4f}×" if f"{low:.4f}" == f"{high:.4f}"
                               else f"{name} {low:.4f}–{high:.4f}×")
        if numbers:
            parts.append(f"{mode} {', '.join(numbers)}")
    return "; ".join(parts)


def readme_summary(out: Path) -> str:
    """The README's block between the RESULTS markers: one picture, the machine and versions it was measured with,
    and the link to everything else (docs/results.md)."""
    every = []
    for script in ("bias_table", "convergence", "overhead", "variance", "trl_run"):
        every += load(out, script)
    lines = ["<!-- Generated by `python benchmarks/report.py` from benchmarks/results/*.csv: do not edit by hand. -->",
             ""]
    if (out / README_IMAGE).exists() or (_common.RESULTS / README_IMAGE).exists():
        lines += [f"![kl-patches check --library core: the relative error of each configuration's expected KL "
                  f"gradient, on- and off-policy, over a grid of policies]({IMAGES}/{README_IMAGE})", ""]
    cost = cost_summary([r for r in every if r["what"].startswith(("overhead-", "work-"))])
    if cost:
        lines += ["Cost, patched / unpatched time of one step, median over interleaved repetitions in random order "
                  "(CPU; [details](docs/results.md#3-overhead-benchmarksoverheadpy)):", "", *cost, ""]
    lines.append("Every table, plot and claim, measured through each library's own code: "
                 "[docs/results.md](docs/results.md)" + (f" (machine: {every[0]['machine']}; versions: "
                                                          f"{versions_line(every)})." if every else "."))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=_common.RESULTS, help="folder of the CSVs")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"where to write (default {DOC})")
    parser.add_argument("--readme", type=Path, default=None,
                        help=f"also replace the section between the RESULTS markers of this file (default: {README} "
                        "when --doc is the default, else none)")
    args = parser.parse_args(argv)
    readme = args.readme or (README if args.doc == DOC else None)  # a --doc elsewhere never rewrites the README
    text = render(args.out)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    # docs/results.md sits one folder below the README: its image links go up one level.
    args.doc.write_text(text.replace(f"]({IMAGES}/", f"](../{IMAGES}/"))
    print(f"[report] wrote {args.doc}")
    if readme is not None and readme.exists():
        current = readme.read_text()
        begin, end = current.find(README_BEGIN), current.find(README_END)
        if begin >= 0 and end > begin:
            summary = readme_summary(args.out)
            readme.write_text(current[: begin + len(README_BEGIN)] + "\n" + summary + "\n" + current[end:])
            print(f"[report] updated the Results section of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
