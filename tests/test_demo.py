"""``tikmix demo`` end to end on a small text corpus: both runs, printout, plots, ledger and results.json."""

import json
from pathlib import Path

import pytest
from testkit.corpus import make_text_corpus

from tikmix_loader import ConfigError
from tikmix_loader.cli import main
from tikmix_loader.demo import DEMO_DEFAULTS
from tikmix_loader.experiment import ensure_corpus
from tikmix_loader.ledger import load_records, verify

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FLAGS = "--steps 8 --batch-size 4 --seq-len 32 --model micro --every 3 --k 8".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_text_corpus(tmp_path_factory.mktemp("demo"))


def _run_demo(corpus, out, flags):
    """``tikmix demo`` on ``corpus`` into ``out``, one torch thread, no progress bars; the exit code."""
    return main(
        ["demo", "--corpus", str(corpus), "--out", str(out), "--no-progress", "--threads", "1", *flags]
    )


def test_demo_end_to_end(corpus, tmp_path, capsys):
    manifest = (corpus / "manifest.json").read_bytes()
    out = tmp_path / "demo"
    assert _run_demo(corpus, out, FLAGS) == 0
    assert (corpus / "manifest.json").read_bytes() == manifest  # a from-text corpus is used as is

    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"stratified", "tikmix-d"} and results["seeds"] == [0]
    assert results["domains"] == ["prose", "numbers", "code"]
    for entry in results["methods"].values():
        assert set(entry["test_loss"]) == set(results["domains"]) and len(entry["train_loss"][0]) == 8
    assert results["config"]["steps"] == 8 and results["config"]["model"] == "micro"
    influence = results["last_influence"]
    assert (
        influence["domains"] == results["domains"] and len(influence["values"]) == 3
    )  # one row per val target
    assert influence["step"] == 5  # decisions after steps 2 and 5

    for name in ("weights", "influence", "loss_curves"):
        path = Path(results["files"][name])
        assert path.parent == out and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    ledger = Path(results["files"]["ledger"])
    assert verify(ledger).ok and [record["step"] for record in load_records(ledger)] == [2, 5]
    assert Path(results["files"]["table"]) == out / "results.md" and (out / "results.md").is_file()

    printed = capsys.readouterr().out
    assert str(out / "results.md") in printed  # the "wrote ..." line lists the table too
    for text in (
        "test loss (nats/token",
        "average",
        "final mixture weights",
        "last influence matrix",
        "prose/val",
    ):
        assert text in printed
    assert f"{results['methods']['tikmix-d']['avg_test_loss'][0]:.4f}" in printed


def test_demo_shorter_than_one_decision_still_writes_its_loss_plot_and_results(corpus, tmp_path, capsys):
    out = tmp_path / "short"
    flags = [*FLAGS]
    flags[flags.index("--steps") + 1] = "2"  # decisions every 3 steps: none is made
    assert _run_demo(corpus, out, flags) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["decisions"] == 0 and results["last_influence"] is None
    assert set(results["files"]) == {"loss_curves", "results", "table"}
    assert Path(results["files"]["loss_curves"]).read_bytes()[:8] == PNG_MAGIC
    assert "TiKMiX-D made no decision in 2 steps" in capsys.readouterr().out


def test_demo_defaults_are_the_two_methods_on_one_seed():
    assert DEMO_DEFAULTS.methods == ("stratified", "tikmix-d") and DEMO_DEFAULTS.seeds == (0,)
    assert DEMO_DEFAULTS.model == "tiny"


def test_demo_refuses_a_folder_that_is_not_a_corpus(tmp_path):
    (tmp_path / "stray.txt").write_text("not a corpus")
    with pytest.raises(ConfigError, match="holds no manifest.json"):
        ensure_corpus(tmp_path, progress=False)
