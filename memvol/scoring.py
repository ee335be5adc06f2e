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
                        E_log_volume, E_stderr, E_prior_logp, E_logp, E_nfe, E_jvps,
                        E_status
                        and, when the estimator has a profile (config.score.profile_times,
                        memvol/profile.py): E_L@t (cumulative L(t0 -> t)) and E_excess@t
                        (L(t) - L_max(t)) at each profile time t, E_t_above (the first
                        profile time above the bound, NaN: never), E_L_capped (the
                        bound-respecting score)
  scores/profile_E.npz  ids [N], split [N], ts [S], L_t [N, S] (the profile; S = 0 when
                        config.score.profile_times is 0), bound_t [S], excess [N, S],
                        t_above [N], edges [W + 1], windows [N, W], window_bound [W],
                        L_capped [N], bound_dim
  scores/manifest.json  the settings of every estimator, peer and agreement run (what
                        is_complete checks) and seconds_per_image of each.

Peers (config.score.peers, memvol/peers.py) run through the same machinery, one part folder
each (scores/parts/peer_{name}), keyed fold_in(PRNGKey(seed), 2), and add to scores.csv the
columns peer_{name} (higher = member / memorised) and peer_{name}_nfe (network passes:
forward evaluations + JVPs). `logp` is copied from the first full-trace
estimator (exact / hutchinson): peer_logp = E_logp, peer_logp_nfe = E_nfe + E_jvps.
Estimator agreement: the first config.score.agreement_subset training images are also scored
with config.score.agreement_estimators (K = score.K capped at D, paper with
agreement_paper_steps), parts in scores/parts/agreement_{E}, merged into

  scores/agreement.csv  id, split, label, dup_count, primary_log_volume, then per estimator E:
                        E_log_volume, E_nfe, E_jvps, E_status

Every part records per image `seconds` (its batch's wall time / batch size) and `compiled`
(whether that batch was the first of its kind in the process, so its time includes
compilation); manifest.json's seconds_per_image (per estimator E, peer_{name} and
agreement_{E}) averages them, leaving compiling batches out when others exist. Timings stay
out of the CSVs, so the same parts give byte-identical CSVs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from memvol import io, parallel, parts, peers, volume
from memvol import profile as profile_lib
from memvol import sde as sde_lib
from memvol import workdir as wdir

_SCORE_STREAM = 1  # fold_in(PRNGKey(config.seed), _SCORE_STREAM): the scoring key
_PEER_STREAM = 2   # fold_in(PRNGKey(config.seed), _PEER_STREAM): the peers' key
PEER_NAMES = peers.PEERS + ("logp",)
FULL_TRACE = ("exact", "hutchinson")  # estimators whose L is a full log-determinant (a likelihood)
# per-estimator CSV columns: (column suffix, record key)
COLUMNS = (("log_volume", "log_volume"), ("stderr", "log_volume_stderr"),
           ("prior_logp", "prior_logp"), ("logp", "logp"), ("nfe", "nfe"), ("jvps", "num_jvps"),
           ("status", "status"))


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
  unknown = [e for e in ests if not _known_estimator(e)]
  if unknown or len(set(ests)) != len(ests):
    raise ValueError(f"config.score.estimators {list(ests)}: each must be one of "
                     f"{volume.ESTIMATORS} or hutchinson@<preset> ({sorted(volume.PRESETS)}), named once")
  if int(config.score.batch_size) < 1:
    raise ValueError(f"config.score.batch_size must be >= 1, got {config.score.batch_size}")
  return ests


def _known_estimator(name: str) -> bool:
  try:
    volume.parse_estimator(name)
  except ValueError:
    return False
  return True


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


def options_from_settings(s: dict[str, Any]) -> volume.VolumeOptions:
  """The VolumeOptions a settings record (`settings`) was made from."""
  sde_d = dict(s["sde"])
  cls = {c.__name__: c for c in sde_lib._SDES.values()}[sde_d.pop("class")]
  o = dict(s["options"])
  if o.get("save_ts") is not None:
    o["save_ts"] = tuple(o["save_ts"])
  return volume.VolumeOptions(sde=cls(**sde_d), **o)


