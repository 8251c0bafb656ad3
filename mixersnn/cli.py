"""The ``mixersnn`` command line.

Each subcommand lives in its own module, imported only when that command is parsed and run:
``mixersnn train ...`` imports the trainer's parser alone, ``mixersnn --help`` none of them.
So ``mixersnn`` (the model library) never imports Ray or MLflow itself, and the trainer and
search commands are resolved from ``trainers`` and ``search`` at dispatch time. To add a
command, add one :class:`Command` to ``COMMANDS``: its module defines
``add_arguments(parser)`` and ``run(args) -> int`` (or the functions the entry names), and its
one-line help (the module's ``HELP``, which a test keeps equal to the entry's).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Iterable, NamedTuple, Optional, Sequence

from mixersnn.errors import UserError

__all__ = ["main", "COMMANDS", "Command", "build_parser", "DeprecatedAlias"]


class Command(NamedTuple):
    """Where a subcommand lives: ``module`` defines ``add`` (the parser) and ``run``."""

    module: str
    help: str
    add: str = "add_arguments"
    run: str = "run"


COMMANDS: dict[str, Command] = {
    "search": Command("search.cli", "Search Mixer-SNN architectures and hyperparameters: accuracy vs energy per "
                      "image (Ray Tune, Optuna, MLflow)."),
    "train": Command("trainers.cli", "Train a Mixer-SNN model with Ray Train, logging to MLflow."),
    "report": Command("search.report", "Print a search's leaderboard and Pareto front from MLflow and write the "
                      "Pareto plot."),
    "models": Command("mixersnn.commands.models", "List registered model variants with parameter counts and stage "
                      "shapes; with --scale, --from-run or --from-model, show one architecture and its scaled "
                      "family member."),
    "data": Command("mixersnn.commands.data", "Convert idx / CIFAR / ImageFolder data to WebDataset shards; inspect "
                    "or download data."),
    "energy": Command("mixersnn.commands.energy", "Measure firing rates on data and print per-layer dense ops, SOPs, "
                      "MACs and energy."),
    "export": Command("mixersnn.commands.export", "Export a checkpoint as a BatchNorm-free "
                      "multiplication-free-inference (MFI) model."),
}


class DeprecatedAlias(argparse.Action):
    """A flag's old spelling, kept working: hidden from ``--help``, it stores into the new
    flag's ``dest`` and says on stderr which flag to use instead.

    ``p.add_argument("--time-budget", dest="time_budget_s", type=float, action=DeprecatedAlias,
    new="--time-budget-s")``
    """

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: object) -> None:
        kwargs.pop("help", None)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: Optional[str] = None) -> None:
        print(f"note: {option_string} is deprecated; use {self.new} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _user_errors() -> tuple[type[BaseException], ...]:
    from mixersnn.data.manifest import ManifestError, SampleError
    from mixersnn.models.config import ConfigError

    return (UserError, ConfigError, ManifestError, SampleError, FileNotFoundError)


def build_parser(load: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The ``mixersnn`` parser with the arguments of the commands in ``load`` (None: all).

    Every command is listed in ``mixersnn --help``; only the loaded ones import their module
    and can parse their own flags.
    """
    from mixersnn import __version__

    wanted = set(COMMANDS) if load is None else set(load)
    parser = argparse.ArgumentParser(
        prog="mixersnn",
        description="Search, train and account for efficient spiking MLPs (Mixer-SNN).",
        epilog="`mixersnn COMMAND --help` lists a command's flags; docs/configuration.md lists them all.",
    )
    parser.add_argument("--version", action="version", version=f"mixersnn {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name in wanted:
            mod = importlib.import_module(cmd.module)
            getattr(mod, cmd.add)(p)
            p.set_defaults(_run=getattr(mod, cmd.run))
    return parser


def _build_parser() -> argparse.ArgumentParser:
    """Every command's parser (tests parse documented command lines with it)."""
    return build_parser()


def _command_in(argv: Sequence[str]) -> list[str]:
    """The command ``argv`` names (its first word that is not a top-level option), if any."""
    for tok in argv:
        if not tok.startswith("-"):
            return [tok] if tok in COMMANDS else []
    return []


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(_command_in(argv)).parse_args(argv)
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
