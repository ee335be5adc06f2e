"""The pool's data-only predictors, kept beside the records as pool.json.

Per pool image (plan order): memvol.predictors' nearest-other distances in pixels (k = 1,
the mean of k = 5, the same class) and in the features of memvol.quality's classifier
(trained, seeded, on the source's labelled images outside the pool, so it has seen none of
the pool), and the PNG size. They need no diffusion model, so a curator can read them before
any training; the analysis sets them beside the copy propensity and the OUT-model scores.
"""

from __future__ import annotations

import math
import os
import types
from typing import Any

import numpy as np

from memvol import data, io, predictors, quality

FILE = "pool.json"
DIGITS = 6  # significant digits kept


def compute(config: Any, ids: np.ndarray, labels: np.ndarray, folder: str) -> dict[str, Any]:
  """pool.json's content for the pool `ids` (ascending) with `labels`; the classifier is
  trained (or reused) in `folder`."""
  whole = data.load_pool(config.data)
  pos = np.searchsorted(whole.ids, ids)
  if not np.array_equal(whole.ids[np.minimum(pos, len(whole.ids) - 1)], ids):
    raise ValueError(f"pool ids {ids[:8]}... are not all in data.name={config.data.name!r}")
  pool = whole.take(pos)
  ref = quality.Reference.build(config, types.SimpleNamespace(train=pool, heldout=pool), folder)
  feats = None if ref.model is None else quality.embed(ref.model, ref.params, pool.images)
  pred = predictors.data_only_predictors(pool.images, labels=np.asarray(labels), features=feats)
  meta = os.path.join(folder, "classifier.json")
  return {"ids": [int(i) for i in ids], "labels": [int(v) for v in labels],
          "predictors": {k: [float(f"{x:.{DIGITS}g}") if math.isfinite(x) else None for x in v]
                         for k, v in pred.items()},
          "classifier": io.load_json(meta) if os.path.exists(meta) else None}


def ensure(config: Any, ids: np.ndarray, labels: np.ndarray, records_dir: str, folder: str) -> dict[str, Any]:
  """records_dir/pool.json (written once; one of another pool is refused)."""
  path = os.path.join(records_dir, FILE)
  if os.path.exists(path):
    old = io.load_json(path)
    if old["ids"] != [int(i) for i in ids]:
      raise ValueError(f"{path} describes another pool; use a new bench.records_dir")
    return old
  out = compute(config, ids, labels, folder)
  os.makedirs(records_dir, exist_ok=True)
  io.save_json(path, out)
  return out


def load(records_dir: str) -> dict[str, np.ndarray] | None:
  """The predictors of records_dir/pool.json as arrays (NaN for null), or None without one."""
  path = os.path.join(records_dir, FILE)
  if not os.path.exists(path):
    return None
  pred = io.load_json(path)["predictors"]
  return {k: np.array([np.nan if x is None else x for x in v], np.float64) for k, v in pred.items()}
