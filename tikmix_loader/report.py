"""PNG plots of a mixture ledger: weight trajectories, the latest influence heatmap and solver objectives.

The plots are drawn with matplotlib's object API on the Agg canvas (no ``pyplot``), so they need no display,
leave no global figure state behind, and can run inside a training process.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tikmix_loader.errors import ConfigError, LedgerError
from tikmix_loader.ledger import load_records

X_AXES = {"step": "step", "tokens": "tokens_seen"}
MAX_TICK_LABELS = 60
ANNOTATE_MAX_CELLS = 100


def new_figure(width: float, height: float):
    """A new figure on the Agg canvas; matplotlib is imported here so other ``tikmix`` commands skip its
    import cost."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _x_key(x: str) -> str:
    if x not in X_AXES:
        raise ConfigError(f"Report `x` must be one of {sorted(X_AXES)}, got {x!r}.")
    return X_AXES[x]


def domain_colors(count: int) -> list:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["turbo"](value) for value in np.linspace(0.0, 1.0, count)]


def _number(value) -> float:
    """A ledger value as a float for plotting; None (a value that did not exist) becomes a gap."""
    return math.nan if value is None else float(value)


def plot_weights(records: Sequence[dict], *, x: str = "step"):
    """Mixture weights over training, one step line per domain.

    Each decision's ``weights_after`` holds from its step until the next decision; the first point is the
    first record's ``weights_before`` at 0. A domain absent from a record is drawn as a gap.

    Args:
        records (Sequence[dict]): Ledger records in order, e.g. from ``tikmix_loader.ledger.load_records``.
        x (str): ``"step"`` or ``"tokens"`` on the x axis. Default: ``"step"``.

    Returns:
        matplotlib.figure.Figure: The figure; its axes hold one line per domain, labelled with its name.

    Raises:
        ConfigError: ``x`` is unknown.
        LedgerError: ``records`` is empty.
    """
    key = _x_key(x)
    if not records:
        raise LedgerError("The ledger has no records; there are no weights to plot.")
    domains = sorted({domain for record in records for domain in record["weights_after"]})
    xs = [0, *(record[key] for record in records)]
    figure = new_figure(9.0, 4.5)
    axes = figure.add_subplot()
    for domain, color in zip(domains, domain_colors(len(domains)), strict=True):
        ys = [_number(records[0]["weights_before"].get(domain))]
        ys += [_number(record["weights_after"].get(domain)) for record in records]
        # Markers show each decision's value, including the last, which a bare step line hides in a riser.
        axes.step(xs, ys, where="post", label=domain, color=color, linewidth=1.5, marker="o", markersize=3)
    axes.set_xlabel("training step" if x == "step" else "tokens seen")
    axes.set_ylabel("mixture weight")
    axes.set_ylim(bottom=0.0)
    axes.set_title(f"Mixture weights ({len(records)} decisions, method {records[-1]['method']})")
    axes.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize="small", ncols=1 + len(domains) // 20)
    return figure


def _thin_ticks(count: int) -> np.ndarray:
    """Tick positions: every label up to ``MAX_TICK_LABELS``, evenly thinned beyond that."""
    return np.arange(0, count, max(1, math.ceil(count / MAX_TICK_LABELS)))


def plot_influence(records: Sequence[dict]):
    """Heatmap of the last recorded influence matrix S (targets x domains); positive means helpful.

    The colour scale is symmetric about zero so the sign reads at a glance; small matrices get their values
    written in the cells.

    Args:
        records (Sequence[dict]): Ledger records in order.

    Returns:
        matplotlib.figure.Figure | None: The figure, or None when no record holds an influence matrix.
    """
    record = next((record for record in reversed(records) if record["influence"] is not None), None)
    if record is None:
        return None
    influence = record["influence"]
    values = np.asarray(influence["values"], dtype=np.float64)
    targets, domains = influence["targets"], influence["domains"]
    width = min(max(3.0 + 0.4 * len(domains), 6.0), 24.0)
    height = min(max(2.0 + 0.4 * len(targets), 3.5), 16.0)
    figure = new_figure(width, height)
    axes = figure.add_subplot()
    limit = float(np.abs(values).max()) or 1.0
    image = axes.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    columns, rows = _thin_ticks(len(domains)), _thin_ticks(len(targets))
    axes.set_xticks(columns, [domains[i] for i in columns], rotation=90, fontsize="small")
    axes.set_yticks(rows, [targets[i] for i in rows], fontsize="small")
    axes.set_xlabel("domain")
    axes.set_ylabel("target")
    axes.set_title(f"Group Influence S at step {record['step']} ({record['method']})")
    if values.size <= ANNOTATE_MAX_CELLS:
        for (row, column), value in np.ndenumerate(values):
            shade = "white" if abs(value) > 0.6 * limit else "black"
            axes.text(column, row, f"{value:.2g}", ha="center", va="center", fontsize="x-small", color=shade)
    figure.colorbar(image, ax=axes, label="S[target, domain] (positive = helpful)")
    return figure


