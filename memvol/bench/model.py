"""One model of the benchmark: train on its half, sample, score the whole pool, count copies.

The model's sub-workdir runs the usual chain (train, sample, score) through the pipeline;
its held-out set is its OUT half, so the score stage scores every pool image. Copies are
searched against the whole pool, IN and OUT (the OUT counts measure the criterion's own false
positives). The record (records/m<k>.json) holds, over the pool in plan order: in_mask,
c (ratio-criterion copy counts), every raw score column (higher = more memorised), each
score's cost, and the wall and compile seconds of the model's stages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import numpy as np

from memvol import data, detect, io, report, scoring
from memvol import workdir as wdir
from memvol.bench import plan

CHAIN = ("train", "sample", "score")
DIGITS = 6  # significant digits of the scores kept in a record
DISTANCE_DIGITS = 4  # ... and of the sample-level distances


def score_names(config: Any, scores: dict[str, np.ndarray]) -> list[str]:
  """The raw score columns of a read scores.csv: per estimator E_log_volume (and E_L_capped
  when present), then every peer_<name> of the config that was scored."""
  out = []
  for e in config.score.estimators:
    out += [c for c in (f"{e}_log_volume", f"{e}_L_capped") if c in scores]
  return out + [f"peer_{p}" for p in config.score.peers if f"peer_{p}" in scores]


def estimator_of(name: str) -> str:
  """The estimator (or peer_<name>) a raw score column belongs to: its cost key."""
  if name.startswith("peer_"):
    return name
  return name[: -len("_log_volume")] if name.endswith("_log_volume") else name[: -len("_L_capped")]


def column_at(scores: dict[str, np.ndarray], col: str, ids: np.ndarray, where: str) -> np.ndarray:
  """Float column `col` of a read scores.csv at `ids`; NaN where its estimator's solve failed."""
  pos = {int(i): k for k, i in enumerate(scores["id"])}
  missing = [int(i) for i in ids if int(i) not in pos]
  if missing:
    raise ValueError(f"{where} lacks rows for ids {missing[:8]}; rerun --mode=score there")
  idx = np.array([pos[int(i)] for i in ids], np.int64)
  v = np.asarray(scores[col], np.float64)[idx]
  status = scores.get(f"{estimator_of(col)}_status")
  if status is not None:
    v = np.where(np.isin(status[idx], scoring.SUCCESS_STATUS), v, math.nan)
  return v


def cost(scores: dict[str, np.ndarray], manifest: dict[str, Any], name: str, ids: np.ndarray,
         where: str) -> dict[str, float]:
  """{passes_per_image, seconds_per_image} of a raw score on `ids` (NaN when not recorded)."""
  key = estimator_of(name)
  cols = [c for c in ((f"{key}_nfe",) if name.startswith("peer_") else (f"{key}_nfe", f"{key}_jvps")) if c in scores]
  passes = float(np.nanmean(sum(column_at(scores, c, ids, where) for c in cols))) if cols else math.nan
  sec = manifest.get("seconds_per_image", {}).get(key, {}).get("seconds_per_image")
  return {"passes_per_image": passes, "seconds_per_image": math.nan if sec is None else float(sec)}


def fingerprint(config: Any, choice: dict[str, Any]) -> str:
  """What makes two records parts of one plan: data, model and SDE sections, the scores,
  the pool size, number of models, training length and samples per model. A field added to
  (or removed from) a section later, at its as-before value, does not change it."""
  def section(name: str) -> dict[str, Any]:  # fields at their as-before value (io.ADDED_FIELDS) left out
    d = io.config_to_dict(config[name])
    return {k: v for k, v in d.items() if io.ADDED_FIELDS.get(f"{name}.{k}", object()) != v}

  keys = {"data": section("data"), "model": section("model"), "sde": section("sde"),
          "estimators": list(config.score.estimators),
          "peers": list(config.score.peers), "num_models": int(config.bench.num_models), "seed": int(config.seed),
          "pool_size": int(choice["pool_size"]), "train_steps": int(choice["train_steps"]),
          "num_samples": int(choice["num_samples"]), "sample_method": str(config.detect.sample_method)}
  return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def compile_seconds() -> Iterator[list[float]]:
  """Accumulates the seconds JAX spends tracing, lowering and compiling inside the block
  (jax.monitoring's /jax/core/compile events) into the yielded one-element list."""
  import jax  # noqa: PLC0415

  total = [0.0]
  active = [True]

  def listen(event: str, duration: float, **_: Any) -> None:
    if active[0] and event.startswith("/jax/core/compile/"):
      total[0] += float(duration)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield total
  finally:
    active[0] = False  # jax keeps its listeners; this one goes quiet


def record_path(config: Any, workdir: str, m: int) -> str:
  return os.path.join(records_dir(config, workdir), f"m{int(m):04d}.json")


def records_dir(config: Any, workdir: str) -> str:
  """Where finished models' records go: bench.records_dir (a path, e.g. under docs/results/
  to commit them as they finish), else workdir/bench/records."""
  return str(config.bench.records_dir) or os.path.join(wdir.bench_dir(workdir), "records")


