"""The screen's plan: the job's images, each reference model's half of them, one model's record.

Images: every image of the job's split (data.make_split: its training and held-out images),
by ascending id; planted duplicates count once (reference models train on distinct images).
Halves: the benchmark's (memvol.bench.plan.balanced_halves): K models in complementary pairs,
each on a class-balanced random half, so every image is IN for K/2 models and OUT for K/2.
Reference model m trains with seed config.seed + 1 + m (never the job's own init) for
screen.train_steps (0 = train.num_steps), then scores every image with config.score's
estimators and peers; no sampling. For a converted checkpoint's job (model.pretrained) the
reference models are memvol's network of the model section's fields, trained from scratch:
the checkpoint itself is never retrained. Its record (records/m<k>.json, the benchmark's format
without copy counts) holds in_mask, every raw score column and its cost, and the seconds.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from memvol import data, io, scoring
from memvol import workdir as wdir
from memvol.bench import model as bench_model
from memvol.bench import plan as bench_plan

CHAIN = ("train", "score")
SEED_OFFSET = 1  # reference model m trains with config.seed + 1 + m


def images(config: Any) -> dict[str, np.ndarray]:
  """{ids [N] ascending, labels [N], images [N, H, W, C], split [N] ('train' | 'heldout')} of
  the job's split; ValueError naming the field when the screen cannot draw halves of it."""
  if config.data.get("heldout_name"):
    raise ValueError(f"data.heldout_name={config.data.heldout_name!r}: the screen draws halves of one source's "
                     "images; screen data.name alone (unset data.heldout_name)")
  split = data.make_split(config.data)
  ids = np.concatenate([split.train.ids, split.heldout.ids]).astype(np.int64)
  order = np.argsort(ids, kind="stable")
  out = {"ids": ids[order], "labels": np.concatenate([split.train.labels, split.heldout.labels])[order],
         "images": np.concatenate([split.train.images, split.heldout.images]).astype(np.float32)[order],
         "split": np.array(["train"] * len(split.train.ids) + ["heldout"] * len(split.heldout.ids))[order]}
  if len(ids) < 4 or len(ids) % 2:
    raise ValueError(f"the screen halves the job's {len(ids)} images (data.num_train + data.num_heldout): "
                     "it needs an even number >= 4")
  return out


def train_steps(config: Any) -> int:
  return int(config.screen.train_steps) or int(config.train.num_steps)


def fingerprint(config: Any, num_images: int) -> str:
  """The benchmark's plan fingerprint (data, model, SDE, scores, seed, K, N, steps) of the
  screen's plan: records of another plan are refused."""
  c = copy.deepcopy(config)
  c.unlock()
  c.bench.num_models = int(config.screen.num_models)
  return bench_model.fingerprint(c, {"pool_size": int(num_images), "train_steps": train_steps(config),
                                     "num_samples": 0})


def ensure_halves(config: Any, workdir: str, pool: dict[str, np.ndarray]) -> np.ndarray:
  """screen/plan.npz: ids, labels, in_mask [K, N] (written once; another plan is refused)."""
  path = os.path.join(wdir.screen_dir(workdir), "plan.npz")
  mask = bench_plan.balanced_halves(pool["labels"], int(config.screen.num_models), int(config.data.split_seed))
  if os.path.exists(path):
    old = io.load_npz(path)
    if not (np.array_equal(old["ids"], pool["ids"]) and np.array_equal(old["in_mask"], mask)):
      raise ValueError(f"{path} holds another plan (images or halves differ: data or screen.num_models changed); "
                       "use a new --workdir")
  else:
    io.save_npz(path, ids=pool["ids"], labels=pool["labels"], in_mask=mask)
  return mask


def model_config(config: Any, split_path: str, half: int, m: int) -> ml_collections.ConfigDict:
  """Reference model m's config: its half, its seed, the screen's length, a network trained here
  (never model.pretrained); no agreement run, no reference of its own."""
  c = bench_plan.model_config(config, split_path, half, int(config.seed) + SEED_OFFSET + m, train_steps(config))
  c.unlock()
  c.model.pretrained = ""  # a converted checkpoint's data: memvol trains config.model's network on each half
  c.score.agreement_subset = 0
  c.score.reference = ""
  c.lock()
  return c


def records_dir(config: Any, workdir: str) -> str:
  return str(config.screen.records_dir) or os.path.join(wdir.screen_dir(workdir), "records")


def record_path(config: Any, workdir: str, m: int) -> str:
  return os.path.join(records_dir(config, workdir), f"m{int(m):04d}.json")


def run_model(config: Any, workdir: str, m: int, pool: dict[str, np.ndarray], in_mask: np.ndarray,
              log: Callable[[str], None]) -> dict[str, Any]:
  """Train and score reference model m (resuming inside its chain); its record."""
  folder = wdir.screen_model(workdir, m)
  ids = pool["ids"]
  split_path = os.path.join(folder, "half.npz")
  bench_plan.write_half(split_path, ids, in_mask)
  c = model_config(config, split_path, len(ids) // 2, m)
  with bench_model.compile_seconds() as compiled:
    start = time.perf_counter()
    bench_plan.run_chain(c, folder, CHAIN, log)
    total = time.perf_counter() - start
  timings = io.load_json(wdir.timings(folder))
  seconds = {k: float(timings[k]) for k in CHAIN if k in timings} | {"total": total}
  sc = scoring.read_scores(wdir.scores_csv(folder), tuple(c.score.estimators), tuple(c.score.peers))
  man = io.load_json(wdir.scores_manifest(folder))
  names = bench_model.score_names(c, sc)
  where = wdir.scores_csv(folder)
  scores = {n: bench_model.column_at(sc, n, ids, where) for n in names}
  return {"model": int(m), "seed": int(c.seed), "fingerprint": fingerprint(config, len(ids)),
          "in_mask": in_mask.astype(int).tolist(), "score_order": names,
          "scores": {n: [float(f"{v:.{bench_model.DIGITS}g}") for v in s] for n, s in scores.items()},
          "costs": {n: bench_model.cost(sc, man, n, ids, where) for n in names},
          "seconds": {k: round(v, 1) for k, v in seconds.items()}, "compile_seconds": round(compiled[0], 1)}
