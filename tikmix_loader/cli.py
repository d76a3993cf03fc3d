"""The ``tikmix`` console script: one subcommand per job, each defined beside the code it drives.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its subcommand(s) and sets
``func`` on the parser it adds. Modules are imported only when the script runs, so ``import tikmix_loader``
stays light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tikmix_loader.errors import TikmixError

COMMAND_MODULES = (
    "tikmix_loader.data.convert",
    "tikmix_loader.data.corpus",
    "tikmix_loader.demo",
    "tikmix_loader.experiment",
    "tikmix_loader._bench_commands",
    "tikmix_loader.ledger",
    "tikmix_loader.report",
)


def build_parser() -> argparse.ArgumentParser:
    """The full ``tikmix`` argument parser."""
    parser = argparse.ArgumentParser(prog="tikmix", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``tikmix``; a ``TikmixError`` prints its message and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TikmixError as exc:
        print(f"tikmix {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
