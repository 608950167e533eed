"""Command line: `forgetscale <verb> ...`. Each verb is a module in this package.

A verb module defines NAME, HELP, add_arguments(parser) and run(args) -> int. This is the only
place that turns a ForgetscaleError into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import pkgutil
import signal
import sqlite3
import sys
from types import ModuleType

from forgetscale import __version__
from forgetscale.errors import ForgetscaleError


def _verbs() -> dict[str, ModuleType]:
    verbs = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "NAME") and hasattr(module, "run"):
            verbs[module.NAME] = module
    return dict(sorted(verbs.items()))


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are bad input like any other: one `forgetscale:` line, exit 2 (`--help` shows usage)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"forgetscale: {self.prog.removeprefix('forgetscale ')}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="forgetscale",
        description="Measure, explain and forecast what a language model forgets when it is fine-tuned.",
    )
    parser.add_argument("--version", action="version", version=f"forgetscale {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, module in _verbs().items():
        verb_parser = sub.add_parser(
            name,
            help=module.HELP,
            description=(module.__doc__ or module.HELP).strip(),
            epilog=getattr(module, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_run=module.run)
    return parser


def _machine_limit(err: BaseException) -> str | None:
    """A full disk or a read-only folder, in one line; None for anything else (a bug: keep the traceback)."""
    text = str(err)
    if getattr(err, "errno", None) == errno.ENOSPC or "disk is full" in text or "No space left" in text:
        return "the disk is full; free space and re-run"
    if getattr(err, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM):
        where = getattr(err, "filename", None)
        return f"cannot write {where or 'the output'} ({os.strerror(err.errno)}); choose a writable --out"
    if "readonly database" in text or "unable to open database" in text:
        return f"cannot write the results store ({text}); choose a writable --out"
    return None


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # a killed sweep stops as Ctrl-C does: stored rows kept, runs left resumable


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ForgetscaleError as err:
        print(f"forgetscale: {err}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.OperationalError, RuntimeError) as err:
        reason = _machine_limit(err)
        if reason is None:
            raise
        print(f"forgetscale: {reason}; everything stored before it is kept (re-run to resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("forgetscale: interrupted; everything stored so far is kept (re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
