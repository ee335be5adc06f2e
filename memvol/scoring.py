"""The `score` stage: log volume growth of every training and held-out image.

Images are ordered train then held-out (ids from the split). For each estimator of
config.score.estimators the images are scored in batches of config.score.batch_size by
`volume.batch_log_volume`, sharded over this process's devices (parallel.shard_map_batch,
one compilation per estimator: the last batch is padded), and each finished batch is
committed to scores/parts/{estimator}/{start:06d}_{end:06d}.npz with the settings that
made it (parts.py): a rerun resumes, recomputes corrupt parts and refuses to mix
settings. Image i's randomness is fold_in(key, id_i), so scores do not depend on the
batch size or the device count. Process 0 merges everything into

  scores/scores.csv     id, split, label, dup_count, then per estimator E:
                        E_log_volume, E_stderr, E_prior_logp, E_logp, E_nfe, E_status
  scores/curves_E.npz   ids [N], split [N], ts [S], L_t [N, S] (cumulative L(t); S = 0
                        when config.score.num_save_times is 0)
  scores/manifest.json  the settings of every estimator (what is_complete checks).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from memvol import io, parallel, parts, volume
from memvol import sde as sde_lib

_SCORE_STREAM = 1  # fold_in(PRNGKey(config.seed), _SCORE_STREAM): the scoring key
# per-estimator CSV columns: (column suffix, record key)
COLUMNS = (("log_volume", "log_volume"), ("stderr", "log_volume_stderr"),
           ("prior_logp", "prior_logp"), ("logp", "logp"), ("nfe", "nfe"), ("status", "status"))


class ImageTable(NamedTuple):
  """Every image to score, train then held-out: images [N, *shape] float32, ids [N]
  int64, split [N] ('train' | 'heldout'), labels [N] int64, dup_counts [N] int64 (0 for
  held-out)."""

  images: np.ndarray
  ids: np.ndarray
  split: np.ndarray
  labels: np.ndarray
  dup_counts: np.ndarray


def image_table(split: Any) -> ImageTable:
  """The ImageTable of a data.Split."""
  tr, ho = split.train, split.heldout
  n_tr, n_ho = len(tr.ids), len(ho.ids)
  if n_tr + n_ho == 0:
    raise ValueError("the data split has no images to score")
  images = np.concatenate([np.asarray(tr.images, np.float32), np.asarray(ho.images, np.float32)])
  ids = np.concatenate([np.asarray(tr.ids), np.asarray(ho.ids)]).astype(np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
    raise ValueError(f"image ids must lie in [0, 2^31) (they seed fold_in); got {ids.min()} .. {ids.max()}")
  return ImageTable(
      images=images, ids=ids, split=np.array(["train"] * n_tr + ["heldout"] * n_ho),
      labels=np.concatenate([np.asarray(tr.labels), np.asarray(ho.labels)]).astype(np.int64),
      dup_counts=np.concatenate([np.asarray(split.dup_counts), np.zeros(n_ho)]).astype(np.int64))


def score_key(config: Any) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _SCORE_STREAM)


def estimators_of(config: Any) -> tuple[str, ...]:
  ests = tuple(config.score.estimators)
  if not ests:
    raise ValueError("config.score.estimators is empty; name at least one of "
                     + ", ".join(volume.ESTIMATORS))
  unknown = [e for e in ests if e not in volume.ESTIMATORS]
  if unknown or len(set(ests)) != len(ests):
    raise ValueError(f"config.score.estimators {list(ests)}: each must be one of "
                     f"{volume.ESTIMATORS}, named once")
  if int(config.score.batch_size) < 1:
    raise ValueError(f"config.score.batch_size must be >= 1, got {config.score.batch_size}")
  return ests


def options(config: Any, estimator: str) -> volume.VolumeOptions:
  return volume.VolumeOptions.from_config(config, estimator)


def settings(config: Any, opts: volume.VolumeOptions, eps_fn: Any, table: ImageTable) -> dict[str, Any]:
  """Everything an estimator's scores depend on (not the batch size or device count)."""
  o = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "sde"}
  sde = {"class": type(opts.sde).__name__, **dataclasses.asdict(opts.sde)}
  return parts.canonical({
      "options": o, "sde": sde, "seed": int(config.seed), "use_ema": bool(config.score.use_ema),
      "params": parts.tree_digest(eps_fn), "num_images": int(len(table.ids)),
      "images": parts.digest(table.images, table.ids, table.split.astype("U7"))})


