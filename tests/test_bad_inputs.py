"""A newcomer's bad inputs, through the entry point's own call (pipeline.run): each is a
clear error naming the input, before anything is half-written in the workdir."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import tiny_chain
from experiments.configs.base import get_base_config
from memvol import pipeline

QUIET = lambda m: None  # noqa: E731


def _run(c, wd, mode="train"):
  pipeline.run(c, wd, mode, log=QUIET, reference=get_base_config())


def _written(wd):
  """What the failed run left in the workdir, beyond the config record every run writes first."""
  return sorted(os.path.relpath(os.path.join(r, f), wd) for r, _, fs in os.walk(wd) for f in fs
                if f != "config.json")


def _user_data(name, path, **changes):
  return tiny_chain.config(data__name=name, data__path=str(path), data__resolution=0, data__num_train=4,
                           data__num_heldout=2, data__num_duplicated=0, data__balanced=False, **changes)


def _pngs(folder, sizes):
  folder.mkdir()
  for k, s in enumerate(sizes):
    Image.fromarray(np.full((s, s), 40 * k, np.uint8), "L").save(folder / f"{k}.png")


def test_folder_of_mixed_sizes(tmp_path):
  _pngs(tmp_path / "imgs", (8, 8, 8, 6, 8, 8))
  with pytest.raises(ValueError, match=r"imgs: images of different sizes \[\(6, 6, 1\), \(8, 8, 1\)\]; set data.resolution"):
    _run(_user_data("folder", tmp_path / "imgs"), str(tmp_path / "wd"))
  assert _written(str(tmp_path / "wd")) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png(tmp_path, damage):
  _pngs(tmp_path / "imgs", (8,) * 6)
  bad = tmp_path / "imgs" / "3.png"
  if damage == "garbage":
    bad.write_bytes(b"\x00not a png at all" * 4)
  else:
    bad.write_bytes(bad.read_bytes()[:40])
  with pytest.raises(ValueError, match=r"3\.png: not a readable image"):
    _run(_user_data("folder", tmp_path / "imgs"), str(tmp_path / "wd"))
  assert _written(str(tmp_path / "wd")) == []


@pytest.mark.parametrize("arrays, match", [
    ({"images": np.linspace(0, 255, 6 * 16).reshape(6, 4, 4)}, r"f.npz:images: float values in \[0, 255\]; expected \[0, 1\] or \[-1, 1\]"),
    ({"images": np.where(np.arange(96).reshape(6, 4, 4) == 7, np.nan, 0.5)}, r"f.npz.*1 NaN/inf values"),
    ({"pixels": np.zeros((6, 4, 4))}, r"f.npz: no array `images` or `x` \(found \['pixels'\]\)"),
], ids=["0-255 floats", "NaN", "wrong key"])
def test_bad_npz(tmp_path, arrays, match):
  np.savez(tmp_path / "f.npz", **arrays)
  with pytest.raises(ValueError, match=match):
    _run(_user_data("npz", tmp_path / "f.npz"), str(tmp_path / "wd"))
  assert _written(str(tmp_path / "wd")) == []


def test_data_path_that_does_not_exist(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data.path=.*missing.npz' does not exist"):
    _run(_user_data("npz", tmp_path / "missing.npz"), str(tmp_path / "wd"))
  assert _written(str(tmp_path / "wd")) == []


def test_score_on_an_empty_workdir(tmp_path):
  wd = str(tmp_path / "wd")
  with pytest.raises(FileNotFoundError, match=r"run training first \(--mode=train\)|train first"):
    _run(tiny_chain.config(), wd, "score")
  assert _written(wd) == []


def test_mitigate_plan_with_an_unknown_score_column(tmp_path):
  """Refused before the baseline chain trains anything (it would take minutes to hours)."""
  c = tiny_chain.config()
  c.mitigate.score_column = "hutchinson_log_volume"   # the tiny chain scores with `exact` only
  wd = str(tmp_path / "wd")
  with pytest.raises(ValueError, match=r"mitigate.score_column='hutchinson_log_volume'.*exact_log_volume"):
    _run(c, wd, "mitigate")
  assert _written(wd) == []
