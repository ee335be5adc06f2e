"""Which training images the model reproduces: nearest-neighbour search of generated
samples against the training set, and two copy criteria.

Distances are L2 in pixel space (images in [-1, 1], flattened).

Ratio criterion (Yoon et al. 2023, "Diffusion probabilistic models generalize when they
fail to memorize"; Gu et al. 2023, "On memorization in diffusion models"): a sample x' is
a copy of its nearest training image NN1 when

    d(x', NN1) / d(x', NN2) < tau        (tau = config.detect.ratio_threshold, 1/3).

If d(x', NN2) = 0 (x' equals two identical training images) the ratio is taken as 1.

Carlini et al.'s criterion (Carlini, Hayes, Nasr et al. 2023, "Extracting training data
from diffusion models", Sec. 5 (CIFAR-10)): with S the n training images nearest to x'
(NN1 included),

    l(x') = d(x', NN1) / (alpha * mean_{y in S} d(x', y)),   a copy of NN1 when l < delta,

with n = config.detect.carlini_n (50 in the paper), alpha = config.detect.carlini_alpha
(0.5 in the paper) and delta = config.detect.carlini_delta (1/3 here). n is capped at
the training-set size. If every y in S is at distance 0, l is taken as 1 / alpha.

A training image's copy count under a criterion is the number of samples that copy it;
it counts as memorised when its ratio-criterion copy count is > 0. The search runs over
the distinct training images (planted duplicates appear once there; their multiplicity is
`dup_count`), so an exact copy of a planted duplicate still has a distinct NN2.

Search: samples in chunks of `chunk_size` (a jitted program per chunk shape), the training
set in blocks of `train_chunk_size` scanned with a running top-k merge, ranking by
|q|^2 + |t|^2 - 2 q.t on mean-centred data (highest matmul precision); the k distances
kept are then recomputed exactly as |q - t| and re-sorted. Memory is
O(chunk_size * train_chunk_size + chunk_size * k * D), never [M, N, D]. The per-training-
image minimum over samples comes from the same expansion (absolute error ~1e-3 for
digits), corrected by the exact distances of the kept pairs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from memvol import io, stats
from memvol import workdir as wdir

DETECT_COLUMNS = ("id", "label", "dup_count", "copies_ratio", "copies_carlini", "memorised",
                  "min_distance", "closest_sample")


@dataclasses.dataclass(frozen=True)
class Neighbours:
  """The k training images nearest to each sample, and the sample nearest to each
  training image. Indices are positions in the arrays searched (not image ids)."""

  index: np.ndarray            # [M, k] int64 training indices, nearest first
  dist: np.ndarray             # [M, k] float32 L2 distances, increasing
  train_min_dist: np.ndarray   # [N] float32 distance from each training image to its closest sample
  train_closest: np.ndarray    # [N] int64 index of that sample


@dataclasses.dataclass(frozen=True)
class Copies:
  """Per-sample copy decisions under one criterion and the per-training-image counts."""

  score: np.ndarray    # [M] the criterion's statistic (ratio or Carlini's l); small = copy
  copied: np.ndarray   # [M] bool
  counts: np.ndarray   # [N] int64 number of samples copying each training image


# --- nearest neighbours ------------------------------------------------------------


def _flatten(x: Any, name: str) -> np.ndarray:
  a = np.asarray(x, np.float32)
  if a.ndim < 2:
    raise ValueError(f"{name}: expected images [N, ...], got shape {a.shape}")
  return a.reshape(a.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("k",))
def _search_chunk(q: jax.Array, q_valid: jax.Array, blocks: jax.Array, b_valid: jax.Array,
                  train: jax.Array, k: int):
  """q [c, D] (centred), q_valid [c]; blocks [nb, b, D] (centred, zero-padded), b_valid
  [nb, b]; train [N, D] (centred, unpadded). Returns top-k (exact dist [c, k], index
  [c, k]) and per block the minimum over valid queries of the approximate distance and
  its query position ([nb, b] each)."""
  hi = jax.lax.Precision.HIGHEST
  c, b = q.shape[0], blocks.shape[1]
  q_sq = jnp.sum(q * q, axis=-1)

  def step(carry, xs):
    best_d2, best_i = carry
    block, valid, offset = xs
    d2 = q_sq[:, None] + jnp.sum(block * block, -1)[None, :] - 2.0 * jnp.matmul(q, block.T, precision=hi)
    d2 = jnp.where(valid[None, :], jnp.maximum(d2, 0.0), jnp.inf)
    cand_d2 = jnp.concatenate([best_d2, d2], axis=1)
    cand_i = jnp.concatenate([best_i, offset + jnp.arange(b)[None, :].repeat(c, 0)], axis=1)
    neg, pos = jax.lax.top_k(-cand_d2, k)
    col = jnp.where(q_valid[:, None], d2, jnp.inf)
    return (-neg, jnp.take_along_axis(cand_i, pos, axis=1)), (jnp.min(col, 0), jnp.argmin(col, 0))

  init = (jnp.full((c, k), jnp.inf, q.dtype), jnp.zeros((c, k), jnp.int32))
  offsets = jnp.arange(blocks.shape[0], dtype=jnp.int32) * b
  (_, idx), (col_min, col_arg) = jax.lax.scan(step, init, (blocks, b_valid, offsets))
  exact = jnp.sqrt(jnp.sum((train[idx] - q[:, None, :]) ** 2, axis=-1))
  order = jnp.argsort(exact, axis=1, stable=True)
  return (jnp.take_along_axis(exact, order, 1), jnp.take_along_axis(idx, order, 1),
          jnp.sqrt(col_min), col_arg)


def nearest_neighbours(samples: Any, train: Any, k: int = 2, chunk_size: int = 256,
                       train_chunk_size: int = 2048) -> Neighbours:
  """L2 nearest neighbours of samples [M, ...] among training images [N, ...] (same
  trailing shape): the k nearest training images per sample (k capped at N) and the
  closest sample per training image."""
  s, t = _flatten(samples, "samples"), _flatten(train, "training images")
  if s.shape[0] == 0:
    raise ValueError("no samples to search")
  if t.shape[0] == 0:
    raise ValueError("no training images to search against")
  if s.shape[1] != t.shape[1]:
    raise ValueError(f"samples have {s.shape[1]} values per image, training images {t.shape[1]}")
  if k < 1 or chunk_size < 1 or train_chunk_size < 1:
    raise ValueError(f"k, chunk_size and train_chunk_size must be >= 1, got {k}, {chunk_size}, {train_chunk_size}")
  m, n, d = s.shape[0], t.shape[0], s.shape[1]
  k = min(k, n)
  mu = t.mean(0, dtype=np.float64).astype(np.float32)
  s, t = s - mu, t - mu
  b = min(train_chunk_size, n)
  nb = -(-n // b)
  blocks = np.zeros((nb * b, d), np.float32)
  blocks[:n] = t
  b_valid = (np.arange(nb * b) < n).reshape(nb, b)
  blocks_j, b_valid_j, t_j = jnp.asarray(blocks.reshape(nb, b, d)), jnp.asarray(b_valid), jnp.asarray(t)

  c = min(chunk_size, m)
  index = np.zeros((m, k), np.int64)
  dist = np.zeros((m, k), np.float32)
  col_min = np.full(nb * b, np.inf, np.float32)
  col_arg = np.zeros(nb * b, np.int64)
  for start in range(0, m, c):
    q = np.zeros((c, d), np.float32)
    stop = min(start + c, m)
    q[:stop - start] = s[start:stop]
    cd, ci, cmin, carg = _search_chunk(jnp.asarray(q), jnp.arange(c) < stop - start,
                                       blocks_j, b_valid_j, t_j, k)
    dist[start:stop], index[start:stop] = np.asarray(cd)[:stop - start], np.asarray(ci)[:stop - start]
    cmin, carg = np.asarray(cmin).reshape(-1), np.asarray(carg).reshape(-1)
    better = cmin < col_min
    col_min[better], col_arg[better] = cmin[better], start + carg[better]
  col_min, col_arg = col_min[:n], col_arg[:n]

  # Exact distances of the kept (sample, training image) pairs improve the column minima.
  flat_d, flat_i = dist.reshape(-1), index.reshape(-1)
  flat_s = np.repeat(np.arange(m), k)
  order = np.argsort(flat_d, kind="stable")
  js, first = np.unique(flat_i[order], return_index=True)
  ex_d, ex_s = flat_d[order][first], flat_s[order][first]
  better = ex_d <= col_min[js]
  col_min[js[better]], col_arg[js[better]] = ex_d[better], ex_s[better]
  return Neighbours(index=index, dist=dist, train_min_dist=col_min, train_closest=col_arg)


# --- copy criteria -----------------------------------------------------------------


def _counts(nn1: np.ndarray, copied: np.ndarray, num_train: int) -> np.ndarray:
  return np.bincount(nn1[copied], minlength=num_train).astype(np.int64)


def ratio_copies(nbrs: Neighbours, num_train: int, threshold: float = 1.0 / 3.0) -> Copies:
  """Yoon et al. / Gu et al.: sample copies NN1 when d1 / d2 < threshold."""
  if nbrs.dist.shape[1] < 2:
    raise ValueError("the ratio criterion needs the 2 nearest training images (k >= 2 and N >= 2)")
  if not threshold > 0:
    raise ValueError(f"ratio_threshold must be > 0, got {threshold}")
  d1, d2 = nbrs.dist[:, 0].astype(np.float64), nbrs.dist[:, 1].astype(np.float64)
  ratio = np.divide(d1, d2, out=np.ones_like(d1), where=d2 > 0)
  copied = ratio < threshold
  return Copies(ratio, copied, _counts(nbrs.index[:, 0], copied, num_train))


def carlini_copies(nbrs: Neighbours, num_train: int, n: int = 50, alpha: float = 0.5,
                   delta: float = 1.0 / 3.0) -> Copies:
  """Carlini et al. 2023: sample copies NN1 when d1 / (alpha * mean of its n nearest
  training distances) < delta; n is capped at the neighbours kept."""
  if n < 1 or not alpha > 0 or not delta > 0:
    raise ValueError(f"carlini_n must be >= 1 and alpha, delta > 0, got {n}, {alpha}, {delta}")
  n = min(n, nbrs.dist.shape[1])
  d = nbrs.dist[:, :n].astype(np.float64)
  denom = alpha * d.mean(1)
  score = np.divide(d[:, 0], denom, out=np.full(d.shape[0], 1.0 / alpha), where=denom > 0)
  copied = score < delta
  return Copies(score, copied, _counts(nbrs.index[:, 0], copied, num_train))


def agreement(a: Copies, b: Copies) -> dict[str, Any]:
  """How two sample sets' copies of the same training set agree: copy rates, distinct
  copied images, the Jaccard index of the copied sets, Spearman of the copy counts and the
  training positions copied by only one of them."""
  if a.counts.shape != b.counts.shape:
    raise ValueError(f"copy counts over {a.counts.shape[0]} and {b.counts.shape[0]} training images: not the same set")
  sa, sb = a.counts > 0, b.counts > 0
  union = int((sa | sb).sum())
  rho, p, _ = stats.spearman(a.counts, b.counts)
  return dict(copy_rate=(float(a.copied.mean()), float(b.copied.mean())),
              distinct=(int(sa.sum()), int(sb.sum())),
              jaccard=float((sa & sb).sum() / union) if union else float("nan"),
              spearman=float(rho), spearman_p=float(p),
              only_a=np.flatnonzero(sa & ~sb).tolist(), only_b=np.flatnonzero(sb & ~sa).tolist())


# --- stage -------------------------------------------------------------------------


def load_samples(config, workdir: str) -> np.ndarray:
  """The generated images searched for copies, [M, H, W, C]; clear errors if missing/empty."""
  path = wdir.samples(workdir, config.detect.sample_method)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: generate samples first with --mode=sample "
        f"(config.detect.sample_method={config.detect.sample_method!r} must be one of config.sample.methods)")
  z = io.load_npz(path)
  if "images" not in z:
    raise ValueError(f"{path} has no 'images' array (keys: {sorted(z)}); rerun --mode=sample")
  images = z["images"]
  if images.ndim != 4:
    raise ValueError(f"{path}: 'images' must be [M, H, W, C], got shape {images.shape}; rerun --mode=sample")
  if images.shape[0] == 0:
    raise ValueError(f"{path} holds zero samples; rerun --mode=sample with config.sample.num_samples > 0")
  return images.astype(np.float32)


def load_split(config, workdir: str):
  """The experiment's train / held-out split (memvol.data)."""
  from memvol import data
  return data.load_split(config, workdir)


