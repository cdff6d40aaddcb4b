"""The ``adaptnn`` command line.

One module per subcommand in this package; each defines ``HELP`` (one line), ``build(parser)`` (adds its
options to a fresh jsonargparse parser) and ``run(args)``, and may define ``interrupted(args, argv)``: the
line printed after Ctrl-C (what is left on disk and the command that continues). ``COMMANDS`` lists them in
help order; adding a command is adding a module and one entry here.

Built on jsonargparse: options are typed flags (``--train.epochs 5``), ``--config FILE.yaml`` reads YAML
(unknown keys are errors), ``--print_config`` prints the resolved config. Errors caused by the user (bad
config, data, checkpoint, input) print one line and exit with status 2.
"""

from __future__ import annotations

import importlib
import logging
import shlex
import sys
from collections.abc import Sequence

from jsonargparse import ArgumentParser

from ..errors import AdaptnnError
from ..version import __version__
from ._shared import SAFE_YAML_MODE

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS: tuple[str, ...] = (
    "quickstart", "train", "calibrate", "evaluate", "compare", "cost", "models", "bench", "profile", "export", "menu",
    "incubate", "predict", "serve",
)  # fmt: skip


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def build_parser() -> ArgumentParser:
    """The full parser with one subcommand per module in ``COMMANDS``."""
    parser = ArgumentParser(
        prog="adaptnn",
        parser_mode=SAFE_YAML_MODE,  # every YAML jsonargparse reads goes through the bounded reader
        description="Dynamic (early-exit) neural networks: train, calibrate, evaluate, count cost.",
    )
    parser.add_argument("--version", action="version", version=f"adaptnn {__version__}")
    parser.add_argument("--log_level", type=str, default="INFO", help="Logging level.")
    commands = parser.add_subcommands(dest="command")
    for name in COMMANDS:
        module = _module(name)
        sub = ArgumentParser(description=module.__doc__.strip().splitlines()[0])
        module.build(sub)
        commands.add_subcommand(name, sub, help=module.HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``argv`` lets tests run the CLI in-process. Returns the exit status."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        _module(args.command).run(args[args.command])
    except AdaptnnError as err:
        print(f"adaptnn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(_module(args.command), "interrupted", None)
        message = hint(args[args.command], argv) if hint is not None else None
        print(message or f"interrupted; run again with: adaptnn {shlex.join(argv)}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
