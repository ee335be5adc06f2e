"""A screen as the reference of a job's score stage: score.reference=<screen workdir>.

The score stage of any job (a memvol-trained model or a converted checkpoint) calibrates each
raw score column c of scores.csv per image against the screen's reference models (LiRA,
memvol.calibrate): lira_off_<c> = (s - mu_OUT) / sd_OUT, and lira_on_<c> (the IN and OUT
Gaussians) where the image has IN reference models. `load` refuses, naming what and where,
before anything is scored or written: a screen that is not finished or has a data-only risk,
of other data (source fields, image shape, images missing or different), with other score
settings or without one of the job's score columns, or with an image that has fewer than 2
OUT reference models.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from memvol import calibrate, data, io
from memvol import workdir as wdir
from memvol.screen import risk as risk_lib

SOURCE_FIELDS = ("name", "path", "resolution", "classes", "channels", "pool_size", "synthetic_std",
                 "num_components", "pool_seed")  # what makes an id the same image
SCORE_FREE = ("estimators", "peers", "batch_size", "chunk_size", "reference", "agreement_subset",
              "agreement_estimators", "agreement_paper_steps")  # fields that do not change a score's value
#                                     (which scores exist is checked column by column)


def summary_path(workdir: str) -> str:
  return os.path.join(wdir.screen_dir(workdir), "summary.json")


def identity(config: Any, images: np.ndarray) -> dict[str, Any]:
  """What a reference must share with a job: the source fields, image shape and score settings."""
  d = io.config_to_dict(config.data)
  sc = io.config_to_dict(config.score)
  return {"data": {k: d.get(k) for k in SOURCE_FIELDS}, "image_shape": list(images.shape[1:]),
          "score": {k: v for k, v in sc.items() if k not in SCORE_FREE}}


def score_columns(scores: dict[str, np.ndarray], estimators: tuple[str, ...], peers: tuple[str, ...]) -> list[str]:
  """The raw score columns (higher = more memorised) of a read scores.csv that get calibrated."""
  cols = [c for e in estimators for c in (f"{e}_log_volume", f"{e}_L_capped") if c in scores]
  return cols + [f"peer_{p}" for p in peers if f"peer_{p}" in scores]


def load(path: str, config: Any, ids: np.ndarray, images: np.ndarray, columns: list[str]) -> dict[str, Any]:
  """The reference statistics of a finished screen at workdir `path` for the job's images
  (ids [N], images [N, H, W, C]), which must hold the raw score `columns`: {stats: {<c>_<stat>:
  [N]} of every score it holds, path, digest of its risk.csv}."""
  where = f"score.reference={path}"
  spath = summary_path(path)
  if not os.path.exists(spath):
    raise ValueError(f"{where}: no finished screen there ({spath} is missing); run --mode=screen with "
                     f"--workdir={path} first")
  s = io.load_json(spath)
  if s.get("risk_kind") != "model":
    raise ValueError(f"{where}: a data-only screen (screen.risk={s.get('risk_kind')!r}) has no reference models to "
                     "calibrate against; screen with screen.risk=model")
  mine = identity(config, images)
  diff = io.config_diff({"data": s["identity"]["data"]}, {"data": mine["data"]})
  if diff:
    raise ValueError(f"{where} screened other data: " + "; ".join(diff))
  if s["identity"]["image_shape"] != mine["image_shape"]:
    raise ValueError(f"{where} screened images of shape {s['identity']['image_shape']}, this job's are "
                     f"{mine['image_shape']}")
  diff = io.config_diff({"score": s["identity"]["score"]}, {"score": mine["score"]})
  if diff:
    raise ValueError(f"{where} scored with other settings, so its scores do not calibrate these: " + "; ".join(diff))
  table = risk_lib.read(wdir.risk_csv(path), ids)
  fp_old = np.asarray(s["image_stats"], np.float64)[np.searchsorted(np.asarray(s["ids"]), ids)]
  fp_new = np.asarray(data._image_stats(images), np.float64)
  differ = ids[~np.all(np.isclose(fp_old, fp_new, atol=1e-4), axis=1)]
  if differ.size:
    raise ValueError(f"{where}: {differ.size} image(s) differ from those it screened (ids {differ[:8].tolist()}); "
                     "the source data changed: rerun --mode=screen")
  missing = [c for c in columns if f"{c}_out_mean" not in table]
  if missing:
    raise ValueError(f"{where} has no reference scores for {missing}; screen with this config's score.estimators "
                     "and score.peers")
  held = [c[: -len("_out_mean")] for c in table if c.endswith("_out_mean")]
  stats = {f"{c}_{k}": table[f"{c}_{k}"] for c in held for k in risk_lib.STATS}
  for c in columns:
    risk_lib.check_out_models(stats, ids, c, where)
  return {"stats": stats, "path": os.path.abspath(path), "digest": io.file_digest(wdir.risk_csv(path))}


def calibrated(ref: dict[str, Any], raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{lira_off_<c>, lira_on_<c>: [N]} of every raw column c [N] (NaN where not defined: a failed
  solve, no IN reference models for online)."""
  st, out = ref["stats"], {}
  for c, s in raw.items():
    mo, so = st[f"{c}_out_mean"], st[f"{c}_out_sd"]
    out[f"lira_off_{c}"] = calibrate.offline(s, mo, so)
    with np.errstate(invalid="ignore", divide="ignore"):
      out[f"lira_on_{c}"] = calibrate.online(s, st[f"{c}_in_mean"], st[f"{c}_in_sd"], mo, so)
  return out
