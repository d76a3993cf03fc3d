"""The influence drift benchmark: its probe leaves online TiKMiX-D's training untouched, and it reports."""

import json

import numpy as np
import pytest
from testkit.corpus import make_text_corpus

from tikmix_loader._bench_commands import _repo_benchmark
from tikmix_loader.experiment import ExperimentConfig, load_splits, train_method

SMALL = {"steps": 8, "batch_size": 4, "seq_len": 32, "model": "micro", "device": "cpu", "every": 3, "k": 8}
SMALL.update(target_samples=4, target_batch_size=4)


@pytest.fixture(scope="module")
def drift():
    return _repo_benchmark("bench_influence_drift")


def test_probe_measures_fresh_influence_without_changing_the_online_run(drift, tmp_path, capsys):
    corpus = make_text_corpus(tmp_path / "corpus")
    config = ExperimentConfig.from_flat(methods=("tikmix-d",), seeds=(0,), **SMALL)
    records = drift.run_seed(config, str(corpus), 0, samples=4, progress=False)
    splits = load_splits(corpus)
    plain = train_method(
        "tikmix-d", 0, config=config, train_domains=splits.train, val_domains=splits.val, progress=False
    )
    # Same decisions as the experiment's own online TiKMiX-D: the fresh passes did not disturb training.
    assert [r["step"] for r in records] == [d["step"] for d in plain.result.decisions] == [2, 5]
    for record, decision in zip(records, plain.result.decisions):
        assert record["weights_online"] == pytest.approx(list(decision["weights"].values()))
        online, (first, second) = (
            np.array(record["influence_online"]),
            map(np.array, record["influence_fresh"]),
        )
        assert online.shape == first.shape == (3, 3) and not np.allclose(first, second)  # independent draws
        assert record["corr_fresh_fresh"] == pytest.approx(np.corrcoef(first.ravel(), second.ravel())[0, 1])
        assert record["negative_diagonal_online"] == int((np.diag(online) < 0).sum())

    out = tmp_path / "drift.json"
    args = ["--corpus", str(corpus), "--seeds", "0", "--samples", "4", "--no-progress", "--json", str(out)]
    args += [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]
    drift.main(args)
    assert "| L1 of the mixture to the prior (median) |" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["config"]["steps"] == 8 and len(saved["records"]) == 2


def test_probe_measures_adam_influence_with_the_runs_optimizer(drift, tmp_path):
    corpus = make_text_corpus(tmp_path / "corpus")
    config = ExperimentConfig.from_flat(methods=("tikmix-d",), seeds=(0,), preconditioner="adam", **SMALL)
    records = drift.run_seed(config, str(corpus), 0, samples=4, progress=False)
    assert [r["step"] for r in records] == [2, 5]
    assert all(
        np.isfinite(r["influence_fresh"]).all() and np.isfinite(r["influence_online"]).all() for r in records
    )