def _score_batch(rep: tuple, x0: jax.Array, ids: jax.Array) -> dict[str, jax.Array]:
  eps_fn, key, opts = rep
  out = volume.batch_log_volume(eps_fn, x0, ids, key, opts)
  out.pop("x_T")
  return out


def score_images(eps_fn: Any, images: np.ndarray, ids: np.ndarray, key: jax.Array,
                 opts: volume.VolumeOptions, mesh: jax.sharding.Mesh, pad_to: int = 0
                 ) -> dict[str, np.ndarray]:
  """volume.batch_log_volume of images [b, *shape] with ids [b], sharded over `mesh`
  (padded to >= pad_to, padding dropped); numpy arrays [b, ...] (no x_T)."""
  mapped = parallel.shard_map_batch(_score_batch, mesh)
  out = mapped((eps_fn, key, opts), jnp.asarray(images), jnp.asarray(ids, jnp.int32), pad_to=pad_to)
  return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def _check_model(eps_fn: Any, shape: tuple[int, ...]) -> None:
  """ValueError unless eps_fn maps one image of `shape` to that shape."""
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  try:
    out = eqx.filter_eval_shape(eps_fn, x, jax.ShapeDtypeStruct((), jnp.float32))
  except Exception as e:  # the model's own shape error, whatever its type
    raise ValueError(f"the model cannot take images of shape {shape} ({type(e).__name__}: {e}); "
                     "score with the data config the model was trained on") from e
  if getattr(out, "shape", None) != shape:
    raise ValueError(f"the model maps images of shape {shape} to {getattr(out, 'shape', out)}; "
                     "score with the data config the model was trained on")


def _load(config: Any, workdir: str) -> tuple[Any, ImageTable]:
  """(eps_fn, ImageTable) of the workdir: the checkpoint's (EMA) network and the split."""
  from memvol import data, loading, models  # the stage's inputs; imported here to stay light
  model, params, model_shape = loading.load_model(config, workdir, use_ema=bool(config.score.use_ema))
  table = image_table(data.load_split(config, workdir))
  if tuple(table.images.shape[1:]) != tuple(model_shape):
    raise ValueError(f"the split's images have shape {table.images.shape[1:]} but the model was "
                     f"trained on {tuple(model_shape)}; score with the data config it was trained on")
  return models.make_eps_fn(model, params, sde_lib.from_config(config.sde)), table


def _paths(workdir: str) -> dict[str, str]:
  root = os.path.join(workdir, "scores")
  return {"root": root, "csv": os.path.join(root, "scores.csv"),
          "manifest": os.path.join(root, "manifest.json")}


def parts_folder(workdir: str, estimator: str) -> str:
  return os.path.join(workdir, "scores", "parts", estimator)


def curves_path(workdir: str, estimator: str) -> str:
  return os.path.join(workdir, "scores", f"curves_{estimator}.npz")


def _fmt(v: Any) -> str:
  v = np.asarray(v)
  if np.issubdtype(v.dtype, np.integer):
    return str(int(v))
  return str(v.item()) if v.dtype == np.float64 else str(np.float32(v))


def run(config: Any, workdir: str, log: Callable[[str], None] = print) -> None:
  """The `score` stage (see the module docstring)."""
  ests = estimators_of(config)
  eps_fn, table = _load(config, workdir)
  shape = tuple(table.images.shape[1:])
  _check_model(eps_fn, shape)
  mesh, key, bs = parallel.local_mesh(), score_key(config), int(config.score.batch_size)
  n = len(table.ids)
  paths = _paths(workdir)
  all_settings = {}
  for est in ests:
    opts = options(config, est)
    volume.validate_inputs(table.images, opts)
    all_settings[est] = s = settings(config, opts, eps_fn, table)
    _refuse_overwrite(paths["manifest"], est, s, paths["root"])
  if _merged(workdir, ests, all_settings):
    log(f"[memvol] scores: already complete in {paths['csv']}, nothing to do")
    return
  for est in ests:
    opts = options(config, est)
    log(f"[memvol] score {est}: {n} images ({int(np.sum(table.split == 'train'))} train), "
        f"batch {bs} on {mesh.devices.size} device(s) x {jax.process_count()} process(es)")

    def compute(start: int, end: int, opts: volume.VolumeOptions = opts) -> dict[str, np.ndarray]:
      out = score_images(eps_fn, table.images[start:end], table.ids[start:end], key, opts, mesh,
                         pad_to=bs)
      out["ids"] = table.ids[start:end]
      return out

    parts.run_batches(parts_folder(workdir, est), n, bs, all_settings[est], compute,
                      root=paths["root"], desc=f"score {est}", unit="img",
                      postfix=lambda a: {"nfe": f"{np.mean(a['nfe']):.0f}"}, log=log)
  if parallel.is_main_process():
    merge(workdir, table, ests, all_settings, bs, log)
  parallel.sync_processes("memvol-scores-merged")


