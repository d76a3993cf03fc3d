"""Tests for the ledger plots: the data drawn, the PNG files written, and the ``tikmix report`` command."""

import matplotlib.image
import numpy as np
import pytest

from tikmix_loader.errors import ConfigError, LedgerError
from tikmix_loader.ledger import MixtureLedger, load_records
from tikmix_loader.report import plot_influence, plot_solver, plot_weights, write_report

DOMAINS = ("code", "math", "web")
TARGETS = ("val_code", "val_web")
WEIGHTS = [(1 / 3, 1 / 3, 1 / 3), (0.5, 0.2, 0.3), (0.6, 0.1, 0.3), (0.6, 0.1, 0.3), (0.4, 0.4, 0.2)]


def influence_at(i: int) -> np.ndarray:
    return np.array([[1.0, -0.5, 0.25], [-2.0, 0.5, 3.0]]) * (i + 1)


def build_ledger(path, *, with_influence=True, with_solver=True) -> MixtureLedger:
    """Four decisions; the third fell back to the prior and the last one carries no S."""
    ledger = MixtureLedger(path, fsync=False)
    for i in range(4):
        fallback = i == 2
        ledger.append(
            {
                "step": 50 * (i + 1),
                "tokens_seen": 1000 * (i + 1),
                "method": "tikmix_d",
                "weights_before": dict(zip(DOMAINS, WEIGHTS[i], strict=True)),
                "weights_after": dict(zip(DOMAINS, WEIGHTS[i + 1], strict=True)),
                "influence": (
                    {"targets": list(TARGETS), "domains": list(DOMAINS), "values": influence_at(i)}
                    if with_influence and i < 3
                    else None
                ),
                "solver": (
                    {
                        "status": "fallback" if fallback else "success",
                        "reason": "Pareto constraint infeasible" if fallback else None,
                        "objective": None if fallback else -1.0 - i,
                        "terms": None if fallback else {"std": 0.1 * i, "sum": -1.0, "entropy": 1.0},
                        "iterations": 4,
                        "fallback": fallback,
                    }
                    if with_solver
                    else None
                ),
            }
        )
    return ledger


@pytest.fixture
def ledger_path(tmp_path):
    path = tmp_path / "ledger.jsonl"
    build_ledger(path)
    return path


@pytest.mark.parametrize(
    ("x", "positions"), [("step", [0, 50, 100, 150, 200]), ("tokens", [0, 1e3, 2e3, 3e3, 4e3])]
)
def test_weight_trajectories_draw_each_domain(ledger_path, x, positions):
    axes = plot_weights(load_records(ledger_path), x=x).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert sorted(lines) == sorted(DOMAINS)
    for d, domain in enumerate(DOMAINS):
        np.testing.assert_allclose(lines[domain].get_xdata(), positions)
        np.testing.assert_allclose(lines[domain].get_ydata(), [w[d] for w in WEIGHTS])
        assert lines[domain].get_drawstyle() == "steps-post"


def test_influence_heatmap_shows_the_last_matrix_with_labels(ledger_path):
    figure = plot_influence(load_records(ledger_path))
    axes = figure.axes[0]
    image = axes.images[0]
    # Record 4 has no S, so the heatmap is record 3's.
    np.testing.assert_allclose(image.get_array(), influence_at(2))
    assert image.get_clim() == (-9.0, 9.0)  # symmetric about zero, so the sign reads as colour
    assert [label.get_text() for label in axes.get_xticklabels()] == list(DOMAINS)
    assert [label.get_text() for label in axes.get_yticklabels()] == list(TARGETS)
    assert "step 150" in axes.get_title()
    assert len(axes.texts) == influence_at(2).size


def test_influence_heatmap_thins_labels_of_a_wide_matrix():
    domains = [f"d{i}" for i in range(256)]
    record = {
        "step": 1,
        "method": "m",
        "influence": {"targets": ["t"], "domains": domains, "values": [[0.0] * 256]},
    }
    axes = plot_influence([record]).axes[0]
    labels = [label.get_text() for label in axes.get_xticklabels()]
    assert 30 <= len(labels) <= 60 and labels[:2] == ["d0", "d5"]
    assert axes.images[0].get_clim() == (-1.0, 1.0) and not axes.texts


def test_solver_plot_draws_terms_objective_and_fallbacks(ledger_path):
    axes = plot_solver(load_records(ledger_path)).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {"std", "sum", "entropy", "objective", "fallback"}
    np.testing.assert_allclose(lines["objective"].get_ydata(), [-1.0, -2.0, np.nan, -4.0])
    np.testing.assert_allclose(lines["std"].get_ydata(), [0.0, 0.1, np.nan, 0.3])
    assert list(lines["fallback"].get_xdata()) == [150, 150]


def test_optional_plots_are_skipped_without_data(tmp_path):
    build_ledger(tmp_path / "bare.jsonl", with_influence=False, with_solver=False)
    records = load_records(tmp_path / "bare.jsonl")
    assert plot_influence(records) is None and plot_solver(records) is None
    assert set(write_report(tmp_path / "bare.jsonl", tmp_path / "out")) == {"weights"}


def test_write_report_writes_readable_pngs(ledger_path, tmp_path):
    records = load_records(ledger_path)
    sizes = {
        "weights": plot_weights(records).get_size_inches(),
        "influence": plot_influence(records).get_size_inches(),
        "solver": plot_solver(records).get_size_inches(),
    }
    written = write_report(ledger_path, tmp_path / "plots" / "new", dpi=50)
    assert set(written) == set(sizes)
    for name, path in written.items():
        assert path == tmp_path / "plots" / "new" / f"{name}.png" and path.stat().st_size > 0
        image = matplotlib.image.imread(path)
        width, height = sizes[name]
        assert image.shape == (round(height * 50), round(width * 50), 4)
        assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_report_errors(tmp_path, ledger_path):
    with pytest.raises(ConfigError, match=r"Report `x` must be one of \['step', 'tokens'\], got 'time'"):
        write_report(ledger_path, tmp_path / "out", x="time")
    with pytest.raises(ConfigError, match=r"Report `dpi` must be an int in \[10, 1000\], got 0"):
        write_report(ledger_path, tmp_path / "out", dpi=0)
    MixtureLedger(tmp_path / "empty.jsonl")
    with pytest.raises(LedgerError, match="no records"):
        write_report(tmp_path / "empty.jsonl", tmp_path / "out")
    lines = ledger_path.read_text().splitlines(keepends=True)
    ledger_path.write_text("".join(lines[:1] + lines[2:]))
    with pytest.raises(LedgerError, match=r"damaged at line 2: .*record 1 was deleted"):
        write_report(ledger_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_report(tmp_path, ledger_path, run_cli, capsys):
    out = tmp_path / "report"
    assert run_cli(["report", str(ledger_path), "--out", str(out), "--x", "tokens", "--dpi", "40"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "weights.png"), str(out / "influence.png"), str(out / "solver.png")]
    assert matplotlib.image.imread(out / "weights.png").shape == (180, 360, 4)

    bare = tmp_path / "bare.jsonl"
    build_ledger(bare, with_influence=False)
    assert run_cli(["report", str(bare), "--out", str(tmp_path / "bare")]) == 0
    assert "no record has influence data; influence.png not written" in capsys.readouterr().err

    ledger_path.write_bytes(ledger_path.read_bytes()[:-10])
    assert run_cli(["report", str(ledger_path), "--out", str(out)]) == 2
    assert "tikmix report: error: Ledger" in capsys.readouterr().err