def run_model(config: Any, workdir: str, m: int, choice: dict[str, Any], halves: dict[str, np.ndarray],
              log: Callable[[str], None]) -> dict[str, Any]:
  """Train, sample and score model m (resuming inside its chain); its record."""
  folder = wdir.bench_model(workdir, m)
  ids, in_mask = halves["ids"], halves["in_mask"][m]
  split_path = os.path.join(folder, "half.npz")
  plan.write_half(split_path, ids, in_mask)
  c = plan.model_config(config, split_path, len(ids) // 2, int(config.seed) + m, int(choice["train_steps"]),
                        int(choice["num_samples"]))
  seconds: dict[str, float] = {}
  with compile_seconds() as compiled:
    start = time.perf_counter()
    plan.run_chain(c, folder, CHAIN, log)
    t0 = time.perf_counter()
    split = data.load_split(c, folder)
    pool_images = np.zeros((len(ids),) + split.train.images.shape[1:], np.float32)
    for part in (split.train, split.heldout):
      pool_images[np.searchsorted(ids, part.ids)] = part.images
    det = plan.search(c, folder, pool_images, samples=detect.load_samples(c, folder))
    seconds["detect"] = time.perf_counter() - t0
  timings = io.load_json(wdir.timings(folder))
  seconds.update({k: float(timings[k]) for k in CHAIN if k in timings})
  seconds["total"] = time.perf_counter() - start
  sc = scoring.read_scores(wdir.scores_csv(folder), tuple(c.score.estimators), tuple(c.score.peers))
  man = io.load_json(wdir.scores_manifest(folder))
  names = score_names(c, sc)
  where = wdir.scores_csv(folder)
  scores = {n: column_at(sc, n, ids, where) for n in names}
  return {"model": int(m), "seed": int(c.seed), "fingerprint": fingerprint(config, choice),
          "num_samples": int(choice["num_samples"]), "in_mask": in_mask.astype(int).tolist(),
          "c": det["ratio"].counts.tolist(), **sample_level(det["nbrs"]), "sampler": sampler(c),
          "score_order": names, "scores": {n: [float(f"{v:.{DIGITS}g}") for v in s] for n, s in scores.items()},
          "costs": {n: cost(sc, man, n, ids, where) for n in names},
          "seconds": {k: round(v, 1) for k, v in seconds.items()}, "compile_seconds": round(compiled[0], 1)}


def sampler(config: Any) -> dict[str, Any]:
  """The sampler the copies were searched among: detect.sample_method and its own settings
  (sample.<method>_*)."""
  method = str(config.detect.sample_method)
  return {"method": method, **{k: v for k, v in io.config_to_dict(config.sample).items() if k.startswith(f"{method}_")}}


def sample_level(nbrs: detect.Neighbours) -> dict[str, Any]:
  """The record's sample-level data, from which any copy label can be recomputed: per sample
  its two nearest pool images (positions in plan order) and distances (nn_index, nn_dist
  [S, 2]), per pool image the distance to its closest sample (closest_dist [N]); distances
  at DISTANCE_DIGITS significant digits (about 80 KB of JSON per 4096 samples)."""
  r = lambda a: [float(f"{v:.{DISTANCE_DIGITS}g}") for v in np.asarray(a, np.float64).ravel()]  # noqa: E731
  return {"nn_index": nbrs.index[:, :2].tolist(), "nn_dist": np.reshape(r(nbrs.dist[:, :2]), (-1, 2)).tolist(),
          "closest_dist": r(nbrs.train_min_dist)}


def save_record(path: str, rec: dict[str, Any]) -> None:
  """A model record as JSON (NaN as null, each named under `not_estimated`), atomically."""
  expected: dict[str, str] = {}
  rec = dict(rec)
  for n, s in rec["scores"].items():
    rec["scores"][n] = [report.not_estimated(f"the {estimator_of(n)} solve failed") if not math.isfinite(v) else v
                        for v in s]
  io.save_json(path, report.jsonable(rec, "", [], expected) | {"not_estimated": expected})


def load_record(path: str) -> dict[str, Any]:
  """A model record with its nulls back as NaN."""
  rec = io.load_json(path)
  rec.pop("not_estimated", None)
  rec["scores"] = {n: np.array([math.nan if v is None else v for v in s], np.float64) for n, s in rec["scores"].items()}
  rec["costs"] = {n: {k: math.nan if v is None else v for k, v in c.items()} for n, c in rec["costs"].items()}
  return rec


def load_records(folder: str, fingerprint_: str | None = None) -> list[dict[str, Any]]:
  """Every m<k>.json in `folder`, by model index; a record of another plan (fingerprint) is
  a ValueError naming it."""
  if not os.path.isdir(folder):
    return []
  out = []
  for name in sorted(f for f in os.listdir(folder) if f.startswith("m") and f.endswith(".json")):
    rec = load_record(os.path.join(folder, name))
    if fingerprint_ is not None and rec["fingerprint"] != fingerprint_:
      raise ValueError(f"{os.path.join(folder, name)} belongs to another plan (fingerprint {rec['fingerprint']}, "
                       f"this plan's {fingerprint_}: data, model, scores, pool, M, length or samples differ)")
    out.append(rec)
  return sorted(out, key=lambda r: r["model"])
