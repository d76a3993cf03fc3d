"""``tikmix experiment``: paired statistics, the results schema end to end, every method, and that only the
final score ever reads the test split."""

import copy
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from testkit.corpus import make_text_corpus

import tikmix_loader
import tikmix_loader.errors
import tikmix_loader.experiment as experiment
import tikmix_loader.experiment.corpus_splits as corpus_splits
import tikmix_loader.experiment.protocol as protocol
import tikmix_loader.experiment.proxies as proxies
import tikmix_loader.experiment.runs as runs_module
import tikmix_loader.mixing.tikmix_d as tikmix_d_module
from tikmix_loader import ConfigError, DomainError, MixtureLoader
from tikmix_loader.cli import main
from tikmix_loader.experiment import (
    METHOD_BUILDERS,
    METHODS,
    ExperimentConfig,
    MethodSetup,
    get_method_builder,
    load_splits,
    markdown_table,
    paired_differences,
    summarize,
    train_method,
)
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.mixing import LookAheadLabel
from tikmix_loader.models.tiny_gpt import per_token_loss
from tikmix_loader.train import make_optimizer

# Small enough for a test: micro model, 32-token windows, a handful of steps.
FAST = {
    "steps": 6,
    "batch_size": 4,
    "seq_len": 32,
    "model": "micro",
    "device": "cpu",
    "every": 3,
    "k": 8,
    "target_samples": 4,
    "target_batch_size": 4,
    "stages": 1,
    "observation_samples": 4,
    "regmix_proxies": 5,
    "regmix_simulations": 500,
    "regmix_val_samples": 4,
    "m_every": 3,
    "m_candidates": 8,
    "lookahead_samples": 2,
    "lookahead_target_samples": 2,
    "eval_samples": 8,
    "num_workers": 0,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_text_corpus(tmp_path_factory.mktemp("experiment"))


def test_paired_differences_from_known_numbers():
    stats = paired_differences([1.0, 2.0, 3.5, 0.5], [1.5, 2.0, 3.0, 1.5])
    assert stats["diffs"] == pytest.approx([-0.5, 0.0, 0.5, -1.0])
    assert stats["mean"] == pytest.approx(-0.25)
    # std(ddof=1) of the diffs = sqrt(1.25 / 3); SE = that / sqrt(4).
    assert stats["se"] == pytest.approx(math.sqrt(1.25 / 3) / 2)
    assert stats["wins"] == 2 and stats["n"] == 4
    assert paired_differences([1.0], [2.0])["se"] is None
    with pytest.raises(ConfigError, match="equally long"):
        paired_differences([1.0, 2.0], [1.0])


def test_paired_differences_p_value_is_the_paired_t_test():
    diffs = np.array([-0.5, 0.0, 0.5, -1.0])
    t = diffs.mean() / (diffs.std(ddof=1) / 2)  # paired t statistic, by hand
    stats = paired_differences(diffs + 3.0, np.full(4, 3.0))
    assert stats["p_value"] == pytest.approx(2 * scipy.stats.t.sf(abs(t), df=3))
    assert paired_differences([1.0, 2.0], [0.5, 1.5])["p_value"] is None  # no spread: no test


def test_summarize_and_table_pair_every_method_with_the_baseline():
    entry = lambda avg, worst: {
        "avg_test_loss": avg,
        "worst_test_loss": worst,
        "decision_flops": 2e9,
        "train_flops": 1e12,
        "wall_seconds": [3.0, 5.0],
    }
    summary = summarize(
        {"stratified": entry([2.0, 2.2], [3.0, 3.1]), "tikmix-d": entry([1.9, 2.0], [3.0, 3.3])}
    )
    row = summary["tikmix-d"]
    assert row["avg_test_loss"]["mean"] == pytest.approx(1.95)
    assert row["avg_test_loss"]["std"] == pytest.approx(np.std([1.9, 2.0], ddof=1))
    assert row["avg_test_loss_vs_stratified"]["diffs"] == pytest.approx([-0.1, -0.2])
    assert row["worst_test_loss_vs_stratified"]["mean"] == pytest.approx(0.1)
    assert "avg_test_loss_vs_stratified" not in summary["stratified"] and row["wall_seconds"] == 4.0
    table = markdown_table(summary, seeds=[0, 1])
    assert "| tikmix-d | 1.9500 ± 0.0707 | -0.1500 ± 0.0500 | 2/2 |" in table
    assert "0.002" in table  # decision / train FLOPs


def _fast_experiment(corpus, out) -> list[str]:
    """``tikmix experiment`` on ``corpus`` into ``out``, one thread, no progress bars, with the FAST flags."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in FAST.items()]
    return [
        "experiment",
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--no-progress",
        "--threads",
        "1",
        *flags,
    ]


def test_experiment_end_to_end_writes_the_results_schema(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    args = _fast_experiment(corpus, out)
    assert main([*args, "--methods", "stratified", "tikmix-d", "--seeds", "0", "1"]) == 0
    assert torch.get_num_threads() == 1
    results = json.loads((out / "results.json").read_text())
    assert results["domains"] == ["prose", "numbers", "code"] and results["seeds"] == [0, 1]
    for name in ("stratified", "tikmix-d"):
        entry = results["methods"][name]
        assert len(entry["avg_test_loss"]) == len(entry["worst_test_loss"]) == 2
        assert all(w >= a for w, a in zip(entry["worst_test_loss"], entry["avg_test_loss"], strict=True))
        assert np.asarray(entry["final_weights"]).shape == (2, 3)
        assert np.allclose(np.sum(entry["final_weights"], axis=1), 1.0)
        for seed in range(2):
            per_domain = [entry["test_loss"][d][seed] for d in results["domains"]]
            assert entry["avg_test_loss"][seed] == pytest.approx(np.mean(per_domain))
            assert entry["worst_test_loss"][seed] == pytest.approx(max(per_domain))
    assert results["methods"]["stratified"]["decision_flops"] == 0.0
    assert results["methods"]["tikmix-d"]["decision_flops"] > 0
    # Seeds differ in init and data order, so the runs differ; the paired diffs come from the same lists.
    strat, tik = results["methods"]["stratified"], results["methods"]["tikmix-d"]
    assert strat["avg_test_loss"][0] != strat["avg_test_loss"][1]
    diff = results["summary"]["tikmix-d"]["avg_test_loss_vs_stratified"]
    assert diff["diffs"] == pytest.approx(np.subtract(tik["avg_test_loss"], strat["avg_test_loss"]).tolist())
    assert "| tikmix-d |" in (out / "results.md").read_text()
    assert "| stratified |" in capsys.readouterr().out
    assert Path(tik["ledgers"][1]).is_file() and strat["ledgers"] == [None, None]


def test_paired_seed_gives_identical_runs_when_the_weights_agree(corpus):
    splits = load_splits(corpus)
    config = ExperimentConfig.from_flat(methods=("stratified",), seeds=(0,), **FAST)
    runs = [
        train_method(m, 4, config=config, train_domains=splits.train, val_domains=splits.val, progress=False)
        for m in ("stratified", "odm")  # ODM's first decision is uniform too, so steps 0-2 match exactly
    ]
    assert runs[0].result.losses[:3] == runs[1].result.losses[:3]
    assert runs[0].initial_weights == runs[1].initial_weights


def test_every_method_runs_and_only_the_final_score_reads_test(corpus, tmp_path, monkeypatch):
    splits_seen, evaluated = [], []

    class SpyLoader(MixtureLoader):
        def __init__(self, domains, **options):
            splits_seen.extend(Path(domain.path).name for domain in domains)
            super().__init__(domains, **options)

    original_evaluate = protocol.evaluate

    def spy_evaluate(model, domains, **options):
        evaluated.append({Path(domain.path).name for domain in domains})
        return original_evaluate(model, domains, **options)

    for module in (runs_module, proxies, corpus_splits):  # every loader the protocol opens
        monkeypatch.setattr(module, "MixtureLoader", SpyLoader)
    for module in (protocol, proxies):  # every scoring pass
        monkeypatch.setattr(module, "evaluate", spy_evaluate)
    config = ExperimentConfig.from_flat(methods=METHODS, seeds=(0,), **FAST)
    results = experiment.run_experiment(config, corpus, tmp_path / "all", progress=False)
    assert set(splits_seen) == {"train", "val"}
    # RegMix's proxies are scored on val; each of the eight runs is scored on test exactly once.
    assert evaluated.count({"test"}) == len(METHODS) and evaluated.count({"val"}) == FAST["regmix_proxies"]
    for name in METHODS:
        entry = results["methods"][name]
        assert len(entry["avg_test_loss"]) == 1 and np.isclose(sum(entry["final_weights"][0]), 1.0)
    assert (
        results["methods"]["temperature"]["final_weights"] != results["methods"]["natural"]["final_weights"]
    )
    for name in ("tikmix-d", "tikmix-d-stage", "tikmix-m", "regmix"):
        assert results["methods"][name]["decision_flops"] > 0, name
    assert results["methods"]["odm"]["decision_flops"] == 0
    assert [d["step"] for d in results["methods"]["tikmix-d-stage"]["decisions"][0]] == [2]  # half the tokens
    assert results["regmix"]["decision_flops"] == results["methods"]["regmix"]["decision_flops"]
    assert len(results["regmix"]["losses"]) == FAST["regmix_proxies"]


@pytest.mark.parametrize("method", ["tikmix-d", "tikmix-d-fresh", "tikmix-d-stage"])
def test_max_step_min_weight_and_step_reach_every_tikmix_d_solve(corpus, method, monkeypatch):
    # On this 3-domain corpus S is diagonal-dominant, so the Pareto rows pin the weights and a bound on the
    # move cannot show in them; spy on the solver's arguments instead.
    seen = []
    solve = tikmix_d_module.solve_tikmix_d
    monkeypatch.setattr(
        tikmix_d_module,
        "solve_tikmix_d",
        lambda *a, **kw: seen.append((kw["max_step"], kw["min_weight"], kw["step"])) or solve(*a, **kw),
    )
    splits = load_splits(corpus)
    config = ExperimentConfig.from_flat(max_step=1.5, min_weight=0.05, d_step=0.5, **FAST)
    run = train_method(
        method, 0, config=config, train_domains=splits.train, val_domains=splits.val, progress=False
    )
    assert seen and set(seen) == {(1.5, 0.05, 0.5)}
    assert run.result.decisions
    too_high = ExperimentConfig.from_flat(min_weight=0.4, **FAST)  # 3 domains x 0.4 > 1
    with pytest.raises(ConfigError, match="No mixture of 3 domains fits `min_weight`=0.4"):
        train_method(method, 0, config=too_high, train_domains=splits.train, val_domains=splits.val)


def test_merge_combines_parts_run_on_disjoint_methods(corpus, tmp_path, capsys):
    config = {**FAST, "seeds": (0, 1)}
    parts = []
    # `temperature` configures only the temperature baseline, so the natural-only part may differ in it.
    for methods, temperature in ((("natural",), 0.3), (("stratified", "temperature"), 0.5)):
        parts.append(tmp_path / "-".join(methods))
        experiment.run_experiment(
            ExperimentConfig.from_flat(methods=methods, temperature=temperature, **config),
            corpus,
            parts[-1],
            progress=False,
        )
    assert main(["experiment", "--merge", *map(str, parts), "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert list(merged["methods"]) == ["stratified", "natural", "temperature"] == merged["config"]["methods"]
    assert merged["config"]["temperature"] == 0.5
    natural = json.loads((parts[0] / "results.json").read_text())["methods"]["natural"]
    strat = json.loads((parts[1] / "results.json").read_text())["methods"]["stratified"]
    diff = merged["summary"]["natural"]["avg_test_loss_vs_stratified"]
    assert diff["diffs"] == pytest.approx(
        np.subtract(natural["avg_test_loss"], strat["avg_test_loss"]).tolist()
    )
    assert "| natural |" in capsys.readouterr().out

    with pytest.raises(ConfigError, match="method 'natural' seed 0 is also in .*natural/results.json"):
        experiment.merge_results([parts[0], parts[0]], tmp_path / "twice")
    other = tmp_path / "other"
    experiment.run_experiment(
        ExperimentConfig.from_flat(methods=("odm",), **{**config, "steps": 4, "temperature": 0.3}),
        corpus,
        other,
        progress=False,
    )
    with pytest.raises(ConfigError, match=r"other/results.json'\]: they differ in \['steps'\]"):
        experiment.merge_results([parts[1], other], tmp_path / "bad")
    with pytest.raises(ConfigError, match="Cannot read the experiment results .*missing/results.json"):
        experiment.merge_results([tmp_path / "missing"], tmp_path / "bad")


def test_merge_joins_parts_split_by_seeds_in_seed_order(corpus, tmp_path):
    def run(name, methods, seeds):
        config = ExperimentConfig.from_flat(methods=methods, seeds=seeds, **FAST)
        return experiment.run_experiment(config, corpus, tmp_path / name, progress=False)

    strat = run("strat", ("stratified",), (0, 1))["methods"]["stratified"]
    late = run("late", ("natural", "regmix"), (1,))
    early = run("early", ("natural", "regmix"), (0,))
    natural = [early["methods"]["natural"], late["methods"]["natural"]]
    parts = [tmp_path / name for name in ("strat", "late", "early")]

    with pytest.raises(ConfigError, match="different proxy sweeps"):  # each part swept with its first seed
        experiment.merge_results(parts, tmp_path / "all")
    run("late-natural", ("natural",), (1,))
    run("regmix", ("regmix",), (0, 1))
    run("early-natural", ("natural",), (0,))
    parts = [tmp_path / name for name in ("strat", "late-natural", "early-natural", "regmix")]
    merged = experiment.merge_results(parts, tmp_path / "all")
    assert merged["seeds"] == merged["config"]["seeds"] == [0, 1]
    assert list(merged["methods"]) == ["stratified", "natural", "regmix"]
    joined = merged["methods"]["natural"]
    assert joined["avg_test_loss"] == [entry["avg_test_loss"][0] for entry in natural]
    assert joined["ledgers"] == [entry["ledgers"][0] for entry in natural]
    for domain, values in joined["test_loss"].items():
        assert values == [entry["test_loss"][domain][0] for entry in natural]
    diff = merged["summary"]["natural"]["avg_test_loss_vs_stratified"]
    assert diff["diffs"] == pytest.approx(
        np.subtract(joined["avg_test_loss"], strat["avg_test_loss"]).tolist()
    )

    with pytest.raises(ConfigError, match=r"method 'natural' has no run for seeds \[0\]"):
        experiment.merge_results(parts[:2], tmp_path / "bad")
    with pytest.raises(ConfigError, match="method 'stratified' seed 0 is also in .*strat/results.json"):
        experiment.merge_results([parts[0], tmp_path / "strat"], tmp_path / "bad")


def test_look_ahead_label_restores_the_snapshot_and_measures_each_mixture(corpus):
    splits = load_splits(corpus)
    loader = MixtureLoader(list(splits.train), batch_size=4, seq_len=32, seed=0, num_workers=0)
    model = experiment.build_model("micro", seed=0, seq_len=32)
    targets = experiment.val_targets(splits.val, samples=2, batch_size=2, seq_len=32, seed=0)
    label = LookAheadLabel(model, loader, targets, loss_fn=per_token_loss, samples=2)
    with pytest.raises(ConfigError, match="no optimizer bound"):
        label(np.full((2, 3), 1 / 3))
    optimizer, _ = make_optimizer(model, experiment.ExperimentConfig.from_flat(**FAST).train_config)
    for _ in range(2):  # give the optimizer moments, which the look-ahead must restore too
        per_token_loss(model, loader.next_batch()).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    label.bind(optimizer)
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    labels = label(np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert labels.shape == (4,) and labels[0] == labels[1] and len(set(labels.tolist())) == 3
    after = (model.state_dict(), optimizer.state_dict())
    assert all(torch.equal(before[0][key], value) for key, value in after[0].items())
    for key, state in after[1]["state"].items():
        assert all(torch.equal(before[1]["state"][key][name], value) for name, value in state.items())
    # 4 candidates x 1 step x (3 domains x 2 samples) x 32 tokens; the targets scored before and after each.
    assert label.train_tokens == 4 * 6 * 32 and label.eval_tokens == 5 * 3 * 2 * 32


@pytest.mark.parametrize(
    "options, match",
    [
        ({"methods": ("stratified", "nope")}, "unknown: \\['nope'\\]"),
        ({"seeds": (1, 1)}, "`seeds` must be distinct"),
        ({"model": "huge"}, "`model` 'huge' is not a preset"),
        ({"init": "random"}, "`init` must be one of"),
        ({"every": 0}, "`every` must be a positive int"),
        ({"regmix_fraction": 1.5}, "`regmix_fraction`"),
        ({"regmix_proxies": 3}, "`regmix_proxies` must be >= 4"),
        ({"m_candidates": 4}, "`m_candidates` must be >= 8"),
        ({"half_life": 0.0}, "`half_life` must be > 0"),
        ({"max_step": 1.0}, "`max_step` must be a finite number > 1"),
        ({"min_weight": -0.1}, "`min_weight`"),
        ({"temperature": -1.0}, "`temperature` must be >= 0"),
        ({"num_workers": -1}, "`num_workers` must be >= 0"),
        ({"eval_samples": 0}, "`eval_samples` must be a positive int"),
        ({"lr": 0.0}, "`lr`: TrainConfig: `lr` must be a finite float > 0"),
        ({"d_step": 1.5}, "`d_step`: `step` must be a number in \\(0, 1\\]"),
        ({"quadmix_proxies": 3}, "ExperimentConfig: `quadmix_proxies` must be >= 10"),
        ({"preconditioner": "shampoo"}, "`preconditioner` must be one of"),
        ({"regmix_regressor": "mlp"}, "`regmix_regressor` must be one of"),
    ],
)
def test_config_rejects_bad_values(options, match):
    with pytest.raises(ConfigError, match=match):
        ExperimentConfig.from_flat(**options)


def test_option_errors_are_config_errors_that_copy_and_pickle_with_their_message():
    # Exported with the other errors; ``except ConfigError`` (what callers caught before) still catches it,
    # and a copy (pickled to another process) keeps the message and still rewords it.
    with pytest.raises(tikmix_loader.OptionError) as caught:
        ExperimentConfig.from_flat(quadmix_top_k=20, quadmix_candidates=10)
    error = caught.value
    assert isinstance(error, ConfigError) and tikmix_loader.errors.OptionError is type(error)
    for clone in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert type(clone) is type(error) and str(clone) == str(error)
        assert clone.worded(str) == "`quadmix_top_k` (20) exceeds `quadmix_candidates` (10)."
        assert (
            clone.worded(lambda option: option.upper())
            == "`QUADMIX_TOP_K` (20) exceeds `QUADMIX_CANDIDATES` (10)."
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quadmix-proxies", "3"], "`--quadmix-proxies` must be >= 10 (5-fold cross-validation), got 3."),
        (["--d-step", "1.5"], "`--d-step`: `step` must be a number in (0, 1]"),
        (["--topk-keep", "0"], "`--topk-keep` must be in (0, 1], got 0.0."),
        (["--hold-out", "code", "--targets", "texts"], "give `--hold-out` ('code') or `--targets` ('texts')"),
        (["--quadmix-top-k", "20", "--quadmix-candidates", "10"], "`--quadmix-top-k` (20) exceeds"),
    ],
)
def test_command_line_config_errors_name_the_flags_typed(flags, message, capsys):
    assert main(["experiment", *flags]) == 2
    error = capsys.readouterr().err
    assert message in error
    for flag in flags[::2]:  # never the fields behind them
        assert f"`{flag[2:].replace('-', '_')}`" not in error and "ExperimentConfig" not in error


def test_splits_must_hold_the_same_domains(corpus, monkeypatch):
    real = corpus_splits.load_corpus
    monkeypatch.setattr(
        corpus_splits, "load_corpus", lambda path, split: real(path, split)[: 2 if split == "test" else 3]
    )
    with pytest.raises(DomainError, match="the splits hold different domains"):
        load_splits(corpus)


@pytest.mark.parametrize("command", ["experiment", "demo"])
def test_help_lists_the_protocol_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--steps", "--batch-size", "--seq-len", "--model", "--device", "--threads", "--out"):
        assert flag in text
    assert ("--methods" in text and "--seeds" in text) == (command == "experiment")


def test_threads_must_be_positive():
    with pytest.raises(ConfigError, match="`--threads` must be >= 1"):
        experiment.apply_threads(0)


def test_regmix_needs_its_sweep_and_unknown_methods_fail(corpus):
    splits = load_splits(corpus)
    config = ExperimentConfig.from_flat(**FAST)
    with pytest.raises(ConfigError, match="pass `static_weights`"):
        train_method("regmix", 0, config=config, train_domains=splits.train, val_domains=splits.val)
    with pytest.raises(ConfigError, match="Unknown method 'bogus'"):
        train_method("bogus", 0, config=config, train_domains=splits.train, val_domains=splits.val)


def test_every_default_method_has_a_builder_and_unknown_names_list_the_known_ones():
    assert set(METHODS) <= set(METHOD_BUILDERS)
    assert all(callable(get_method_builder(name)) for name in METHOD_BUILDERS)
    with pytest.raises(ConfigError) as error:
        get_method_builder("bogus")
    for name in METHOD_BUILDERS:
        assert repr(name) in str(error.value)


def test_a_method_added_to_the_registry_is_accepted_and_trained(corpus, monkeypatch):
    def uniform_on_first(run):
        names = run.loader.domain_names
        run.loader.set_weights({name: float(name == names[0]) for name in names})
        return MethodSetup()

    monkeypatch.setitem(METHOD_BUILDERS, "first-only", uniform_on_first)
    splits = load_splits(corpus)
    config = ExperimentConfig.from_flat(methods=("first-only",), seeds=(0,), **FAST)
    run = train_method(
        "first-only", 0, config=config, train_domains=splits.train, val_domains=splits.val, progress=False
    )
    assert list(run.initial_weights.values()) == [1.0, 0.0, 0.0]


def test_flat_option_names_map_to_the_nested_options():
    config = ExperimentConfig.from_flat(regmix_proxies=8, m_every=7, temperature=0.3, half_life=None, k=4)
    assert config.regmix.proxies == 8 and config.tikmix_m.every == 7 and config.temperature.tau == 0.3
    assert config.tikmix_d.half_life is None and config.influence.k == 4
    assert config.regmix.model == "micro"  # untouched options keep their defaults
    flat = config.to_dict()
    assert flat["regmix_proxies"] == 8 and flat["methods"] == list(METHODS)
    assert ExperimentConfig.from_flat(**flat) == config
    with pytest.raises(ConfigError, match=r"unknown options \['proxies'\]"):
        ExperimentConfig.from_flat(proxies=8)


def test_tikmix_d_fresh_measures_a_fresh_observation_pass_at_every_decision(corpus, monkeypatch):
    calls = {"compute": 0, "observe": 0, "online influence": 0}
    for name in calls:
        original = getattr(GroupInfluence, name.split()[-1])

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(GroupInfluence, name.split()[-1], counted)
    splits = load_splits(corpus)
    config = ExperimentConfig.from_flat(**{**FAST, "steps": 9})  # every 3 steps; none after the last step
    run = train_method(
        "tikmix-d-fresh", 0, config=config, train_domains=splits.train, val_domains=splits.val, progress=False
    )
    assert [d["step"] for d in run.result.decisions] == [2, 5]
    assert calls["compute"] == 2  # one observation pass per decision, on fresh samples
    assert calls["observe"] == 0 and calls["online influence"] == 0  # no EMA is collected or read


def test_adam_preconditioner_runs_online_and_fresh_tikmix_d(corpus, tmp_path, monkeypatch):
    """``--preconditioner adam``: the optimizer reaches the engine before the first step, and every decision
    of online and fresh TiKMiX-D is measured with AdamW's step sizes."""
    import tikmix_loader.influence.group_influence as engine

    reads = []
    original = engine.adam_scales
    monkeypatch.setattr(
        engine,
        "adam_scales",
        lambda optimizer, layers: reads.append(optimizer) or original(optimizer, layers),
    )
    out = tmp_path / "out"
    args = _fast_experiment(corpus, out)
    methods = ("tikmix-d", "tikmix-d-fresh")
    assert main([*args, "--preconditioner", "adam", "--methods", *methods, "--seeds", "0"]) == 0
    assert reads and all(isinstance(optimizer, torch.optim.AdamW) for optimizer in reads)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["preconditioner"] == "adam"
    for name in methods:
        ledger = [
            json.loads(line) for line in Path(results["methods"][name]["ledgers"][0]).read_text().splitlines()
        ]
        assert [record["step"] for record in ledger] == [2], name  # none after the last step
        for record in ledger:
            assert np.isfinite(record["influence"]["values"]).all() and np.any(record["influence"]["values"])
