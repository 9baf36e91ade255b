"""The ``kl-patches`` command line: ``check`` audits KL gradients exactly; ``modes`` lists the modes.

    kl-patches check                              # core reference set + every installed library
    kl-patches check --library trl --config my_grpo.yaml
    kl-patches check --library verl -- actor_rollout_ref.actor.use_kl_loss=True
    kl-patches check --library openrlhf -- --algo.kl.use_loss --algo.kl.estimator k3
    kl-patches check --json                       # records for machines: stdout is exactly one JSON document

Exit status: 0 the audit ran (and any user configuration is exact); 1 a user configuration is biased;
2 the audit could not run (library missing, unsupported version, bad arguments).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
import textwrap
from typing import IO, Iterator, Sequence

from kl_patches import LIBRARIES, __version__
from kl_patches.modes import DESCRIPTIONS, MODES

EXIT_OK, EXIT_BIASED, EXIT_ERROR = 0, 1, 2

DESCRIPTION = "Audit the KL gradients of TRL, verl and OpenRLHF exactly, and list the KL modes of kl-patches."
EPILOG = """examples:
  kl-patches check                                   the reference set and every installed library
  kl-patches check --library trl --config my_grpo.yaml
  kl-patches check --library verl -- actor_rollout_ref.actor.kl_loss_type=low_var_kl
  kl-patches check --library openrlhf -- --algo.kl.use_loss --algo.kl.estimator k3
  kl-patches check --json | jq .                     stdout is exactly one JSON document
  kl-patches modes

