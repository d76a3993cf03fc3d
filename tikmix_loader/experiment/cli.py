"""``tikmix experiment``'s command line: one flag per ``ExperimentConfig`` option, run or merge, print."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from tikmix_loader.errors import ConfigError, OptionError
from tikmix_loader.experiment import protocol
from tikmix_loader.experiment.config import FLAGS, ExperimentConfig
from tikmix_loader.experiment.corpus_splits import ensure_corpus
from tikmix_loader.experiment.leave_one_out import LOO_FILE, LOO_TABLE, loo_markdown, run_leave_one_out
from tikmix_loader.experiment.methods import METHOD_BUILDERS
from tikmix_loader.experiment.results import RESULTS_FILE, TABLE_FILE, merge_results
from tikmix_loader.experiment.stats import markdown_table


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


# Options that also take `none` on the command line, and the type of their other values.
_OPTIONAL_TYPES = {
    "half_life": float,
    "max_step": float,
    "m_every": int,
    "eval_samples": int,
    "hold_out": str,
    "targets": str,
    "quadmix_params": str,
}


def cli_flag(option: str) -> str:
    """The command-line flag of flat option name ``option`` (``quadmix_proxies``: ``--quadmix-proxies``)."""
    return f"--{option.replace('_', '-')}"


def _help_section(parser: argparse.ArgumentParser, group: str | None):
    """The ``--help`` section of the flags of ``ExperimentConfig``'s nested options ``group`` (None: its own
    fields), titled by the group and described by its options class."""
    if group is None:
        return parser.add_argument_group("experiment options")
    options = next(
        item.metadata["options"] for item in dataclasses.fields(ExperimentConfig) if item.name == group
    )
    summary = options.__doc__.splitlines()[0].replace("``", "")
    return parser.add_argument_group(f"{group.replace('_', '-')} options", summary)


def add_config_arguments(
    parser: argparse.ArgumentParser, defaults: ExperimentConfig, *, skip=(), hidden=()
) -> None:
    """One ``--flag`` per ``ExperimentConfig`` option (``FLAGS``) not in ``skip``, help from it, default from
    ``defaults``; ``--help`` lists them in one section per nested options group, except those in ``hidden``
    (accepted, so that one set of flags can serve several commands, but not listed)."""
    sections = {}
    for flag in FLAGS:
        if flag.name in skip:
            continue
        default = defaults.get(flag.name)
        if flag.name in hidden:
            target, help_text = parser, argparse.SUPPRESS
        else:
            if flag.group not in sections:
                sections[flag.group] = _help_section(parser, flag.group)
            shown = list(default) if isinstance(default, tuple) else default
            # argparse %-formats help strings, so a literal "%" must be doubled.
            target, help_text = sections[flag.group], f"{flag.help} (default: {shown})".replace("%", "%%")
        option = cli_flag(flag.name)
        if flag.name == "methods":
            target.add_argument(
                option, nargs="+", choices=list(METHOD_BUILDERS), default=list(default), help=help_text
            )
        elif flag.name == "seeds":
            target.add_argument(option, nargs="+", type=int, default=list(default), help=help_text)
        elif flag.name in _OPTIONAL_TYPES:
            target.add_argument(
                option, type=_optional(_OPTIONAL_TYPES[flag.name]), default=default, help=help_text
            )
        else:
            target.add_argument(option, type=type(default), default=default, help=help_text)


def config_from_args(args: argparse.Namespace, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """An ``ExperimentConfig`` from parsed ``add_config_arguments`` flags (missing ones from ``base``).

    Raises:
        ConfigError: a bad value; the message names the flags (``--quadmix-proxies``), not the fields.
    """
    base = base or ExperimentConfig()
    try:
        return ExperimentConfig.from_flat(
            **{flag.name: getattr(args, flag.name, base.get(flag.name)) for flag in FLAGS}
        )
    except OptionError as error:
        raise ConfigError(error.worded(cli_flag)) from error


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads when asked (on a shared machine, 1 thread is often faster than 2)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"`--threads` must be >= 1, got {threads}.")
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    if args.merge:
        results = merge_results(args.merge, args.out)
    else:
        apply_threads(args.threads)
        config = config_from_args(args)
        corpus = (
            ensure_corpus(args.corpus, progress=not args.no_progress) if args.build else Path(args.corpus)
        )
        if args.leave_one_out:
            pooled = run_leave_one_out(config, corpus, args.out, progress=not args.no_progress)
            print(loo_markdown(pooled))
            print(f"wrote {Path(args.out) / LOO_FILE} and {Path(args.out) / LOO_TABLE}")
            return 0
        results = protocol.run_experiment(config, corpus, args.out, progress=not args.no_progress)
    print(markdown_table(results["summary"], seeds=results["seeds"]))
    print(
        f"wrote {Path(args.out) / RESULTS_FILE} and {Path(args.out) / TABLE_FILE} "
        f"({results['wall_seconds']:.0f} s on {results['device']})"
    )
    return 0


def register(subparsers) -> None:
    """Add ``tikmix experiment``."""
    parser = subparsers.add_parser(
        "experiment",
        help="compare mixing methods on paired seeds by test loss (the mixture-quality protocol)",
        description=protocol.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--corpus", default="corpus", help="corpus directory DIR/<domain>/{train,val,test}/")
    parser.add_argument("--out", default="out/experiment", help="output directory (default: out/experiment)")
    parser.add_argument(
        "--build", action="store_true", help="build (or reuse) the built-in corpus in --corpus first"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--leave-one-out",
        action="store_true",
        help="hold out every domain in turn (OUT/hold-out-NAME/) and pool the paired differences over "
        "hold-outs x seeds into OUT/leave_one_out.{json,md}",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="combine the results of one protocol run in parts (split by --methods, --seeds or both) into "
        "--out (trains nothing; the other flags are ignored)",
    )
    add_config_arguments(parser, ExperimentConfig())
    parser.set_defaults(func=_run)
