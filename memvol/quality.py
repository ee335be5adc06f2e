"""Sample quality without downloads: a small classifier's features, Frechet distance,
unbiased KID and k-NN precision / recall.

Features: the penultimate layer (2 * width units, after ReLU) of a small CNN trained once,
seeded, on the source's own labelled images that are neither training nor held-out
images of the split (so it has seen none of the images it judges), cached in the
mitigation folder. Samples are compared with the **held-out** images: a model that copies
its training set does not look perfect.

* Frechet distance (Heusel et al. 2017) between Gaussian fits (mean, covariance with
  ddof 1) of the two feature sets: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)),
  with tr (S_a S_b)^(1/2) = sum of the square roots of the eigenvalues of the symmetric
  PSD S_a^(1/2) S_b S_a^(1/2). Biased at small n (it needs no download, not small n).
* KID (Binkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial
  kernel k(x, y) = (x.y / d + 1)^3: mean over i != j of k(a_i, a_j) + the same for b
  - 2 mean k(a_i, b_j). Its expectation is 0 when both sets come from one distribution.
* Precision / recall (Kynkaenniemi et al. 2019): the real manifold is the union of balls
  around each real feature of radius its distance to its k-th nearest real neighbour;
  precision = fraction of samples inside it, recall = fraction of real features inside
  the samples' manifold (built the same way).
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from memvol import io


# --- metrics -------------------------------------------------------------------------


def _features(x: Any, name: str) -> np.ndarray:
  a = np.asarray(x, np.float64)
  if a.ndim != 2 or a.shape[0] < 2:
    raise ValueError(f"{name}: expected features [n >= 2, d], got shape {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name}: features contain NaN or inf")
  return a


def frechet_distance(a: Any, b: Any) -> float:
  """Frechet distance between Gaussian fits of features a [n, d] and b [m, d]."""
  a, b = _features(a, "a"), _features(b, "b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
  sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  w, v = np.linalg.eigh(sa)
  root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  m = root_a @ sb @ root_a
  ev = np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)
  diff = a.mean(0) - b.mean(0)
  return float(max(diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * np.sqrt(ev).sum(), 0.0))


def kid(a: Any, b: Any) -> float:
  """Unbiased MMD^2 with the kernel (x.y / d + 1)^3 between features a [n, d] and b [m, d]."""
  a, b = _features(a, "a"), _features(b, "b")
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feature sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
  d, n, m = a.shape[1], a.shape[0], b.shape[0]
  k = lambda x, y: (x @ y.T / d + 1.0) ** 3  # noqa: E731
  kaa, kbb = k(a, a), k(b, b)
  return float((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
               - 2.0 * k(a, b).mean())


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
  d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))
  return np.sort(d, axis=1)[:, min(k, len(x) - 1)]  # column 0 is the point itself


def precision_recall(real: Any, fake: Any, k: int = 3) -> tuple[float, float]:
  """k-NN precision (samples inside the real manifold) and recall (real inside the
  samples' manifold)."""
  r, f = _features(real, "real"), _features(fake, "fake")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  d = np.sqrt(np.maximum(((f[:, None, :] - r[None, :, :]) ** 2).sum(-1), 0.0))  # [fake, real]
  precision = np.mean(np.any(d <= _kth_radius(r, k)[None, :], axis=1))
  recall = np.mean(np.any(d.T <= _kth_radius(f, k)[None, :], axis=1))
  return float(precision), float(recall)


def metrics(real: Any, fake: Any, k: int = 3) -> dict[str, float]:
  """fd, kid, precision, recall of sample features `fake` against `real`."""
  p, r = precision_recall(real, fake, k)
  return {"fd": frechet_distance(real, fake), "kid": kid(real, fake), "precision": p, "recall": r}


# --- the feature classifier ----------------------------------------------------------


class Classifier(nn.Module):
  """conv(w) - 2x2 mean pool (sides >= 4) - conv(2w) - flatten - dense(2w) = features -
  dense(classes), ReLU after each hidden layer."""

  width: int
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, features: bool = False) -> jax.Array:
    x = nn.relu(nn.Conv(self.width, (3, 3))(x))
    if min(x.shape[1:3]) >= 4:
      x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(2 * self.width, (3, 3))(x))
    h = nn.relu(nn.Dense(2 * self.width)(x.reshape(x.shape[0], -1)))
    return h if features else nn.Dense(self.num_classes)(h)


@functools.partial(jax.jit, static_argnames=("model", "steps", "batch"))
def _train(model: Classifier, params: Any, images: jax.Array, labels: jax.Array, key: jax.Array,
           steps: int, batch: int) -> tuple[Any, jax.Array]:
  tx = optax.adam(1e-3)

  def step(carry, k):
    p, opt = carry
    idx = jax.random.randint(k, (batch,), 0, images.shape[0])

    def loss_fn(p):
      logits = model.apply({"params": p}, images[idx])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

    loss, g = jax.value_and_grad(loss_fn)(p)
    upd, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, upd), opt), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
  return params, losses


