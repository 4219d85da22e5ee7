"""Quality metrics of bench_frontier.py: the energy distance of two sample sets (chunked, float64,
with the reference set's own term computed once), the Fréchet distance of two feature sets, the
digits classifier's logit features and the Pareto front of (cost, metric) points."""

from __future__ import annotations

import math

import numpy as np
import torch


def _mean_dist(x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> float:
    """Mean Euclidean distance over all (x_i, y_j) pairs, in row chunks so that no n x m matrix
    is held (20,000 x 20,000 would be 3.2 GB)."""
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        # the mm-based cdist loses digits where points nearly coincide; in float64 that is far
        # below the differences between samplers
        total += float(torch.cdist(x[i : i + chunk], y).sum())
    return total / (x.shape[0] * y.shape[0])


class EnergyReference:
    """A fixed reference sample and its within-set mean distance E|Y - Y'| (V-statistic: the
    diagonal zeros included), computed once: each :meth:`distance` then costs O(n m + n^2)."""

    def __init__(self, y: torch.Tensor):
        self.y = y.detach().reshape(y.shape[0], -1).to(torch.float64)
        self.yy = _mean_dist(self.y, self.y)

    def distance(self, x: torch.Tensor) -> float:
        """The squared energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (V-statistic, as
        ``specdiff_kernels.testing.two_sample.energy_distance_statistic``) of ``x`` to the
        reference. Its bias (about E|X - X'| / n) is the same for any sampler at the same n, so
        the floor (exact draws, same n) is what an exact sampler scores."""
        x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
        if x.shape[1] != self.y.shape[1]:
            raise ValueError(f"x has {x.shape[1]} features, the reference {self.y.shape[1]}")
        if not bool(torch.isfinite(x).all()):
            return math.inf
        return 2 * _mean_dist(x, self.y) - _mean_dist(x, x) - self.yy


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets [n, d] (the
    FID formula); the matrix square root from the symmetric form C_a^(1/2) C_b C_a^(1/2), whose
    eigenvalues are real and >= 0, so no complex parts to discard."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sa @ cb @ sa)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)


def digits_features(x: torch.Tensor) -> np.ndarray:
    """The embedded digit classifier's 11 logits (10 digits and "not a digit") of images
    [n, 1, 8, 8]: its decision function on the pixels clipped to [-1, 1], as
    ``digit_probabilities`` feeds it. The classifier is linear, so these are the features it
    has; they weigh the pixel directions that tell digits (and non-digits) apart."""
    from specdiff_kernels.models.digits_classifier import _fit

    a = x.detach().to("cpu", torch.float64).reshape(x.shape[0], -1).numpy()
    a = np.nan_to_num(np.clip(a, -1.0, 1.0))
    return _fit().decision_function(a)


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which of the (cost, metric) points no other point beats: another point with cost <= and
    metric <= and one of them strictly less dominates it. NaN / inf coordinates never count."""
    ok = [math.isfinite(c) and math.isfinite(m) for c, m in points]
    out = []
    for i, (c, m) in enumerate(points):
        if not ok[i]:
            out.append(False)
            continue
        dominated = any(
            ok[j] and c2 <= c and m2 <= m and (c2 < c or m2 < m)
            for j, (c2, m2) in enumerate(points)
            if j != i
        )
        out.append(not dominated)
    return out
