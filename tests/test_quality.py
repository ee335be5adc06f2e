"""Sample-quality metrics: Frechet distance, unbiased KID, k-NN precision / recall, and the
feature classifier."""

from __future__ import annotations

import numpy as np
import pytest

from memvol import quality


def test_frechet_distance_identical_zero_and_shift_closed_form():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
  assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
  shift = rng.normal(size=6)
  # equal covariances: FD is exactly |shift|^2
  assert quality.frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_frechet_distance_of_two_gaussians():
  # N(0, I) vs N(0, 4 I) in d dims: d (1 + 4 - 2 * 2) = d
  rng = np.random.default_rng(1)
  d = 4
  fd = quality.frechet_distance(rng.normal(size=(40000, d)), 2.0 * rng.normal(size=(40000, d)))
  assert fd == pytest.approx(d, rel=0.03)


def test_kid_unbiased_at_small_n_and_positive_for_a_shift():
  rng = np.random.default_rng(2)
  n, d, reps = 8, 5, 3000
  vals = np.array([quality.kid(rng.normal(size=(n, d)), rng.normal(size=(n, d))) for _ in range(reps)])
  se = vals.std(ddof=1) / np.sqrt(reps)
  assert abs(vals.mean()) < 3 * se
  # the biased V-statistic (diagonals kept) is clearly positive at this n: the test can fail
  def biased(a, b):
    k = lambda x, y: (x @ y.T / d + 1.0) ** 3  # noqa: E731
    return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()
  bvals = np.array([biased(rng.normal(size=(n, d)), rng.normal(size=(n, d))) for _ in range(300)])
  assert bvals.mean() > 10 * 3 * se
  shifted = [quality.kid(rng.normal(size=(n, d)), 1.0 + rng.normal(size=(n, d))) for _ in range(200)]
  assert np.mean(shifted) > 10 * 3 * se
  a = rng.normal(size=(50, d))
  assert abs(quality.kid(a, a)) < quality.kid(a, a + 1.0) / 20


def test_precision_recall():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(100, 3))
  assert quality.precision_recall(real, real, k=3) == (1.0, 1.0)
  assert quality.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
  # samples on a small part of the real support: high precision, low recall
  part = real[real[:, 0] > 1.0]
  p, r = quality.precision_recall(real, part, k=3)
  assert p == 1.0 and r < 0.5
  m = quality.metrics(real, real + 0.5)
  assert set(m) == {"fd", "kid", "precision", "recall"} and m["fd"] > 0


def test_metric_errors():
  with pytest.raises(ValueError, match="dimension"):
    quality.frechet_distance(np.zeros((4, 2)), np.zeros((4, 3)))
  with pytest.raises(ValueError, match="NaN"):
    quality.kid(np.full((4, 2), np.nan), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="n >= 2"):
    quality.precision_recall(np.zeros((1, 2)), np.zeros((4, 2)))


def test_classifier_learns_digits_and_its_features_separate_classes():
  from sklearn.datasets import load_digits
  d = load_digits()
  x = (d.images[..., None] / 8.0 - 1.0).astype(np.float32)
  y = d.target
  model, params, loss = quality.train_classifier(x[:1500], y[:1500], width=8, steps=300, batch=64, seed=0)
  import jax.numpy as jnp
  acc = np.mean(np.argmax(np.asarray(model.apply({"params": params}, jnp.asarray(x[1500:]))), 1) == y[1500:])
  assert acc > 0.8 and np.isfinite(loss)
  f = quality.embed(model, params, x[1500:], batch=64)
  assert f.shape == (len(x) - 1500, 16)
  zeros, ones = f[y[1500:] == 0], f[y[1500:] == 1]
  # another class is further (FD) than another half of the same class
  assert quality.frechet_distance(zeros[::2], ones) > 2 * quality.frechet_distance(zeros[::2], zeros[1::2])
  with pytest.raises(ValueError, match="labelled"):
    quality.train_classifier(x[:10], -np.ones(10, int), 4, 2, 4, 0)
