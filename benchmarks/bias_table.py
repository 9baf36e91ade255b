"""The exact gradient audit over a grid of tiny policies: kl-patches' version of the paper's table of configurations.

For every policy of the grid (seeds x vocabulary sizes x horizons x distances from the reference x staleness of the
behaviour policy, tabular and transformer policies), every configuration is audited by exact enumeration,
on- and off-policy: the core's reference taxonomy (``kl_patches.audit.reference.run_reference``) and, for each
installed library, the adapter's ``audit()`` (the library's own loss code, unpatched and under each kl-patches
mode). Per configuration the CSV holds the median / p20 / p80 and the worst relative error and cosine over the
grid, the fraction of cells that are exact, and the median relative error per value of each grid dimension.

    python benchmarks/bias_table.py            # core + every library installed in this interpreter
    python benchmarks/bias_table.py --quick    # two policies (smoke test)
"""

from __future__ import annotations

import itertools
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

SCRIPT = "bias_table"
DIMENSIONS = ("distance", "staleness")  # per-dimension breakdown rows: how far pi_ref and mu are from pi_theta
FLOOR = 1e-17  # log-scale floor for exact cells (float64 rounding gives ~1e-16)


def grid(quick: bool, library: str):
    """The policies audited. Libraries get a smaller tabular grid than the core: their losses are called once per
    enumerated group of responses (225 groups at vocab 3, horizon 3) rather than vectorised."""
    from kl_patches.audit import PolicySpec

    if quick:
        return [PolicySpec(vocab=3, horizon=2, seed=0), PolicySpec(vocab=3, horizon=3, seed=1, distance=1.0)]
    if library == "core":
        tabular = itertools.product((0, 1, 2), (3, 4), (2, 3, 4), (0.25, 1.0), (0.15, 0.5))
        transformer = itertools.product((0, 1), (3,), (2, 3), (0.1, 0.5), (0.3,))
    else:
        tabular = itertools.product((0, 1, 2), (3,), (2, 3), (0.25, 1.0), (0.15, 0.5))
        # TRL audits its own model (a tiny GPT-2) whatever spec.kind says: no transformer specs for it
        transformer = itertools.product((0,), (3,), (2,), (0.1, 0.5), (0.3,)) if library != "trl" else ()
    specs = [PolicySpec("tabular", v, h, s, d, st) for s, v, h, d, st in tabular]
    specs += [PolicySpec("transformer", v, h, s, d, st) for s, v, h, d, st in transformer]
    return specs


def audit_library(library: str, adapter, spec):
    if library == "core":
        from kl_patches.audit.reference import run_reference

        return run_reference(spec, steps=False)  # the step cells are shown by `check`, not gridded
    return adapter.audit(spec)


