"""Training the noise-prediction network: the `train` stage.

Loss (eps prediction, as the paper): for x0 from the training stream, t ~ U(eps, T),
z ~ N(0, I), x_t = a(t) x0 + sigma(t) z,

    loss = mean over batch and pixels of (eps_theta(x_t, 999 t) - z)^2.

Adam with a linear warm-up (lr (k + 1) / warmup at update k) after global-norm gradient
clipping; an EMA of the parameters with decay min(ema_decay, (1 + k) / (10 + k)) (so it
tracks the parameters early in short runs), kept in the checkpoint and used for
sampling and scoring by default.

Determinism: update k draws its noise from fold_in(PRNGKey(seed) -> 1, k); the training
stream of N images (planted duplicates repeated) is read in epochs, epoch e being the
permutation of fold_in(PRNGKey(seed) -> 2, e), and the global example counter
`examples_seen` is saved in every checkpoint. A resumed run therefore sees the same
batches and noise and, on CPU, ends with bitwise the same parameters as an uninterrupted
one.

Throughput: the training stream lives on the device (replicated) and every update draws its
batch indices there from the data-order key (`stream_indices`). On accelerators one
compiled call runs up to train.steps_per_call updates in a `lax.fori_loop` whose length is
a traced argument, so one program serves every call length; on CPU (train.fused_steps)
the updates of a call are dispatched one by one. Calls stop short at the steps the config
names for a log row, checkpoint or sample grid, and the result does not depend on how the
steps are split into calls. Checkpoints are saved asynchronously (orbax, atomic as before) from a
device copy of the state, so the next call starts while the previous save is written. A
SIGTERM (memvol.preempt) stops the run after the call in flight: a checkpoint is saved at
that step and `preempt.Preempted` is raised; rerunning resumes bitwise.

Scale-out: the batch is split over the `data` axis of a mesh of all devices (params
replicated, XLA inserts the gradient all-reduce); each device keeps only its rows of the
batch gathered from the replicated stream (a sharding constraint, no communication).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from memvol import checkpoint as ckpt_lib
from memvol import data as data_lib
from memvol import io, models, numerics, parallel, plotting, preempt, sampling
from memvol import sde as sde_lib
from memvol import workdir as wdir

Array = jax.Array
LOG_COLUMNS = ("step", "loss", "grad_norm", "lr", "steps_per_s", "elapsed_s")
_INIT, _STEP, _ORDER, _PREVIEW = 0, 1, 2, 3  # fold_in tags of PRNGKey(seed)
_FUSED = ("auto", "true", "false")  # train.fused_steps


@flax.struct.dataclass
class TrainState:
  """step: int32 [] updates applied; params / ema_params: the network's "params"
  collection; opt_state: optax state."""

  step: Array
  params: Any
  ema_params: Any
  opt_state: Any


# --- maths ---------------------------------------------------------------------------


# --- the training stream: augmentation and a mitigation arm's edits -----------------


def flip_batch(key: Array, batch: Array) -> Array:
  """Each image of batch [B, H, W, C] mirrored left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (batch.shape[0],))
  return jnp.where(flip[:, None, None, None], batch[:, :, ::-1, :], batch)


def augment_settings(data_cfg: Any) -> tuple[int, float]:
  """(shift pixels, noise std) of augment_batch from data.augment_shift / augment_noise."""
  shift, noise = int(data_cfg.augment_shift), float(data_cfg.augment_noise)
  if shift < 0 or noise < 0:
    raise ValueError(f"data.augment_shift and data.augment_noise must be >= 0, got {shift}, {noise}")
  return shift, noise


