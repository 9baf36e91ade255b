"""Smoke runs of the benchmark scripts in their --quick modes: each runs, covers core, says which libraries it
skipped, and writes its CSV rows (in the documented columns) and its PNG plots -- into benchmarks/results/tmp/
(ignored by git), never over the committed results: the working tree is left exactly as it was. Benchmark numbers
are never asserted on here: only that the measurements were made and written."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
QUICK = BENCHMARKS / "results" / "tmp"  # where --quick writes without --out
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


def committed_state() -> tuple[str | None, dict[str, str]]:
    """`git status --porcelain` (None outside a git checkout) and the hashes of every published result file."""
    published = [*sorted((BENCHMARKS / "results").glob("*.*")), ROOT / "docs" / "results.md", ROOT / "README.md"]
    hashes = {str(path.relative_to(ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()
              for path in published if path.is_file()}
    status = None
    if shutil.which("git") and (ROOT / ".git").exists():
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout
    return status, hashes


@pytest.fixture
def untouched_checkout():
    """A quick run leaves the checkout as it found it: on a clean clone (CI), `git status --porcelain` stays
    empty; on a working copy with edits, those edits and nothing else; published results byte for byte."""
    before = committed_state()
    yield
    after = committed_state()
    assert after[1] == before[1], "a quick run changed published results"
    assert after[0] == before[0], f"a quick run changed the working tree:\n{after[0]}"


@pytest.fixture(scope="module")
def plotting():
    if importlib.util.find_spec("matplotlib") is None:
        pytest.fail("matplotlib is needed to draw the benchmark plots: it belongs to the test extra")


def fresh_quick_outputs(*names: str) -> None:
    for name in names:
        (QUICK / name).unlink(missing_ok=True)


@pytest.mark.parametrize("script", sorted(CORE_OUTPUTS))
def test_quick_run_writes_core_rows_and_plots(script, plotting, untouched_checkout):
    """Without --out, as a user types it: the outputs land in benchmarks/results/tmp/."""
    expected, images = CORE_OUTPUTS[script]
    fresh_quick_outputs(f"{script}.csv", *images)
    result = run(script, "--quick", "--libraries", "core")
    assert "core" in coverage_line(result.stdout, script).split("skipped:")[0]
    tmp_path = QUICK
    rows = read(tmp_path / f"{script}.csv")
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


def test_trl_run_says_what_it_skipped_or_writes_rows(plotting, untouched_checkout):
    tmp_path = QUICK
    fresh_quick_outputs("trl_run.csv", "trl_run.png")
    result = run("trl_run", "--quick", timeout=300)
    line = coverage_line(result.stdout, "trl_run")
    if importlib.util.find_spec("trl") is None:
        assert "skipped: trl (trl is not installed" in line
    else:
        assert line.split("skipped:")[0].endswith("covered: trl; "), line
        rows = read(tmp_path / "trl_run.csv")
        assert {"trl_run", "trl_run-time", "trl_run-optimum"} <= {row["what"] for row in rows}
        assert (tmp_path / "trl_run.png").exists()


def test_run_all_and_report_regenerate_everything(tmp_path, plotting, untouched_checkout):
    """The one command: every script (core part here), the plots from the merged CSVs, then the Results section --
    of a quick run, beside its CSVs in benchmarks/results/tmp/, never docs/results.md or the README."""
    fresh_quick_outputs("results.md", *(f"{script}.csv" for script in CORE_OUTPUTS),
                        *(image for _, images in CORE_OUTPUTS.values() for image in images))
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--libraries", "core"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    for script in CORE_OUTPUTS:
        assert (QUICK / f"{script}.csv").exists()
        for image in CORE_OUTPUTS[script][1]:
            assert (QUICK / image).exists()
    assert "== summary ==" in result.stdout
    text = (QUICK / "results.md").read_text()
    for heading in ("### 1.", "### 2.", "### 3.", "### 4.", "### 5.", "### 6."):
        assert heading in text
    assert "python benchmarks/run_all.py" in text
    # report.py alone, elsewhere: also never the README.
    doc = tmp_path / "results.md"
    run("report", "--out", str(QUICK), "--doc", str(doc))
    assert "### 5." in doc.read_text()


def test_report_fills_the_readme_block_between_its_markers(tmp_path):
    """report.py keeps the README's RESULTS block (one picture and the link to docs/results.md) generated: the
    markers are there once, in order, and a report touches nothing outside them."""
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"
    assert readme.count(begin) == 1 and readme.count(end) == 1 and readme.index(begin) < readme.index(end)
    copy = tmp_path / "README.md"
    block = readme[readme.index(begin) + len(begin):readme.index(end)]
    copy.write_text(readme.replace(block, "\nSTALE-BLOCK-SENTINEL\n"))
    run("report", "--out", str(BENCHMARKS / "results"), "--doc", str(tmp_path / "results.md"), "--readme", str(copy))
    text = copy.read_text()
    assert "STALE-BLOCK-SENTINEL" not in text
    assert text[:text.index(begin)] == readme[:readme.index(begin)]
    assert text[text.index(end):] == readme[readme.index(end):]
    block = text[text.index(begin):text.index(end)]
    assert "(docs/results.md)" in block
    for image in [part.split(")")[0] for part in block.split("](")[1:] if part.split(")")[0].endswith(".png")]:
        assert (ROOT / image).is_file(), image
