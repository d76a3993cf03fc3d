"""``tikmix experiment`` target modes: a held-out domain, a directory of text, and leave-one-domain-out."""

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_experiment import FAST
from testkit.corpus import make_text_corpus

import tikmix_loader.experiment.corpus_splits as corpus_splits
import tikmix_loader.experiment.protocol as protocol
import tikmix_loader.experiment.proxies as proxies
import tikmix_loader.experiment.runs as runs_module
from tikmix_loader import ConfigError, DomainError, MixtureLoader
from tikmix_loader.cli import main
from tikmix_loader.experiment import ExperimentConfig, pool_leave_one_out, run_experiment
from tikmix_loader.experiment.leave_one_out import loo_markdown
from tikmix_loader.experiment.targets import split_target_files


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_text_corpus(tmp_path_factory.mktemp("targets"))


def _spy(monkeypatch):
    """Record the (domain, split) of every loader opened for training, for targets and for scoring."""
    seen = {"train": [], "targets": [], "scored": []}

    def loader_spy(kind):
        class Spy(MixtureLoader):
            def __init__(self, domains, **options):
                seen[kind].append([(d.name, Path(d.path).name) for d in domains])
                super().__init__(domains, **options)

        return Spy

    monkeypatch.setattr(runs_module, "MixtureLoader", loader_spy("train"))
    monkeypatch.setattr(proxies, "MixtureLoader", loader_spy("train"))
    monkeypatch.setattr(corpus_splits, "MixtureLoader", loader_spy("targets"))
    for module in (protocol, proxies):
        original = module.evaluate

        def spy_evaluate(model, domains, _original=original, **options):
            seen["scored"].append([(d.name, Path(d.path).name) for d in domains])
            return _original(model, domains, **options)

        monkeypatch.setattr(module, "evaluate", spy_evaluate)
    return seen


