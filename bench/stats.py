"""The statistics behind the reported numbers, as small pure functions (numbers in, numbers out).

* speed-up: the median of the paired per-round ratios (dense time / method time of the same round, the two
  forwards run back to back), with a seeded percentile-bootstrap interval of that median;
* latency percentiles of the timed forwards, and how many of them were slowed from outside (over 3x the median);
* expected calibration error (equal-width confidence bins) and the mean cosine similarity of two feature sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15
BOOTSTRAP_RESAMPLES = 2000
SLOW_FACTOR = 3.0  # a timed forward over 3x its run's median is counted as slowed from outside (slow_rounds)


def paired_ratios(method_times: Sequence[float], baseline_times: Sequence[float]) -> np.ndarray:
    """Per round: baseline time / method time (> 1: the method was faster in that round)."""
    method, baseline = np.asarray(method_times, dtype=float), np.asarray(baseline_times, dtype=float)
    if method.shape != baseline.shape or method.ndim != 1 or method.size == 0:
        raise ValueError(f"paired times must be two non-empty lists of one length, got {method.shape} and "
                         f"{baseline.shape}")
    return baseline / method


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear interpolation between order statistics."""
    return float(np.percentile(np.asarray(values, dtype=float), q))


def slow_rounds(times: Sequence[float], factor: float = SLOW_FACTOR) -> int:
    """How many of ``times`` took more than ``factor`` x their median: forwards slowed by something outside
    the model (another process on the machine, a clock change), which raise latency p90."""
    data = np.asarray(times, dtype=float)
    return int((data > factor * np.median(data)).sum()) if data.size else 0


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of ``values``: ``resamples`` draws with replacement
    (a generator seeded with ``seed``, so the same inputs give the same interval)."""
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("bootstrap_interval needs a non-empty list of numbers")
    rng = np.random.default_rng(seed)
    draws = data[rng.integers(0, data.size, size=(resamples, data.size))]
    medians = np.median(draws, axis=1)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(medians, [tail, 100.0 - tail])
    return float(low), float(high)


def speedup(method_times: Sequence[float], baseline_times: Sequence[float], seed: int = 0) -> dict[str, float]:
    """``{"speedup", "speedup_low", "speedup_high"}``: the median paired ratio and its bootstrap 95% interval."""
    ratios = paired_ratios(method_times, baseline_times)
    low, high = bootstrap_interval(ratios, seed=seed)
    return {"speedup": median(ratios), "speedup_low": low, "speedup_high": high}


def expected_calibration_error(confidence: Any, correct: Any, bins: int = ECE_BINS) -> float:
    """ECE with ``bins`` equal-width bins over (0, 1]: sum over bins of (share of samples in the bin) x
    |accuracy in the bin - mean confidence in the bin|. ``confidence``: the top-1 probability per sample;
    ``correct``: whether the top-1 class was right. Bin i holds confidences in (i/bins, (i+1)/bins] (0 goes
    to the first bin). A fraction in [0, 1]."""
    conf = np.asarray(confidence, dtype=float).reshape(-1)
    hit = np.asarray(correct, dtype=float).reshape(-1)
    if conf.shape != hit.shape or conf.size == 0:
        raise ValueError("expected_calibration_error needs as many confidences as correctness flags (> 0)")
    if not np.isfinite(conf).all():  # non-finite logits: undefined (not binned through an invalid int cast)
        return math.nan
    index = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    gap = np.abs(np.bincount(index, weights=hit, minlength=bins) - np.bincount(index, weights=conf, minlength=bins))
    # |sum(hit) - sum(conf)| over a bin = count x |accuracy - mean confidence|; divided by N: the weighted gap
    return float(gap.sum() / conf.size)


def mean_cosine(a: Any, b: Any, eps: float = 1e-12) -> float:
    """Mean over rows of the cosine similarity of ``a[i]`` and ``b[i]`` ((N, D) each), in float64."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"mean_cosine needs two (N, D) arrays of one shape, got {x.shape} and {y.shape}")
    dot = (x * y).sum(axis=1)
    norm = np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), eps)
    return float((dot / norm).mean())