def plot_solver(records: Sequence[dict], *, x: str = "step"):
    """The solver's objective and each of its terms over decisions; fallbacks are marked by red lines.

    Args:
        records (Sequence[dict]): Ledger records in order.
        x (str): ``"step"`` or ``"tokens"`` on the x axis. Default: ``"step"``.

    Returns:
        matplotlib.figure.Figure | None: The figure, or None when no record has an objective or terms.
    """
    key = _x_key(x)
    solved = [record for record in records if record["solver"] is not None]
    terms = sorted({term for record in solved for term in (record["solver"]["terms"] or {})})
    has_objective = any(record["solver"]["objective"] is not None for record in solved)
    if not terms and not has_objective:
        return None
    xs = [record[key] for record in solved]
    figure = new_figure(9.0, 4.5)
    axes = figure.add_subplot()
    for term in terms:
        ys = [_number((record["solver"]["terms"] or {}).get(term)) for record in solved]
        axes.plot(xs, ys, marker="o", markersize=3, label=term)
    if has_objective:
        ys = [_number(record["solver"]["objective"]) for record in solved]
        axes.plot(xs, ys, color="black", linestyle="--", marker="s", markersize=3, label="objective")
    fallbacks = [record[key] for record in solved if record["solver"]["fallback"]]
    for i, position in enumerate(fallbacks):
        axes.axvline(position, color="red", linestyle=":", alpha=0.6, label="fallback" if i == 0 else None)
    axes.set_xlabel("training step" if x == "step" else "tokens seen")
    axes.set_ylabel("value")
    axes.set_title(f"Solver objective terms ({len(solved)} solves, {len(fallbacks)} fallbacks)")
    axes.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize="small")
    return figure


def write_report(
    ledger: str | os.PathLike, out_dir: str | os.PathLike, *, x: str = "step", dpi: int = 100
) -> dict[str, Path]:
    """Verify a ledger and write its plots as PNG files.

    Writes ``weights.png`` always, ``influence.png`` when a record holds S, and ``solver.png`` when a record
    has solver terms or an objective.

    Args:
        ledger (str | PathLike): The ledger JSONL file; it must pass :func:`tikmix_loader.ledger.verify`.
        out_dir (str | PathLike): Directory for the PNGs; created if missing.
        x (str): ``"step"`` or ``"tokens"`` on the x axis of the trajectory plots. Default: ``"step"``.
        dpi (int): Resolution; a figure of w x h inches becomes a (h * dpi) x (w * dpi) image. Default: 100.

    Returns:
        dict[str, Path]: Plot name (``"weights"``, ``"influence"``, ``"solver"``) to the file written.

    Raises:
        LedgerError: The ledger is missing, damaged or empty.
        ConfigError: ``x`` or ``dpi`` is invalid.
    """
    _x_key(x)
    if isinstance(dpi, bool) or not isinstance(dpi, int) or not 10 <= dpi <= 1000:
        raise ConfigError(f"Report `dpi` must be an int in [10, 1000], got {dpi!r}.")
    records = load_records(ledger)
    figures = {
        "weights": plot_weights(records, x=x),
        "influence": plot_influence(records),
        "solver": plot_solver(records, x=x),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, figure in figures.items():
        if figure is not None:
            written[name] = out / f"{name}.png"
            figure.savefig(written[name], dpi=dpi)
    return written


def _report_command(args) -> int:
    written = write_report(args.ledger, args.out, x=args.x, dpi=args.dpi)
    for name in ("influence", "solver"):
        if name not in written:
            print(f"note: no record has {name} data; {name}.png not written", file=sys.stderr)
    for path in written.values():
        print(path)
    return 0


def register(subparsers) -> None:
    """Add ``tikmix report LEDGER --out DIR`` to the ``tikmix`` console script."""
    parser = subparsers.add_parser(
        "report",
        help="Plot a mixture ledger (weights, influence heatmap, solver terms) as PNG files.",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("ledger", help="The ledger JSONL file (verified before plotting).")
    parser.add_argument("--out", required=True, help="Directory for the PNG files.")
    parser.add_argument("--x", choices=sorted(X_AXES), default="step", help="X axis of the trajectories.")
    parser.add_argument("--dpi", type=int, default=100, help="Image resolution (default: 100).")
    parser.set_defaults(func=_report_command)
