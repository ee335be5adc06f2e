"""memvol.predictors: data-only predictors on hand-built sets with known distances."""

import numpy as np
import pytest

from memvol import predictors


def _points(values):
  """Images [N, 1, 1, 1] whose pixel distances are the differences of `values`."""
  return np.asarray(values, np.float32).reshape(-1, 1, 1, 1)


def test_pixel_distances_known():
  x = _points([0.0, 0.1, 0.3, 0.7, -0.5, 1.0])
  out = predictors.data_only_predictors(x, k=2)
  np.testing.assert_allclose(out["nn1_pixel"], [0.1, 0.1, 0.2, 0.3, 0.5, 0.3], atol=1e-6)
  np.testing.assert_allclose(out["nn5_pixel"], [0.2, 0.15, 0.25, 0.35, 0.55, 0.5], atol=1e-6)  # mean of k = 2
  assert set(out) == {"nn1_pixel", "nn5_pixel", "png_bytes"}


def test_same_class_and_features():
  x = _points([0.0, 0.1, 0.5, 0.55, 0.9, 0.95, -0.9])
  labels = np.array([0, 1, 0, 1, 0, 1, 2])
  feats = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 1.0], [9.0, 12.0], [0.0, 3.0], [30.0, 40.0]])
  out = predictors.data_only_predictors(x, labels=labels, features=feats, k=1)
  np.testing.assert_allclose(out["nn1_pixel_same_class"][:6], [0.5, 0.45, 0.4, 0.4, 0.4, 0.4], atol=1e-6)
  assert np.isnan(out["nn1_pixel_same_class"][6])  # alone in its class
  np.testing.assert_allclose(out["nn1_feature"], [1, np.sqrt(10), 5, 1, 5, 2, 35], atol=1e-5)
  np.testing.assert_allclose(out["nn5_feature"], out["nn1_feature"])  # k = 1


def test_duplicates_are_at_distance_zero():
  x = _points([0.2, 0.2, 0.6])
  out = predictors.data_only_predictors(x, k=1)
  np.testing.assert_allclose(out["nn1_pixel"], [0.0, 0.0, 0.4], atol=1e-6)


def test_png_bytes_constant_smaller_than_noise():
  rng = np.random.default_rng(0)
  x = np.concatenate([np.full((1, 16, 16, 1), -1.0), rng.uniform(-1, 1, (1, 16, 16, 1)),
                      np.zeros((1, 16, 16, 1))]).astype(np.float32)
  b = predictors.png_bytes(x)
  assert b[0] < b[1] and b[2] < b[1] and b.dtype == np.int64
  rgb = predictors.png_bytes(np.repeat(x, 3, -1))
  assert rgb[1] > b[1]


@pytest.mark.parametrize("images, k, match", [
    (np.zeros((0, 2, 2, 1)), 5, "empty"),
    (np.zeros((4, 2, 2)), 1, r"\[N, H, W, C\]"),
    (np.zeros((3, 2, 2, 1)), 5, "N >= 6"),
    (np.full((7, 2, 2, 1), np.nan), 5, "NaN"),
    (np.zeros((7, 2, 2, 1)), 0, "k must be"),
])
def test_bad_input(images, k, match):
  with pytest.raises(ValueError, match=match):
    predictors.data_only_predictors(images, k=k)


def test_bad_labels_and_features():
  x = _points(np.linspace(-1, 1, 8))
  with pytest.raises(ValueError, match="labels"):
    predictors.data_only_predictors(x, labels=np.zeros(7), k=1)
  with pytest.raises(ValueError, match="features"):
    predictors.data_only_predictors(x, features=np.zeros((7, 3)), k=1)
  with pytest.raises(ValueError, match="NaN"):
    predictors.data_only_predictors(x, features=np.full((8, 3), np.nan), k=1)
