"""memvol.detect: chunked nearest neighbours vs brute force, the two copy criteria on
constructed copies, and the stage's files and errors."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest

from experiments.configs.base import get_base_config
from memvol import detect, io


def _brute(samples, train, k):
  s, t = samples.reshape(len(samples), -1).astype(np.float64), train.reshape(len(train), -1).astype(np.float64)
  d = np.sqrt(((s[:, None, :] - t[None, :, :]) ** 2).sum(-1))
  idx = np.argsort(d, axis=1)[:, :k]
  return d, idx, np.take_along_axis(d, idx, 1)


@pytest.mark.parametrize("chunk,train_chunk", [(7, 5), (16, 64), (64, 3), (1000, 1000)])
def test_nearest_neighbours_match_brute_force(chunk, train_chunk):
  rng = np.random.default_rng(0)
  samples = rng.uniform(-1, 1, (37, 4, 3, 2)).astype(np.float32)   # 37, 23: no chunk divides them
  train = rng.uniform(-1, 1, (23, 4, 3, 2)).astype(np.float32)
  d, idx, dk = _brute(samples, train, 5)
  nb = detect.nearest_neighbours(samples, train, k=5, chunk_size=chunk, train_chunk_size=train_chunk)
  np.testing.assert_array_equal(nb.index, idx)
  np.testing.assert_allclose(nb.dist, dk, rtol=1e-5)
  np.testing.assert_array_equal(nb.train_closest, d.argmin(0))
  np.testing.assert_allclose(nb.train_min_dist, d.min(0), rtol=1e-4)
  # k larger than the training set is capped
  assert detect.nearest_neighbours(samples, train, k=50, chunk_size=chunk).index.shape == (37, 23)


def test_exact_copies_have_zero_distance_despite_an_offset():
  rng = np.random.default_rng(1)
  train = (0.9 + 0.05 * rng.uniform(-1, 1, (30, 14, 14, 1))).astype(np.float32)   # large |x|^2
  samples = np.concatenate([train[[3, 17]], rng.uniform(-1, 1, (5, 14, 14, 1)).astype(np.float32)])
  nb = detect.nearest_neighbours(samples, train, k=2, chunk_size=4, train_chunk_size=8)
  assert nb.index[0, 0] == 3 and nb.index[1, 0] == 17
  assert nb.dist[0, 0] == 0.0 and nb.dist[1, 0] == 0.0
  assert nb.train_min_dist[3] == 0.0 and nb.train_closest[3] == 0 and nb.train_closest[17] == 1


def _copies_case():
  """8 training images far apart; samples: exact copies of 0 (twice) and 5, a near copy of
  2, an average of 6 and 7 (not a copy) and pure noise (not a copy)."""
  rng = np.random.default_rng(2)
  train = rng.choice([-1.0, 1.0], size=(8, 6, 6, 1)).astype(np.float32)
  near2 = train[2] + 0.05 * rng.normal(size=train[2].shape).astype(np.float32)
  samples = np.stack([train[0], train[5], near2, 0.5 * (train[6] + train[7]),
                      0.1 * rng.normal(size=train[0].shape).astype(np.float32), train[0]])
  return samples, train


def test_ratio_and_carlini_labels_on_constructed_copies():
  samples, train = _copies_case()
  nb = detect.nearest_neighbours(samples, train, k=8)
  r = detect.ratio_copies(nb, 8, 1.0 / 3.0)
  np.testing.assert_array_equal(r.copied, [True, True, True, False, False, True])
  np.testing.assert_array_equal(r.counts, [2, 0, 1, 0, 0, 1, 0, 0])
  assert r.score[0] == 0.0
  d, _, dk = _brute(samples, train, 8)
  np.testing.assert_allclose(r.score, dk[:, 0] / dk[:, 1], rtol=1e-5)
  c = detect.carlini_copies(nb, 8, n=5, alpha=0.5, delta=1.0 / 3.0)
  np.testing.assert_allclose(c.score, dk[:, 0] / (0.5 * dk[:, :5].mean(1)), rtol=1e-5)
  np.testing.assert_array_equal(c.copied, [True, True, True, False, False, True])
  np.testing.assert_array_equal(c.counts, r.counts)
  # a stricter delta drops the near copy but keeps the exact ones
  strict = detect.carlini_copies(nb, 8, n=5, alpha=0.5, delta=0.01)
  np.testing.assert_array_equal(strict.copied, [True, True, False, False, False, True])


def test_degenerate_distances():
  # a sample equal to two identical training images: ratio and Carlini's l are defined
  train = np.stack([np.ones((2, 2, 1)), np.ones((2, 2, 1)), -np.ones((2, 2, 1))]).astype(np.float32)
  nb = detect.nearest_neighbours(train[:1], train, k=2)
  assert detect.ratio_copies(nb, 3).score[0] == 1.0
  assert not detect.ratio_copies(nb, 3).copied[0]
  assert detect.carlini_copies(nb, 3, n=2, alpha=0.5).score[0] == 2.0
  with pytest.raises(ValueError, match="k >= 2"):
    detect.ratio_copies(detect.nearest_neighbours(train[:1], train, k=1), 3)


def _config():
  c = get_base_config()
  c.detect.carlini_n = 5
  c.detect.chunk_size = 4
  c.detect.train_chunk_size = 3
  return c


def _split(train, labels=None, ids=None, dup=None):
  n = len(train)
  st = types.SimpleNamespace(images=train, labels=np.arange(n) % 3 if labels is None else labels,
                             ids=np.arange(100, 100 + n) if ids is None else ids)
  return types.SimpleNamespace(train=st, heldout=st, dup_counts=np.ones(n, np.int64) if dup is None else dup)


def test_run_writes_csv_npz_and_png(tmp_path):
  samples, train = _copies_case()
  cfg, wd = _config(), str(tmp_path)
  io.save_npz(os.path.join(wd, "samples", "samples_sde.npz"), images=samples)
  out = detect.run(cfg, wd, split=_split(train))
  assert out["copied_samples_ratio"] == 4 and out["memorised_ratio"] == 3
  rows = io.load_csv(os.path.join(wd, "detect", "detect.csv"))
  assert list(rows[0]) == list(detect.DETECT_COLUMNS)
  assert [int(r["id"]) for r in rows] == list(range(100, 108))
  assert [int(r["copies_ratio"]) for r in rows] == [2, 0, 1, 0, 0, 1, 0, 0]
  assert [int(r["memorised"]) for r in rows] == [1, 0, 1, 0, 0, 1, 0, 0]
  assert float(rows[0]["min_distance"]) == 0.0 and int(rows[0]["closest_sample"]) in (0, 5)
  z = io.load_npz(os.path.join(wd, "detect", "nn.npz"))
  np.testing.assert_array_equal(z["nn_id"][:, 0], 100 + np.array([0, 5, 2, z["nn_index"][3, 0], z["nn_index"][4, 0], 0]))
  assert z["copied_ratio"].tolist() == [True, True, True, False, False, True]
  assert os.path.getsize(os.path.join(wd, "detect", "copies.png")) > 1000


def test_run_without_copies_still_draws_the_closest_pairs(tmp_path):
  rng = np.random.default_rng(3)
  train = rng.uniform(-1, 1, (10, 5, 5, 1)).astype(np.float32)
  wd = str(tmp_path)
  io.save_npz(os.path.join(wd, "samples", "samples_sde.npz"), images=rng.uniform(-1, 1, (6, 5, 5, 1)).astype(np.float32))
  out = detect.run(_config(), wd, split=_split(train))
  assert out["memorised_ratio"] == 0
  assert os.path.exists(os.path.join(wd, "detect", "copies.png"))


def test_run_errors(tmp_path):
  _, train = _copies_case()
  wd, cfg = str(tmp_path), _config()
  with pytest.raises(FileNotFoundError, match="--mode=sample"):
    detect.run(cfg, wd, split=_split(train))
  path = os.path.join(wd, "samples", "samples_sde.npz")
  io.save_npz(path, images=np.zeros((0, 6, 6, 1), np.float32))
  with pytest.raises(ValueError, match="zero samples"):
    detect.run(cfg, wd, split=_split(train))
  io.save_npz(path, images=np.zeros((3, 7, 7, 1), np.float32))
  with pytest.raises(ValueError, match="another data config"):
    detect.run(cfg, wd, split=_split(train))
  io.save_npz(path, other=np.zeros(3))
  with pytest.raises(ValueError, match="no 'images'"):
    detect.run(cfg, wd, split=_split(train))
  with open(path, "wb") as f:
    f.write(b"not a zip")
  with pytest.raises(ValueError, match="corrupt"):
    detect.run(cfg, wd, split=_split(train))
  io.save_npz(path, images=train[:2])
  with pytest.raises(ValueError, match="split arrays disagree"):
    detect.run(cfg, wd, split=_split(train, dup=np.ones(3, np.int64)))
  assert not os.path.exists(os.path.join(wd, "detect", "detect.csv"))


def test_agreement_of_two_copy_sets():
  def copies(nn1, copied, n=5):
    nn1, copied = np.asarray(nn1), np.asarray(copied, bool)
    return detect.Copies(np.zeros(len(nn1)), copied, detect._counts(nn1, copied, n))

  a = copies([0, 0, 1, 2, 4], [1, 1, 1, 0, 0])        # copies images 0 (twice) and 1
  b = copies([0, 1, 1, 3, 4], [1, 0, 1, 1, 0])        # copies images 0, 1 and 3
  ag = detect.agreement(a, b)
  assert ag["copy_rate"] == (0.6, 0.6) and ag["distinct"] == (2, 3)
  assert ag["jaccard"] == pytest.approx(2 / 3) and ag["only_a"] == [] and ag["only_b"] == [3]
  assert detect.agreement(a, a)["spearman"] == pytest.approx(1.0)
  none = copies([0, 1, 2, 3, 4], [0, 0, 0, 0, 0])
  assert np.isnan(detect.agreement(none, none)["jaccard"])
  with pytest.raises(ValueError, match="not the same set"):
    detect.agreement(a, copies([0], [1], n=3))
