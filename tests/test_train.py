"""The shared training loop and evaluation: LR schedule, falling loss, decisions, exact test loss."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tikmix_loader import ConfigError, Domain, MixtureLoader
from tikmix_loader.controller import MixtureController, every
from tikmix_loader.data.sources.memmap import write_memmap
from tikmix_loader.influence import GroupInfluence
from tikmix_loader.models.tiny_gpt import GPTConfig, TinyGPT
from tikmix_loader.train import TrainConfig, evaluate, resolve_device, train

SEQ_LEN = 16


def _patterned(num_docs: int, *, seed: int, period: int) -> list[np.ndarray]:
    """Documents repeating a short random motif: learnable in a few dozen steps, different per domain."""
    rng = np.random.default_rng(seed)
    motif = rng.integers(0, 256, size=period)
    return [np.tile(motif, int(rng.integers(4, 12)))[: int(rng.integers(30, 90))] for _ in range(num_docs)]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-domains")
    specs = {"a": (30, 3), "b": (40, 5), "c": (25, 7)}
    return [
        Domain(name, write_memmap(root / f"{name}.bin", _patterned(n, seed=i, period=p), vocab_size=258))
        for i, (name, (n, p)) in enumerate(specs.items())
    ]


def _model(seed=0):
    return TinyGPT(GPTConfig.preset("micro", seq_len=SEQ_LEN), seed=seed)


def _loader(domains, **options):
    return MixtureLoader(domains, batch_size=8, seq_len=SEQ_LEN, seed=0, num_workers=0, **options)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    config = TrainConfig(steps=100, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [config.lr_at(step) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(later <= earlier + 1e-15 for earlier, later in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(1e-3)
    assert TrainConfig(steps=100).warmup == 5


@pytest.mark.parametrize(
    "options, match",
    [
        ({"steps": 0}, "`steps` must be a positive int"),
        ({"lr": float("nan")}, "`lr` must be a finite float"),
        ({"steps": 10, "warmup_steps": 10}, "`warmup_steps` must be in"),
        ({"min_lr_ratio": 2.0}, "`min_lr_ratio`"),
        ({"grad_clip": 0.0}, "`grad_clip`"),
        ({"beta2": 1.0}, "beta1, beta2"),
    ],
)
def test_train_config_rejects_bad_values(options, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**options)


def test_train_reduces_loss_and_follows_the_schedule(domains):
    model = _model()
    config = TrainConfig(steps=60, lr=1e-2)
    result = train(model, _loader(domains), config=config, device="cpu", progress=False)
    assert len(result.losses) == 60 and result.tokens == 60 * 8 * SEQ_LEN
    assert result.losses[0] > math.log(200)  # starts near uniform over the bytes
    assert np.mean(result.losses[-5:]) < result.losses[0] - 1.5
    assert result.decisions == [] and set(result.weights) == {"a", "b", "c"}


def test_train_records_every_controller_decision_with_its_influence_tokens(domains):
    model = _model()
    loader = _loader(domains)
    targets = {name: [loader.sample_domain(name, 4, seed=7)] for name in loader.domain_names}
    influence = GroupInfluence(model, k=4, domains=loader.domain_names)
    controller = MixtureController(
        loader, "tikmix_d", influence=influence, targets=targets, schedule=every(3)
    )
    result = train(
        model, loader, config=TrainConfig(steps=9), controller=controller, device="cpu", progress=False
    )
    # every(3) is due after steps 2, 5 and 8; step 8 is the last, where new weights would go unused.
    assert [d["step"] for d in result.decisions] == [2, 5] and controller.decisions == 2
    # Target passes only: 3 targets x 4 samples x SEQ_LEN tokens per decision (online statistics are free).
    assert [d["influence_tokens"] for d in result.decisions] == [3 * 4 * SEQ_LEN] * 2
    assert result.decisions[-1]["weights"] == result.weights == loader.weights


def test_train_fails_clearly_when_the_loader_runs_out(domains):
    loader = _loader(domains, exhaustion="stop")
    with pytest.raises(ConfigError, match="ran out of batches at step"):
        train(_model(), loader, config=TrainConfig(steps=10_000), device="cpu", progress=False)


def _manual_loss(model, domain: Domain, seq_len: int) -> float:
    """Every window of the packed stream (the one document + EOS, stride seq_len), plain cross-entropy."""
    (document,) = domain.read_docs(0, 1)
    stream = np.append(document, domain.eos_id)
    count = (len(stream) - 1) // seq_len
    windows = torch.as_tensor(
        np.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)])
    )
    with torch.no_grad():
        logits = model(windows[:, :-1])
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1)))


def test_evaluate_matches_a_manual_computation(domains, tmp_path):
    # One document per domain, so the packed stream's order is known without the loader's shuffle.
    rng = np.random.default_rng(5)
    single = [
        Domain(
            name, write_memmap(tmp_path / f"{name}.bin", [rng.integers(0, 256, size=size)], vocab_size=258)
        )
        for name, size in (("x", 150), ("y", 97))
    ]
    model = _model(seed=3)
    train(model, _loader(domains), config=TrainConfig(steps=5), device="cpu", progress=False)
    model.train()
    scores = evaluate(model, single, seq_len=SEQ_LEN, batch_size=4)
    assert model.training  # restored
    for domain in single:
        assert scores[domain.name] == pytest.approx(_manual_loss(model, domain, SEQ_LEN), rel=1e-6)
    assert evaluate(model, {d.name: d for d in single}, seq_len=SEQ_LEN) == pytest.approx(scores)


def test_evaluate_subset_is_fixed_by_the_seed(domains):
    model = _model()
    first = evaluate(model, domains, seq_len=SEQ_LEN, max_samples=5, seed=1)
    assert evaluate(model, domains, seq_len=SEQ_LEN, max_samples=5, seed=1, batch_size=2) == pytest.approx(
        first
    )
    assert evaluate(model, domains, seq_len=SEQ_LEN, max_samples=5, seed=2) != first
    with pytest.raises(ConfigError, match="`max_samples` must be a positive int"):
        evaluate(model, domains, seq_len=SEQ_LEN, max_samples=0)


def test_evaluate_names_a_domain_too_short_to_score(tmp_path):
    short = Domain("tiny", write_memmap(tmp_path / "tiny.bin", [np.arange(5)], vocab_size=258))
    with pytest.raises(ConfigError, match="domain 'tiny' .* has no scorable token at seq_len 16"):
        evaluate(_model(), [short], seq_len=SEQ_LEN)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="is not a torch device"):
        resolve_device("tpu-please")
