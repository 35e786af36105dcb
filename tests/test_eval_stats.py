"""The eval's intervals: coverage on synthetic data, determinism, pairing, edge cases, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lychee_fx.apps.eval_stats import Interval, bootstrap, paired_bootstrap, proportion, wilson


def test_bootstrap_covers_the_true_mean_about_95_percent_of_the_time():
    """Clustered keys (a per-prompt ability drawn around p): the prompt bootstrap covers p in
    about 95% of 300 synthetic evals (binomial sd of the rate at 300 trials: 1.3 points)."""
    rng = np.random.default_rng(1)
    p, prompts, keys, hits = 0.7, 64, 2, 0
    trials = 300
    for t in range(trials):
        ability = np.clip(rng.normal(p, 0.2, prompts), 0, 1)
        found = rng.random((prompts, keys)) < ability[:, None]
        iv = bootstrap(found.sum(1), np.full(prompts, keys), resamples=1000, seed=t)
        hits += iv.contains(p)
    assert 0.89 <= hits / trials <= 0.99, hits / trials


def test_interval_width_matches_the_binomial_formula_for_independent_keys():
    rng = np.random.default_rng(2)
    found = rng.random(512) < 0.5
    iv = bootstrap(found.astype(float), np.ones(512), seed=0)
    expected = 1.96 * math.sqrt(0.25 / 512)  # 4.3 points
    assert iv.half_width == pytest.approx(expected, rel=0.15)


def test_bootstrap_is_deterministic_given_the_seed():
    rng = np.random.default_rng(4)
    sums, counts = rng.integers(0, 3, 40), np.full(40, 2)
    assert bootstrap(sums, counts, seed=5) == bootstrap(sums, counts, seed=5)
    assert bootstrap(sums, counts, seed=5) != bootstrap(sums, counts, seed=6)


def test_perplexity_is_exp_of_the_pooled_mean_per_resample():
    nll_sums, tokens = [64 * 2.0, 64 * 2.2, 32 * 1.9], [64, 64, 32]
    iv = bootstrap(nll_sums, tokens, transform="exp", seed=0)
    assert iv.point == pytest.approx(math.exp(sum(nll_sums) / sum(tokens)))
    assert math.exp(1.9) - 1e-9 <= iv.lo < iv.point < iv.hi <= math.exp(2.2) + 1e-9


def test_edge_cases_one_prompt_and_all_correct():
    one = bootstrap([1], [2])
    assert (one.point, one.lo, one.hi, one.units) == (0.5, 0.5, 0.5, 1)
    allc = proportion([[True, True]] * 10)
    assert allc.point == allc.hi == 1.0
    assert allc.lo == pytest.approx(wilson(20, 20)[0]) and allc.lo < 0.9  # not a width-0 interval
    single = proportion([[True, False]])
    assert single.lo < 0.5 < single.hi


def test_wilson_known_values():
    lo, hi = wilson(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0


def test_paired_bootstrap_sees_a_small_consistent_difference_the_unpaired_intervals_hide():
    rng = np.random.default_rng(3)
    base = rng.random((200, 2)) < rng.random(200)[:, None]  # strongly prompt-dependent
    better = base | (rng.random((200, 2)) < 0.08)
    a = (better.sum(1), np.full(200, 2))
    b = (base.sum(1), np.full(200, 2))
    ia, ib = bootstrap(*a, seed=0), bootstrap(*b, seed=0)
    assert ia.lo < ib.hi  # the separate intervals overlap
    d = paired_bootstrap(a, b, seed=0)
    assert d.point == pytest.approx(ia.point - ib.point) and d.lo > 0
    same = paired_bootstrap(b, b, seed=0)
    assert (same.point, same.lo, same.hi) == (0.0, 0.0, 0.0)
    rel = paired_bootstrap(([2.2], [1]), ([2.0], [1]), transform="exp", compare="rel")
    assert rel.point == pytest.approx(math.exp(0.2) - 1)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: bootstrap([], []), "expected at least one unit, got 0"),
        (lambda: bootstrap([1, 2], [1]), r"expected sums and counts of one shape \(U,\), got \(2,\) and \(1,\)"),
        (lambda: bootstrap([1], [0]), "every unit needs a count > 0, got 0"),
        (lambda: bootstrap([1], [1], resamples=10), "expected at least 1000 resamples, got 10"),
        (lambda: bootstrap([1], [1], transform="log"), "unknown transform 'log'"),
        (lambda: paired_bootstrap(([1], [1]), ([1, 1], [1, 1])), "same units for both: got 1 and 2 units"),
        (lambda: paired_bootstrap(([1], [1]), ([1], [1]), compare="ratio"), "unknown comparison 'ratio'"),
        (lambda: proportion([]), "at least one prompt"),
        (lambda: wilson(3, 2), "expected 0 <= successes <= n"),
        (lambda: Interval(0.5, 0.6, 0.4, 1), r"lo <= hi, got \[0.6, 0.4\]"),
    ],
)
def test_errors_name_expected_and_actual(call, match):
    with pytest.raises(ValueError, match=match):
        call()