def _fmt(v: Any) -> str:
  v = np.asarray(v)
  if np.issubdtype(v.dtype, np.integer):
    return str(int(v))
  return str(v.item()) if v.dtype == np.float64 else str(np.float32(v))


def peer_key(config: Any) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _PEER_STREAM)


def logp_source(ests: tuple[str, ...]) -> str | None:
  """The first full-trace estimator (its E_logp is the `logp` peer), or None."""
  return next((e for e in ests if volume.parse_estimator(e)[0] in FULL_TRACE), None)


def peers_of(config: Any, ests: tuple[str, ...]) -> tuple[str, ...]:
  """config.score.peers, checked: names from PEER_NAMES, each once; `logp` needs a
  full-trace estimator."""
  names = tuple(config.score.get("peers", ()) or ())
  unknown = [p for p in names if p not in PEER_NAMES]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f"config.score.peers {list(names)}: each must be one of {PEER_NAMES}, named once")
  if "logp" in names and logp_source(ests) is None:
    raise ValueError(f"peer 'logp' is the ODE likelihood of a full-trace estimator ({FULL_TRACE}), "
                     f"but config.score.estimators = {list(ests)}; add one or drop 'logp'")
  return names


def peer_options(config: Any, name: str) -> peers.PeerOptions:
  return peers.PeerOptions.from_config(config, name)


def agreement_plan(config: Any, table: ImageTable) -> tuple[ImageTable | None, tuple[str, ...]]:
  """(the agreement subset: the first config.score.agreement_subset training images, or None
  when 0; the estimators scored on it)."""
  n = config.score.get("agreement_subset", 0)
  if int(n) != n or n < 0:
    raise ValueError(f"config.score.agreement_subset must be an integer >= 0, got {n}")
  agree = tuple(config.score.get("agreement_estimators", ()) or ())
  bad = [e for e in agree if e not in volume.ESTIMATORS]
  if bad or len(set(agree)) != len(agree):
    raise ValueError(f"config.score.agreement_estimators {list(agree)}: each must be one of "
                     f"{volume.ESTIMATORS}, named once")
  rows = np.flatnonzero(table.split == "train")[:int(n)]
  if not agree or rows.size == 0:
    return None, ()
  return ImageTable(*(np.asarray(a)[rows] for a in table)), agree


def agreement_options(config: Any, estimator: str, dim: int) -> volume.VolumeOptions:
  """The estimator's options on the agreement subset: K = score.K capped at D, paper with
  score.agreement_paper_steps Euler steps, no L(t) curve."""
  return volume.VolumeOptions.from_config(
      config, estimator, K=min(int(config.score.K), dim), save_ts=None,
      paper_steps=int(config.score.get("agreement_paper_steps", config.score.paper_steps)))


class Plan(NamedTuple):
  """What the score stage computes for a config, with the settings record of each part folder."""

  ests: tuple[str, ...]
  settings: dict[str, Any]        # estimator -> settings
  peers: tuple[str, ...]
  peer_settings: dict[str, Any]   # peer (not logp) -> settings
  subset: ImageTable | None       # the agreement subset
  agreement_settings: dict[str, Any]  # agreement estimator -> settings
  reference: dict[str, Any] | None = None  # score.reference's statistics (memvol.screen.reference.load)

  def manifest_extra(self) -> dict[str, Any]:
    ref = {} if self.reference is None else {"path": self.reference["path"], "digest": self.reference["digest"]}
    return {"peers": list(self.peers), "peer_settings": self.peer_settings,
            "agreement_settings": self.agreement_settings, "reference": ref}


def plan(config: Any, eps_fn: Any, table: ImageTable) -> Plan:
  ests = estimators_of(config)
  names = peers_of(config, ests)
  sub, agree = agreement_plan(config, table)
  dim = int(np.prod(table.images.shape[1:]))
  ref = None
  if config.score.get("reference"):  # refused here, before anything is scored or written
    from memvol.screen import reference  # noqa: PLC0415  (the screen package reads scores.csv: no cycle at import)
    need = [f"{e}_log_volume" for e in ests] + [f"peer_{p}" for p in names]
    ref = reference.load(str(config.score.reference), config, table.ids, table.images, need)
  return Plan(
      ests=ests, settings={e: settings(config, options(config, e), eps_fn, table) for e in ests},
      peers=names,
      peer_settings={p: settings(config, peer_options(config, p), eps_fn, table) for p in names if p != "logp"},
      subset=sub,
      agreement_settings={e: settings(config, agreement_options(config, e, dim), eps_fn, sub) for e in agree},
      reference=ref)


