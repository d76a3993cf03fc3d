"""The counterfactual check: paired branches, the scoring of predictors, and a smoke run of the benchmark."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from testkit.corpus import make_text_corpus

from tikmix_loader._bench_commands import _repo_benchmark
from tikmix_loader.data.loader import MixtureLoader
from tikmix_loader.errors import ConfigError
from tikmix_loader.experiment import build_model, load_splits, val_targets
from tikmix_loader.train import TrainConfig, make_optimizer

SMALL = {"model": "micro", "steps": 6, "checkpoints": (3, 6), "branch_steps": 2, "dirichlet": 2}
SMALL.update(batch_size=4, seq_len=32, target_samples=4, observation_samples=4, target_batch_size=4, ks=(8,))
SMALL.update(k=8, solve_steps=(0.5, 1.0))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (tiny models run faster so on a shared CPU); the smoke run sets it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench():
    return _repo_benchmark("bench_counterfactual")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_text_corpus(tmp_path_factory.mktemp("counterfactual"))


@pytest.mark.parametrize("weights", [[0.2, 0.3, 0.5], [0.9, 0.05, 0.05], [1 / 3] * 3])
def test_quotas_round_to_the_batch(bench, weights):
    rows = bench.quotas(np.array(weights), 16)
    assert rows.sum() == 16 and np.all(np.abs(rows - np.array(weights) * 16) < 1)


def test_quotas_of_a_mixture_within_1e_9_of_uniform_are_the_uniform_quotas(bench):
    uniform = np.full(5, 0.2)
    nearly = uniform + np.array([-2e-12, 1e-12, 0.0, 1e-12, 0.0])
    np.testing.assert_array_equal(bench.quotas(nearly, 16), bench.quotas(uniform, 16))
    np.testing.assert_array_equal(bench.quotas(uniform, 16), [4, 3, 3, 3, 3])  # the tie goes to the first


def test_weighted_branch_on_one_domain_is_a_sampled_branch_on_its_rows(bench, corpus):
    """``sum_d w_d L_d`` with w one-hot is the mean loss of that domain's rows: the same training as a sampled
    branch that takes every row from it; a weighted branch is also paired (same w, same outcome)."""
    splits = load_splits(corpus)
    model = build_model("micro", seed=0, seq_len=32)
    loader = MixtureLoader(list(splits.train), batch_size=4, seq_len=32, seed=0, num_workers=0)
    targets = val_targets(splits.val, samples=4, batch_size=4, seq_len=32, seed=0)
    data = bench.branch_data(loader, steps=2, batch_size=4, key=2)
    outcomes = {}
    for mode, w in (
        ("sampled", [0.0, 1.0, 0.0]),
        ("weighted", [0.0, 1.0, 0.0]),
        ("weighted", [0.2, 0.5, 0.3]),
    ):
        config = bench.CounterfactualConfig(**{**SMALL, "branch_data": mode, "weighted_rows": 4})
        optimizer, _ = make_optimizer(model, config.train_config)
        runs = [
            bench.target_losses(
                bench.run_branch(model, optimizer, np.array(w), data, config=config, start=3), targets
            )
            for _ in range(2)
        ]
        np.testing.assert_array_equal(runs[0], runs[1])
        outcomes[mode, tuple(w)] = runs[0]
    np.testing.assert_allclose(
        outcomes["weighted", (0.0, 1.0, 0.0)], outcomes["sampled", (0.0, 1.0, 0.0)], rtol=1e-6
    )
    assert not np.allclose(outcomes["weighted", (0.2, 0.5, 0.3)], outcomes["weighted", (0.0, 1.0, 0.0)])
    loader.close()


def test_branch_mixtures_lean_on_each_domain_and_sum_to_one(bench):
    mixtures = bench.branch_mixtures(["a", "b", "c"], dirichlet=3, lean=0.6, seed=0)
    assert list(mixtures)[:4] == ["stratified", "lean:a", "lean:b", "lean:c"] and len(mixtures) == 7
    assert mixtures["lean:b"] == pytest.approx([0.2, 0.6, 0.2])
    assert all(w.sum() == pytest.approx(1.0) and (w >= 0).all() for w in mixtures.values())


def test_branches_are_paired_and_leave_the_base_run_alone(bench, corpus):
    config = bench.CounterfactualConfig(**SMALL)
    splits = load_splits(corpus)
    model = build_model("micro", seed=0, seq_len=32)
    optimizer, _ = make_optimizer(model, config.train_config)
    loader = MixtureLoader(list(splits.train), batch_size=4, seq_len=32, seed=0, num_workers=0)
    targets = val_targets(splits.val, samples=4, batch_size=4, seq_len=32, seed=0)
    data = bench.branch_data(loader, steps=2, batch_size=4, key=1)
    before = bench.target_losses(model, targets)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    runs = [
        bench.target_losses(
            bench.run_branch(model, optimizer, np.array(w), data, config=config, start=3), targets
        )
        for w in ([1 / 3] * 3, [1 / 3] * 3, [0.8, 0.1, 0.1])
    ]
    np.testing.assert_array_equal(runs[0], runs[1])  # same mixture, same data: the same outcome
    assert not np.allclose(runs[0], runs[2]) and not np.allclose(runs[0], before)
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert not optimizer.state  # the base optimizer took no step
    loader.close()


def test_score_predictor_rewards_the_right_ranking(bench):
    mixtures = np.array([[1 / 2, 1 / 2], [0.9, 0.1], [0.1, 0.9], [0.7, 0.3]])
    S = np.array([[1.0, -0.5], [0.2, 0.4]])  # [targets, domains]
    change = -(mixtures @ S.T)  # measured drop exactly what S predicts
    perfect = bench.score_predictor(S, mixtures, change)
    assert perfect["spearman"] == pytest.approx([1.0, 1.0]) and perfect["regret"] == 0.0
    assert perfect["baseline_regret"] == pytest.approx(change.mean(1)[0] - change.mean(1).min())
    wrong = bench.score_predictor(-S, mixtures, change)
    assert wrong["spearman"] == pytest.approx([-1.0, -1.0]) and wrong["regret"] > 0


def test_config_rejects_checkpoints_past_the_run(bench):
    with pytest.raises(ConfigError, match=r"last checkpoint 9 is past `steps` 6"):
        bench.CounterfactualConfig(steps=6, checkpoints=(3, 9))
    with pytest.raises(ConfigError, match=r"unknown `preconditioners` \['exact'\]"):
        bench.CounterfactualConfig(preconditioners=("kfac", "exact"))
    with pytest.raises(ConfigError, match=r"`branch_data` must be one of \('sampled', 'weighted'\)"):
        bench.CounterfactualConfig(branch_data="mean")
    with pytest.raises(ConfigError, match=r"`solve_steps` must be in \(0, 1\], got \[0.0, 1.0\]"):
        bench.CounterfactualConfig(solve_steps=(0.0, 1.0))


@pytest.mark.parametrize("exact", [(), ("adam", "gradient", "branch-rows")])
def test_smoke_run_reports_every_predictor(bench, corpus, tmp_path, capsys, exact):
    out = tmp_path / "cf.json"
    kinds = ("identity", "kfac", "adam")
    args = ["--corpus", str(corpus), "--json", str(out), "--threads", "1", "--preconditioners", *kinds]
    args += ["--exact", *exact] if exact else []
    for key, value in SMALL.items():
        args += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, tuple) else [value])]
    bench.main(args)
    table = capsys.readouterr().out
    assert "| online kfac k=8 |" in table and "| fresh identity k=8 |" in table
    assert "| online adam k=8 |" in table and "| fresh adam k=8 |" in table  # the optimizer reached both
    assert "| stratified (baseline) |" in table and "| own domain (S = I) |" in table
    saved = json.loads(out.read_text())
    assert [record["step"] for record in saved["checkpoints"]] == [3, 6]
    change = np.array(saved["checkpoints"][1]["change"])
    assert change.shape == (6, 3) and np.isfinite(change).all()  # stratified, 3 leaning, 2 Dirichlet
    decisions = saved["checkpoints"][1]["decisions"]
    assert sorted(decisions) == sorted(
        [
            f"{when} {kind} k=8 step={t}"
            for when in ("online", "fresh")
            for kind in kinds
            for t in ("0.5", "1")
        ]
        + [f"fresh {kind}-exact step={t}" for kind in exact[:2] for t in ("0.5", "1")]
    )
    for kind in exact[:2]:  # scored and decided on like the engines' predictors
        assert f"| fresh {kind}-exact |" in table and f"| fresh {kind}-exact step=1 |" in table
    assert ("| branch rows adam-exact (oracle) |" in table) == bool(exact)  # scored, never decided on
    assert "| linear ceiling (same checkpoint, LOO branch) |" in table
    for decision in decisions.values():  # TiKMiX-D's own branch, compared with stratified's on the same data
        assert sum(decision["weights"]) == pytest.approx(1.0) and min(decision["weights"]) >= 0.1 - 1e-9
        delta = np.mean(decision["change"]) - change[0].mean()
        assert decision["vs_stratified"] == pytest.approx(delta)
        assert decision["regret"] == pytest.approx(np.mean(decision["change"]) - change.mean(1).min())
    for name in ("online kfac k=8", "fresh identity k=8"):  # the half step lies halfway to the full one
        half, full = (np.array(decisions[f"{name} step={t}"]["weights"]) for t in ("0.5", "1"))
        np.testing.assert_allclose(half, (full + 1 / 3) / 2, atol=1e-9)
    assert "| TiKMiX-D solved from |" in table and "| step fitted on the other checkpoints, from |" in table


def test_held_out_step_is_fitted_on_the_other_checkpoints(bench):
    def record(deltas):  # {step: vs_stratified}; regret = delta + 0.01 here
        return {
            "decisions": {
                f"p step={t:g}": {"vs_stratified": d, "regret": d + 0.01} for t, d in deltas.items()
            }
        }

    result = {
        "checkpoints": [
            record({0.5: -0.01, 1.0: 0.02}),
            record({0.5: 0.00, 1.0: -0.03}),
            record({0.5: -0.02, 1.0: 0.01}),
        ]
    }
    picks = bench.held_out_steps(result)["p"]
    # Others' means, held out 0: 0.5 -> -0.010, 1.0 -> -0.010 (a tie up to rounding: the smaller step wins
    # either way); held out 1: 0.5 -> -0.015, 1.0 -> +0.015; held out 2: -0.005 and -0.005 (a tie again).
    assert [pick["step"] for pick in picks] == [0.5, 0.5, 0.5]
    assert [pick["vs_stratified"] for pick in picks] == [-0.01, 0.00, -0.02]
    result["checkpoints"][0]["decisions"]["p step=1"]["vs_stratified"] = -0.05
    picks = bench.held_out_steps(result)["p"]
    # Held out 1: 0.5 -> -0.015, 1.0 -> -0.020 (1.0 wins); held out 2: 0.5 -> -0.005, 1.0 -> -0.040.
    assert [pick["step"] for pick in picks] == [0.5, 1.0, 1.0]
    assert [pick["regret"] for pick in picks] == pytest.approx([0.0, -0.02, 0.02])
    assert bench.held_out_steps({"checkpoints": result["checkpoints"][:1]}) == {}


def test_held_out_mode_trains_on_the_others_and_scores_only_the_held_out_target(
    bench, corpus, tmp_path, capsys, monkeypatch
):
    built = []  # the domains of every loader the bench builds (the targets' sampler is not the bench's)

    class Spy(bench.MixtureLoader):
        def __init__(self, domains, **kwargs):
            built.append([domain.name for domain in domains])
            super().__init__(domains, **kwargs)

    monkeypatch.setattr(bench, "MixtureLoader", Spy)
    out = tmp_path / "held-out.json"
    args = ["--corpus", str(corpus), "--json", str(out), "--threads", "1", "--preconditioners", "kfac"]
    for key, value in {**SMALL, "dirichlet": 1, "branch_data": "weighted", "solve_steps": (1.0,)}.items():
        args += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, tuple) else [value])]
    bench.main([*args, "--hold-out", "numbers"])
    table = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert built == [["prose", "code"]] and saved["domains"] == ["prose", "code"]
    assert saved["hold_out"] == "numbers" and saved["targets"] == ["numbers/val"]
    assert list(saved["mixtures"]) == ["stratified", "lean:prose", "lean:code", "dirichlet:0"]
    splits = load_splits(corpus)
    tokens = np.array([splits.train[0].num_tokens, splits.train[2].num_tokens], dtype=float)
    for record in saved["checkpoints"]:
        assert np.array(record["change"]).shape == (4, 1)  # 4 branches, one target
        assert all(np.array(S).shape == (1, 2) for S in record["influence"].values())
        np.testing.assert_allclose(record["natural"]["weights"], tokens / tokens.sum())
        change = np.array(record["change"])[:, 0]
        assert record["natural"]["regret"] == pytest.approx(record["natural"]["change"][0] - change.min())
    # S = I says nothing about a target that is not a training domain; the floor is fitted on measurements.
    assert "own domain (S = I)" not in saved["checkpoints"][0]["scores"]
    assert "| fitted on other checkpoints |" in table and "| natural |" in table
    assert "Pooled over 1 hold-out(s) x 2 checkpoints = 2 cases." in table


def test_fitted_floor_recovers_a_linear_outcome_from_the_other_checkpoints(bench):
    mixtures = np.array([[0.5, 0.5], [0.8, 0.2], [0.2, 0.8], [0.6, 0.4]])
    S = np.array([[0.03, -0.01]])  # one target; domain 0 helps it, domain 1 hurts it
    result = {
        "mixtures": {str(i): w.tolist() for i, w in enumerate(mixtures)},
        "checkpoints": [
            {"change": (-scale * mixtures @ S.T).tolist(), "influence": {}, "scores": {}}
            for scale in (2.0, 1.0, 0.5)
        ],
    }
    bench.add_fitted_floor(result)
    for record in result["checkpoints"]:
        fitted = np.array(record["influence"]["fitted on other checkpoints"])
        assert fitted[0, 0] > 0 > fitted[0, 1]  # the sign of each domain's effect, from the others alone
        assert record["scores"]["fitted on other checkpoints"]["spearman"] == pytest.approx([1.0])
    # held out 0: the drops of checkpoints 1 and 2 are 1.0 and 0.5 times S w, so the fit is 0.75 S.
    np.testing.assert_allclose(result["checkpoints"][0]["influence"]["fitted on other checkpoints"], 0.75 * S)
    single = {"mixtures": result["mixtures"], "checkpoints": result["checkpoints"][:1]}
    single["checkpoints"][0]["scores"].clear()
    bench.add_fitted_floor(single)
    assert single["checkpoints"][0]["scores"] == {}


def test_leave_one_out_holds_out_every_domain_once_and_pools_them(
    bench, corpus, tmp_path, capsys, monkeypatch
):
    held = []

    def fake_run_check(config, corpus_dir, *, hold_out_name, progress):  # one checkpoint, two branches
        held.append(hold_out_name)
        change = [[-0.02], [-0.01 * (1 + len(held))]]
        record = {
            "step": 3,
            "change": change,
            "decisions": {},
            "natural": {"regret": 0.001 * len(held), "vs_stratified": 0.0},
        }
        record["scores"] = {"p": {"spearman": [0.1 * len(held)], "pearson": [0.0], "regret": 0.0}}
        record["scores"]["p"]["baseline_regret"] = 0.002
        return {"hold_out": hold_out_name, "mixtures": {}, "checkpoints": [record], "seconds": 0.0}

    monkeypatch.setattr(bench, "run_check", fake_run_check)
    monkeypatch.setattr(bench, "report", lambda result: "")
    out = tmp_path / "loo.json"
    bench.main(["--corpus", str(corpus), "--leave-one-out", "--checkpoints", "3", "--json", str(out)])
    table = capsys.readouterr().out
    assert held == ["prose", "numbers", "code"]
    saved = json.loads(out.read_text())
    assert saved["mode"] == "leave-one-out" and list(saved["hold_outs"]) == held
    # medians and means over the three (hold-out, checkpoint) cases: Spearman 0.1/0.2/0.3, natural 1-3e-3
    assert "| p | 0.20 | 0.00 | 0/3 | 0.0000 |" in table and "| natural | — | — | — | 0.0020 |" in table
    bench.main(["--pool", str(out), str(out)])
    assert "Pooled over 3 hold-out(s) x 1 checkpoints = 3 cases." in capsys.readouterr().out  # same keys
    default = tmp_path / "default.json"
    default.write_text(json.dumps({"config": {"seed": 0}, "hold_out": None, "checkpoints": []}))
    with pytest.raises(ConfigError, match=r"--pool .*default.json: not a --hold-out or --leave-one-out run"):
        bench.main(["--pool", str(default)])


def _trained_with_recorded_grads(corpus, steps=3):
    """A micro model after ``steps`` AdamW steps (no clipping) on loader batches, and their gradients."""
    splits = load_splits(corpus)
    model = build_model("micro", seed=0, seq_len=32)
    optimizer, _ = make_optimizer(model, TrainConfig(steps=10))
    loader = MixtureLoader(list(splits.train), batch_size=4, seq_len=32, seed=0, num_workers=0)
    batches = iter(loader)
    recorded = []
    for _ in range(steps):
        batch = next(batches)
        logits = model(batch["input_ids"])
        F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).backward()
        recorded.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    domains = {name: loader.sample_batches(name, 6, batch_size=4, seed=5) for name in loader.domain_names}
    targets = val_targets(splits.val, samples=5, batch_size=2, seq_len=32, seed=0)
    loader.close()
    return model, optimizer, recorded, domains, targets


def _func_gradient(model, batches):
    """torch.func gradient of the mean loss per token over every row of ``batches`` taken as one batch."""
    batch = {key: torch.cat([b[key] for b in batches]) for key in ("input_ids", "labels")}
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(params):
        logits = torch.func.functional_call(model, params, (batch["input_ids"],))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    return torch.func.grad(loss)(params)


def _hand_adam_denominator(recorded, beta2=0.95, eps=1e-8):
    """``1 / (sqrt(v_hat) + eps)`` per parameter name, from the recorded gradients of every step so far:
    ``v_n = sum_i (1 - beta2) beta2^(n - i) g_i^2``, bias-corrected by ``1 - beta2^n`` (torch.optim.AdamW)."""
    n = len(recorded)
    out = {}
    for name in recorded[0]:
        v = sum(
            (1 - beta2) * beta2 ** (n - i) * g[name].double() ** 2 for i, g in enumerate(recorded, start=1)
        )
        out[name] = 1.0 / ((v / (1 - beta2**n)).sqrt() + eps)
    return out


def _dot(a, b, scale):
    return float(sum((a[name].double() * scale.get(name, 1.0) * b[name].double()).sum() for name in a))


def test_exact_predictors_equal_torch_func_gradients_and_a_hand_built_adam_second_moment(bench, corpus):
    model, optimizer, recorded, domains, targets = _trained_with_recorded_grads(corpus)
    model.eval()  # TinyGPT has no dropout; eval() as the predictors' passes use
    D = _hand_adam_denominator(recorded)
    g_d = [_func_gradient(model, batches) for batches in domains.values()]
    g_t = [_func_gradient(model, batches) for batches in targets.values()]
    expected = {
        "fresh adam-exact": np.array([[_dot(t, d, D) for d in g_d] for t in g_t]),
        "fresh gradient-exact": np.array([[_dot(t, d, {}) for d in g_d] for t in g_t]),
    }
    model.train()
    got = bench.exact_influence(model, optimizer, domains, targets, kinds=("adam", "gradient"))
    assert model.training and sorted(got) == sorted(expected)
    for name, S in expected.items():
        assert S.shape == (3, 3)
        np.testing.assert_allclose(got[name], S, rtol=1e-6, atol=1e-7 * np.abs(S).max())
    # v is not constant, so Adam's preconditioning changes the matrix beyond a scale factor
    adam, plain = (got[name] / np.abs(got[name]).max() for name in expected)
    assert np.abs(adam - plain).max() > 0.05


def test_branch_rows_oracle_takes_each_domains_gradient_on_the_rows_of_every_branch_step(bench, corpus):
    model, optimizer, recorded, domains, targets = _trained_with_recorded_grads(corpus)
    loader = MixtureLoader(list(load_splits(corpus).train), batch_size=4, seq_len=32, seed=0, num_workers=0)
    data = bench.branch_data(loader, steps=2, batch_size=3, key=7)  # [step][domain] samples of 3 rows
    loader.close()
    got = bench.branch_rows_influence(model, optimizer, data, list(domains), targets)
    model.eval()
    D = _hand_adam_denominator(recorded)
    g_d = [_func_gradient(model, [data[0][index], data[1][index]]) for index in range(len(domains))]
    g_t = [_func_gradient(model, batches) for batches in targets.values()]
    expected = np.array([[_dot(t, d, D) for d in g_d] for t in g_t])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7 * np.abs(expected).max())
    independent = bench.exact_influence(model, optimizer, domains, targets, kinds=("adam",))
    assert not np.allclose(got, independent["fresh adam-exact"], rtol=0.05)  # other rows, another S


def test_linear_ceiling_leaves_each_branch_out_of_its_own_fit(bench):
    mixtures = np.random.default_rng(0).dirichlet(np.ones(3), size=8)
    S = np.array([[0.5, -1.0, 2.0]])
    change = -(mixtures @ S.T)  # exactly linear: every fit recovers S
    for leave_one_out in (True, False):
        np.testing.assert_allclose(
            bench.linear_ceiling(mixtures, change, leave_one_out=leave_one_out), -change, atol=1e-12
        )
    bumped = change.copy()
    bumped[3] += 1.0  # one branch off the line: left out, it is predicted from the others' S
    predicted = bench.linear_ceiling(mixtures, bumped)
    np.testing.assert_allclose(predicted[3], -change[3], atol=1e-12)
    in_sample = bench.linear_ceiling(mixtures, bumped, leave_one_out=False)
    assert in_sample[3, 0] < predicted[3, 0] - 0.1  # the fit that saw it is pulled towards its worse drop
    result = {"mixtures": {str(i): w.tolist() for i, w in enumerate(mixtures)}}
    result["checkpoints"] = [{"change": change.tolist(), "scores": {}}]
    bench.add_linear_ceiling(result)
    scores = result["checkpoints"][0]["scores"]
    assert scores[bench.CEILING]["spearman"] == pytest.approx([1.0]) and scores[bench.CEILING]["regret"] == 0


def test_exact_adam_with_a_constant_second_moment_is_the_scaled_gradient_product(bench, corpus):
    model, optimizer, _, domains, targets = _trained_with_recorded_grads(corpus, steps=2)
    for state in optimizer.state.values():
        state["exp_avg_sq"].fill_(4e-6)
    got = bench.exact_influence(model, optimizer, domains, targets, kinds=("adam", "gradient"))
    scale = 1.0 / (np.sqrt(4e-6 / (1 - 0.95**2)) + 1e-8)
    np.testing.assert_allclose(got["fresh adam-exact"], scale * got["fresh gradient-exact"], rtol=1e-6)


def test_exact_adam_needs_the_optimizers_second_moments(bench):
    model = build_model("micro", seed=0, seq_len=32)
    optimizer, _ = make_optimizer(model, TrainConfig(steps=10))
    params = list(model.parameters())
    with pytest.raises(ConfigError, match=r"parameter 0 .* no AdamW second moment"):
        bench.adam_preconditioner(optimizer, params)
    with pytest.raises(ConfigError, match=r"unknown `exact` predictors \['hessian'\]"):
        bench.CounterfactualConfig(exact=("adam", "hessian"))