def augment_batch(key: Array, batch: Array, mask: Array, shift: int, noise: float) -> Array:
  """Stronger augmentation of the masked images of batch [B, H, W, C] (mask bool [B]):
  a shift by an integer offset uniform in [-shift, shift] pixels along each axis (edges
  repeated), then N(0, noise^2) pixel noise, clipped to [-1, 1]. Unmasked images pass
  unchanged."""
  b, h, w, _ = batch.shape
  k_shift, k_noise = jax.random.split(key)
  offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * shift + 1)
  padded = jnp.pad(batch, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
  crop = lambda x, o: jax.lax.dynamic_slice(x, (o[0], o[1], 0), (h, w, x.shape[-1]))  # noqa: E731
  moved = jax.vmap(crop)(padded, offsets) + noise * jax.random.normal(k_noise, batch.shape, batch.dtype)
  return jnp.where(mask[:, None, None, None], jnp.clip(moved, -1.0, 1.0), batch)


def _arm_ids(data_cfg: Any, field: str, train_ids: np.ndarray) -> np.ndarray:
  """bool [num_train]: which training images data_cfg.<field> names (ValueError for ids
  that are not training images)."""
  ids = np.asarray([int(i) for i in data_cfg[field]], np.int64)
  unknown = np.setdiff1d(ids, train_ids)
  if unknown.size:
    raise ValueError(f"data.{field} names ids {unknown[:8].tolist()} that are not training images")
  return np.isin(train_ids, ids)


def edit_stream(split: data_lib.Split, data_cfg: Any) -> data_lib.Split:
  """The training stream of a mitigation arm (the data fields base.py declares empty and
  memvol/mitigate/ sets): data.drop_ids leave the training stream (they stay in
  split.train, so detect still counts their copies); data.augment_ids get stronger
  augmentation; data.replace_path (an npz of `ids` [k] and `images` [k, H, W, C] whose
  sha256 must equal data.replace_sha256) replaces those images in the stream only."""
  ids = split.train.ids
  counts, images, augment = None, None, None
  if len(data_cfg.drop_ids):
    counts = np.where(_arm_ids(data_cfg, "drop_ids", ids), 0, split.dup_counts).astype(np.int64)
  if len(data_cfg.augment_ids):
    augment = _arm_ids(data_cfg, "augment_ids", ids)
  path = str(data_cfg.replace_path)
  if path:
    want, got = str(data_cfg.replace_sha256), io.file_sha256(path) if os.path.exists(path) else ""
    if not got or got != want:
      raise ValueError(f"data.replace_path={path!r} is missing or has sha256 {got[:12] or '-'}, not "
                       f"data.replace_sha256={want[:12] or '-'}; rerun the mitigation arm that writes it")
    z = io.load_npz(path)
    pos = data_lib.train_positions(ids, z["ids"], path)
    images = split.train.images.copy()
    images[pos] = data_lib.validate_images(z["images"], f"{path}:images")
  if counts is None and images is None and augment is None:
    return split
  return dataclasses.replace(split, stream_counts=counts, stream_images=images, augment=augment)


def lr_schedule(train_cfg: Any) -> Callable[[Array], Array]:
  """Learning rate at update k (0-based): lr * min((k + 1) / warmup_steps, 1)."""
  lr, warmup = float(train_cfg["lr"]), int(train_cfg["warmup_steps"])
  if warmup <= 0:
    return lambda count: jnp.full((), lr, jnp.float32)
  return lambda count: lr * jnp.minimum((count + 1.0) / warmup, 1.0)


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
  """Global-norm clipping (train.grad_clip; 0 = off), then Adam with the warm-up schedule.
  Equal settings give the same object, so jitted steps built on it are reused."""
  return _optimizer(float(train_cfg.lr), int(train_cfg.warmup_steps), float(train_cfg.adam_b1),
                    float(train_cfg.adam_b2), float(train_cfg.adam_eps), float(train_cfg.grad_clip))


@functools.lru_cache(maxsize=8)
def _optimizer(lr: float, warmup_steps: int, b1: float, b2: float, eps: float, grad_clip: float
               ) -> optax.GradientTransformation:
  schedule = lr_schedule({"lr": lr, "warmup_steps": warmup_steps})
  adam = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  if grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip), adam)
  return adam


