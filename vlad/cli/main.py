"""``vlad``: parse the arguments, run one sub-command, and turn user errors into one line.

A user mistake (any :class:`~vlad.errors.VladError`, raised by the up-front checks of
:mod:`vlad.cli.common` or by the library) prints ``vlad: error: <what and how to fix>`` and exits with
code 2; an operating-system error (disk full, file vanished) prints one line and exits with 1. Anything
else is a bug and keeps its traceback. ``-v`` shows the traceback of every error.

Exit codes: 0 done; 1 an operating-system error; 2 a mistake found before any work (options, an
unreadable reference, an unreadable input with ``--fail-fast``); 3 ``vlad score`` went to the end but
some inputs could not be read or scored (each has a row with its error; ``10 scored, 1 failed: see the
error column``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from vlad.cli import demo, export, score, serve, weights
from vlad.cli import eval as eval_cmd
from vlad.cli.common import EXIT_FINISHED_WITH_FAILURES, CliParser  # noqa: F401 - every exit code here
from vlad import installed_version
from vlad.errors import VladError

EXIT_USER_ERROR = 2
EXIT_SYSTEM_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    """The full ``vlad`` argument parser (cheap: no model library is imported)."""
    parser = CliParser(prog="vlad", description="Zero- and few-shot visual anomaly detection.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show tracebacks")
    parser.add_argument("--version", action="version", version=f"vlad {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    score.add_parser(sub)
    eval_cmd.add_parser(sub)
    weights.add_parser(sub)
    export.add_parser(sub)
    sub.add_parser("list", help="list the registered scorers")
    demo.add_parser(sub)
    serve.add_parser(sub)
    p = sub.add_parser("bench", help="benchmark a scorer at real size (prints figures)")
    p.add_argument("target", help="what to benchmark: patchcore, coreset, winclip, maeday, anomalydino, ...")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (see --help there)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "score":
        return score.run(args)
    if args.command == "eval":
        return eval_cmd.run(args)
    if args.command == "weights":
        return weights.run(args)
    if args.command == "export":
        return export.run(args)
    if args.command == "list":
        from vlad.registry import list_scorers

        print("\n".join(list_scorers()))
        return 0
    if args.command == "demo":
        return demo.run(args)
    if args.command == "serve":
        return serve.run(args)
    if args.command == "bench":
        from vlad.bench import main as bench_main

        return bench_main([args.target, *args.rest])
    raise VladError(f"unknown command {args.command!r}; see `vlad --help`")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    first, _, rest = text.partition("\n")
    return first + ("\n" + "\n".join("  " + line for line in rest.splitlines()) if rest else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``vlad`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or an argument error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except VladError as exc:
        if args.verbose:
            logging.getLogger("vlad").exception("traceback of the error below")
        print(f"vlad: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        if args.verbose:
            logging.getLogger("vlad").exception("traceback of the error below")
        print(f"vlad: error: {exc}", file=sys.stderr)
        return EXIT_SYSTEM_ERROR
    except KeyboardInterrupt:
        print("vlad: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
