"""Intervals over seeds and the paired bootstrap on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from significance import Interval, cell_bootstrap, paired_bootstrap, seed_interval


def test_the_seed_interval_is_the_student_t_interval() -> None:
    interval = seed_interval([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)  # t_{0.975, 2} s / sqrt(n), s = 1
    assert interval.mean == 2.0
    assert interval.low == pytest.approx(2.0 - half, abs=1e-5)
    assert interval.high == pytest.approx(2.0 + half, abs=1e-5)
    assert not interval.excludes_zero
    assert interval.describe() == "2.0 [-0.5, 4.5]"


def test_one_seed_has_no_interval() -> None:
    interval = seed_interval([61.25])
    assert math.isnan(interval.low) and interval.describe(2) == "61.25"
    with pytest.raises(ValueError):
        seed_interval([])


def test_one_more_error_on_every_utterance_is_a_difference_without_spread() -> None:
    generator = np.random.default_rng(0)
    words = generator.integers(3, 11, size=80)
    errors_b = generator.integers(0, 4, size=(3, 80))
    difference = paired_bootstrap(errors_b + 1, errors_b, words, resamples=2000)
    exact = 100.0 * 80 / words.sum()
    assert difference.mean == pytest.approx(exact)
    # every resample adds one error per drawn utterance: 100 * n / words of the draw
    assert exact * 0.8 < difference.low <= difference.mean <= difference.high < exact * 1.25
    assert difference.excludes_zero


def test_a_system_against_itself_is_no_difference() -> None:
    generator = np.random.default_rng(1)
    words = generator.integers(3, 11, size=50)
    errors = generator.integers(0, 5, size=(3, 50))
    assert paired_bootstrap(errors, errors, words, resamples=500) == Interval(0.0, 0.0, 0.0)


def test_seed_order_does_not_matter_but_pairing_does() -> None:
    generator = np.random.default_rng(2)
    words = np.full(60, 5)
    errors_a = generator.integers(0, 5, size=(3, 60))
    errors_b = generator.integers(0, 5, size=(3, 60))
    forward = paired_bootstrap(errors_a, errors_b, words, resamples=1000)
    assert paired_bootstrap(errors_a[::-1], errors_b, words, resamples=1000) == forward
    backward = paired_bootstrap(errors_b, errors_a, words, resamples=1000)
    assert backward.mean == pytest.approx(-forward.mean)


def test_the_interval_covers_the_true_difference_about_95_times_in_100() -> None:
    """Utterances with a true per-word error rate of 30 % for a and 25 % for b (binomial errors, three
    seeds each): over 300 simulated test sets the 95 % interval holds the true 5 points 91-99 % of
    the time."""
    generator = np.random.default_rng(3)
    covered = 0
    trials = 300
    for trial in range(trials):
        words = generator.integers(3, 11, size=120)
        errors_a = generator.binomial(words, 0.30, size=(3, 120))
        errors_b = generator.binomial(words, 0.25, size=(3, 120))
        difference = paired_bootstrap(errors_a, errors_b, words, resamples=1000, seed=trial)
        covered += difference.low <= 5.0 <= difference.high
    assert 0.91 <= covered / trials <= 0.99


def test_mismatched_utterances_are_refused() -> None:
    with pytest.raises(ValueError, match="same utterances"):
        paired_bootstrap(np.zeros((3, 10)), np.zeros((3, 9)), np.ones(10))


def test_a_cell_is_the_mean_wer_over_seeds_and_its_interval_covers_the_binomial_one() -> None:
    """400 one-word utterances with 30 % errors, one seed: the interval is the binomial one,
    30 +- 1.96 sqrt(0.3 * 0.7 / 400) = 30 +- 4.5 points."""
    generator = np.random.default_rng(4)
    errors = (generator.random(400) < 0.3).astype(int)
    errors[:120], errors[120:] = 1, 0  # exactly 30 %
    cell = cell_bootstrap(errors, np.ones(400), resamples=4000)
    assert cell.mean == pytest.approx(30.0)
    assert cell.low == pytest.approx(30.0 - 4.5, abs=0.7) and cell.high == pytest.approx(30.0 + 4.5, abs=0.7)


def test_a_cell_without_spread_has_a_point_interval_and_seed_spread_widens_it() -> None:
    words = np.full(50, 4)
    same = np.ones((3, 50))
    assert cell_bootstrap(same, words, resamples=500) == Interval(25.0, 25.0, 25.0)
    # seeds at 0 and 2 errors per utterance: every utterance alike, so only the seed draw moves the WER
    spread = np.stack([np.zeros(50), np.full(50, 2.0)])
    cell = cell_bootstrap(spread, words, resamples=2000)
    assert cell.mean == pytest.approx(25.0)
    assert (cell.low, cell.high) == (0.0, 50.0)  # both seeds drawn twice: all the mass at 0, 25 and 50


def test_a_cell_of_mismatched_utterances_is_refused() -> None:
    with pytest.raises(ValueError, match="utterances"):
        cell_bootstrap(np.zeros((2, 10)), np.ones(9))