exit status: 0 the audit ran (and your configuration, if given, is exact); 1 your configuration is biased
(the fix is printed); 2 the audit could not run (library missing, unsupported version, bad arguments)."""
AFTER_DASHES = ("Arguments after -- describe your own configuration: hydra overrides for verl "
                "(actor_rollout_ref.actor.kl_loss_type=low_var_kl ...), the train_ppo_ray arguments for OpenRLHF "
                "(--algo.kl.use_loss --algo.kl.estimator k3 ...), TRL command-line flags for TRL (--beta 0.04 ...).")


def installed_libraries() -> list[str]:
    return [library for library in LIBRARIES if importlib.util.find_spec(library) is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kl-patches", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kl-patches {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser(
        "check", help="audit KL gradients by exact enumeration on a tiny policy",
        description=textwrap.fill(
            "Audit the KL gradient of each configuration by exact enumeration of every response of a tiny "
            "autoregressive policy: relative error, cosine and norm ratio against grad KL(pi || pi_ref) over whole "
            "responses.", 100) + "\n\n" + textwrap.fill(AFTER_DASHES, 100),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--library", default="all", choices=("all", "core", *LIBRARIES),
                       help="'core' = the reference taxonomy in plain torch; 'all' (default) = core plus every "
                       "installed library")
    check.add_argument("--config", metavar="FILE",
                       help="audit this configuration file of the library (a TRL or verl YAML)")
    check.add_argument("--json", action="store_true",
                       help="print the records as one JSON document on stdout (whatever the libraries print goes "
                       "to stderr)")
    policy = check.add_argument_group("the tiny policy (recorded on every record, so any cell can be rerun)")
    policy.add_argument("--policy", dest="kind", default="tabular", choices=("tabular", "transformer"))
    policy.add_argument("--vocab", type=int, default=3, help="vocabulary size including EOS (default 3)")
    policy.add_argument("--horizon", type=int, default=3, help="maximum response length (default 3)")
    policy.add_argument("--seed", type=int, default=0)
    policy.add_argument("--distance", type=float, default=0.5,
                        help="scale of the perturbation between pi_theta and pi_ref (default 0.5)")
    policy.add_argument("--staleness", type=float, default=0.3,
                        help="scale of the perturbation between pi_theta and the behaviour policy mu (default 0.3)")

    modes = commands.add_parser("modes", help="list the KL modes")
    modes.add_argument("--json", action="store_true")
    status = commands.add_parser(
        "status", help="what kl-patches patches in this process: versions, mode and where it came from, targets",
        description="Installed and supported versions per library, KL_PATCHES_MODE, and the patched targets. In a "
                    "training script call kl_patches.status() for the same report about that process.")
    status.add_argument("--json", action="store_true")
    return parser


def run_check(args: argparse.Namespace, extra: Sequence[str]) -> tuple[list, list[str]]:
    """The records, and the errors of libraries that could not be audited."""
    from kl_patches.audit.policies import PolicySpec

    spec = PolicySpec(kind=args.kind, vocab=args.vocab, horizon=args.horizon, seed=args.seed,
                      distance=args.distance, staleness=args.staleness)
    libraries = ["core", *installed_libraries()] if args.library == "all" else [args.library]
    records, errors = [], []
    for library in libraries:
        if library == "core":
            from kl_patches.audit.reference import run_reference

            records.extend(run_reference(spec))
            continue
        try:
            adapter = importlib.import_module(f"kl_patches.integrations.{library}.audit")
            records.extend(adapter.audit(spec, config=args.config, args=list(extra)))
        except Exception as err:  # noqa: BLE001 - the audit must say why a library could not be audited, not crash
            errors.append(f"could not audit {library}: {type(err).__name__}: {err}")
    return records, errors


def validate(args: argparse.Namespace, extra: Sequence[str]) -> str | None:
    """What is wrong with the command line, found before any library is imported (importing TRL takes seconds)."""
    if (args.config is not None or extra) and args.library in ("all", "core"):
        return "--config / arguments after -- need --library trl, verl or openrlhf"
    if args.config is not None and args.library == "openrlhf":
        return "OpenRLHF has no configuration file: pass your train_ppo_ray arguments after --"
    if args.config is not None and not os.path.isfile(args.config):
        return f"--config {args.config}: no such file"
    if args.library in LIBRARIES and importlib.util.find_spec(args.library) is None:
        return f"{args.library} is not installed: pip install 'kl-patches[{args.library}]'"
    return None


def _fail(message: str) -> int:
    print(f"kl-patches: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render(records: list, errors: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    class PipeConsole(Console):
        def on_broken_pipe(self) -> None:  # rich exits 1 here; a reader that leaves early is not an error
            self.quiet = True
            raise BrokenPipeError

    console = PipeConsole()
    if not console.is_terminal and console.width < 160:
        console = PipeConsole(width=160)  # piped or captured: don't fold the reasons into a narrow column
    for library in dict.fromkeys(record.library for record in records):
        rows = [record for record in records if record.library == library]
        first = rows[0]
        table = Table(title=f"{library} {first.library_version}", title_justify="left")
        for column, justify in (("configuration", "left"), ("mode", "left"), ("KL", "left"), ("policy", "center"),
                                ("rel_err", "right"), ("cosine", "right"), ("norm", "right"),
                                ("verdict", "left"), ("what the gradient is", "left")):
            table.add_column(column, justify=justify, overflow="fold")
        for record in rows:
            style = {"exact": "green", "biased": "red"}.get(record.verdict, "yellow")
            reason = record.reason.rstrip(". ") + "."
            if record.fix and record.verdict == "biased":
                reason += f" Fix: {record.fix.rstrip('. ')}."
            table.add_row(Text(record.configuration), record.mode, f"{record.estimator} in {record.placement}",
                          record.policy, _number(record.rel_err, ".1e"), _number(record.cosine, ".3f"),
                          _number(record.norm_ratio, ".3f"), Text(record.verdict, style=style), Text(reason))
        console.print(table)
        for note in sorted({note for record in rows for note in record.notes}):
            console.print(Text(f"  note: {note}"))
        spec = {k: v for k, v in first.spec.items()
                if k in ("kind", "vocab", "horizon", "seed", "distance", "staleness")}
        console.print(Text(f"  policy: {spec}"))
    for error in errors:
        console.print(Text(error, style="red"))
    counts = {verdict: sum(r.verdict == verdict for r in records) for verdict in ("exact", "biased", "not covered")}
    console.print(f"{len(records)} cells audited: {counts['exact']} exact, {counts['biased']} biased, "
                  f"{counts['not covered']} not covered (exact = relative error < 1e-10 against "
                  f"grad KL(pi || pi_ref) over whole responses, by exact enumeration).")


@contextlib.contextmanager
def document_stdout() -> Iterator[IO[str]]:
    """A stream on the real stdout for the one machine-readable document, while everything else written to
    stdout (print, C extensions, child processes: DeepSpeed prints its accelerator warnings there on import) goes
    to stderr, at the file-descriptor level. fd 1 and ``sys.stdout`` are restored on exit."""
    sys.stdout.flush()
    saved = os.dup(1)
    document = open(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield document
        document.flush()
    except BrokenPipeError:
        _to_devnull(document.fileno())  # the reader left: nothing more to write, and nothing to complain about
        raise
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()  # what a library buffered in Python goes to stderr, not after the document
        _flush_c_stdio()
        os.dup2(saved, 1)
        os.close(saved)
        with contextlib.suppress(OSError):
            document.close()


def _flush_c_stdio() -> None:
    """Flush C stdio buffers (printf from extensions) while fd 1 still points at stderr."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


