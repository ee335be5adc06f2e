"""Data-only predictors of which images a model will copy: no model, no training.

Per image of a set [N, H, W, C] in [-1, 1]:

  nn1_pixel             L2 distance (pixels, flattened) to the nearest *other* image of the set
  nn5_pixel             mean L2 distance to its k nearest other images (k = 5 by default)
  nn1_pixel_same_class  nn1_pixel among the images of its own class (NaN when it is alone there)
  nn1_feature           nn1 in a feature space (e.g. memvol.quality.embed's classifier features)
  nn5_feature           the k-mean in that feature space
  png_bytes             the image's compressed size as a lossless PNG (8-bit, Pillow, level 9): complexity

An isolated image passes the ratio copy criterion (d1 / d2 < 1/3) more easily; a crowded one
falls inside an absolute radius more often (DESIGN.md section 4), so these distances predict
the copy propensity with a sign that depends on the copy label. The search is
memvol.detect.nearest_neighbours (exact L2 of the kept pairs), the set against itself.
"""

from __future__ import annotations

import io as _io

import numpy as np

from memvol import detect


def _check(images: np.ndarray, k: int) -> np.ndarray:
  x = np.asarray(images)
  if x.ndim != 4:
    raise ValueError(f"images: expected [N, H, W, C], got shape {x.shape}")
  if x.shape[0] == 0:
    raise ValueError("images: the set is empty")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if x.shape[0] < k + 1:
    raise ValueError(f"images: {x.shape[0]} image(s); the mean over the k = {k} nearest others needs N >= {k + 1}")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError("images contain NaN or inf")
  return x


def nearest_others(x: np.ndarray, k: int) -> np.ndarray:
  """dist [N, k]: L2 distances of each row of x [N, ...] to its k nearest *other* rows,
  increasing (an exact duplicate elsewhere counts, at distance 0). Needs N >= k + 1."""
  n = x.shape[0]
  if n < k + 1:
    raise ValueError(f"{n} point(s): the {k} nearest others need N >= {k + 1}")
  nb = detect.nearest_neighbours(x, x, k=k + 1)
  not_self = nb.index != np.arange(n)[:, None]
  # A row whose own index is not among its k + 1 (duplicates at distance 0 won the ties)
  # drops its farthest neighbour instead.
  not_self[not_self.all(1), -1] = False
  return nb.dist[not_self].reshape(n, k).astype(np.float64)


def nn1_same_class(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """[N] distance of each row of x to the nearest other row of its class; NaN when alone."""
  out = np.full(x.shape[0], np.nan)
  for c in np.unique(labels):
    where = np.flatnonzero(labels == c)
    if where.size > 1:
      out[where] = nearest_others(x[where], 1)[:, 0]
  return out


def png_bytes(images: np.ndarray) -> np.ndarray:
  """[N] bytes of each image [H, W, C] in [-1, 1] as an 8-bit lossless PNG (grey for C = 1,
  RGB for C = 3), compression level 9."""
  from PIL import Image  # noqa: PLC0415

  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"png_bytes: expected images [N, H, W, 1 or 3], got shape {x.shape}")
  u8 = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  out = np.zeros(len(u8), np.int64)
  for i, im in enumerate(u8):
    buf = _io.BytesIO()
    Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(buf, format="PNG", optimize=False, compress_level=9)
    out[i] = buf.tell()
  return out


def data_only_predictors(images: np.ndarray, labels: np.ndarray | None = None, features: np.ndarray | None = None,
                         k: int = 5) -> dict[str, np.ndarray]:
  """The predictors of the module doc for images [N, H, W, C] in [-1, 1], optional labels [N]
  (adds nn1_pixel_same_class) and features [N, F] (adds nn1_feature, nn5_feature); k the
  neighbours averaged by the nn5_ columns (named nn5_ whatever k is). Each value is [N]."""
  x = _check(images, k)
  flat = x.reshape(len(x), -1)
  d = nearest_others(flat, k)
  out = {"nn1_pixel": d[:, 0], "nn5_pixel": d.mean(1)}
  if labels is not None:
    lab = np.asarray(labels)
    if lab.shape != (len(x),):
      raise ValueError(f"labels: expected shape ({len(x)},), got {lab.shape}")
    out["nn1_pixel_same_class"] = nn1_same_class(flat, lab)
  if features is not None:
    f = np.asarray(features, np.float32)
    if f.ndim != 2 or f.shape[0] != len(x):
      raise ValueError(f"features: expected [{len(x)}, F], got shape {f.shape}")
    if not np.all(np.isfinite(f)):
      raise ValueError("features contain NaN or inf")
    df = nearest_others(f, k)
    out["nn1_feature"], out["nn5_feature"] = df[:, 0], df.mean(1)
  out["png_bytes"] = png_bytes(x)
  return out
