"""QuaDMix's sampling function against hand computations of the paper's formulas."""

import math

import numpy as np
import pytest

from tikmix_loader.errors import ScoreError
from tikmix_loader.quality import QualityParams, QualitySampler, tail_scores, weighted_percentiles


def test_weighted_percentiles_by_hand():
    # Weights 1, 2, 1 on values 10, 30, 20: sorted 10(1) 20(1) 30(2) of total 4 -> mid-ranks 0.5, 1.5, 3.0.
    np.testing.assert_allclose(weighted_percentiles([10, 30, 20], [1, 2, 1]), [0.5 / 4, 3.0 / 4, 1.5 / 4])
    # Ties share one percentile.
    np.testing.assert_allclose(weighted_percentiles([5, 5, 1], [1, 1, 2]), [0.75, 0.75, 0.25])


def test_copies_at_follows_the_formula():
    params = QualityParams(alpha=(1.0,), lam=8.0, omega=0.6, eta=2.0, eps=0.05)
    for r in (0.0, 0.3, 0.6, 0.61, 1.0):
        expected = (2 / (1 + math.exp(-8.0 * (0.6 - r)))) ** 2.0 + 0.05 if r <= 0.6 else 0.05
        assert params.copies_at(np.array([r]))[0] == pytest.approx(expected)


def test_merged_score_orients_and_weights_criteria():
    lengths = np.ones(4)
    scores = {"ppl": np.array([1.0, 2.0, 3.0, 4.0]), "clf": np.array([0.9, 0.8, 0.1, 0.2])}
    # "clf" is higher-is-better, so both criteria rank document 0 best and 2/3 worst.
    params = QualityParams(alpha=(0.5, 0.5), lam=0.0, omega=0.5, eta=1.0, eps=0.0)
    sampler = QualitySampler("web", scores, lengths, {"ppl": "lower", "clf": "higher"}, params)
    np.testing.assert_allclose(sampler.percentiles, [0.125, 0.375, 0.75, 0.75])  # docs 2, 3 tie at 0.75
    # lam = 0: S = 1 ** eta + eps = 1 inside the cut-off, eps = 0 outside.
    np.testing.assert_allclose(sampler.expected_copies, [1, 1, 0, 0])


def test_copies_are_deterministic_and_unbiased():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=5000)
    sampler = QualitySampler(
        "web", {"q": rng.random(5000)}, lengths, {"q": "lower"}, QualityParams((1.0,), 10.0, 0.7, 1.5, 0.2)
    )
    first = sampler.copies(seed=3, domain_key=11, epoch=0)
    np.testing.assert_array_equal(first, sampler.copies(seed=3, domain_key=11, epoch=0))
    assert not np.array_equal(first, sampler.copies(seed=3, domain_key=11, epoch=1))
    whole = np.floor(sampler.expected_copies)
    assert np.all((first == whole) | (first == whole + 1))
    draws = np.mean([sampler.copies(seed=3, domain_key=11, epoch=e) for e in range(200)], axis=0)
    assert abs(draws.sum() - sampler.expected_copies.sum()) < 0.01 * sampler.expected_copies.sum()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"alpha": (0.0,)}, "positive weight"),
        ({"lam": float("nan")}, "`lam`"),
        ({"eps": -1.0}, "`eps`"),
        ({"omega": 1.5}, "`omega`"),
    ],
)
def test_bad_params_are_named(values, message):
    base = {"alpha": (1.0,), "lam": 1.0, "omega": 0.5, "eta": 1.0, "eps": 0.0}
    with pytest.raises(ScoreError, match=message):
        QualityParams(**{**base, **values})


def test_params_round_trip_and_mismatched_alpha():
    params = QualityParams((0.2, 0.8), 3.0, 0.4, 1.0, 0.1)
    assert QualityParams.from_dict(params.to_dict()) == params
    with pytest.raises(ScoreError, match="2 weights but there are 1 criteria"):
        QualitySampler("web", {"q": np.zeros(3)}, np.ones(3), {"q": "lower"}, params)
    with pytest.raises(ScoreError, match="expected keys"):
        QualityParams.from_dict({"alpha": [1.0]})


def test_one_criterion_flagging_a_document_ranks_it_last():
    # Document 0 is the worst of 100 on criterion "a" and median on "b" and "c"; document 1 is mediocre
    # (70th percentile) on all three. A mean of plain percentiles ranks document 1 worse; the tail scores
    # rank the single-criterion outlier worse, which is what lets a cut-off drop it.
    rng = np.random.default_rng(0)
    scores = {name: rng.permutation(100).astype(float) for name in "abc"}
    scores["a"][0], scores["b"][0], scores["c"][0] = 1000.0, 49.5, 49.5
    for name in "abc":
        scores[name][1] = 69.5
    params = QualityParams((1.0, 1.0, 1.0), 0.0, 0.5, 1.0, 0.0)
    sampler = QualitySampler("web", scores, np.ones(100), dict.fromkeys("abc", "lower"), params)
    assert sampler.percentiles[0] > sampler.percentiles[1]
    plain = sum(weighted_percentiles(scores[name], np.ones(100)) for name in "abc")
    assert plain[0] < plain[1]  # the linear merge of percentiles would keep the outlier
    expected = sum(tail_scores(weighted_percentiles(scores[name], np.ones(100))) for name in "abc")
    np.testing.assert_allclose(sampler.percentiles, weighted_percentiles(expected, np.ones(100)))


def test_tail_scores_by_hand():
    np.testing.assert_allclose(tail_scores(np.array([0.0, 0.5, 0.99])), [0.0, math.log(2), math.log(100)])
    assert np.isfinite(tail_scores(np.array([1.0])))
