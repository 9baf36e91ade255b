"""Smoke runs of the benchmark scripts in their --quick modes: each runs, covers core, says which libraries it
skipped, and writes its CSV rows (in the documented columns) and its PNG plots. Benchmark numbers are never
asserted on here: only that the measurements were made and written."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
LIBRARIES = ("trl", "verl", "openrlhf")
COLUMNS = ["what", "library", "configuration", "metric", "unit", "x_name", "x", "median", "p20", "p80", "config",
           "machine", "versions", "timestamp"]

#: script -> (the `what` values its core part must write, the PNG files it must draw)
CORE_OUTPUTS = {
    "bias_table": ({"bias", "bias_by_distance", "bias_audit_time"}, ["bias_table_core.png"]),
    "convergence": ({"convergence-sampled-on", "convergence-sampled-stale", "convergence-exact-on",
                     "convergence-exact-stale", "convergence-optimum", "regime-lag-4-exact", "regime-lag-4-sampled",
                     "regime-top-p-exact", "regime-top-p-sampled"},
                    ["convergence_sampled.png", "convergence_exact.png", "convergence_regime_lag-4.png",
                     "convergence_regime_top-p.png"]),
    "variance": ({"variance", "variance-mse", "variance-baselines"}, ["variance.png"]),
    "truncation": ({"truncation"}, ["truncation.png"]),
    "overhead": ({"overhead-tensors", "overhead-lm-head", "check_time"}, ["overhead_core.png"]),
}


def run(script: str, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(BENCHMARKS / f"{script}.py"), *arguments], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def coverage_line(output: str, script: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith(f"[{script}] covered:")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture(scope="module")
def plotting():
    if importlib.util.find_spec("matplotlib") is None:
        pytest.fail("matplotlib is needed to draw the benchmark plots: it belongs to the test extra")


@pytest.mark.parametrize("script", sorted(CORE_OUTPUTS))
def test_quick_run_writes_core_rows_and_plots(script, tmp_path, plotting):
    result = run(script, "--quick", "--libraries", "core", "--out", str(tmp_path))
    assert "core" in coverage_line(result.stdout, script).split("skipped:")[0]
    rows = read(tmp_path / f"{script}.csv")
    expected, images = CORE_OUTPUTS[script]
    assert {row["library"] for row in rows} == {"core"}
    assert expected <= {row["what"] for row in rows}
    for row in rows:
        json.loads(row["config"]), json.loads(row["versions"])
        for key in ("median", "p20", "p80"):
            float(row[key])
        assert row["machine"]
    for image in images:
        path = tmp_path / image
        assert path.exists() and path.stat().st_size > 1000, f"{image} was not drawn"


def test_default_run_names_every_library_covered_or_skipped(tmp_path, plotting):
    result = run("bias_table", "--quick", "--out", str(tmp_path), "--no-plot")
    line = coverage_line(result.stdout, "bias_table")
    covered, skipped = line.split("covered:")[1].split("; skipped:")
    for library in LIBRARIES:
        if importlib.util.find_spec(library) is None:
            assert f"{library} ({library} is not installed" in skipped
        else:
            assert library in covered or f"{library} (" in skipped
    assert "core" in covered


def test_rows_of_other_libraries_are_kept(tmp_path):
    """A run replaces the rows of the libraries it measured and keeps the others (run_all merges venvs so)."""
    csv_path = tmp_path / "variance.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerow({**{c: "" for c in COLUMNS}, "what": "variance", "library": "elsewhere",
                         "median": "1", "p20": "1", "p80": "1", "config": "{}", "versions": "{}"})
        writer.writerow({**{c: "" for c in COLUMNS}, "what": "variance", "library": "core", "configuration": "stale",
                         "median": "1", "p20": "1", "p80": "1", "config": "{}", "versions": "{}"})
    run("variance", "--quick", "--libraries", "core", "--out", str(tmp_path), "--no-plot")
    rows = read(csv_path)
    assert [row["library"] for row in rows].count("elsewhere") == 1
    assert not [row for row in rows if row["configuration"] == "stale"]
    assert [row for row in rows if row["library"] == "core"]


def test_trl_run_says_what_it_skipped_or_writes_rows(tmp_path, plotting):
    result = run("trl_run", "--quick", "--out", str(tmp_path), timeout=300)
    line = coverage_line(result.stdout, "trl_run")
    if importlib.util.find_spec("trl") is None:
        assert "skipped: trl (trl is not installed" in line
    else:
        assert line.split("skipped:")[0].endswith("covered: trl; "), line
        rows = read(tmp_path / "trl_run.csv")
        assert {"trl_run", "trl_run-time", "trl_run-optimum"} <= {row["what"] for row in rows}
        assert (tmp_path / "trl_run.png").exists()


def test_run_all_and_report_regenerate_everything(tmp_path, plotting):
    """The one command: every script (core part here), the plots from the merged CSVs, then the Results section."""
    doc = tmp_path / "results.md"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--libraries", "core",
                             "--out", str(tmp_path), "--no-docs"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for script in CORE_OUTPUTS:
        assert (tmp_path / f"{script}.csv").exists()
        for image in CORE_OUTPUTS[script][1]:
            assert (tmp_path / image).exists()
    assert "== summary ==" in result.stdout
    readme = (ROOT / "README.md").read_text()
    run("report", "--out", str(tmp_path), "--doc", str(doc))
    assert (ROOT / "README.md").read_text() == readme  # a report of quick runs never rewrites the README
    text = doc.read_text()
    for heading in ("### 1.", "### 2.", "### 3.", "### 4.", "### 5.", "### 6."):
        assert heading in text
    assert "python benchmarks/run_all.py" in text