def summarise(rows: _common.Rows, library: str, records_by_spec: list) -> None:
    cells = defaultdict(list)  # (configuration, mode, policy) -> [(spec, record)]
    for spec, records in records_by_spec:
        for record in records:
            cells[(record.configuration, record.mode, record.policy)].append((spec, record))
    for (configuration, mode, policy), entries in cells.items():
        first = entries[0][1]
        audited = [r for _, r in entries if r.rel_err is not None]
        config = {"mode": mode, "estimator": first.estimator, "placement": first.placement,
                  "library_version": first.library_version, "policies": len(entries),
                  "not_covered": sum(r.verdict == "not covered" for _, r in entries)}
        notes = {"notes": sorted({n for _, r in entries for n in r.notes})}  # on the main row only (size)
        common = dict(what="bias", library=library, configuration=configuration, x_name="policy", x=policy,
                      config=config)
        if not audited:
            rows.add(metric="not_covered", unit="fraction", values=1.0, **{**common, "config": {**config, **notes}})
            continue
        rel = [max(r.rel_err, FLOOR) for r in audited]
        cos = [r.cosine for r in audited]
        rows.add(metric="rel_err", unit="relative", values=rel, **{**common, "config": {**config, **notes}})
        common["config"] = {"mode": mode}  # the full configuration is on the rel_err row (CSV size)
        rows.add(metric="rel_err_worst", unit="relative", values=max(rel), **common)
        rows.add(metric="cosine", unit="cosine", values=cos, **common)
        rows.add(metric="cosine_worst", unit="cosine", values=min(cos), **common)
        rows.add(metric="exact_fraction", unit="fraction",
                 values=sum(r.verdict == "exact" for r in audited) / len(audited), **common)
        for dimension in DIMENSIONS:
            if dimension == "staleness" and policy == "on":
                continue  # on-policy cells have no behaviour policy: staleness does not enter them
            by_value = defaultdict(list)
            for spec, record in entries:
                if record.rel_err is not None:
                    by_value[getattr(spec, dimension)].append(max(record.rel_err, FLOOR))
            if len(by_value) < 2:
                continue
            for value, rels in sorted(by_value.items(), key=lambda item: str(item[0])):
                rows.add(what=f"bias_by_{dimension}", library=library, configuration=configuration,
                         metric="rel_err", unit="relative", values=rels, x_name=f"{policy}-policy {dimension}",
                         x=value, config={"mode": mode, "policy": policy})


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    table = [r for r in rows if r["what"] == "bias" and r["metric"] in ("rel_err", "rel_err_worst")]
    libraries = list(dict.fromkeys(r["library"] for r in table))
    written = []
    for library in libraries:
        mine = [r for r in table if r["library"] == library]
        configurations = list(dict.fromkeys(r["configuration"] for r in mine))
        height = 0.9 + 0.32 * len(configurations)
        fig, axes = plt.subplots(1, 2, figsize=(12, height), sharey=True)
        for axis, policy in zip(axes, ("on", "off")):
            for index, configuration in enumerate(configurations):
                cell = {r["metric"]: r for r in mine
                        if r["configuration"] == configuration and r["x"] == policy}
                if "rel_err" not in cell:
                    continue
                median = float(cell["rel_err"]["median"])
                low, high = float(cell["rel_err"]["p20"]), float(cell["rel_err_worst"]["median"])
                mode = eval_json(cell["rel_err"]["config"]).get("mode", "library")
                colour = "tab:green" if median < 1e-10 else ("tab:blue" if mode != "library" else "tab:red")
                axis.plot([low, high], [index, index], color=colour, linewidth=2, alpha=0.5)
                axis.plot([median], [index], "o", color=colour)
            axis.axvline(1e-10, color="grey", linestyle="--", linewidth=1)
            axis.set_xscale("log")
            axis.set_xlim(1e-17, 10)
            axis.set_title(f"{policy}-policy")
            axis.grid(axis="x", alpha=0.3)
        fig.supxlabel("relative error |E[grad] - grad KL_seq| / |grad KL_seq| over the policy grid "
                      "(dot: median; bar: p20 to worst; dashed: exactness threshold 1e-10)", fontsize=9)
        axes[0].set_yticks(range(len(configurations)))
        axes[0].set_yticklabels(configurations, fontsize=8)
        axes[0].invert_yaxis()
        version = eval_json(mine[0]["config"]).get("library_version", "")
        fig.suptitle(f"Exact audit over the policy grid: {library} {version} "
                     "(green = exact, red = library default / upstream fix, blue = kl-patches mode, biased)",
                     fontsize=9)
        fig.tight_layout()
        path = out / f"bias_table_{library}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def eval_json(text: str) -> dict:
    import json

    return json.loads(text) if text else {}


def main(argv=None) -> int:
    args = _common.parser(__doc__.split("\n")[0]).parse_args(argv)
    coverage, adapters = _common.resolve_coverage(args.libraries)
    rows = _common.Rows(SCRIPT, args.out)
    if not args.plot_only:
        for library in list(coverage.covered):
            specs = grid(args.quick, library)
            started = time.perf_counter()
            results = []
            try:
                for spec in specs:
                    results.append((spec, audit_library(library, adapters.get(library), spec)))
            except Exception as err:  # an adapter that cannot audit is reported, and the others still run
                coverage.skip(library, f"audit() raised {type(err).__name__}: {err}")
                continue
            elapsed = time.perf_counter() - started
            summarise(rows, library, results)
            rows.add(what="bias_audit_time", library=library, configuration="audit() per policy", metric="time",
                     unit="s", values=elapsed / len(specs), config={"policies": len(specs)})
            print(f"[{SCRIPT}] {library}: {len(specs)} policies, {sum(len(r) for _, r in results)} records, "
                  f"{elapsed:.2f} s")
    _common.finish(rows, coverage, args, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
