"""A tiny, deterministic digit classifier used by tests to check that samples look like digits.

:func:`digit_confidence` returns, per sample, the top-class probability of a classifier fitted
(in about a second, on first use, then cached) on sklearn's bundled digits scaled to [-1, 1].

The classifier is multinomial logistic regression on the 64 pixels with an 11th "not a digit"
class. Plain softmax classifiers are confidently wrong far from the data (a linear logit grows
with the input norm, so pure noise gets top-class probabilities near 1); the extra class is
trained on clearly non-digit images -- clipped Gaussian noise at several scales, uniform
noise, blurred noise, and digits drowned in unit-variance noise -- so that the reported confidence (the largest of the ten DIGIT probabilities, the
"not a digit" probability is never reported) is high for digit-like images and low for noise.
Everything is seeded; the fit is deterministic.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["digit_confidence", "digit_predict", "digit_probabilities"]

_SEED = 0
_NOT_A_DIGIT = 10
_C = 3.0


def _blur(x: np.ndarray) -> np.ndarray:
    """3x3 box blur of [N, 8, 8] images (edge-replicated)."""
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    out = np.zeros_like(x)
    for di in range(3):
        for dj in range(3):
            out += p[:, di : di + 8, dj : dj + 8]
    return out / 9.0


def _negatives(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = digits.shape[0]
    parts = []
    # pure noise of several kinds and scales
    for scale in (0.5, 1.0, 2.0):
        parts.append(np.clip(rng.standard_normal((n // 3, 64)) * scale, -1, 1))
    parts.append(rng.uniform(-1, 1, (n // 2, 64)))
    blurred = _blur(rng.standard_normal((n, 8, 8)) * 2.0)
    parts.append(
        np.clip(blurred / blurred.reshape(n, -1).std(1)[:, None, None] * 0.7 - 0.3, -1, 1).reshape(
            n, 64
        )
    )
    # digits destroyed by strong noise
    k = rng.integers(0, n, n)
    parts.append(np.clip(digits[k] + rng.standard_normal((n, 64)) * 1.0, -1, 1))
    return np.concatenate(parts, axis=0)


@lru_cache(maxsize=1)
def _fit():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    ds = load_digits()
    x = ds.images.reshape(-1, 64).astype(np.float64) / 8.0 - 1.0
    y = ds.target.astype(np.int64)
    rng = np.random.default_rng(_SEED)
    neg = _negatives(x, rng)
    xa = np.concatenate([x, neg], axis=0)
    ya = np.concatenate([y, np.full(neg.shape[0], _NOT_A_DIGIT, dtype=np.int64)])
    clf = LogisticRegression(C=_C, max_iter=5000)
    clf.fit(xa, ya)
    return clf


def digit_probabilities(samples: torch.Tensor) -> torch.Tensor:
    """[B, 11] float32 class probabilities (digits 0..9, then "not a digit")."""
    x = samples.detach().to("cpu", torch.float64).reshape(samples.shape[0], -1).numpy()
    if x.shape[1] != 64:
        raise ValueError(f"expected [B, 1, 8, 8] (64 pixels), got {tuple(samples.shape)}")
    x = np.nan_to_num(np.clip(x, -1.0, 1.0))
    return torch.as_tensor(_fit().predict_proba(x), dtype=torch.float32)


def digit_confidence(samples: torch.Tensor) -> torch.Tensor:
    """Top DIGIT-class probability, [B] float32, for samples [B, 1, 8, 8] in [-1, 1]."""
    return digit_probabilities(samples)[:, :10].max(dim=1).values


def digit_predict(samples: torch.Tensor) -> torch.Tensor:
    """Predicted digit (0..9) per sample, int64 [B] (ignores the "not a digit" class)."""
    return digit_probabilities(samples)[:, :10].argmax(dim=1)
