"""``rng_for`` seeds exactly like ``PCG64(SeedSequence([seed, *keys]))``: every shuffle rests on it."""

import numpy as np
import pytest

from tikmix_loader.data.shuffle import rng_for, stable_key


def library_generator(seed, *keys):
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *keys])))


def test_rng_for_draws_the_numbers_of_a_generator_seeded_with_the_ints():
    rng = np.random.default_rng(0)
    cases = [
        (0,),
        (0, 0, 0),
        (1, 2**32 - 1, 2**32, 2**64 - 1, 2**64),
        (5, 1 << 100),
        (3, stable_key("web"), 7, 2, 0),
    ]
    # Random keys of every width from 1 to 63 bits, and 1 to 7 of them.
    for size in range(1, 8):
        for _ in range(40):
            cases.append(
                tuple(
                    int(v) >> int(s) for v, s in zip(rng.integers(0, 2**63, size), rng.integers(0, 63, size))
                )
            )
    for case in cases:
        expected = library_generator(*case).integers(0, 2**63, 4)
        np.testing.assert_array_equal(rng_for(*case).integers(0, 2**63, 4), expected, err_msg=str(case))
        np.testing.assert_array_equal(
            rng_for(*case).permutation(50), library_generator(*case).permutation(50)
        )


def test_rng_for_accepts_numpy_ints_and_refuses_negative_keys_like_seedsequence():
    np.testing.assert_array_equal(
        rng_for(np.int64(4), np.uint64(2**63 + 5)).random(3), library_generator(4, 2**63 + 5).random(3)
    )
    with pytest.raises(ValueError, match="negative"):
        rng_for(0, -1)
