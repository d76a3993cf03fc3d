"""The ``tikmix`` console script: one subcommand per job, each defined beside the code it drives.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its subcommand(s) and sets
``func`` on the parser it adds. ``COMMANDS`` maps each subcommand to its module so that ``tikmix NAME …``
imports only that module: ``tikmix convert`` never pays for torch, which the training commands import.
``tikmix`` alone or ``tikmix --help`` imports them all to list every subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tikmix_loader.errors import TikmixError

COMMANDS = {
    "convert": "tikmix_loader.data.convert",
    "corpus": "tikmix_loader.data.corpus",
    "demo": "tikmix_loader.demo",
    "experiment": "tikmix_loader.experiment",
    "bench": "tikmix_loader._bench_commands",
    "ledger": "tikmix_loader.ledger",
    "report": "tikmix_loader.report",
    "score": "tikmix_loader.quality.scorers",
}
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``tikmix`` argument parser; with ``argv`` naming a subcommand, only that one is registered."""
    parser = argparse.ArgumentParser(prog="tikmix", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = next((arg for arg in argv or () if not arg.startswith("-")), None)
    wanted = COMMANDS.get(command)
    for module_name in (wanted,) if wanted in COMMAND_MODULES else COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``tikmix``; a ``TikmixError`` prints its message and exits with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TikmixError as exc:
        print(f"tikmix {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
