"""How sure a benchmark number is: intervals over seeds and paired bootstrap differences.

    seed_interval([61.2, 63.0, 62.1])                  # mean and 95 % Student-t interval over seeds
    cell_bootstrap(errors, words)                      # one system's WER over its seeds, 95 % interval
    paired_bootstrap(errors_a, errors_b, words)        # WER(a) - WER(b) and its 95 % interval

Seeds: the mean of n per-seed values and mean +- t_{(1+c)/2, n-1} s / sqrt(n), s the sample standard
deviation (no interval from one seed).

Cell bootstrap (a table cell: one system on one test, over its seeds): ``errors`` holds each seed's
word errors per utterance (seeds x utterances). WER = the mean over seeds of 100 sum(errors) /
sum(words). Each of R resamples draws the seeds with replacement and, independently, the utterances
with replacement (a two-level bootstrap: seed-to-seed spread and test-set sampling both widen the
interval; with one seed it is the bootstrap over utterances alone); the interval is the percentile
interval of the R WERs.

Paired bootstrap (Koehn 2004; Bisani and Ney 2004), over utterances and across seeds: ``errors_a`` and
``errors_b`` hold each seed's word errors per utterance (seeds x utterances, the same utterances in
the same order), ``words`` each utterance's reference words. A system's WER is the mean over its seeds
of 100 sum(errors) / sum(words). Each of R resamples draws the utterances with replacement, the same
draw for both systems and every seed, and recomputes WER(a) - WER(b); the interval is the percentile
interval of the R differences. A difference whose interval holds zero is "no difference".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """A mean and its interval (``low`` = ``high`` = nan when it has none, e.g. from one seed)."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def describe(self, digits: int = 1) -> str:
        if math.isnan(self.low):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean over seeds and its Student-t interval (none for one value)."""
    if not values:
        raise ValueError("seed_interval needs at least one value")
    array = np.asarray(values, dtype=float)
    mean = float(array.mean())
    if len(array) == 1:
        return Interval(mean, math.nan, math.nan)
    half = stats.t.ppf((1 + confidence) / 2, len(array) - 1) * array.std(ddof=1) / math.sqrt(len(array))
    return Interval(mean, mean - half, mean + half)


def percentile_interval(observed: float, draws: np.ndarray, confidence: float) -> Interval:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Interval(float(observed), float(low), float(high))


def cell_bootstrap(
    errors: np.ndarray, words: np.ndarray, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """One system's WER (mean over its seeds) with its two-level bootstrap interval (module docstring)."""
    errors = np.atleast_2d(errors).astype(float)
    words = np.asarray(words, dtype=float)
    if errors.shape[1] != len(words):
        raise ValueError(
            f"per-utterance errors of shape {errors.shape} do not match {len(words)} utterances; give a "
            "seeds x utterances array over the test's utterances"
        )
    if words.sum() <= 0:
        raise ValueError("the utterances have no reference words")
    observed = 100.0 * float(errors.sum(axis=1).mean()) / words.sum()
    generator = np.random.default_rng(seed)
    seeds, utterances = errors.shape
    utterance_draws = generator.integers(0, utterances, size=(resamples, utterances))
    seed_draws = generator.integers(0, seeds, size=(resamples, seeds))
    totals = errors[:, utterance_draws].sum(axis=2)  # seeds x resamples: each seed's errors on each draw
    per_draw = totals[seed_draws, np.arange(resamples)[:, None]].mean(axis=1)
    wers = 100.0 * per_draw / np.maximum(words[utterance_draws].sum(axis=1), 1.0)
    return percentile_interval(observed, wers, confidence)


def paired_bootstrap(
    errors_a: np.ndarray,
    errors_b: np.ndarray,
    words: np.ndarray,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """WER(a) - WER(b) in points, with its paired bootstrap interval (module docstring)."""
    errors_a, errors_b = np.atleast_2d(errors_a).astype(float), np.atleast_2d(errors_b).astype(float)
    words = np.asarray(words, dtype=float)
    if errors_a.shape[1] != len(words) or errors_b.shape[1] != len(words):
        raise ValueError(
            f"per-utterance errors of shapes {errors_a.shape} and {errors_b.shape} do not match "
            f"{len(words)} utterances; give seeds x utterances arrays over the same utterances"
        )
    if words.sum() <= 0:
        raise ValueError("the utterances have no reference words")
    # per utterance: mean errors over seeds of a minus those of b (WER is linear in the errors)
    delta = errors_a.mean(axis=0) - errors_b.mean(axis=0)
    observed = 100.0 * delta.sum() / words.sum()
    generator = np.random.default_rng(seed)
    draws = generator.integers(0, len(words), size=(resamples, len(words)))
    differences = 100.0 * delta[draws].sum(axis=1) / np.maximum(words[draws].sum(axis=1), 1.0)
    return percentile_interval(observed, differences, confidence)
