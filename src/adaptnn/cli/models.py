"""List registered models."""

from __future__ import annotations

from jsonargparse import ArgumentParser, Namespace

HELP = "List registered models."


def build(parser: ArgumentParser) -> None:
    parser.add_argument("--pattern", type=str, default="*", help="fnmatch filter, e.g. 'mecnn_*'.")


def run(args: Namespace) -> None:
    from ..models import list_models

    print("\n".join(list_models(args.pattern)))