def test_hold_out_trains_without_the_domain_and_scores_its_test_split(corpus, tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    config = ExperimentConfig.from_flat(
        methods=("stratified", "regmix", "tikmix-d"), seeds=(0,), hold_out="numbers", **FAST
    )
    results = run_experiment(config, corpus, tmp_path, progress=False)
    trained = {pair for domains in seen["train"] for pair in domains}
    assert trained == {("prose", "train"), ("code", "train")}
    # Targets (influence) and RegMix's proxy scores read the held-out val split only; the metric its test.
    assert all(domains == [("numbers", "val")] for domains in seen["targets"]) and seen["targets"]
    assert seen["scored"].count([("numbers", "test")]) == 3  # one per method
    assert seen["scored"].count([("numbers", "val")]) == FAST["regmix_proxies"]
    assert len(seen["scored"]) == 3 + FAST["regmix_proxies"]
    assert results["targets"] == {
        "mode": "hold-out",
        "source": "numbers",
        "train": ["prose", "code"],
        "val": ["numbers"],
        "test": ["numbers"],
    }
    assert results["domains"] == ["prose", "code"] and results["config"]["hold_out"] == "numbers"
    for entry in results["methods"].values():
        assert list(entry["test_loss"]) == ["numbers"] and len(entry["final_weights"][0]) == 2
        assert entry["avg_test_loss"] == entry["worst_test_loss"] == entry["test_loss"]["numbers"]
    assert len(results["regmix"]["weights"]) == 2


def test_bad_hold_out_and_conflicting_targets_name_the_problem(corpus, tmp_path):
    config = ExperimentConfig.from_flat(methods=("stratified",), seeds=(0,), hold_out="poems", **FAST)
    with pytest.raises(
        DomainError, match=r"--hold-out 'poems' is not a domain.*\['prose', 'numbers', 'code'\]"
    ):
        run_experiment(config, corpus, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="or `targets`"):
        ExperimentConfig.from_flat(hold_out="code", targets=str(tmp_path))


def _write_texts(folder: Path, texts: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for name, text in texts.items():
        (folder / name).write_text(text)
    return folder


def test_a_text_directory_is_split_by_file_into_val_and_test_halves(tmp_path):
    texts = {f"t{i}.txt": f"target document {i} " * 20 for i in range(5)}
    first = split_target_files(_write_texts(tmp_path / "a", texts))
    again = split_target_files(_write_texts(tmp_path / "b", dict(reversed(list(texts.items())))))
    names = {split: [f.name for f in files] for split, files in first.items()}
    assert names == {split: [f.name for f in files] for split, files in again.items()}  # order-free
    assert sorted(names["val"] + names["test"]) == sorted(texts) and len(names["val"]) == 3
    hashed = sorted(texts, key=lambda name: hashlib.sha256(name.encode()).hexdigest())
    assert names == {"val": hashed[0::2], "test": hashed[1::2]}


def test_text_targets_are_the_decisions_and_the_test_half_is_the_metric(corpus, tmp_path, monkeypatch):
    texts = {f"q{i}.txt": f"question {i}: what is {i} + {i}? " * 8 for i in range(4)}
    folder = _write_texts(tmp_path / "quiz", texts)
    seen = _spy(monkeypatch)
    config = ExperimentConfig.from_flat(
        methods=("stratified", "tikmix-d"), seeds=(0,), targets=str(folder), **FAST
    )
    results = run_experiment(config, corpus, tmp_path / "out", progress=False)
    assert results["targets"]["mode"] == "dir" and results["targets"]["test"] == ["quiz"]
    assert results["domains"] == ["prose", "numbers", "code"]  # trains on every domain
    assert all(domains == [("quiz", "val")] for domains in seen["targets"]) and seen["targets"]
    assert seen["scored"] == [[("quiz", "test")]] * 2
    # The test half holds exactly the bytes of its files (the corpus's byte tokenizer).
    halves = split_target_files(folder)
    meta = json.loads((tmp_path / "out" / "targets" / "quiz" / "test" / "tikmix.json").read_text())
    assert meta["num_tokens"] == sum(len(f.read_bytes()) for f in halves["test"])
    assert list(results["methods"]["tikmix-d"]["test_loss"]) == ["quiz"]


@pytest.mark.parametrize(
    "files, match",
    [
        (None, "no such directory"),
        ({"only.txt": "one file " * 50}, "holds 1 file"),
        ({"a.txt": "fine text " * 50, "b.txt": b"\xff\xfe bad"}, "b.txt is not UTF-8"),
        ({"a.txt": "tiny", "b.txt": "tiny"}, "too few for one sample"),
    ],
)
def test_bad_target_directories_are_named(corpus, tmp_path, files, match):
    folder = tmp_path / "targets-in"
    if files is not None:
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    config = ExperimentConfig.from_flat(methods=("stratified",), seeds=(0,), targets=str(folder), **FAST)
    with pytest.raises(ConfigError, match=f"--targets {folder}.*{match}"):
        run_experiment(config, corpus, tmp_path / "out", progress=False)


def _part(losses: dict[str, list[float]], flops: float = 0.0) -> dict:
    methods = {
        name: {"avg_test_loss": values, "decision_flops": flops, "train_flops": 1e9}
        for name, values in losses.items()
    }
    return {"seeds": [0, 1], "methods": methods}


def test_leave_one_out_pools_the_pairs_by_hold_out_and_seed():
    parts = {
        "a": _part({"stratified": [2.0, 2.2], "natural": [2.1, 2.1], "tikmix-d": [1.9, 2.3]}),
        "b": _part({"stratified": [3.0, 3.4], "natural": [3.1, 3.2], "tikmix-d": [2.8, 3.3]}),
    }
    pooled = pool_leave_one_out(parts)
    assert pooled["pairs"] == [["a", 0], ["a", 1], ["b", 0], ["b", 1]]
    tik = pooled["methods"]["tikmix-d"]
    # By hand: tikmix-d - stratified per (hold-out, seed) = -0.1, +0.1, -0.2, -0.1.
    diffs = [-0.1, 0.1, -0.2, -0.1]
    assert tik["vs_stratified"]["diffs"] == pytest.approx(diffs)
    assert tik["vs_stratified"]["mean"] == pytest.approx(-0.075)
    sd = math.sqrt(sum((d + 0.075) ** 2 for d in diffs) / 3)
    assert tik["vs_stratified"]["se"] == pytest.approx(sd / 2) and tik["vs_stratified"]["wins"] == 3
    # tikmix-d - natural = -0.2, +0.2, -0.3, +0.1.
    assert tik["vs_natural"]["diffs"] == pytest.approx([-0.2, 0.2, -0.3, 0.1])
    assert tik["per_hold_out"]["b"]["vs_stratified"]["diffs"] == pytest.approx([-0.2, -0.1])
    assert tik["test_loss"] == pytest.approx(np.mean([1.9, 2.3, 2.8, 3.3]))
    assert "vs_stratified" not in pooled["methods"]["stratified"] and "vs_regmix" not in tik
    parts["b"]["seeds"] = [0, 2]
    with pytest.raises(ConfigError, match="hold-out 'b' ran methods"):
        pool_leave_one_out(parts)


def test_leave_one_out_states_decision_flops_against_regmix_and_every_baseline_per_hold_out():
    def part(regmix_flops: float, tikmix_flops: float) -> dict:
        result = _part({"stratified": [2.0, 2.2], "regmix": [2.1, 2.0], "tikmix-d": [1.9, 2.1]})
        result["methods"]["regmix"]["decision_flops"] = regmix_flops
        result["methods"]["tikmix-d"]["decision_flops"] = tikmix_flops
        return result

    pooled = pool_leave_one_out({"a": part(8e9, 1e9), "b": part(12e9, 3e9)})
    # Means over hold-outs: RegMix 1e10, TiKMiX-D 2e9, so TiKMiX-D decides at 0.2 of RegMix's FLOPs.
    assert pooled["methods"]["tikmix-d"]["flops_vs_regmix"] == pytest.approx(0.2)
    assert pooled["methods"]["stratified"]["flops_vs_regmix"] == 0.0
    table = loo_markdown(pooled)
    assert "decision / RegMix's |" in table.splitlines()[0]
    # tikmix-d - regmix = -0.2, +0.1 on each hold-out: mean -0.05, SE std(ddof=1) / sqrt(n) = 0.0866 pooled
    # over 4 pairs, 0.15 per hold-out over 2 seeds; tikmix-d - stratified = -0.1 on every pair.
    pooled_row = (
        "| tikmix-d | 2.0000 | -0.1000 ± 0.0000 (4/4) | -0.0500 ± 0.0866 (2/4) | 2e+09 | 2.000 | 0.200 |"
    )
    assert pooled_row in table
    assert "| a | tikmix-d | 2.0000 | -0.1000 ± 0.0000 (2/2) | -0.0500 ± 0.1500 (1/2) |" in table
    assert "RegMix's" not in loo_markdown(
        pool_leave_one_out({"a": _part({"stratified": [2.0], "natural": [2.1]})})
    )


def test_leave_one_out_end_to_end(corpus, tmp_path, capsys):
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in FAST.items()]
    out = tmp_path / "loo"
    args = ["experiment", "--corpus", str(corpus), "--out", str(out), "--no-progress", *flags]
    assert main(args + ["--leave-one-out", "--methods", "stratified", "natural", "--seeds", "0", "1"]) == 0
    pooled = json.loads((out / "leave_one_out.json").read_text())
    assert pooled["hold_outs"] == ["prose", "numbers", "code"] and pooled["seeds"] == [0, 1]
    expected = []
    for name in pooled["hold_outs"]:
        part = json.loads((out / f"hold-out-{name}" / "results.json").read_text())
        assert part["targets"]["mode"] == "hold-out" and name not in part["domains"]
        natural, strat = (part["methods"][m]["avg_test_loss"] for m in ("natural", "stratified"))
        expected += list(np.subtract(natural, strat))
    assert pooled["methods"]["natural"]["vs_stratified"]["diffs"] == pytest.approx(expected)
    assert "| natural |" in (out / "leave_one_out.md").read_text()
    assert "| numbers | natural |" in capsys.readouterr().out
    assert main(args + ["--leave-one-out", "--hold-out", "code"]) == 2
    assert "--leave-one-out holds out every domain itself" in capsys.readouterr().err
