"""Is a difference between two systems on the same queries real? A paired randomisation test.

Inputs: per-query scores of system a and of system b on the same queries. Under the null
hypothesis the two systems are exchangeable on every query, so each query's difference keeps or
flips its sign with probability 1/2 (Fisher's randomisation test, as Smucker, Allan & Carterette
2007 recommend for IR). The p-value is two-sided: the share of sign assignments whose mean
difference is at least as far from zero as the observed one, exact when 2^n is within `trials`,
else estimated from `trials` random assignments (the observed one counted, so p > 0). The 95%
interval of the mean difference is a percentile bootstrap over queries.
"""

from __future__ import annotations

import itertools

import numpy as np


def paired_test(a: list[float] | np.ndarray, b: list[float] | np.ndarray, trials: int = 20_000,
                seed: int = 0) -> dict[str, float]:
    """{mean_difference (a - b), p_value, ci_low, ci_high, queries}."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or len(diff) == 0:
        raise ValueError("paired_test: two equal-length, non-empty lists of per-query scores")
    n = len(diff)
    observed = abs(diff.mean())
    tolerance = 1e-12 * max(1.0, observed)
    rng = np.random.default_rng(seed)
    if 2 ** n <= trials:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        p_value = float(np.mean(np.abs(signs @ diff / n) >= observed - tolerance))
    else:
        hits = 0
        for start in range(0, trials, 4096):
            signs = rng.choice((1.0, -1.0), size=(min(4096, trials - start), n))
            hits += int(np.sum(np.abs(signs @ diff / n) >= observed - tolerance))
        p_value = (hits + 1) / (trials + 1)
    means = np.empty(trials)
    for start in range(0, trials, 4096):
        rows = min(4096, trials - start)
        means[start:start + rows] = diff[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean_difference": float(diff.mean()), "p_value": p_value, "ci_low": float(low), "ci_high": float(high),
            "queries": n}
