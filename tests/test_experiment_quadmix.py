"""The QuaDMix experiment methods: criteria, top-k filters, implied weights, served noise, the search command
and the protocol end to end on a tiny scored corpus with labelled noise."""

import json
import re

import numpy as np
import pytest
from testkit.corpus import kept_by_hand, make_scored_noisy_corpus

from tikmix_loader import ConfigError
from tikmix_loader.cli import main
from tikmix_loader.data.corpus import NOISE_LABELS_FILE
from tikmix_loader.experiment import ExperimentConfig, load_splits, merge_results, run_experiment
from tikmix_loader.experiment.config import FLAG_NAMES
from tikmix_loader.experiment.quadmix import SEARCH_FLAGS
from tikmix_loader.experiment.quality import ScoredDomains, parse_criteria, served_noise, topk_params
from tikmix_loader.ledger import MixtureLedger
from tikmix_loader.models.tiny_gpt import GPTConfig, flops_per_token
from tikmix_loader.quality import QualityParams, QualitySampler
from tikmix_loader.quality.search import read_quadmix_params

FAST = {
    "steps": 8,
    "batch_size": 4,
    "seq_len": 32,
    "model": "micro",
    "device": "cpu",
    "every": 4,
    "k": 8,
    "target_samples": 4,
    "target_batch_size": 4,
    "eval_samples": 8,
    "num_workers": 0,
    "quadmix_criteria": "compression,repetition",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_scored_noisy_corpus(tmp_path_factory.mktemp("quadmix"))


def test_criteria_take_the_scorers_orientation_unless_told():
    assert parse_criteria("ref_ppl, clf:higher,mine") == {
        "ref_ppl": "lower",
        "clf": "higher",
        "mine": "lower",
    }
    for bad in ("", "a,a", "a:best"):
        with pytest.raises(ConfigError, match="criteria"):
            parse_criteria(bad)


def test_topk_keeps_the_best_share_of_tokens(corpus):
    params = topk_params(["repetition", "compression"], "compression", 0.8)
    assert params.alpha == (0.0, 1.0) and params.eta == 0 and params.eps == 0
    for domain in load_splits(corpus).train:
        scores = {"compression": np.arange(domain.num_docs), "repetition": np.zeros(domain.num_docs)}
        criteria = {"repetition": "lower", "compression": "lower"}
        sampler = QualitySampler(domain.name, scores, domain.doc_lengths, criteria, params)
        expected = kept_by_hand(domain.doc_lengths.astype(float), 0.8).astype(float)
        np.testing.assert_array_equal(sampler.expected_copies, expected)
    with pytest.raises(ConfigError, match="topk-ref_ppl"):
        topk_params(["compression"], "ref_ppl", 0.8)


def test_implied_weights_are_expected_tokens_by_hand(corpus):
    train = load_splits(corpus).train
    params = {
        "prose": QualityParams((1.0, 0.0), 50.0, 0.5, 1.0, 0.001),
        "code": QualityParams((0, 1), 0, 1, 0, 0),
    }
    scored = ScoredDomains(train, {"compression": "lower", "repetition": "lower"})
    weights = scored.implied_weights(params)
    tokens = {}
    for domain in train:
        lengths = domain.doc_lengths.astype(float)
        if domain.name == "prose":  # ranked in storage order: mid-rank percentiles by hand
            r = (np.cumsum(lengths) - lengths / 2) / lengths.sum()
            copies = np.where(r <= 0.5, (2 / (1 + np.exp(-50 * (0.5 - r)))) ** 1.0, 0) + 0.001
        else:  # "code": omega = 1, eta = 0 -> every document once; "numbers" has no parameters -> once
            copies = np.ones(len(lengths))
        tokens[domain.name] = float(copies @ lengths)
    total = sum(tokens.values())
    assert weights == pytest.approx({name: value / total for name, value in tokens.items()})
    assert scored.expected_tokens(params) == pytest.approx(tokens)
    assert scored.keeps(params, min(tokens.values())) and not scored.keeps(params, min(tokens.values()) + 1)


def test_served_noise_shares_by_hand(corpus):
    train = load_splits(corpus).train
    served = {domain.name: np.zeros(domain.num_docs) for domain in train}
    labels = {d.name: np.load(corpus / d.name / "train" / NOISE_LABELS_FILE) for d in train}
    first_noisy = int(np.flatnonzero(labels["prose"])[0])
    served["prose"][0] = 30  # a clean document
    served["prose"][first_noisy] = 10
    served["code"][0] = 60
    report = served_noise(corpus, train, served)
    noisy_pool = sum(float(d.doc_lengths[labels[d.name] == 1].sum()) for d in train)
    pool = noisy_pool / sum(float(d.doc_lengths.sum()) for d in train)
    assert report["shuffled_words"]["share"] == pytest.approx(10 / 100)
    assert report["shuffled_words"]["pool"] == pytest.approx(pool)
    assert report["noisy"]["rate"] == pytest.approx(0.1 / pool)
    assert report["char_noise"]["share"] == 0 and report["char_noise"]["pool"] == 0
    assert served_noise(corpus.parent / "elsewhere", train, served) == {}  # no labels: nothing to report


def test_search_help_lists_only_the_flags_the_search_reads(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_info:
        main(["quadmix", "search", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    # argparse wraps the options to the terminal; the module docstring and the epilog are printed raw.
    assert max(len(line) for line in text.splitlines()) <= 110
    listed = set(re.findall(r"--[a-z][a-z-]*", text))
    config_flags = {f"--{name.replace('_', '-')}" for name in FLAG_NAMES}
    assert listed & config_flags == {f"--{name.replace('_', '-')}" for name in SEARCH_FLAGS}
    assert {"--quadmix-proxies", "--steps", "--corpus", "--seed"} <= listed
    assert not {"--regmix-proxies", "--m-candidates", "--methods", "--hold-out", "--quadmix-params"} & listed


def test_search_command_and_the_protocol_end_to_end(corpus, tmp_path, capsys):
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in FAST.items()]  # the experiment's, too
    search_file = tmp_path / "quadmix.json"
    search = ["--quadmix-proxies", "10", "--quadmix-candidates", "300", "--quadmix-val-samples", "4"]
    code = main(["quadmix", "search", "--corpus", str(corpus), "--out", str(search_file), "--no-progress"])
    assert code == 2 and "quadmix_criteria" not in capsys.readouterr().err  # default criteria: no ref_ppl
    code = main(
        [
            "quadmix",
            "search",
            "--corpus",
            str(corpus),
            "--out",
            str(search_file),
            "--no-progress",
            *flags,
            *search,
        ]
    )
    assert code == 0, capsys.readouterr().err
    summary = capsys.readouterr().out
    assert re.search(r"out-of-fold Spearman (-?\d\.\d\d|undefined), RMSE", summary)
    decision = json.loads(search_file.read_text())
    # The summary rounds the parameters to 3 significant digits; the JSON keeps them whole.
    for name, chosen in decision["params"].items():
        alpha = " / ".join(f"{c} {a:.3g}" for c, a in zip(["compression", "repetition"], chosen["alpha"]))
        assert f"  {name}: weight {decision['weights'][name]:.3f}, kept " in summary
        assert f"; alpha {alpha}, lam {chosen['lam']:.3g}, omega {chosen['omega']:.3g}, eta " in summary
        assert repr(chosen["lam"]) not in summary and len(repr(chosen["lam"])) > 8
    params = read_quadmix_params(search_file)
    assert list(params) == ["prose", "numbers", "code"] and decision["num_proxies"] == 10
    assert decision["space"]["criteria"] == ["compression", "repetition"]
    # 10 proxies of 2 steps (a quarter of 8) x 4 x 32 tokens, plus scoring <= 4 val samples per domain.
    splits = load_splits(corpus)
    shape = GPTConfig.preset("micro", seq_len=32)
    scored = sum(min(4, d.num_samples(32)) for d in splits.val) * 32
    per_run = (
        flops_per_token(shape, seq_len=32) * 2 * 4 * 32 + flops_per_token(shape, training=False) * scored
    )
    assert decision["decision_flops"] == pytest.approx(10 * per_run)
    assert sum(decision["weights"].values()) == pytest.approx(1.0)

    # The experiment in two parts, merged: the filters, then the QuaDMix methods with the searched parameters.
    parts = {"filters": ("uniform-docs", "topk-compression"), "quadmix": ("quadmix", "quadmix+tikmix-d")}
    for part, methods in parts.items():
        config = ExperimentConfig.from_flat(
            methods=methods, seeds=(0, 1), quadmix_params=str(search_file), **FAST
        )
        run_experiment(config, corpus, tmp_path / part, progress=False)
    results = merge_results([tmp_path / part for part in parts], tmp_path / "out")
    entries = results["methods"]
    assert results["quadmix"]["source"] == str(search_file)
    weights = ScoredDomains(splits.train, parse_criteria(FAST["quadmix_criteria"])).implied_weights(params)
    for name in ("quadmix", "quadmix+tikmix-d"):
        assert entries[name]["initial_weights"][0] == pytest.approx(list(weights.values()))
        assert entries[name]["decision_flops"] >= decision["decision_flops"]
    assert entries["topk-compression"]["initial_weights"][0] == pytest.approx([1 / 3] * 3)
    first = next(MixtureLedger(entries["quadmix+tikmix-d"]["ledgers"][0]).records())
    assert first["method"] == "quality" and first["step"] == 0
    assert first["quality"] == {name: value.to_dict() for name, value in params.items()}
    # The filter drops exactly the labelled documents, so it serves no noise; the baseline serves some.
    assert all(report["noisy"]["share"] == 0 for report in entries["topk-compression"]["served_noise"])
    assert any(report["noisy"]["share"] > 0 for report in entries["uniform-docs"]["served_noise"])
    summary = results["summary"]
    assert "avg_test_loss_vs_uniform-docs" in summary["quadmix"]
    assert "Δ avg vs uniform-docs" in (tmp_path / "out" / "results.md").read_text()

    wrong = ExperimentConfig.from_flat(
        methods=("quadmix",),
        seeds=(0,),
        quadmix_params=str(search_file),
        **{**FAST, "quadmix_criteria": "compression"},
    )
    with pytest.raises(ConfigError, match="criteria"):
        run_experiment(wrong, corpus, tmp_path / "wrong", progress=False)