def ema_decay_at(decay: float, step: Array) -> Array:
  """EMA decay used at update `step` (0-based): min(decay, (1 + step) / (10 + step))."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def denoising_loss(apply_fn: Callable[..., Array], params: Any, sde: sde_lib.SDE, x0: Array,
                   key: Array, train: bool = True) -> Array:
  """eps-prediction loss (scalar) of a batch x0 [B, H, W, C]; `apply_fn(params, x, t_net,
  dropout_key)` is the batched network with t_net = 999 t."""
  k_t, k_z, k_drop = jax.random.split(key, 3)
  t = jax.random.uniform(k_t, (x0.shape[0],), x0.dtype, minval=sde.eps, maxval=sde.T)
  z = jax.random.normal(k_z, x0.shape, x0.dtype)
  tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  x_t = sde.perturb(x0, tb, z)
  eps = apply_fn(params, x_t, sde.time_input(t), k_drop)
  return jnp.mean(jnp.square(eps - z))


def _apply_fn(model: Any, train: bool) -> Callable[..., Array]:
  def apply(params: Any, x: Array, t_net: Array, key: Array) -> Array:
    return model.apply({"params": params}, x, t_net, train=train, rngs={"dropout": key})
  return apply


def make_train_step(model: Any, sde: sde_lib.SDE, tx: optax.GradientTransformation,
                    train_cfg: Any, mesh: Mesh, random_flip: bool = False,
                    augment: tuple[int, float] | None = None
                    ) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
  """The jitted update `step(state, batch [B, H, W, C], key) -> (state, {loss, grad_norm})`:
  batch sharded over `data`, state and key replicated, state donated. Update k uses
  fold_in(key, k); matmuls and convolutions run at train.precision. With `augment` =
  (shift, noise) the step takes a fourth argument, a bool mask [B] (sharded like the batch)
  of the examples given augment_batch. Built once per
  (model, sde, tx, ema_decay, precision, mesh, random_flip, augment)."""
  return _train_step(model, sde, tx, float(train_cfg.ema_decay), _precision(train_cfg), mesh,
                     bool(random_flip), augment)


def _precision(train_cfg: Any) -> str:
  return numerics.check_precision(train_cfg.get("precision", "default"), "train.precision")


def _step_fn(model: Any, sde: sde_lib.SDE, tx: optax.GradientTransformation, ema_decay: float,
             precision: str, random_flip: bool, augment: tuple[int, float] | None = None
             ) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
  """The pure update of `make_train_step` (not jitted)."""
  apply = _apply_fn(model, train=True)

  def step(state: TrainState, x0: Array, key: Array, aug: Array | None = None
           ) -> tuple[TrainState, dict[str, Array]]:
    key = jax.random.fold_in(key, state.step)
    k_loss, k_flip = jax.random.split(key)
    if random_flip:
      x0 = flip_batch(k_flip, x0)
    if augment is not None:
      x0 = augment_batch(jax.random.fold_in(k_flip, 1), x0, aug, *augment)
    with numerics.precision(precision):
      loss, grads = jax.value_and_grad(lambda p: denoising_loss(apply, p, sde, x0, k_loss))(state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay_at(ema_decay, state.step)
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
    new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new, {"loss": loss, "grad_norm": grad_norm}

  return step


@functools.lru_cache(maxsize=8)
def _train_step(model: Any, sde: sde_lib.SDE, tx: optax.GradientTransformation, ema_decay: float,
                precision: str, mesh: Mesh, random_flip: bool,
                augment: tuple[int, float] | None = None) -> Callable[..., Any]:
  rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  step = _step_fn(model, sde, tx, ema_decay, precision, random_flip, augment)
  in_shardings = (rep, shard, rep) + ((shard,) if augment is not None else ())
  return jax.jit(step, in_shardings=in_shardings, out_shardings=(rep, rep), donate_argnums=0)


def make_train_loop(model: Any, sde: sde_lib.SDE, tx: optax.GradientTransformation,
                    train_cfg: Any, mesh: Mesh, random_flip: bool = False,
                    augment: tuple[int, float] | None = None) -> Callable[..., Any]:
  """The multi-step update
  `loop(state, images [N, H, W, C], seen: int, n: int, step_key, order_key) -> (state, {loss, grad_norm})`:
  n (1 <= n <= train.steps_per_call) updates of `make_train_step`'s kind, update j on the
  batch of train.batch_size stream examples seen + j B, ... (`stream_indices` of order_key),
  each device keeping its rows; images, keys and state replicated, state donated. Metrics
  are float32 vectors whose first n entries are the updates' values. With `augment`
  (see make_train_step), `images` is the pair (images, mask bool [N]) of the stream.

  Fused (`fused_steps(train_cfg, mesh)`): one dispatch of one compiled `lax.fori_loop`
  whose trip count n is traced, so one program serves every n. Unfused (the CPU default):
  n dispatches of one compiled update that still draws and gathers its batch on the device
  (XLA:CPU runs convolution gradients inside a loop body 20-70x slower than outside one)."""
  fused = fused_steps(train_cfg, mesh)
  return _train_loop(model, sde, tx, float(train_cfg.ema_decay), _precision(train_cfg), mesh,
                     bool(random_flip), int(train_cfg.batch_size),
                     int(train_cfg.steps_per_call) if fused else 0, fused, augment)


def fused_steps(train_cfg: Any, mesh: Mesh) -> bool:
  """Whether calls run as one compiled loop: train.fused_steps "true" | "false" | "auto"
  (auto: yes unless the mesh is on CPU)."""
  value = str(train_cfg.get("fused_steps", "auto")).lower()
  if value not in _FUSED:
    raise ValueError(f"train.fused_steps must be one of {_FUSED}; got {value!r}")
  if value == "auto":
    return mesh.devices.flat[0].platform != "cpu"
  return value == "true"


@functools.lru_cache(maxsize=8)
def _train_loop(model: Any, sde: sde_lib.SDE, tx: optax.GradientTransformation, ema_decay: float,
                precision: str, mesh: Mesh, random_flip: bool, batch_size: int,
                steps_per_call: int, fused: bool, augment: tuple[int, float] | None = None
                ) -> Callable[..., Any]:
  rep, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  step = _step_fn(model, sde, tx, ema_decay, precision, random_flip, augment)

  def update(state: TrainState, stream: Any, seen: Array, step_key: Array,
             order_key: Array) -> tuple[TrainState, dict[str, Array]]:
    images, mask = stream if augment is not None else (stream, None)
    idx = stream_indices(order_key, seen, batch_size, images.shape[0])
    rows = lambda a: jax.lax.with_sharding_constraint(a[idx], shard)  # noqa: E731
    return step(state, rows(images), step_key, None if mask is None else rows(mask))

  def scalar(v: int) -> Array:
    return jax.device_put(np.int32(v), rep)

  if not fused:
    one = jax.jit(update, in_shardings=(rep,) * 5, out_shardings=(rep, rep), donate_argnums=0)

    def stepwise(state, images, seen, n, step_key, order_key):
      metrics = []
      for j in range(int(n)):
        state, m = one(state, images, scalar(seen + j * batch_size), step_key, order_key)
        metrics.append(m)
      return state, {k: jnp.stack([m[k] for m in metrics]) for k in ("loss", "grad_norm")}
    return stepwise

  def loop(state: TrainState, images: Array, seen: Array, n: Array, step_key: Array,
           order_key: Array) -> tuple[TrainState, dict[str, Array]]:
    def body(j, carry):
      state, losses, gnorms = carry
      state, m = update(state, images, seen + j * batch_size, step_key, order_key)
      return state, losses.at[j].set(m["loss"]), gnorms.at[j].set(m["grad_norm"])

    zeros = jnp.zeros((steps_per_call,), jnp.float32)
    state, losses, gnorms = jax.lax.fori_loop(0, n, body, (state, zeros, zeros))
    return state, {"loss": losses, "grad_norm": gnorms}

  jitted = jax.jit(loop, in_shardings=(rep,) * 6, out_shardings=(rep, rep), donate_argnums=0)

  def fused_call(state, images, seen, n, step_key, order_key):
    return jitted(state, images, scalar(seen), scalar(n), step_key, order_key)
  return fused_call


def init_state(model: Any, tx: optax.GradientTransformation, key: Array,
               image_shape: Sequence[int], sharding: NamedSharding) -> TrainState:
  """Fresh state, created directly with `sharding` (EMA starts at the initial params)."""
  return _init_jit(model, tx, tuple(int(s) for s in image_shape), sharding)(key)


@functools.lru_cache(maxsize=8)
def _init_jit(model: Any, tx: optax.GradientTransformation, image_shape: tuple[int, ...],
              sharding: NamedSharding) -> Callable[[Array], TrainState]:
  return jax.jit(_init_fn(model, tx, image_shape), out_shardings=sharding)


def _init_fn(model: Any, tx: optax.GradientTransformation, image_shape: Sequence[int]
             ) -> Callable[[Array], TrainState]:
  shape = tuple(int(s) for s in image_shape)

  def init(key: Array) -> TrainState:
    params = models.init_params(model, key, shape)
    ema = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema,
                      opt_state=tx.init(params))
  return init


# --- data order ----------------------------------------------------------------------


def stream_indices(order_key: Array, start: Array | int, count: int, size: int) -> Array:
  """Stream indices [count] int32 of the run's examples start .. start + count - 1: example
  k is perm_e[k mod size] of epoch e = k // size, perm_e = jax.random.permutation(
  fold_in(order_key, e), size). Traceable (start may be a traced int32 scalar); computes
  the permutations of the (count - 1) // size + 2 epochs a window can touch. Integer
  sorts only, so every backend and process gets the same indices."""
  k = jnp.asarray(start, jnp.int32) + jnp.arange(count, dtype=jnp.int32)
  first = k[0] // size
  epochs = first + jnp.arange((count - 1) // size + 2, dtype=jnp.int32)
  perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(order_key, e), size))(epochs)
  return perms[k // size - first, k % size].astype(jnp.int32)


def stream_fingerprint(ids: np.ndarray) -> str:
  """sha1 of the training stream's image ids in stream order."""
  return hashlib.sha1(np.ascontiguousarray(np.asarray(ids, np.int64)).tobytes()).hexdigest()