def detect(samples: np.ndarray, train_images: np.ndarray, config) -> dict[str, Any]:
  """Neighbours and both criteria for samples [M, H, W, C] against distinct training images
  [N, H, W, C]. Returns a dict: nbrs (Neighbours), ratio (Copies), carlini (Copies)."""
  if samples.shape[1:] != train_images.shape[1:]:
    raise ValueError(f"samples have shape {samples.shape[1:]} per image but training images "
                     f"{train_images.shape[1:]}: the samples come from another data config; "
                     "rerun --mode=sample in this workdir")
  if train_images.shape[0] < 2:
    raise ValueError(f"copy detection needs >= 2 training images, got {train_images.shape[0]}")
  dc = config.detect
  nbrs = nearest_neighbours(samples, train_images, k=max(2, int(dc.carlini_n)),
                            chunk_size=int(dc.chunk_size), train_chunk_size=int(dc.train_chunk_size))
  n = train_images.shape[0]
  return dict(nbrs=nbrs, ratio=ratio_copies(nbrs, n, float(dc.ratio_threshold)),
              carlini=carlini_copies(nbrs, n, int(dc.carlini_n), float(dc.carlini_alpha),
                                     float(dc.carlini_delta)))


def _warn_repeated_images(images: np.ndarray) -> None:
  flat = np.ascontiguousarray(images.reshape(images.shape[0], -1))
  n_unique = np.unique(flat, axis=0).shape[0]
  if n_unique < flat.shape[0]:
    logging.warning("detect: %d of %d training images are exact repeats of others; the ratio "
                    "criterion cannot tell repeats apart (d1 = d2), so their copies are missed",
                    flat.shape[0] - n_unique, flat.shape[0])


