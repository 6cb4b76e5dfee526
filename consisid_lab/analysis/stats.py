"""Statistics of a seed sweep: confidence intervals of means, paired differences across experiments, verdicts.

Two runs of different experiments with the same seed share their data order, their sampling noise and their
initialisation stream, so the study compares them *paired*: the claim's effect is the mean over seeds of
``treatment(seed) - control(seed)``. Intervals are 95% bootstrap intervals (``scipy.stats.bootstrap``, BCa, a
fixed random stream so a report is reproducible). With a handful of seeds a bootstrap interval is too narrow (it
cannot see variation the seeds did not show), which is why every comparison also carries its minimal detectable
effect, from the t distribution:

    MDE = (t_{1 - alpha/2, n-1} + t_{power, n-1}) * sd(differences) / sqrt(n)

the smallest true mean difference that a two-sided paired t-test at level ``alpha`` detects with probability
``power`` (defaults 0.05 and 0.8) given the spread the seeds showed. An effect below the MDE is not evidence of
no effect: more seeds are.

A bootstrap interval never leaves the range of the seeds' values, so with three seeds that all point one way it
excludes 0 whatever their spread (a sign test of three seeds has p = 0.25). Verdicts therefore use the wider of
the bootstrap interval and the paired t interval ``mean +- t_{1-alpha/2, n-1} sd / sqrt(n)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
POWER = 0.8
N_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # a fixed stream: the same runs give the same report
DIRECTIONS = ("higher", "lower")
VERDICTS = ("supported", "contradicted", "inconclusive")


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES
) -> tuple[float, float]:
    """95% (``confidence``) bootstrap interval of the mean of ``values`` (BCa).

    ``(nan, nan)`` for fewer than two values (no spread to resample); ``(v, v)`` when all values are equal,
    where BCa is undefined but the interval is not in doubt.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"bootstrap_mean_ci takes a 1-d sequence of values, got shape {arr.shape}")
    if len(arr) < 2 or not np.all(np.isfinite(arr)):
        return float("nan"), float("nan")
    if np.ptp(arr) == 0:
        return float(arr[0]), float(arr[0])
    low, high = _bootstrap_interval(arr, confidence, n_resamples, "BCa")
    if not (math.isfinite(low) and math.isfinite(high)):  # BCa degenerate (e.g. one outlier): percentile
        low, high = _bootstrap_interval(arr, confidence, n_resamples, "percentile")
    return low, high


def _bootstrap_interval(arr: np.ndarray, confidence: float, n_resamples: int, method: str) -> tuple[float, float]:
    from scipy.stats import bootstrap

    with warnings.catch_warnings():
        # BCa warns on few distinct resamples (2-3 seeds); the interval is still the best estimate it has.
        warnings.simplefilter("ignore")
        res = bootstrap(
            (arr,),
            np.mean,
            confidence_level=confidence,
            n_resamples=n_resamples,
            method=method,
            vectorized=True,
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def minimal_detectable_effect(sd: float, n: int, alpha: float = 1 - CONFIDENCE, power: float = POWER) -> float:
    """Smallest true mean (paired) difference a two-sided t-test at ``alpha`` finds with ``power``, for ``n``
    seeds whose differences have sample standard deviation ``sd``: ``(t_{1-alpha/2,n-1} + t_{power,n-1}) sd /
    sqrt(n)``. ``inf`` below two seeds."""
    from scipy.stats import t

    if n < 2:
        return float("inf")
    df = n - 1
    return float((t.ppf(1 - alpha / 2, df) + t.ppf(power, df)) * sd / math.sqrt(n))


def seeds_needed(sd: float, effect: float, max_seeds: int = 100) -> int | None:
    """Smallest seed count whose MDE at this spread is at most ``|effect|``: how many paired seeds would detect
    an effect of the size observed (80 % power), were it real. None when no count up to ``max_seeds`` does (or the
    effect is 0 or undefined); 2 when the differences have no spread."""
    if not (math.isfinite(sd) and math.isfinite(effect)) or effect == 0:
        return None
    for n in range(2, max_seeds + 1):
        if minimal_detectable_effect(sd, n) <= abs(effect):
            return n
    return None


def verdict(ci_low: float, ci_high: float, direction: str) -> str:
    """``supported`` when the interval excludes 0 on the side ``direction`` claims (``higher``: treatment above
    control), ``contradicted`` when it excludes 0 on the other side, ``inconclusive`` otherwise (or undefined)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "inconclusive"
    sign = 1.0 if direction == "higher" else -1.0
    low, high = sorted((sign * ci_low, sign * ci_high))
    if low > 0:
        return "supported"
    if high < 0:
        return "contradicted"
    return "inconclusive"


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean, ``mean +- t_{(1+confidence)/2, n-1} sd / sqrt(n)``; ``(nan, nan)`` below
    two values."""
    from scipy.stats import t

    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"t_interval takes a 1-d sequence of values, got shape {arr.shape}")
    if len(arr) < 2 or not np.all(np.isfinite(arr)):
        return float("nan"), float("nan")
    half = float(t.ppf((1 + confidence) / 2, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))
    return float(arr.mean()) - half, float(arr.mean()) + half