# --- checks and logs -----------------------------------------------------------------


def check_finite(losses: np.ndarray, grad_norms: np.ndarray, first_step: int) -> None:
  """FloatingPointError naming the first step (losses[i] is step first_step + i) whose loss
  or gradient norm is not finite."""
  bad = ~(np.isfinite(losses) & np.isfinite(grad_norms))
  if bad.any():
    i = int(np.argmax(bad))
    raise FloatingPointError(
        f"non-finite training metrics at step {first_step + i}: loss={losses[i]}, "
        f"grad_norm={grad_norms[i]}. Lower train.lr, lengthen train.warmup_steps or lower "
        f"train.grad_clip; resume starts from the last checkpoint, saved before this step.")


def _check_train_config(tc: Any, num_devices: int) -> None:
  ints = {"num_steps": 1, "batch_size": 1, "warmup_steps": 0, "log_every": 1, "ckpt_every": 1,
          "keep_checkpoints": 1, "keep_every": 0, "sample_every": 0, "sample_num": 1,
          "sample_steps": 1, "steps_per_call": 1}
  for name, low in ints.items():
    if int(tc[name]) < low:
      raise ValueError(f"train.{name} must be >= {low}, got {tc[name]}")
  if not float(tc.lr) > 0:
    raise ValueError(f"train.lr must be > 0, got {tc.lr}")
  if float(tc.grad_clip) < 0:
    raise ValueError(f"train.grad_clip must be >= 0 (0 = no clipping), got {tc.grad_clip}")
  if not 0.0 <= float(tc.ema_decay) < 1.0:
    raise ValueError(f"train.ema_decay must be in [0, 1), got {tc.ema_decay}")
  _precision(tc)
  if str(tc.get("fused_steps", "auto")).lower() not in _FUSED:
    raise ValueError(f"train.fused_steps must be one of {_FUSED}; got {tc.fused_steps!r}")
  if int(tc.batch_size) % num_devices:
    raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by the {num_devices} "
                     f"devices of the data mesh; use a multiple of {num_devices}")


