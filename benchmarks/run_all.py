"""Regenerate every benchmark CSV, plot and the Results section (docs/results.md) with one command.

    python benchmarks/run_all.py                                   # from the core environment
    python benchmarks/run_all.py --python trl=/path/to/trl-venv/bin/python --python verl=... --python openrlhf=...
    python benchmarks/run_all.py --quick                           # smoke run of the whole pipeline (~1 minute),
                                                                   # written to benchmarks/results/tmp/ (ignored)

Each library lives in a virtual environment of its own (their pins conflict), so the per-library parts run
inside the library's interpreter: the one given with ``--python LIB=PATH``, else ``$KL_PATCHES_BENCH_PYTHON_<LIB>``,
else the nox session's ``.nox/<lib>/bin/python`` (``python -m nox -s <lib>`` creates it), else the current
interpreter when the library is installed in it. The core parts run in the current interpreter. Every script
replaces its own library's rows in ``benchmarks/results/<script>.csv`` and keeps the others; the plots and
``docs/results.md`` are then redrawn here from the merged CSVs (only this interpreter needs matplotlib).
Libraries without an interpreter are skipped and listed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

ROOT = _common.HERE.parent
#: script -> the libraries it measures (trl_run trains with TRL only)
SCRIPTS = {
    "bias_table": ("core", *_common.LIBRARIES),
    "convergence": ("core", *_common.LIBRARIES),
    "variance": ("core", *_common.LIBRARIES),
    "overhead": ("core", *_common.LIBRARIES),
    "trl_run": ("trl",),
    "truncation": ("core",),
}


def find_python(library: str, given: dict[str, str]) -> tuple[str | None, str]:
    """(interpreter, where it came from) for the library's environment, or (None, why not)."""
    if library in given:
        return given[library], "--python"
    env = os.environ.get(f"KL_PATCHES_BENCH_PYTHON_{library.upper()}")
    if env:
        return env, f"$KL_PATCHES_BENCH_PYTHON_{library.upper()}"
    nox = ROOT / ".nox" / library / "bin" / "python"
    if nox.exists():
        return str(nox), f"nox session .nox/{library}"
    import importlib.util

    if importlib.util.find_spec(library) is not None:
        return sys.executable, "current interpreter"
    return None, (f"no interpreter with {library}: pass --python {library}=PATH, set "
                  f"KL_PATCHES_BENCH_PYTHON_{library.upper()}, or run `python -m nox -s {library}` first")


def run_script(python: str, script: str, arguments: list[str], log: list[str]) -> int:
    command = [python, str(_common.HERE / f"{script}.py"), *arguments]
    print(f"\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        if re.match(r"^\[\w+\] (covered|wrote|kl-patches check)", line):
            log.append(line.rstrip())
    code = process.wait()
    print(f"  ({time.perf_counter() - started:.0f} s, exit {code})", flush=True)
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: every script in its --quick mode")
    parser.add_argument("--python", action="append", default=[], metavar="LIB=PATH",
                        help="the interpreter of a library's environment (repeatable)")
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), help="run only these scripts")
    parser.add_argument("--libraries", nargs="+", metavar="LIB", help="measure only these (core, trl, verl, openrlhf)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default {_common.RESULTS}; with --quick {_common.QUICK_RESULTS} (ignored by git)")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/results.md")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = _common.default_out(args.quick)
    given = {}
    for item in args.python:
        library, _, path = item.partition("=")
        if library not in _common.LIBRARIES or not path:
            parser.error(f"--python expects LIB=PATH with LIB in {', '.join(_common.LIBRARIES)}, got {item!r}")
        given[library] = path
    wanted = set(args.libraries or ("core", *_common.LIBRARIES))
    scripts = args.only or list(SCRIPTS)
    common = ["--no-plot", "--out", str(args.out)] + (["--quick"] if args.quick else [])
    log: list[str] = []
    failures: list[str] = []
    skipped: dict[str, str] = {}

    interpreters = {"core": sys.executable}
    for library in _common.LIBRARIES:
        if library in wanted:
            python, where = find_python(library, given)
            if python is None:
                skipped[library] = where
            else:
                interpreters[library] = python
                print(f"{library}: {python} ({where})")

    for script in scripts:
        for library in SCRIPTS[script]:
            if library not in wanted or library not in interpreters:
                continue
            code = run_script(interpreters[library], script, [*common, "--libraries", library], log)
            if code:
                failures.append(f"{script} --libraries {library} (exit {code})")
    for script in scripts:  # the plots, from the merged CSVs, in this interpreter
        if run_script(sys.executable, script, ["--plot-only", "--out", str(args.out)], log):
            failures.append(f"{script} --plot-only")
    if not args.no_docs:
        # A smoke run's report goes beside its CSVs: docs/results.md and the README describe the committed results.
        doc = ["--doc", str(args.out / "results.md")] if args.quick else []
        if run_script(sys.executable, "report", ["--out", str(args.out), *doc], log):
            failures.append("report")

    print("\n== summary ==")
    for line in log:
        if " covered: " in line or "kl-patches check" in line:
            print(line)
    for library, why in skipped.items():
        print(f"skipped {library}: {why}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