def _peer_batch(rep: tuple, x0: jax.Array, ids: jax.Array) -> dict[str, jax.Array]:
  eps_fn, key, opts = rep
  return peers.batch_scores(eps_fn, x0, ids, key, opts)


def peer_images(eps_fn: Any, images: np.ndarray, ids: np.ndarray, key: jax.Array, opts: peers.PeerOptions,
                mesh: jax.sharding.Mesh, pad_to: int = 0) -> dict[str, np.ndarray]:
  """peers.batch_scores of images [b, *shape] with ids [b], sharded over `mesh` (padded to
  >= pad_to, padding dropped): numpy score [b], nfe [b]."""
  mapped = parallel.shard_map_batch(_peer_batch, mesh)
  out = mapped((eps_fn, key, opts), jnp.asarray(images), jnp.asarray(ids, jnp.int32), pad_to=pad_to)
  return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def _timed(compute: Callable[[int, int], dict[str, np.ndarray]]) -> Callable[[int, int], dict[str, np.ndarray]]:
  """compute with per-image `seconds` (batch wall time / batch size) and `compiled` (True for
  the first batch this process computes, whose time includes compilation)."""
  first = [True]

  def timed(start: int, end: int) -> dict[str, np.ndarray]:
    t0 = time.perf_counter()
    out = compute(start, end)
    n = end - start
    out["seconds"] = np.full(n, (time.perf_counter() - t0) / n)
    out["compiled"] = np.full(n, first[0])
    first[0] = False
    return out

  return timed


def seconds_per_image(rec: dict[str, np.ndarray]) -> dict[str, Any]:
  """Mean wall seconds per image of merged parts, leaving out batches that compiled when
  any others exist: {'seconds_per_image', 'includes_compile'} (NaN / None without timings)."""
  if "seconds" not in rec:
    return {"seconds_per_image": float("nan"), "includes_compile": None}
  sec, comp = np.asarray(rec["seconds"], np.float64), np.asarray(rec["compiled"], bool)
  keep = ~comp if (~comp).any() else np.ones_like(comp)
  return {"seconds_per_image": float(sec[keep].mean()), "includes_compile": bool(comp[keep].any())}


