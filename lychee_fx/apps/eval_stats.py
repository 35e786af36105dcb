"""95% intervals for the eval's numbers: a seeded percentile bootstrap over whole units.

Every metric of the eval is a ratio of sums over units (prompts or text windows), passed
through a transform:

    passkey exact match   sum(keys found) / sum(keys)          per prompt (its keys are correlated)
    perplexity            exp(sum(nll) / sum(scored tokens))   per window, recomputed per resample
    greedy agreement      sum(share agreeing) / sum(1)         per prompt

:func:`bootstrap` resamples units with replacement (``resamples`` times, seeded) and reads the
2.5 and 97.5 percentiles of the statistic. :func:`paired_bootstrap` draws the same units for
two methods that saw the same prompts and bootstraps their difference (``a - b``) or relative
change (``a / b - 1``): the interval the target checks read. :func:`proportion` widens the
bootstrap interval of a share of keys to include the Wilson score interval over keys, so that
a share of 1.0 (every key found) or a single prompt does not come with an interval of width 0.

Notation: U units, R resamples; ``sums`` and ``counts`` are (U,) arrays.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["Interval", "bootstrap", "paired_bootstrap", "proportion", "wilson", "RESAMPLES", "LEVEL"]

RESAMPLES = 2000
LEVEL = 0.95
_TRANSFORMS = ("identity", "exp")
_COMPARE = ("diff", "rel")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its interval [lo, hi] at ``level``, from ``units`` units."""

    point: float
    lo: float
    hi: float
    units: int
    level: float = LEVEL
    method: str = "percentile bootstrap"

    def __post_init__(self):
        if not self.lo <= self.hi:
            raise ValueError(f"an interval needs lo <= hi, got [{self.lo}, {self.hi}]")

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def contains(self, x: float) -> bool:
        return self.lo <= x <= self.hi

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _arrays(sums: Sequence[float], counts: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if s.ndim != 1 or c.shape != s.shape:
        raise ValueError(f"{what}: expected sums and counts of one shape (U,), got {s.shape} and {c.shape}")
    if s.size == 0:
        raise ValueError(f"{what}: expected at least one unit, got 0")
    if (c <= 0).any():
        raise ValueError(f"{what}: every unit needs a count > 0, got {c.min()}")
    return s, c


def _check(resamples: int, level: float, transform: str) -> None:
    if resamples < 1000:
        raise ValueError(f"expected at least 1000 resamples, got {resamples}")
    if not 0.5 < level < 1:
        raise ValueError(f"expected a level in (0.5, 1), got {level}")
    if transform not in _TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; expected one of {_TRANSFORMS}")


def _ratio(s: np.ndarray, c: np.ndarray, transform: str, idx: np.ndarray | None = None):
    """``transform(sum(s) / sum(c))``: a float, or (R,) over the resamples ``idx`` (R, U)."""
    x = s.sum() / c.sum() if idx is None else s[idx].sum(1) / c[idx].sum(1)
    return np.exp(x) if transform == "exp" else x


def _draws(units: int, resamples: int, seed: int) -> np.ndarray:
    """(R, U) unit indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, units, size=(resamples, units))


def _percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return float(lo), float(hi)


def bootstrap(
    sums: Sequence[float], counts: Sequence[float], *, transform: str = "identity", resamples: int = RESAMPLES,
    seed: int = 0, level: float = LEVEL,
) -> Interval:
    """``transform(sum(sums) / sum(counts))`` with its percentile bootstrap interval over units."""
    _check(resamples, level, transform)
    s, c = _arrays(sums, counts, "bootstrap")
    point = float(_ratio(s, c, transform))
    stats = _ratio(s, c, transform, _draws(s.size, resamples, seed))  # (R,)
    lo, hi = _percentiles(stats, level)
    return Interval(point, min(lo, point), max(hi, point), int(s.size), level)


def paired_bootstrap(
    a: tuple[Sequence[float], Sequence[float]], b: tuple[Sequence[float], Sequence[float]], *,
    transform: str = "identity", compare: str = "diff", resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL,
) -> Interval:
    """The difference (``compare="diff"``: a - b) or relative change (``"rel"``: a / b - 1) of
    two statistics over the same units, ``a = (sums, counts)`` and ``b`` likewise, unit i of
    both being the same prompt; the same units are drawn for both in every resample."""
    _check(resamples, level, transform)
    if compare not in _COMPARE:
        raise ValueError(f"unknown comparison {compare!r}; expected one of {_COMPARE}")
    sa, ca = _arrays(*a, "paired_bootstrap (a)")
    sb, cb = _arrays(*b, "paired_bootstrap (b)")
    if sa.shape != sb.shape:
        raise ValueError(f"paired_bootstrap needs the same units for both: got {sa.size} and {sb.size} units")

    def cmp(x, y):
        return x - y if compare == "diff" else x / y - 1

    point = float(cmp(_ratio(sa, ca, transform), _ratio(sb, cb, transform)))
    idx = _draws(sa.size, resamples, seed)  # (R, U), the same units for both
    stats = cmp(_ratio(sa, ca, transform, idx), _ratio(sb, cb, transform, idx))  # (R,)
    lo, hi = _percentiles(stats, level)
    return Interval(point, min(lo, point), max(hi, point), int(sa.size), level, "paired percentile bootstrap")


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a binomial share ``successes / n``."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"expected 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if successes == 0 else max(0.0, mid - half)
    hi = 1.0 if successes == n else min(1.0, mid + half)
    return lo, hi


def proportion(found: Sequence[Sequence[bool]], *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The share of keys found, ``found[u]`` the keys of prompt u: the bootstrap interval over
    prompts, widened to include the Wilson interval over all keys."""
    if not found or any(len(f) == 0 for f in found):
        raise ValueError(f"expected at least one prompt with at least one key each, got key counts {[len(f) for f in found]}")
    sums, counts = [sum(map(bool, f)) for f in found], [len(f) for f in found]
    boot = bootstrap(sums, counts, resamples=resamples, seed=seed, level=level)
    wlo, whi = wilson(sum(sums), sum(counts), level)
    return Interval(boot.point, min(boot.lo, wlo), max(boot.hi, whi), boot.units, level,
                    "percentile bootstrap over prompts, widened to the Wilson interval over keys")
