"""Shared plumbing of the benchmark scripts: which libraries this interpreter can cover, the CSV rows (Liger's
shape: what, library, configuration, metric, unit, x, median/p20/p80, config JSON, machine, versions) and the
command-line options every script accepts.

A script run in the core environment measures ``core``; run in a library's environment it measures ``core``
and that library. Each run replaces, in ``benchmarks/results/<script>.csv``, the rows of the libraries it
measured and keeps the others, so ``run_all.py`` can fill one CSV from several virtual environments.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also when piped to a log

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: where ``--quick`` writes unless ``--out`` is given: ignored by git, so a smoke run never replaces (or dirties)
#: the committed results.
QUICK_RESULTS = RESULTS / "tmp"
LIBRARIES = ("trl", "verl", "openrlhf")
COLUMNS = ("what", "library", "configuration", "metric", "unit", "x_name", "x", "median", "p20", "p80",
           "config", "machine", "versions", "timestamp")


# ----------------------------------------------------------------------------------------------------------------
# Which libraries this interpreter covers
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Coverage:
    """The libraries a script measured and the ones it skipped, with why (printed, never silent)."""

    covered: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def skip(self, library: str, why: str) -> None:
        self.skipped[library] = why
        if library in self.covered:
            self.covered.remove(library)

    def report(self, script: str) -> str:
        skipped = "; ".join(f"{lib} ({why})" for lib, why in self.skipped.items()) or "none"
        return f"[{script}] covered: {', '.join(self.covered) or 'none'}; skipped: {skipped}"


def library_adapter(library: str, module: str = "audit"):
    """The adapter's ``module`` (``audit``, or ``""`` for the adapter package) when the library and its adapter
    are importable here, else None and the reason why not."""
    if importlib.util.find_spec(library) is None:
        return None, f"{library} is not installed in {sys.prefix}"
    name = f"kl_patches.integrations.{library}" + (f".{module}" if module else "")
    try:
        return importlib.import_module(name), None
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to skip, reported verbatim
        return None, f"{name} failed to import: {type(err).__name__}: {err}"


def resolve_coverage(requested: Sequence[str] | None, module: str = "audit") -> tuple[Coverage, dict]:
    """``requested`` = None: core plus every library installed here. Returns the coverage and the adapters'
    ``module`` per covered library."""
    wanted = list(requested) if requested else ["core", *LIBRARIES]
    coverage, adapters = Coverage(), {}
    for library in wanted:
        if library == "core":
            coverage.covered.append("core")
            continue
        if library not in LIBRARIES:
            raise SystemExit(f"unknown library {library!r}; choose from core, {', '.join(LIBRARIES)}")
        adapter, why = library_adapter(library, module)
        if adapter is None:
            coverage.skipped[library] = why
        else:
            coverage.covered.append(library)
            adapters[library] = adapter
    return coverage, adapters


# ----------------------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cpus"


def versions(libraries: Iterable[str] = ()) -> dict:
    import importlib.metadata as metadata

    found = {"python": platform.python_version()}
    for distribution in ("torch", "kl-patches", *[lib for lib in libraries if lib != "core"]):
        try:
            found[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[distribution] = "not installed"
    return found


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) with linear interpolation; a single value gives three equal numbers."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        raise ValueError("no values")

    def at(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return statistics.median(ordered), at(0.2), at(0.8)


def dumps(value: dict) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def compact(value: float) -> str:
    """Seven significant digits: far below any difference the benchmarks report, and half the bytes of repr."""
    return format(float(value), ".7g")


class Rows:
    """Collects measurement rows for one script and writes them, merged with other libraries' rows."""

    def __init__(self, script: str, out: Path):
        self.script, self.out = script, out
        self.rows: list[dict] = []
        self._machine = machine()
        self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S")

    def add(self, *, what: str, library: str, configuration: str, metric: str, unit: str, values,
            x_name: str = "", x="", config: dict | None = None, summary: tuple | None = None) -> None:
        """``summary`` = (median, low, high) written as they are (e.g. a confidence interval), instead of the
        median / p20 / p80 of ``values``."""
        values = [values] if isinstance(values, (int, float)) else list(values)
        median, p20, p80 = summary if summary is not None else quantiles(values)
        self.rows.append({
            "what": what, "library": library, "configuration": configuration, "metric": metric, "unit": unit,
            "x_name": x_name, "x": x, "median": compact(median), "p20": compact(p20), "p80": compact(p80),
            "config": dumps(config or {}), "machine": self._machine,
            "versions": dumps(versions([library])), "timestamp": self._stamp,
        })

    @property
    def path(self) -> Path:
        return self.out / f"{self.script}.csv"

    def write(self, measured: Sequence[str]) -> Path:
        """Replace the rows of the ``measured`` libraries in the CSV; keep every other library's rows."""
        self.out.mkdir(parents=True, exist_ok=True)
        kept = [{**row, **{key: compact(row[key]) for key in ("median", "p20", "p80")}}
                for row in read_rows(self.path) if row["library"] not in set(measured)]
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(kept + self.rows)
        return self.path


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def number(row: dict, key: str = "median") -> float:
    return float(row[key])


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Resolves the output folder once the other options are known: ``--quick`` defaults to QUICK_RESULTS."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        if getattr(parsed, "out", None) is None:
            parsed.out = default_out(getattr(parsed, "quick", False))
        return parsed, extra


def default_out(quick: bool) -> Path:
    return QUICK_RESULTS if quick else RESULTS


def parser(description: str) -> argparse.ArgumentParser:
    p = _Parser(description=description)
    p.add_argument("--quick", action="store_true", help="a smoke run (seconds): tiny grid, few steps")
    p.add_argument("--libraries", nargs="+", metavar="LIB",
                   help="what to measure (core, trl, verl, openrlhf); default: core and every installed library")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {RESULTS}; with --quick {QUICK_RESULTS}, ignored by git)")
    p.add_argument("--no-plot", action="store_true", help="write the CSV only (run_all plots in the core venv)")
    p.add_argument("--plot-only", action="store_true", help="redraw the plots from the CSV, measure nothing")
    return p


def finish(rows: Rows, coverage: Coverage, args, plot) -> None:
    """Write the CSV (unless --plot-only), then the plots, and say what was covered and what was skipped."""
    if not args.plot_only:
        path = rows.write(coverage.covered)
        print(f"[{rows.script}] wrote {len(rows.rows)} rows to {path}")
        print(coverage.report(rows.script))
    if args.no_plot:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print(f"[{rows.script}] matplotlib is not installed here: no plot written (pip install matplotlib)")
        return
    for written in plot(read_rows(rows.path), args.out):
        print(f"[{rows.script}] wrote {written}")