def merge(workdir: str, table: ImageTable, ests: tuple[str, ...], all_settings: dict[str, Any],
          batch_size: int, log: Callable[[str], None] = print) -> None:
  """Write scores.csv, curves_E.npz and manifest.json from the part files (deterministic:
  the same parts give byte-identical files)."""
  paths = _paths(workdir)
  n = len(table.ids)
  rows = [{"id": str(int(table.ids[i])), "split": str(table.split[i]),
           "label": str(int(table.labels[i])), "dup_count": str(int(table.dup_counts[i]))}
          for i in range(n)]
  columns = ["id", "split", "label", "dup_count"]
  for est in ests:
    rec = parts.merge_parts(parts_folder(workdir, est), n, batch_size, all_settings[est],
                            root=paths["root"])
    if not np.array_equal(rec["ids"], table.ids):
      raise ValueError(f"{parts_folder(workdir, est)} holds other image ids than the split; "
                       f"delete {paths['root']} and rerun")
    for suffix, key in COLUMNS:
      col = f"{est}_{suffix}"
      columns.append(col)
      for i in range(n):
        rows[i][col] = _fmt(rec[key][i])
    ts = np.asarray(all_settings[est]["options"]["save_ts"] or [], np.float64)
    L_t = rec["L_t"] if "L_t" in rec else np.zeros((n, 0), np.float32)
    io.save_npz(curves_path(workdir, est), ids=table.ids, split=table.split.astype("U7"), ts=ts, L_t=L_t)
    failed = int(np.sum(rec["status"] != 0))
    if failed:
      log(f"[memvol] WARNING score {est}: {failed} of {n} solves did not succeed (status != 0 in "
          f"scores.csv); raise config.score.max_steps or loosen rtol/atol")
    log(f"[memvol] score {est}: mean log volume train {np.mean(rec['log_volume'][table.split == 'train']):.2f}, "
        f"heldout {np.mean(rec['log_volume'][table.split == 'heldout']) if np.any(table.split == 'heldout') else float('nan'):.2f}, "
        f"mean nfe {np.mean(rec['nfe']):.1f}")
  io.save_csv(paths["csv"], rows, columns)
  io.save_json(paths["manifest"], {"estimators": list(ests), "batch_size": batch_size,
                                   "settings": all_settings})
  log(f"[memvol] scores written to {paths['csv']}")


def _refuse_overwrite(manifest: str, est: str, s: dict[str, Any], root: str) -> None:
  """Never replace an estimator's merged scores made with other settings."""
  if not os.path.exists(manifest):
    return
  saved = io.load_json(manifest).get("settings", {}).get(est)
  if saved is not None and saved != s:
    raise ValueError(
        f"{root} holds {est} scores made with other settings "
        f"({'; '.join(io.config_diff(saved, s))}); they are not overwritten. "
        f"Use a new --workdir, or delete {root} to rescore.")


def _merged(workdir: str, ests: tuple[str, ...], all_settings: dict[str, Any]) -> bool:
  """Whether the merged files exist and were made for exactly these estimators/settings."""
  paths = _paths(workdir)
  if not (os.path.exists(paths["csv"]) and os.path.exists(paths["manifest"])
          and all(os.path.exists(curves_path(workdir, e)) for e in ests)):
    return False
  try:
    manifest = io.load_json(paths["manifest"])
  except ValueError:
    return False
  return manifest.get("estimators") == list(ests) and manifest.get("settings") == all_settings


def is_complete(config: Any, workdir: str) -> bool:
  """Whether scores.csv holds every configured estimator for these settings, this model
  and this split."""
  try:
    ests = estimators_of(config)
    if not os.path.exists(_paths(workdir)["manifest"]):
      return False
    eps_fn, table = _load(config, workdir)
    return _merged(workdir, ests, {e: settings(config, options(config, e), eps_fn, table) for e in ests})
  except (FileNotFoundError, ValueError):
    return False