def run(config: Any, workdir: str, log: Callable[[str], None] = print) -> None:
  """The `score` stage (see the module docstring)."""
  peers_of(config, estimators_of(config))  # bad settings fail before the model is loaded
  eps_fn, table = _load(config, workdir)
  shape = tuple(table.images.shape[1:])
  _check_model(eps_fn, shape)
  pl = plan(config, eps_fn, table)
  ests, all_settings = pl.ests, pl.settings
  mesh, key, bs = parallel.local_mesh(), score_key(config), int(config.score.batch_size)
  n = len(table.ids)
  root, csv_path, manifest_path = wdir.scores_dir(workdir), wdir.scores_csv(workdir), wdir.scores_manifest(workdir)
  for est in ests:
    volume.validate_inputs(table.images, options(config, est))
    _refuse_overwrite(manifest_path, est, all_settings[est], root)
  if _merged(workdir, ests, all_settings, pl):
    log(f"[memvol] scores: already complete in {csv_path}, nothing to do")
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

    parts.run_batches(wdir.score_parts(workdir, est), n, bs, all_settings[est], _timed(compute),
                      root=root, desc=f"score {est}", unit="img",
                      postfix=lambda a: {"nfe": f"{np.mean(a['nfe']):.0f}"}, log=log)
  pkey = peer_key(config)
  for name in pl.peer_settings:
    popts = peer_options(config, name)
    log(f"[memvol] peer {name}: {n} images, {popts.nfe(int(np.prod(shape)))} network passes each")

    def peer_compute(start: int, end: int, popts: peers.PeerOptions = popts) -> dict[str, np.ndarray]:
      out = peer_images(eps_fn, table.images[start:end], table.ids[start:end], pkey, popts, mesh, pad_to=bs)
      out["ids"] = table.ids[start:end]
      return out

    parts.run_batches(wdir.peer_parts(workdir, name), n, bs, pl.peer_settings[name], _timed(peer_compute),
                      root=root, desc=f"peer {name}", unit="img", log=log)
  sub = pl.subset
  for est in pl.agreement_settings:
    aopts = agreement_options(config, est, int(np.prod(shape)))
    log(f"[memvol] agreement {est} (K={aopts.K}): {len(sub.ids)} training images")

    def agree_compute(start: int, end: int, aopts: volume.VolumeOptions = aopts) -> dict[str, np.ndarray]:
      out = score_images(eps_fn, sub.images[start:end], sub.ids[start:end], key, aopts, mesh,
                         pad_to=min(bs, len(sub.ids)))  # a subset smaller than a batch is not padded to one
      out.pop("L_t", None)
      out["ids"] = sub.ids[start:end]
      return out

    parts.run_batches(wdir.agreement_parts(workdir, est), len(sub.ids), bs, pl.agreement_settings[est],
                      _timed(agree_compute), root=root, desc=f"agreement {est}", unit="img",
                      postfix=lambda a: {"nfe": f"{np.mean(a['nfe']):.0f}"}, log=log)
  if parallel.is_main_process():
    merge(workdir, table, ests, all_settings, bs, log, plan=pl)
  parallel.sync_processes("memvol-scores-merged")


def merge(workdir: str, table: ImageTable, ests: tuple[str, ...], all_settings: dict[str, Any],
          batch_size: int, log: Callable[[str], None] = print, *, plan: Plan | None = None) -> None:
  """Write scores.csv, profile_E.npz, agreement.csv and manifest.json from the part files
  (deterministic: the same parts give byte-identical CSV and npz files)."""
  root, csv_path, manifest_path = wdir.scores_dir(workdir), wdir.scores_csv(workdir), wdir.scores_manifest(workdir)
  n = len(table.ids)
  rows = [{"id": str(int(table.ids[i])), "split": str(table.split[i]),
           "label": str(int(table.labels[i])), "dup_count": str(int(table.dup_counts[i]))}
          for i in range(n)]
  columns = ["id", "split", "label", "dup_count"]
  timing: dict[str, Any] = {}
  merged: dict[str, dict[str, np.ndarray]] = {}
  for est in ests:
    rec = merged[est] = parts.merge_parts(wdir.score_parts(workdir, est), n, batch_size, all_settings[est],
                                          root=root)
    if not np.array_equal(rec["ids"], table.ids):
      raise ValueError(f"{wdir.score_parts(workdir, est)} holds other image ids than the split; "
                       f"delete {root} and rerun")
    _add_columns(rows, columns, rec, [(f"{est}_{suffix}", key) for suffix, key in COLUMNS])
    timing[est] = seconds_per_image(rec)
    ts = np.asarray(all_settings[est]["options"]["save_ts"] or [], np.float64)
    L_t = rec["L_t"] if "L_t" in rec else np.zeros((n, 0), np.float32)
    _merge_profile(workdir, table, est, all_settings[est], rec, ts, L_t, rows, columns)
    failed = int(np.sum(rec["status"] != 0))
    if failed:
      log(f"[memvol] WARNING score {est}: {failed} of {n} solves did not succeed (status != 0 in "
          f"scores.csv); raise config.score.max_steps or loosen rtol/atol")
    log(f"[memvol] score {est}: mean log volume train {np.mean(rec['log_volume'][table.split == 'train']):.2f}, "
        f"heldout {np.mean(rec['log_volume'][table.split == 'heldout']) if np.any(table.split == 'heldout') else float('nan'):.2f}, "
        f"mean nfe {np.mean(rec['nfe']):.1f}")
  extra: dict[str, Any] = {}
  if plan is not None:
    extra = plan.manifest_extra()
    for name in plan.peers:
      if name == "logp":
        src = merged[logp_source(ests)]
        rec = {"score": src["logp"], "nfe": src["nfe"] + src["num_jvps"], **(
            {"seconds": src["seconds"], "compiled": src["compiled"]} if "seconds" in src else {})}
      else:
        rec = parts.merge_parts(wdir.peer_parts(workdir, name), n, batch_size, plan.peer_settings[name],
                                root=root)
        if not np.array_equal(rec["ids"], table.ids):
          raise ValueError(f"{wdir.peer_parts(workdir, name)} holds other image ids than the split; "
                           f"delete {root} and rerun")
      _add_columns(rows, columns, rec, [(f"peer_{name}", "score"), (f"peer_{name}_nfe", "nfe")])
      timing[f"peer_{name}"] = seconds_per_image(rec)
    if plan.subset is not None:
      _merge_agreement(workdir, table, plan, merged[ests[0]], batch_size, timing)
    if plan.reference is not None:
      _merge_calibrated(rows, columns, plan.reference)
  io.save_csv(csv_path, rows, columns)
  io.save_json(manifest_path, {"estimators": list(ests), "batch_size": batch_size,
                                   "settings": all_settings, **extra, "seconds_per_image": timing})
  log(f"[memvol] scores written to {csv_path}")


