"""Statistical checks that two sets of samples share a law (scipy.stats underneath).

Used by the exactness tests, the demo's p-value and the benchmarks' quality columns: speculative
sampling must keep the ancestral chain's law, so these tests are the product's acceptance tests.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from scipy.spatial.distance import cdist


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def bonferroni(pvalues) -> float:
    """Bonferroni-combined p-value: min(1, m * min p)."""
    p = np.asarray(pvalues, dtype=np.float64)
    return float(min(1.0, p.min() * p.size))


def random_directions(D: int, n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, D))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def gaussian_one_sample_pvalue(
    x, mean, cov, *, n_proj: int = 8, seed: int = 0, extra_dirs=None
) -> float:
    """H0: rows of x ~ N(mean, cov). KS of the squared Mahalanobis distances against chi2_D and KS
    of standardised random projections against N(0, 1); Bonferroni-combined p-value."""
    x = _np(x)
    D = x.shape[1]
    diff = x - np.asarray(mean, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    prec = np.linalg.inv(cov)
    m2 = np.einsum("nd,de,ne->n", diff, prec, diff)
    ps = [stats.kstest(m2, stats.chi2(D).cdf).pvalue]
    dirs = random_directions(D, n_proj, seed)
    if extra_dirs is not None:
        dirs = np.concatenate([dirs, np.asarray(extra_dirs, dtype=np.float64)])
    for v in dirs:
        z = diff @ v / math.sqrt(v @ cov @ v)
        ps.append(stats.kstest(z, stats.norm.cdf).pvalue)
    return bonferroni(ps)


def per_coordinate_ks_pvalue(x, y) -> float:
    """Two-sample KS per coordinate, Bonferroni over coordinates."""
    x, y = _np(x), _np(y)
    return bonferroni([stats.ks_2samp(x[:, d], y[:, d]).pvalue for d in range(x.shape[1])])


def energy_distance_statistic(x, y) -> float:
    """The (squared) energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| between two samples (V-statistic)."""
    x, y = _np(x), _np(y)
    return float(2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean())


def energy_distance_pvalue(x, y, *, n_resamples: int = 2999, seed: int = 0) -> float:
    """Multivariate energy-distance two-sample permutation test: scipy.stats.permutation_test
    permuting indices into the pooled sample; the statistic
    2 E|X-Y| - E|X-X'| - E|Y-Y'| is computed from the precomputed pooled distance matrix with one
    matrix product per batch of permutations."""
    x, y = _np(x), _np(y)
    z = np.concatenate([x, y])
    dist = cdist(z, z)
    total = dist.sum()
    nx, n = x.shape[0], z.shape[0]
    ny = n - nx

    def energy(ix, iy, axis=-1):
        ix = np.atleast_2d(ix)
        mask = np.zeros((ix.shape[0], n))
        np.put_along_axis(mask, ix, 1.0, axis=1)
        dm = mask @ dist  # [P, n]: sum over x of distances
        sxx = (dm * mask).sum(1)
        sx_all = dm.sum(1)
        sxy = sx_all - sxx
        syy = total - 2 * sxy - sxx
        return 2 * sxy / (nx * ny) - sxx / nx**2 - syy / ny**2

    res = stats.permutation_test(
        (np.arange(nx), np.arange(nx, n)),
        energy,
        permutation_type="independent",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="greater",
        batch=100,
        random_state=np.random.default_rng(seed),
    )
    return float(res.pvalue)


def two_sample_pvalue(x, y, seed: int = 0) -> float:
    """Combined two-sample test: per-coordinate KS (Bonferroni) and the energy permutation test,
    Bonferroni over the two."""
    return bonferroni([per_coordinate_ks_pvalue(x, y), energy_distance_pvalue(x, y, seed=seed)])


def sliced_wasserstein(x, y, *, n_proj: int = 128, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance: mean over random directions of
    scipy.stats.wasserstein_distance of the projected samples."""
    x, y = _np(x), _np(y)
    dirs = random_directions(x.shape[1], n_proj, seed)
    return float(np.mean([stats.wasserstein_distance(x @ v, y @ v) for v in dirs]))
