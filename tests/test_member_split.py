"""A published member split (data.member_split_path, the npz of mia_train_idxs /
mia_eval_idxs that PIA and SecMI publish): members and non-members indexed as published,
subsampled by split_seed, and clear errors for bad files."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.configs.base import get_base_config
from memvol import data

MEMBERS = np.array([13, 3, 17, 5, 8, 0, 11, 14])
NONMEMBERS = np.array([1, 2, 19, 7, 4, 9, 16])


@pytest.fixture
def source(tmp_path):
  """20 images whose pixels encode their index (i / 20), labels i % 2, and a split file."""
  images = np.broadcast_to((np.arange(20) / 20.0)[:, None, None, None], (20, 4, 4, 3)).astype(np.float32)
  path = tmp_path / "pool.npz"
  np.savez(path, images=images, labels=np.arange(20) % 2)
  split = tmp_path / "split.npz"
  np.savez(split, mia_train_idxs=MEMBERS, mia_eval_idxs=NONMEMBERS, ratio=0.5)
  c = get_base_config().data
  c.update(dict(name="npz", path=str(path), resolution=0, num_train=len(MEMBERS),
                num_heldout=len(NONMEMBERS), num_duplicated=0, member_split_path=str(split)))
  return c, tmp_path


def _index(images):
  """The source index each image encodes (floats in [0, 1] arrive as 2 x - 1)."""
  return np.rint((images[:, 0, 0, 0] + 1) * 10).astype(int)


def test_members_and_nonmembers_are_the_published_indices(source):
  c, _ = source
  split = data.make_split(c)
  np.testing.assert_array_equal(split.train.ids, np.sort(MEMBERS))
  np.testing.assert_array_equal(split.heldout.ids, np.sort(NONMEMBERS))
  np.testing.assert_array_equal(_index(split.train.images), split.train.ids)  # image i is source image i
  np.testing.assert_array_equal(_index(split.heldout.images), split.heldout.ids)
  np.testing.assert_array_equal(split.train.labels, split.train.ids % 2)
  assert not np.intersect1d(split.train.ids, split.heldout.ids).size
  assert np.all(split.dup_counts == 1)


def test_subsample_by_split_seed(source):
  c, _ = source
  c.num_train, c.num_heldout = 4, 3
  a = data.make_split(c)
  assert set(a.train.ids) <= set(MEMBERS) and set(a.heldout.ids) <= set(NONMEMBERS)
  assert len(a.train) == 4 and len(a.heldout) == 3
  assert sorted(a.train.labels.tolist()) == [0, 0, 1, 1]  # class-balanced draw
  np.testing.assert_array_equal(data.make_split(c).train.ids, a.train.ids)  # deterministic
  draws = set()
  for seed in range(6):
    c.split_seed = seed
    draws.add(tuple(data.make_split(c).train.ids))
  assert len(draws) > 1


@pytest.mark.parametrize("content, match", [
    (dict(mia_train_idxs=MEMBERS, eval_idxs=NONMEMBERS), "no array 'mia_eval_idxs'"),
    (dict(mia_train_idxs=MEMBERS, mia_eval_idxs=np.array([1, 20])), "'mia_eval_idxs' holds index 20, outside the 20"),
    (dict(mia_train_idxs=np.array([-1, 3]), mia_eval_idxs=NONMEMBERS), "'mia_train_idxs' holds index -1"),
    (dict(mia_train_idxs=MEMBERS, mia_eval_idxs=np.array([1, 3])), "index 3 is in both"),
    (dict(mia_train_idxs=MEMBERS.astype(float), mia_eval_idxs=NONMEMBERS), "'mia_train_idxs' must be a non-empty 1-D integer"),
    (dict(mia_train_idxs=np.array([3, 3]), mia_eval_idxs=NONMEMBERS), "'mia_train_idxs' repeats"),
])
def test_bad_split_files_are_refused_naming_the_key(source, content, match):
  c, tmp = source
  bad = tmp / "bad.npz"
  np.savez(bad, **content)
  c.member_split_path = str(bad)
  c.num_train, c.num_heldout = 2, 2
  with pytest.raises(ValueError, match=match):
    data.make_split(c)


def test_bad_settings_are_refused(source):
  c, tmp = source
  c.num_train = len(MEMBERS) + 1
  with pytest.raises(ValueError, match=r"data.num_train=9 must be in \[1, 8\], the members"):
    data.make_split(c)
  c.num_train, c.num_duplicated = 4, 2
  with pytest.raises(ValueError, match="data.num_duplicated must be unset"):
    data.make_split(c)
  c.num_duplicated, c.heldout_name = 0, "cifar10_test"
  with pytest.raises(ValueError, match="data.heldout_name must be unset"):
    data.make_split(c)
  c.heldout_name, c.member_split_path = "", str(tmp / "missing.npz")
  with pytest.raises(FileNotFoundError, match="member_split_path"):
    data.make_split(c)


def test_workdirs_recorded_before_the_field_still_match():
  """A split.json written before data.member_split_path existed records no such field: it
  counts as "" (unset), so those workdirs resume."""
  from memvol import io
  new = io.config_to_dict(get_base_config().data)
  old = {k: v for k, v in new.items() if k != "member_split_path"}
  assert io.config_diff({"data": old}, {"data": new}) == []
  assert io.config_diff({"data": old}, {"data": {**new, "member_split_path": "x.npz"}})
