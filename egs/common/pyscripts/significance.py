"""How sure a benchmark number is: intervals over seeds and paired bootstrap differences.

    seed_interval([61.2, 63.0, 62.1])                  # mean and 95 % Student-t interval over seeds
    paired_bootstrap(errors_a, errors_b, words)        # WER(a) - WER(b) and its 95 % interval

Seeds: the mean of n per-seed values and mean +- t_{(1+c)/2, n-1} s / sqrt(n), s the sample standard
deviation (no interval from one seed).

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
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return Interval(float(observed), float(low), float(high))