DONE_MEANS = "outputs present, made with these settings and inputs"
OUTPUTS = ("detect.csv", "nn.npz", "copies.png")


def settings(config, workdir: str) -> dict[str, Any]:
  """What detect's outputs depend on: the detect and data sections and the samples file."""
  return {"detect": io.config_to_dict(config.detect), "data": io.config_to_dict(config.data),
          "inputs": {"samples": io.file_digest(wdir.samples(workdir, config.detect.sample_method))}}


def stale_reason(config, workdir: str) -> str | None:
  """None when detect/ holds outputs made with this config from the current samples;
  otherwise why not (for --mode=all)."""
  return io.stale_reason(wdir.detect_dir(workdir), settings(config, workdir), OUTPUTS)


def is_complete(config, workdir: str) -> bool:
  return stale_reason(config, workdir) is None


def run(config, workdir: str, split: Any = None) -> dict[str, Any]:
  """Search the samples for copies of training images; write detect/detect.csv,
  detect/nn.npz and detect/copies.png, then detect/settings.json (the settings and
  input digest that made them; a rerun with others recomputes). `split` defaults to
  memvol.data.load_split."""
  folder = wdir.detect_dir(workdir)
  io.forget_settings(folder)
  record = settings(config, workdir)
  samples = load_samples(config, workdir)
  split = load_split(config, workdir) if split is None else split
  train = split.train
  images = np.asarray(train.images, np.float32)
  ids, labels = np.asarray(train.ids, np.int64), np.asarray(train.labels, np.int64)
  dup = np.asarray(split.dup_counts, np.int64)
  if not (len(ids) == len(labels) == len(dup) == images.shape[0]):
    raise ValueError(f"split arrays disagree: {images.shape[0]} training images, {len(ids)} ids, "
                     f"{len(labels)} labels, {len(dup)} dup_counts")
  _warn_repeated_images(images)
  out = detect(samples, images, config)
  nbrs, ratio, carlini = out["nbrs"], out["ratio"], out["carlini"]

  rows = [dict(id=int(ids[j]), label=int(labels[j]), dup_count=int(dup[j]),
               copies_ratio=int(ratio.counts[j]), copies_carlini=int(carlini.counts[j]),
               memorised=int(ratio.counts[j] > 0), min_distance=f"{float(nbrs.train_min_dist[j]):.6g}",
               closest_sample=int(nbrs.train_closest[j]))
          for j in range(images.shape[0])]
  io.save_npz(wdir.nn(workdir),
              nn_index=nbrs.index[:, :2], nn_id=ids[nbrs.index[:, :2]],
              d1=nbrs.dist[:, 0], d2=nbrs.dist[:, 1], ratio=ratio.score, copied_ratio=ratio.copied,
              carlini_score=carlini.score, copied_carlini=carlini.copied,
              knn_index=nbrs.index, knn_dist=nbrs.dist,
              train_ids=ids, train_min_distance=nbrs.train_min_dist,
              train_closest_sample=nbrs.train_closest)
  save_copies_figure(samples, images, ids, nbrs, ratio, config, wdir.copies_figure(workdir))
  io.save_csv(wdir.detect_csv(workdir), rows, DETECT_COLUMNS)
  io.record_settings(folder, record)
  summary = dict(num_samples=int(samples.shape[0]), num_train=int(images.shape[0]),
                 copied_samples_ratio=int(ratio.copied.sum()), copied_samples_carlini=int(carlini.copied.sum()),
                 memorised_ratio=int((ratio.counts > 0).sum()), memorised_carlini=int((carlini.counts > 0).sum()))
  logging.info("detect: %d/%d samples are copies (ratio < %.3g), of %d distinct training images; "
               "Carlini: %d samples, %d images", summary["copied_samples_ratio"], summary["num_samples"],
               config.detect.ratio_threshold, summary["memorised_ratio"], summary["copied_samples_carlini"],
               summary["memorised_carlini"])
  return summary


