"""Command line: `forgetscale <verb> ...`. Each verb is a module in this package.

A verb module defines NAME, HELP, add_arguments(parser) and run(args) -> int. This is the only
place that turns a ForgetscaleError into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        print("forgetscale: interrupted; everything stored so far is kept (re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
