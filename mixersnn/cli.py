"""The ``mixersnn`` command line.

Each subcommand lives in its own module, imported only when it runs, so ``mixersnn`` (the
model library) never imports Ray or MLflow itself: the trainer and search commands are
resolved from ``trainers`` and ``search`` at dispatch time. To add a command, add one line to
``COMMANDS``: ``name -> "module"``, where the module defines
``add_arguments(parser)`` and ``run(args) -> int``, and a one-line ``HELP`` string.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from mixersnn.errors import UserError

__all__ = ["main", "COMMANDS"]

COMMANDS: dict[str, str] = {
    "models": "mixersnn.commands.models",
    "data": "mixersnn.commands.data",
    "energy": "mixersnn.commands.energy",
    "export": "mixersnn.commands.export",
    "train": "trainers.cli",
    "search": "search.cli",
    "report": "search.report",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    from mixersnn.data.manifest import ManifestError, SampleError
    from mixersnn.models.config import ConfigError

    return (UserError, ConfigError, ManifestError, SampleError, FileNotFoundError)


def _build_parser() -> argparse.ArgumentParser:
    from mixersnn import __version__

    parser = argparse.ArgumentParser(
        prog="mixersnn",
        description="Search, train and account for efficient spiking MLPs (Mixer-SNN).",
    )
    parser.add_argument("--version", action="version", version=f"mixersnn {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, modname in COMMANDS.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=getattr(mod, "HELP", None), description=getattr(mod, "HELP", None))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except _user_errors() as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        how = "with --resume" if args.command == "search" else "again"
        print(f"interrupted: what was trained is kept; run the same command {how} to continue from the last "
              f"checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