def read_detect(path: str) -> dict[str, np.ndarray]:
  """detect.csv (written by `run`) as int / float columns (DETECT_COLUMNS)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: label memorised images first with --mode=detect")
  rows = io.load_csv(path)
  missing = [c for c in DETECT_COLUMNS if c not in rows[0]]
  if missing:
    raise ValueError(f"{path} lacks columns {missing}; delete it and rerun --mode=detect")
  try:
    return {c: np.array([float((r[c] or "").strip() or "nan") if c == "min_distance" else int(r[c]) for r in rows])
            for c in DETECT_COLUMNS}
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path} is corrupt ({e}); delete it and rerun --mode=detect") from e


def align_detect(train_ids: np.ndarray, det: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
  """detect columns reordered to `train_ids` (the training rows of scores.csv)."""
  pos = {int(i): k for k, i in enumerate(det["id"])}
  missing = [int(i) for i in train_ids if int(i) not in pos]
  if missing:
    raise ValueError(f"{path} has no rows for training ids {missing[:10]} listed in scores.csv: the two "
                     "files come from different splits; rerun --mode=detect (and --mode=score) in this workdir")
  order = np.array([pos[int(i)] for i in train_ids], np.int64)
  return {c: v[order] for c, v in det.items()}


def save_copies_figure(samples: np.ndarray, train: np.ndarray, ids: np.ndarray, nbrs: Neighbours,
                       ratio: Copies, config, path: str) -> None:
  """PNG: copied samples (ratio criterion, most exact first) above their nearest training
  image; if nothing is copied, the closest sample/training pairs instead."""
  from memvol import plotting

  limit = int(config.detect.max_pairs_shown)
  copied = np.flatnonzero(ratio.copied)
  if copied.size:
    order = copied[np.argsort(ratio.score[copied], kind="stable")][:limit]
    title = (f"{copied.size} of {samples.shape[0]} samples copy a training image "
             f"(d1/d2 < {config.detect.ratio_threshold:.3g}); {min(limit, copied.size)} shown, most exact first")
  else:
    order = np.argsort(ratio.score, kind="stable")[:min(limit, 16)]
    title = (f"No sample copies a training image (d1/d2 < {config.detect.ratio_threshold:.3g}); "
             f"the {order.size} samples with the smallest d1/d2 shown")
  nn1 = nbrs.index[order, 0]
  captions = [f"id {ids[j]}\nd1 {nbrs.dist[i, 0]:.2f}  r {ratio.score[i]:.2f}" for i, j in zip(order, nn1)]
  plotting.save_pairs_figure(
      [dict(title=title, top=samples[order], bottom=train[nn1], captions=captions,
            row_labels=("sample", "train NN1"))], path)
