"""``tikmix demo``: train the tiny GPT with stratified sampling and with online TiKMiX-D, and compare them.

It prints and plots what the adaptive mixture did and what it bought.

The demo is the experiment protocol (``tikmix_loader.experiment``) cut down to one seed and two methods: the
same model, initialisation, data order and LR schedule for both runs; TiKMiX-D measures Group Influence online
(from the training backward passes) against small batches of every domain's val split and re-solves the
mixture every ``--every`` steps; both models are scored on a fixed subset of every domain's test split.
The defaults take about three minutes on two CPU cores (see ``DEFAULT_STEPS``) and use a GPU when present.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tikmix_loader.experiment import (
    FLAG_NAMES,
    RESULTS_FILE,
    TABLE_FILE,
    ExperimentConfig,
    add_config_arguments,
    apply_threads,
    config_from_args,
    ensure_corpus,
    run_experiment,
    write_results,
)
from tikmix_loader.ledger import load_records

# The report module's Agg figure and palette helpers, so the demo's plots match `tikmix report`'s.
from tikmix_loader.report import domain_colors, new_figure, write_report

METHODS = ("stratified", "tikmix-d")
LOSS_PLOT = "loss_curves.png"
# Sized by measurement (`time tikmix demo --threads 1` on 2 shared CPU cores): two runs of 300 steps of
# 16 x 128 tokens, with the influence passes, test scoring and plots, take about three minutes.
DEFAULT_STEPS = 300
DEMO_DEFAULTS = ExperimentConfig.from_flat(
    methods=METHODS,
    seeds=(0,),
    steps=DEFAULT_STEPS,
    batch_size=16,
    seq_len=128,
    model="tiny",
    every=30,
    half_life=60.0,
    target_samples=16,
    target_batch_size=16,
    eval_samples=128,
)
# The demo's own flags; the rest of ExperimentConfig keeps DEMO_DEFAULTS.
DEMO_FLAGS = ("steps", "batch_size", "seq_len", "model", "device", "every", "k", "lr")


def run_demo(
    config: ExperimentConfig = DEMO_DEFAULTS,
    *,
    corpus: str | Path = "corpus",
    out: str | Path = "out/demo",
    progress: bool = True,
) -> dict:
    """Run both methods, print their scores, weights and last influence matrix, and write plots to ``out``.

    Args:
        config (ExperimentConfig): The protocol; its ``methods`` must be stratified and tikmix-d.
            Default: ``DEMO_DEFAULTS``.
        corpus (str | Path): Corpus directory: the built-in corpus is built (or reused) there, and a corpus
            made by ``tikmix corpus from-text`` is used as is. Default: ``"corpus"``.
        out (str | Path): Output directory. Default: ``"out/demo"``.
        progress (bool): Show progress bars. Default: True.

    Returns:
        dict: ``results.json``'s content: the experiment's results plus ``files`` (what was written) and
        ``last_influence`` (S of the last TiKMiX-D decision).
    """
    out = Path(out)
    ensure_corpus(corpus, progress=progress)
    results = run_experiment(config, corpus, out, progress=progress)
    ledger = Path(results["methods"]["tikmix-d"]["ledgers"][0])
    # A run shorter than one decision interval leaves no ledger records (or no ledger file): the loss plot
    # and results are still written, and the summary says that the weights never moved.
    records = load_records(ledger) if ledger.exists() else []
    files = {name: str(path) for name, path in write_report(ledger, out).items()} if records else {}
    files["loss_curves"] = str(_plot_losses(results, out / LOSS_PLOT))
    if records:
        files["ledger"] = str(ledger)
    files["results"] = str(out / RESULTS_FILE)
    files["table"] = str(out / TABLE_FILE)
    results["decisions"] = len(records)
    last = next((record for record in reversed(records) if record["influence"] is not None), None)
    results["last_influence"] = None if last is None else {"step": last["step"], **last["influence"]}
    results["files"] = files
    write_results(results, out)
    print(format_results(results))
    return results


def format_results(results: dict) -> str:
    """Per-domain and average test loss, final weights of both runs, and the last influence matrix."""
    names = results["domains"]
    methods = results["methods"]
    width = max(12, *(len(name) + 2 for name in names))
    lines = ["", "test loss (nats/token, lower is better)"]
    lines.append(f"  {'domain':<{width}}" + "".join(f"{method:>14}" for method in methods))
    for name in names:
        lines.append(
            f"  {name:<{width}}"
            + "".join(f"{entry['test_loss'][name][0]:>14.4f}" for entry in methods.values())
        )
    for label, key in (("average", "avg_test_loss"), ("worst domain", "worst_test_loss")):
        lines.append(f"  {label:<{width}}" + "".join(f"{entry[key][0]:>14.4f}" for entry in methods.values()))
    lines += ["", "final mixture weights"]
    lines.append(f"  {'domain':<{width}}" + "".join(f"{method:>14}" for method in methods))
    for index, name in enumerate(names):
        lines.append(
            f"  {name:<{width}}"
            + "".join(f"{entry['final_weights'][0][index]:>14.3f}" for entry in methods.values())
        )
    if results.get("decisions") == 0:
        lines += [
            "",
            f"TiKMiX-D made no decision in {results['config']['steps']} steps (it decides every "
            f"{results['config']['every']} steps), so its weights stayed at the prior; run more steps.",
        ]
    influence = results.get("last_influence")
    if influence is not None:
        lines += [
            "",
            f"last influence matrix S[target, domain] at step {influence['step']} (positive = helpful)",
        ]
        lines.append(f"  {'target':<{width}}" + "".join(f"{name:>12}" for name in influence["domains"]))
        for target, row in zip(influence["targets"], influence["values"], strict=True):
            lines.append(f"  {target:<{width}}" + "".join(f"{value:>12.3g}" for value in row))
    flops = methods["tikmix-d"]["decision_flops"] / methods["tikmix-d"]["train_flops"]
    lines += [
        "",
        f"TiKMiX-D decision compute: {methods['tikmix-d']['decision_flops']:.3g} FLOPs "
        f"({100 * flops:.1f}% of its training FLOPs); wall time {results['wall_seconds']:.0f} s "
        f"on {results['device']}",
    ]
    files = results.get("files", {})
    if files:
        lines.append("wrote " + ", ".join(sorted(files.values())))
    return "\n".join(lines)


def _smooth(values: list[float], span: int) -> np.ndarray:
    """Exponential moving average (span ``span``) so the curves of two runs can be told apart."""
    alpha = 2.0 / (span + 1)
    out = np.empty(len(values))
    running = values[0]
    for index, value in enumerate(values):
        running = alpha * value + (1 - alpha) * running
        out[index] = running
    return out


def _plot_losses(results: dict, path: Path) -> Path:
    """Training loss of both runs (smoothed) and per-domain test loss side by side."""
    figure = new_figure(12.0, 4.5)
    curves, bars = figure.subplots(1, 2)
    names = results["domains"]
    methods = results["methods"]
    colors = domain_colors(len(methods))
    for (method, entry), color in zip(methods.items(), colors, strict=True):
        losses = entry["train_loss"][0]
        curves.plot(
            np.arange(len(losses)), _smooth(losses, max(5, len(losses) // 30)), label=method, color=color
        )
    curves.set_xlabel("training step")
    curves.set_ylabel("training loss (nats/token, EMA)")
    curves.set_title("Training loss")
    curves.grid(alpha=0.3)
    curves.legend()
    positions = np.arange(len(names) + 1)
    width = 0.8 / len(methods)
    for offset, ((method, entry), color) in enumerate(zip(methods.items(), colors, strict=True)):
        values = [entry["test_loss"][name][0] for name in names] + [entry["avg_test_loss"][0]]
        bars.bar(
            positions + (offset - (len(methods) - 1) / 2) * width, values, width, label=method, color=color
        )
    bars.set_xticks(positions, [*names, "average"], rotation=30)
    bars.set_ylabel("test loss (nats/token)")
    bars.set_title("Test loss per domain")
    low = min(min(entry["test_loss"][name][0] for name in names) for entry in methods.values())
    bars.set_ylim(bottom=0.9 * low)
    bars.legend()
    figure.savefig(path, dpi=100)
    return path


def _run(args: argparse.Namespace) -> int:
    apply_threads(args.threads)
    args.seeds = [args.seed]
    run_demo(
        config_from_args(args, DEMO_DEFAULTS), corpus=args.corpus, out=args.out, progress=not args.no_progress
    )
    return 0


def register(subparsers) -> None:
    """Add ``tikmix demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="train the tiny GPT with stratified sampling and with online TiKMiX-D, and compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--corpus",
        default="corpus",
        help="corpus dir: a from-text corpus is used as is, else the built-in one is built or reused there",
    )
    parser.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation and data order (default: 0)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_config_arguments(parser, DEMO_DEFAULTS, skip=set(FLAG_NAMES) - set(DEMO_FLAGS))
    parser.set_defaults(func=_run)
