"""Paired statistics: the same items for both models, several training seeds."""

import math

import numpy as np
import pytest

from vlsafe.eval.metrics import mcnemar, paired_difference


def test_mcnemar_exact_on_known_counts():
    # 8 items only a is True, 2 only b: p = 2 * P(X <= 2), X ~ Bin(10, 0.5) = 2 * 56/1024
    a = [True] * 8 + [False] * 2 + [True] * 5
    b = [False] * 8 + [True] * 2 + [True] * 5
    result = mcnemar(a, b)
    assert (result["a_only"], result["b_only"]) == (8, 2)
    assert result["p_value"] == pytest.approx(2 * 56 / 1024, abs=1e-6)
    assert mcnemar(a, a)["p_value"] == 1.0


def test_paired_interval_is_narrower_than_unpaired_when_outcomes_correlate():
    rng = np.random.default_rng(1)
    base = rng.random(200) < 0.5
    flips = rng.random(200) < 0.1
    a, b = base, base | flips  # b = a plus a few more successes on the same items
    result = paired_difference(a, b, seed=0)
    assert result["difference"] == pytest.approx(b.mean() - a.mean())
    low, high = result["ci"]
    assert 0 < low <= result["difference"] <= high
    # an unpaired view of the same rates would need about +-0.1: pairing shows the small shift is real
    assert high - low < 0.08
    assert result["p_value"] < 0.01


def test_paired_seeds_add_their_spread_and_broadcast_a_reference():
    items = 100
    reference = [True] * 30 + [False] * 70
    same = [reference, reference]
    assert paired_difference(reference, same)["difference"] == 0.0
    seed0 = [True] * 60 + [False] * 40
    seed1 = [True] * 40 + [False] * 60
    result = paired_difference(reference, [seed0, seed1], seed=0)
    assert result["seeds"] == 2 and result["n"] == items
    assert result["per_seed"] == [0.3, 0.1]
    assert result["difference"] == pytest.approx(0.2)
    assert result["seed_sd"] == pytest.approx(math.sqrt(0.02), abs=1e-6)
    one_seed = paired_difference(reference, seed0, seed=0)
    # resampling the seeds widens the interval beyond the one-seed item interval's width
    assert (result["ci"][1] - result["ci"][0]) > (one_seed["ci"][1] - one_seed["ci"][0])
    with pytest.raises(ValueError):
        paired_difference(reference, [True] * 5)