@dataclass(frozen=True)
class PairedDifference:
    """``treatment - control`` per shared seed: its mean, 95% bootstrap and t intervals, and MDE. ``ci_low`` /
    ``ci_high`` are the interval the verdict uses: the wider of the two (their union)."""

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    sd: float  # sample standard deviation of the differences (NaN below two seeds)
    ci_low: float
    ci_high: float
    mde: float
    boot_low: float = float("nan")
    boot_high: float = float("nan")
    t_low: float = float("nan")
    t_high: float = float("nan")

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def seeds_needed(self) -> int | None:
        """Paired seeds that would detect the observed mean difference at the observed spread (``seeds_needed``)."""
        return seeds_needed(self.sd, self.mean)


class UnpairedSeedsError(ValueError):
    """Treatment and control were not run on the same seeds; the message names the missing ones."""


def paired_difference(
    treatment: Mapping[int, float],
    control: Mapping[int, float],
    treatment_name: str = "treatment",
    control_name: str = "control",
) -> PairedDifference:
    """Paired comparison of two ``{seed: value}`` maps; both must hold the same seeds.

    Raises ``UnpairedSeedsError`` naming the seeds that one side lacks (a seed that failed, or was never run),
    since dropping them silently would compare different sets of seeds.
    """
    only_t = sorted(set(treatment) - set(control))
    only_c = sorted(set(control) - set(treatment))
    if only_t or only_c:
        parts = []
        if only_t:
            parts.append(f"{control_name} lacks seed(s) {only_t} that {treatment_name} has")
        if only_c:
            parts.append(f"{treatment_name} lacks seed(s) {only_c} that {control_name} has")
        raise UnpairedSeedsError(
            f"unpaired seeds: {'; '.join(parts)}. Run the missing seeds (or rerun the sweep: completed members "
            "are skipped) so both sides have the same seeds"
        )
    if not treatment:
        raise UnpairedSeedsError(f"{treatment_name} and {control_name} have no completed seed with this metric")
    seeds = tuple(sorted(treatment))
    diffs = np.asarray([treatment[s] - control[s] for s in seeds], dtype=np.float64)
    sd = float(diffs.std(ddof=1)) if len(diffs) > 1 else float("nan")
    boot_low, boot_high = bootstrap_mean_ci(diffs)
    t_low, t_high = t_interval(diffs)
    # the union; a nan bound (fewer than two seeds) makes the interval undefined: inconclusive
    low = float("nan") if math.isnan(boot_low) or math.isnan(t_low) else min(boot_low, t_low)
    high = float("nan") if math.isnan(boot_high) or math.isnan(t_high) else max(boot_high, t_high)
    mde = minimal_detectable_effect(sd, len(diffs)) if len(diffs) > 1 else float("inf")
    return PairedDifference(
        seeds=seeds,
        differences=tuple(float(d) for d in diffs),
        mean=float(diffs.mean()),
        sd=sd,
        ci_low=low,
        ci_high=high,
        mde=mde,
        boot_low=boot_low,
        boot_high=boot_high,
        t_low=t_low,
        t_high=t_high,
    )