def _to_devnull(fd: int) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def check(args: argparse.Namespace, extra: Sequence[str]) -> int:
    problem = validate(args, extra)
    if problem is not None:
        return _fail(problem)
    if args.json:
        with document_stdout() as document:
            try:
                records, errors = run_check(args, extra)
            except ValueError as err:
                return _fail(str(err))
            json.dump([record.as_dict() for record in records], document, indent=1)
            document.write("\n")
    else:
        try:
            records, errors = run_check(args, extra)
        except ValueError as err:
            return _fail(str(err))
        render(records, errors)
    if args.json:
        for error in errors:
            print(f"kl-patches: {error}", file=sys.stderr)
    if errors:
        return EXIT_ERROR
    biased_user = [r for r in records if r.user_config and r.verdict != "exact"]
    if biased_user:
        out = sys.stderr if args.json else sys.stdout
        for record in biased_user:
            print(f"your configuration is {record.verdict} ({record.policy}-policy, {record.configuration}): "
                  f"{record.reason}" + (f" Fix: {record.fix}" if record.fix else ""), file=out)
        return EXIT_BIASED
    return EXIT_OK


def list_modes(args: argparse.Namespace) -> int:
    if args.json:
        json.dump([{"mode": mode, "description": DESCRIPTIONS[mode]} for mode in MODES], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for mode in MODES:
            print(f"{mode:14} {DESCRIPTIONS[mode]}")
    return EXIT_OK


def show_status(args: argparse.Namespace) -> int:
    import kl_patches

    rows = kl_patches.status()
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return EXIT_OK
    for row in rows:
        installed = row["installed"] or "not installed"
        mode = row["mode"] or "not patched"
        print(f"{row['library']:9} {installed:14} supported {row['supported']:14} {mode}")
        for target in row["targets"]:
            print(f"          patched: {target}")
        for target in row.get("table", []):
            modes = ", ".join(target["modes"]) if target["modes"] else "every mode"
            print(f"          target:  {target['target']} ({modes})")
            print(f"                   answers: {target['answers']}; remove when: {target['remove_when']}")
    print(f"KL_PATCHES_MODE: {rows[0]['environment'] or 'unset'}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `kl-patches check | head`: the reader closed the pipe. Not an error (Python docs, "Note on SIGPIPE"):
        # point stdout at devnull so the interpreter's final flush cannot fail, and exit 0.
        with contextlib.suppress(Exception):
            _to_devnull(sys.stdout.fileno())
        return EXIT_OK


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    args = build_parser().parse_args(argv)
    if args.command == "modes":
        code = list_modes(args)
    elif args.command == "status":
        code = show_status(args)
    else:
        code = check(args, extra)
    sys.stdout.flush()  # a closed pipe surfaces here, inside main's handler, not at interpreter exit
    return code


if __name__ == "__main__":
    sys.exit(main())