def read_log(workdir: str) -> list[dict[str, float]]:
  """Rows of workdir/train/log.csv (step int, the rest float; [] if there is none yet)."""
  path = wdir.train_log(workdir)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    if len(f.readlines()) <= 1:
      return []
  return [{k: int(v) if k == "step" else float(v) for k, v in r.items()} for r in io.load_csv(path)]


def save_loss_curve(rows: Sequence[Mapping[str, float]], path: str) -> None:
  """PNG of the logged training loss against step (log scale)."""
  fig, ax = plotting.pyplot().subplots(figsize=(6, 3.5))
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("eps-prediction loss (per pixel)")
  ax.grid(alpha=0.3)
  plotting.save_figure(fig, path)


def _host_copy(tree: Any) -> Any:
  """This process's copy of a replicated pytree, as numpy."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def save_sample_grid(config: Any, model: Any, sde: sde_lib.SDE, ema_params: Any,
                     image_shape: Sequence[int], path: str) -> None:
  """PNG grid of train.sample_num reverse-SDE samples (train.sample_steps steps) of the EMA
  network, from a fixed key so grids of different steps are comparable."""
  tc = config.train
  eps_fn = models.make_eps_fn(model, jax.tree.map(jnp.asarray, _host_copy(ema_params)), sde)
  key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _PREVIEW)
  out = sampling.reverse_sde_sample(eps_fn, sde, key, int(tc.sample_num), tuple(image_shape),
                                    num_steps=int(tc.sample_steps))
  plotting.save_image_grid(np.asarray(out.images), path, scale=max(1, 64 // int(image_shape[0])))


# --- the stage -----------------------------------------------------------------------


def _abstract_state(model: Any, tx: optax.GradientTransformation, image_shape: Sequence[int],
                    sharding: NamedSharding) -> TrainState:
  shapes = jax.eval_shape(_init_fn(model, tx, image_shape), jax.random.PRNGKey(0))
  return ckpt_lib.abstract_like(shapes, sharding)


def restore_state(config: Any, workdir: str, mesh: Mesh, step: int | None = None
                  ) -> tuple[TrainState, dict[str, Any]]:
  """The training state of the checkpoint at `step` (default: latest), replicated over
  `mesh`, and its meta (config checked: ValueError naming differing fields)."""
  meta = ckpt_lib.restore_meta(workdir, step)
  ckpt_lib.check_config(meta, config, f"{wdir.checkpoints(workdir)}/{meta['step']}")
  image_shape = tuple(meta["image_shape"])
  model = models.get_model(config.model, image_shape)
  rep = parallel.replicated(mesh)
  abstract = _abstract_state(model, make_optimizer(config.train), image_shape, rep)
  targets = {"params": abstract.params, "ema_params": abstract.ema_params,
             "opt_state": abstract.opt_state}
  try:
    items, meta = ckpt_lib.restore(workdir, config, targets, meta["step"])
  except (ValueError, KeyError, TypeError) as e:
    fields = ("grad_clip", "adam_b1", "adam_b2", "adam_eps", "lr", "warmup_steps")
    diff = io.config_diff({k: meta.get("train", {}).get(k) for k in fields},
                          {k: io.config_to_dict(config.train)[k] for k in fields}, "train.")
    raise ValueError(f"cannot restore the optimiser state of checkpoint {meta['step']} in "
                     f"{workdir} ({e}); optimiser settings changed since: {diff or 'none'}") from e
  step_arr = jax.device_put(jnp.asarray(meta["step"], jnp.int32), rep)
  return TrainState(step=step_arr, **items), meta


DONE_MEANS = "the latest checkpoint has train.num_steps updates"


def stale_reason(config: Any, workdir: str) -> str | None:
  """None when the latest checkpoint has at least train.num_steps updates; otherwise why not."""
  step = ckpt_lib.latest_step(workdir)
  return None if step is not None and step >= int(config.train.num_steps) else \
      "no checkpoint with train.num_steps updates yet"


def is_complete(config: Any, workdir: str) -> bool:
  return stale_reason(config, workdir) is None


def run(config: Any, workdir: str, mesh: Mesh | None = None) -> TrainState:
  """Train (or resume) to train.num_steps; returns the final state. Writes
  workdir/checkpoints, workdir/train/log.csv (appended on resume), samples_step{N}.png grids
  and loss.png. Returns at once when the latest checkpoint is already complete."""
  tc = config.train
  mesh = parallel.data_mesh() if mesh is None else mesh
  _check_train_config(tc, mesh.size)
  rep = parallel.replicated(mesh)
  latest = ckpt_lib.latest_step(workdir)
  if latest is not None:  # refuse a different config before touching the workdir
    ckpt_lib.check_config(ckpt_lib.restore_meta(workdir, latest), config,
                          f"{wdir.checkpoints(workdir)}/{latest}")
  if latest is not None and latest >= int(tc.num_steps):
    logging.info("train: checkpoint at step %d >= num_steps=%d, nothing to do", latest, tc.num_steps)
    return restore_state(config, workdir, mesh)[0]

  split = edit_stream(data_lib.prepare(config, workdir), config.data)
  images, ids = split.training_stream()
  images = np.asarray(images, np.float32)
  image_shape = tuple(images.shape[1:])
  model = models.get_model(config.model, image_shape)
  sde = sde_lib.from_config(config.sde)
  tx = make_optimizer(tc)
  fingerprint = stream_fingerprint(ids)

  if latest is None:
    seed = int(config.seed)
    state = init_state(model, tx, jax.random.fold_in(jax.random.PRNGKey(seed), _INIT), image_shape, rep)
    examples_seen = 0
  else:
    state, meta = restore_state(config, workdir, mesh)
    if meta["stream_size"] != len(ids) or meta["stream_fingerprint"] != fingerprint:
      raise ValueError(
          f"the training stream of {workdir} changed since the checkpoint at step {meta['step']} "
          f"({meta['stream_size']} -> {len(ids)} images); use a new --workdir")
    seed, examples_seen = int(meta["seed"]), int(meta["examples_seen"])
    if seed != int(config.seed):
      logging.warning("train: resuming with the checkpoint's seed %d (config.seed=%d ignored)",
                      seed, config.seed)
  start = latest or 0
  root = jax.random.PRNGKey(seed)
  step_key = jax.device_put(jax.random.fold_in(root, _STEP), rep)
  order_key = jax.device_put(jax.random.fold_in(root, _ORDER), rep)
  stream = jax.make_array_from_process_local_data(rep, images, images.shape)
  aug_mask = split.stream_augment()
  augment = augment_settings(config.data) if aug_mask is not None else None
  if augment is not None:
    stream = (stream, jax.make_array_from_process_local_data(rep, aug_mask, aug_mask.shape))
  train_loop = make_train_loop(model, sde, tx, tc, mesh, bool(config.data.random_flip), augment)
  schedule = lr_schedule(tc)

  batch_size, num_steps = int(tc.batch_size), int(tc.num_steps)
  is_main = parallel.is_main_process()
  log_rows = [r for r in read_log(workdir) if r["step"] <= start]
  elapsed0 = log_rows[-1]["elapsed_s"] if log_rows else 0.0

  def meta_at(step: int) -> dict[str, Any]:
    return {"step": step, "seed": seed, "examples_seen": examples_seen, "stream_size": len(ids),
            "stream_fingerprint": fingerprint, "image_shape": list(image_shape),
            "config": ckpt_lib.config_record(config), "train": io.config_to_dict(tc),
            "num_params": models.count_params(state.params)}

  logging.info("train: %d stream images %s (%d distinct), %d params, steps %d -> %d, batch %d "
               "over %d device(s), up to %d steps per call", len(ids), image_shape,
               len(np.unique(ids)), models.count_params(state.params), start, num_steps, batch_size,
               mesh.size, int(tc.steps_per_call))
  mngr = ckpt_lib.open_manager(workdir, int(tc.keep_checkpoints), int(tc.keep_every) or None,
                               async_save=True)
  bar = tqdm(total=num_steps, initial=start, desc="train", unit="step",
             dynamic_ncols=True, mininterval=1.0, disable=not is_main)
  pending: list[tuple[dict[str, Array], int]] = []  # (metrics of a call, its number of steps)
  t_run0 = t_last = time.perf_counter()
  done = step_last = start
  try:
    with preempt.handling():
      while done < num_steps:
        n = call_length(tc, done)
        state, metrics = train_loop(state, stream, examples_seen, n, step_key, order_key)
        examples_seen += n * batch_size
        pending.append((metrics, n))
        bar.update(n)
        done += n
        stop = preempt.should_stop(done)
        final = done == num_steps
        do_ckpt = final or stop or done % int(tc.ckpt_every) == 0
        do_sample = int(tc.sample_every) > 0 and done % int(tc.sample_every) == 0
        if not (do_ckpt or do_sample or done % int(tc.log_every) == 0):
          continue
        fetched = jax.device_get(pending)
        losses = np.concatenate([np.asarray(m["loss"][:k], np.float64) for m, k in fetched])
        gnorms = np.concatenate([np.asarray(m["grad_norm"][:k], np.float64) for m, k in fetched])
        check_finite(losses, gnorms, done - len(losses) + 1)
        pending = []
        now = time.perf_counter()
        log_rows.append({"step": done, "loss": float(losses.mean()), "grad_norm": float(gnorms.mean()),
                         "lr": float(schedule(done - 1)),
                         "steps_per_s": (done - step_last) / max(now - t_last, 1e-9),
                         "elapsed_s": elapsed0 + now - t_run0})
        t_last, step_last = now, done
        bar.set_postfix(loss=f"{log_rows[-1]['loss']:.4f}", refresh=False)
        if is_main:
          io.save_csv(wdir.train_log(workdir), log_rows, LOG_COLUMNS)
        if do_ckpt:  # from a copy, so the next call may donate the state while it is written
          mngr.wait_until_finished()
          snapshot = jax.tree.map(jnp.copy, (state.params, state.ema_params, state.opt_state))
          ckpt_lib.save(mngr, done, *snapshot, meta_at(done))
        if do_sample and is_main:
          save_sample_grid(config, model, sde, state.ema_params, image_shape,
                           os.path.join(wdir.train_dir(workdir), f"samples_step{done}.png"))
        if stop and not final:
          mngr.wait_until_finished()
          raise preempt.Preempted("train", f"step {done}",
                                  f"the same command with --workdir={workdir} (checkpoint {done} saved)")
    mngr.wait_until_finished()
  finally:
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
  if is_main and log_rows:
    save_loss_curve(log_rows, os.path.join(wdir.train_dir(workdir), "loss.png"))
  logging.info("train: %d steps done, final loss %.4f", num_steps,
               log_rows[-1]["loss"] if log_rows else float("nan"))
  return state


def call_length(train_cfg: Any, done: int) -> int:
  """Updates of the next compiled call after `done` updates: up to train.steps_per_call,
  stopping at the next step named for a log row, checkpoint, sample grid or the end."""
  tc = train_cfg
  stops = [int(tc.num_steps), done + int(tc.steps_per_call)]
  for every in (int(tc.log_every), int(tc.ckpt_every), int(tc.sample_every)):
    if every > 0:
      stops.append((done // every + 1) * every)
  return min(stops) - done