# --- reading scores.csv --------------------------------------------------------------

REQUIRED_COLUMNS = ("id", "split", "label", "dup_count")
SUCCESS_STATUS = ("0",)  # E_status of a successful solve (diffrax RESULTS code 0)
CALIBRATED_PREFIXES = ("lira_off_", "lira_on_")  # columns calibrated against score.reference


def _float(v: str) -> float:
  v = (v or "").strip()
  return math.nan if v == "" else float(v)


def read_scores(path: str, estimators: tuple[str, ...], peers: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """scores.csv (written by `merge`) as columns: id, split, label, dup_count (int / str
  arrays); for each estimator E the floats E_log_volume (and E_L_capped, E_stderr, E_prior_logp,
  E_logp, E_nfe, E_jvps where present) and the strings E_status; for each peer p the floats peer_p and
  peer_p_nfe where present. Clear errors when missing, empty or malformed."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: score the images first with --mode=score")
  try:
    rows = io.load_csv(path)
  except (UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"{path} is empty or unreadable ({e}); delete it and rerun --mode=score") from e
  header = list(rows[0])
  need = list(REQUIRED_COLUMNS) + [f"{e}_log_volume" for e in estimators]
  missing = [c for c in need if c not in header]
  if missing:
    raise ValueError(f"{path} lacks columns {missing} (has {header}); config.score.estimators="
                     f"{list(estimators)}: rerun --mode=score with this config")
  out: dict[str, np.ndarray] = {}
  try:
    out["id"] = np.array([int(r["id"]) for r in rows], np.int64)
    out["label"] = np.array([int(r["label"]) for r in rows], np.int64)
    out["dup_count"] = np.array([int(r["dup_count"]) for r in rows], np.int64)
    for e in estimators:
      for f in ("log_volume", "L_capped", "stderr", "prior_logp", "logp", "nfe", "jvps"):
        if f"{e}_{f}" in header:
          out[f"{e}_{f}"] = np.array([_float(r[f"{e}_{f}"]) for r in rows], np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path} is corrupt ({e}); delete it and rerun --mode=score") from e
  for p in peers:
    for col in (f"peer_{p}", f"peer_{p}_nfe"):
      if col in header:
        try:
          out[col] = np.array([_float(r[col]) for r in rows], np.float64)
        except (TypeError, ValueError) as e:
          raise ValueError(f"{path} column {col} is corrupt ({e}); rerun --mode=score") from e
  for col in header:  # calibrated columns (score.reference): lira_off_<c>, lira_on_<c>
    if col.startswith(CALIBRATED_PREFIXES):
      try:
        out[col] = np.array([_float(r[col]) for r in rows], np.float64)
      except (TypeError, ValueError) as e:
        raise ValueError(f"{path} column {col} is corrupt ({e}); rerun --mode=score") from e
  for e in estimators:
    if f"{e}_status" in header:
      out[f"{e}_status"] = status = np.array([(r[f"{e}_status"] or "").strip() for r in rows])
      bad = [k for k, v in enumerate(status) if not v.isdigit()]
      if bad:  # a solve of unknown outcome is neither a success nor a counted failure
        raise ValueError(f"{path}: column {e}_status is missing or unknown ({status[bad[0]]!r}; expected a "
                         f"diffrax result code, 0 = success) for {len(bad)} rows, ids "
                         f"{[int(out['id'][k]) for k in bad[:8]]}; rerun --mode=score")
  out["split"] = np.array([(r["split"] or "").strip() for r in rows])
  bad = sorted(set(out["split"]) - {"train", "heldout"})
  if bad:
    raise ValueError(f"{path}: column 'split' has values {bad}; expected 'train' or 'heldout'")
  return out


def read_agreement(path: str) -> dict[str, np.ndarray]:
  """agreement.csv (written by `merge`) as columns: id (int), primary_log_volume and, per
  agreement estimator E, E_log_volume and E_nfe_total (E_nfe + E_jvps) as floats; {} when the
  file does not exist."""
  if not os.path.exists(path):
    return {}
  rows = io.load_csv(path)
  ests = [c[: -len("_log_volume")] for c in rows[0] if c.endswith("_log_volume") and c != "primary_log_volume"]
  try:
    out = {"id": np.array([int(r["id"]) for r in rows], np.int64),
           "primary_log_volume": np.array([_float(r["primary_log_volume"]) for r in rows])}
    for e in ests:
      out[f"{e}_log_volume"] = np.array([_float(r[f"{e}_log_volume"]) for r in rows])
      out[f"{e}_nfe_total"] = np.array([_float(r[f"{e}_nfe"]) + _float(r[f"{e}_jvps"]) for r in rows])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path} is corrupt ({e}); delete it and rerun --mode=score") from e
  return out


def _merge_profile(workdir: str, table: ImageTable, est: str, s: dict[str, Any], rec: dict[str, np.ndarray],
                   ts: np.ndarray, L_t: np.ndarray, rows: list[dict[str, str]], columns: list[str]) -> None:
  """profile_E.npz and, when there is a profile, its scores.csv columns (module docstring)."""
  opts = options_from_settings(s)
  dim = profile_lib.bound_dim(opts.estimator, int(np.prod(table.images.shape[1:])), opts.K)
  summ = profile_lib.summarise(opts.sde, opts.t_start, opts.t_end, ts, L_t, rec["log_volume"], dim)
  io.save_npz(wdir.profile(workdir, est), ids=table.ids, split=table.split.astype("U7"), L_t=L_t,
              bound_dim=np.asarray(dim), **summ)
  if ts.size == 0:
    return
  names = profile_lib.column_names(est, ts)
  cols = {"L": L_t.astype(np.float64), "excess": summ["excess"], "t_above": summ["t_above"][:, None],
          "L_capped": summ["L_capped"][:, None]}
  for kind, mat in cols.items():
    for j, col in enumerate(names[kind]):
      columns.append(col)
      for i, row in enumerate(rows):
        row[col] = _fmt(np.float32(mat[i, j]))


def _add_columns(rows: list[dict[str, str]], columns: list[str], rec: dict[str, np.ndarray],
                 cols: list[tuple[str, str]]) -> None:
  """Append columns (name, record key) of `rec` to the CSV rows."""
  for col, key in cols:
    columns.append(col)
    for i, row in enumerate(rows):
      row[col] = _fmt(rec[key][i])


def _merge_calibrated(rows: list[dict[str, str]], columns: list[str], ref: dict[str, Any]) -> None:
  """Append lira_off_<c> and lira_on_<c> for every raw score column c the reference holds
  (memvol.screen.reference; NaN where c's solve failed)."""
  from memvol.bench import model as bench_model  # noqa: PLC0415
  from memvol.screen import reference  # noqa: PLC0415

  raw = {}
  for c in [c for c in columns if f"{c}_out_mean" in ref["stats"]]:
    v = np.array([_float(r[c]) for r in rows], np.float64)
    status = f"{bench_model.estimator_of(c)}_status"
    if status in columns:
      v = np.where(np.isin([r[status] for r in rows], SUCCESS_STATUS), v, math.nan)
    raw[c] = v
  for col, v in reference.calibrated(ref, raw).items():
    columns.append(col)
    for i, row in enumerate(rows):
      row[col] = _fmt(np.float64(v[i]))


def _merge_agreement(workdir: str, table: ImageTable, pl: Plan, primary: dict[str, np.ndarray],
                     batch_size: int, timing: dict[str, Any]) -> None:
  sub = pl.subset
  pos = {int(i): k for k, i in enumerate(table.ids)}
  rows = [{"id": str(int(i)), "split": str(s), "label": str(int(lab)), "dup_count": str(int(d)),
           "primary_log_volume": _fmt(primary["log_volume"][pos[int(i)]])}
          for i, s, lab, d in zip(sub.ids, sub.split, sub.labels, sub.dup_counts)]
  columns = ["id", "split", "label", "dup_count", "primary_log_volume"]
  root = wdir.scores_dir(workdir)
  for est, s in pl.agreement_settings.items():
    rec = parts.merge_parts(wdir.agreement_parts(workdir, est), len(sub.ids), batch_size, s, root=root)
    _add_columns(rows, columns, rec, [(f"{est}_log_volume", "log_volume"), (f"{est}_nfe", "nfe"),
                                      (f"{est}_jvps", "num_jvps"), (f"{est}_status", "status")])
    timing[f"agreement_{est}"] = seconds_per_image(rec)
  io.save_csv(wdir.agreement_csv(workdir), rows, columns)


def _refuse_overwrite(manifest: str, est: str, s: dict[str, Any], root: str) -> None:
  """Never replace an estimator's merged scores made with other settings."""
  if not os.path.exists(manifest):
    return
  saved = io.load_json(manifest).get("settings", {}).get(est)
  if saved is not None and not io.same_settings(saved, s):
    raise ValueError(
        f"{root} holds {est} scores made with other settings "
        f"({'; '.join(io.config_diff(saved, s))}); they are not overwritten. "
        f"Use a new --workdir, or delete {root} to rescore.")


def _merged(workdir: str, ests: tuple[str, ...], all_settings: dict[str, Any], pl: Plan | None = None) -> bool:
  """Whether the merged files exist and were made for exactly these estimators, peers,
  agreement runs and settings."""
  csv_path, manifest_path = wdir.scores_csv(workdir), wdir.scores_manifest(workdir)
  if not (os.path.exists(csv_path) and os.path.exists(manifest_path)
          and all(os.path.exists(wdir.profile(workdir, e)) for e in ests)):
    return False
  if pl is not None and pl.subset is not None and not os.path.exists(wdir.agreement_csv(workdir)):
    return False
  try:
    manifest = io.load_json(manifest_path)
  except ValueError:
    return False
  extra = {} if pl is None else pl.manifest_extra()
  saved = manifest.get("settings") or {}
  same = set(saved) == set(all_settings) and all(io.same_settings(saved[k], v) for k, v in all_settings.items())
  return (manifest.get("estimators") == list(ests) and same
          and all(manifest.get(k, [] if k == "peers" else {}) == v for k, v in extra.items()))


DONE_MEANS = "scores.csv holds every configured estimator, made with these settings and this model"


def stale_reason(config: Any, workdir: str) -> str | None:
  """None when scores.csv holds every configured estimator and peer (and agreement.csv every
  agreement run) for these settings, this model and this split; otherwise why not."""
  why = "scores are missing, partial, or were made with other settings or another model"
  try:
    ests = estimators_of(config)
    if not os.path.exists(wdir.scores_manifest(workdir)):
      return why
    eps_fn, table = _load(config, workdir)
    pl = plan(config, eps_fn, table)
    return None if _merged(workdir, ests, pl.settings, pl) else why
  except (FileNotFoundError, ValueError):
    return why


def is_complete(config: Any, workdir: str) -> bool:
  return stale_reason(config, workdir) is None