def train_classifier(images: np.ndarray, labels: np.ndarray, width: int, steps: int, batch: int,
                     seed: int) -> tuple[Classifier, Any, float]:
  """(model, params, final loss) of a Classifier trained with Adam(1e-3) on images
  [N, H, W, C] with integer labels [N] >= 0 (one compiled scan over all steps)."""
  labels = np.asarray(labels, np.int64)
  if len(images) < 2 or np.any(labels < 0):
    raise ValueError("the feature classifier needs >= 2 images, all labelled (labels >= 0)")
  model = Classifier(int(width), int(labels.max()) + 1)
  key = jax.random.PRNGKey(int(seed))
  params = model.init(jax.random.fold_in(key, 0), jnp.zeros((1,) + images.shape[1:]))["params"]
  params, losses = _train(model, params, jnp.asarray(images), jnp.asarray(labels), jax.random.fold_in(key, 1),
                          int(steps), int(batch))
  return model, params, float(np.mean(np.asarray(losses)[-50:]))


@functools.partial(jax.jit, static_argnames=("model",))
def _embed(model: Classifier, params: Any, x: jax.Array) -> jax.Array:
  return model.apply({"params": params}, x, features=True)


def embed(model: Classifier, params: Any, images: np.ndarray, batch: int = 256) -> np.ndarray:
  """Penultimate features [N, 2 width] of images [N, H, W, C] (batches padded to `batch`,
  so one compilation)."""
  out = []
  for s in range(0, len(images), batch):
    x = np.asarray(images[s:s + batch], np.float32)
    pad = np.zeros((batch - len(x),) + x.shape[1:], np.float32)
    out.append(np.asarray(_embed(model, params, jnp.asarray(np.concatenate([x, pad]))))[:len(x)])
  return np.concatenate(out).astype(np.float64)


class Reference:
  """The trained classifier and the held-out features of one split."""

  def __init__(self, model: Classifier | None, params: Any, heldout: np.ndarray | None, k: int):
    self.model, self.params, self.heldout, self.k = model, params, heldout, k

  @classmethod
  def build(cls, config: Any, split: Any, folder: str) -> "Reference":
    """Train (or load from folder/classifier.msgpack, keyed by its settings) the classifier
    on the labelled source images outside split.train and split.heldout."""
    from memvol import data
    mt = config.mitigate
    k = int(mt.knn_k)
    pool = data.load_pool(config.data)
    keep = ~np.isin(pool.ids, np.concatenate([split.train.ids, split.heldout.ids])) & (pool.labels >= 0)
    if keep.sum() < 2 or len(split.heldout) < 2:
      logging.warning("quality: no labelled images outside the split, or < 2 held-out images; "
                      "FD / KID / precision / recall are NaN")
      return cls(None, None, None, k)
    settings = {"arch": "conv-pool-conv-flatten-dense", "data": io.config_to_dict(config.data),
                "width": int(mt.classifier_width),
                "steps": int(mt.classifier_steps), "batch": int(mt.classifier_batch),
                "seed": int(mt.classifier_seed),
                "ids": hashlib.sha1(pool.ids[keep].tobytes()).hexdigest()}
    for key in ("drop_ids", "augment_ids", "replace_path", "replace_sha256"):
      settings["data"].pop(key, None)
    path, meta = os.path.join(folder, "classifier.msgpack"), os.path.join(folder, "classifier.json")
    labels = pool.labels[keep]
    model = Classifier(settings["width"], int(labels.max()) + 1)
    if os.path.exists(path) and os.path.exists(meta) and io.load_json(meta).get("settings") == settings:
      init = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + pool.images.shape[1:]))["params"]
      with open(path, "rb") as f:
        params = flax.serialization.from_bytes(init, f.read())
    else:
      model, params, loss = train_classifier(pool.images[keep], labels, settings["width"],
                                             settings["steps"], settings["batch"], settings["seed"])
      acc = float(np.mean(np.argmax(np.asarray(model.apply({"params": params}, jnp.asarray(split.heldout.images))), 1)
                          == split.heldout.labels))
      with io.atomic_open(path, "wb") as f:
        f.write(flax.serialization.to_bytes(params))
      io.save_json(meta, {"settings": settings, "final_loss": loss, "heldout_accuracy": acc,
                          "num_images": int(keep.sum())})
      logging.info("quality: classifier trained on %d images, loss %.3f, held-out accuracy %.3f",
                   keep.sum(), loss, acc)
    return cls(model, params, embed(model, params, split.heldout.images), k)

  def metrics(self, samples: np.ndarray) -> dict[str, float]:
    """fd, kid, precision, recall of samples [M, H, W, C] against the held-out images."""
    if self.model is None:
      return {"fd": float("nan"), "kid": float("nan"), "precision": float("nan"), "recall": float("nan")}
    return metrics(self.heldout, embed(self.model, self.params, samples), self.k)
