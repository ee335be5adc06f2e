"""The benchmark's plan: the pool, each model's half of it, shards, claims and the pilot.

Pool: N distinct images of data.name drawn class-balanced by data.split_seed (data.draw_pool:
the draw data.num_train = N would make, so the candidate pools of the pilot are nested).
Halves: models come in complementary pairs; pair k orders the pool by its own permutation
(default_rng((split_seed, PAIR_STREAM, k))), class by class in turn, and model 2k trains on
the first N/2, model 2k + 1 on the rest. So every model's half is class-balanced, and every
image is IN for exactly M/2 models (one of each pair). Model m also gets its own init and
data order (config.seed + m): models are independent replicates.

Shards: `bench.shard = "k/n"` runs the models m with m mod n = k, on one workdir shared by
all shards. A unit of work (a pilot size, a model) is claimed by the lock of its sub-workdir
(memvol.lock: a live holder keeps it, a dead one's lock is taken over), so two processes
never train the same model and a killed shard's model is resumed by the next process that
reaches it.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from memvol import data, detect, io, loading, lock, models, parallel, pipeline, sampling
from memvol import sde as sde_lib
from memvol import workdir as wdir

PAIR_STREAM = 7  # the generator stream of the halves, apart from the split's own
PILOT_SEED = 10_000  # config.seed + this: the pilot's models, never one of the M replicates


# --- pool and halves -------------------------------------------------------------------


def pool(config: Any, pool_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids [N] ascending, labels [N]): the pool of N distinct images (data.draw_pool)."""
  return data.draw_pool(config.data, int(pool_size))


def balanced_halves(labels: np.ndarray, num_models: int, seed: int) -> np.ndarray:
  """in_mask [M, N] bool: model 2k's half of the pool and its complement for 2k + 1, each a
  class-balanced N/2 (classes take turns in pair k's own random order). M and N even."""
  labels = np.asarray(labels)
  n, m = len(labels), int(num_models)
  if m < 2 or m % 2 or n < 2 or n % 2:
    raise ValueError(f"balanced halves need an even number of models >= 2 and an even pool, got M={m}, N={n}")
  mask = np.zeros((m, n), bool)
  for k in range(m // 2):
    rng = np.random.default_rng((int(seed), PAIR_STREAM, k))
    order = data.round_robin(rng.permutation(n), labels)
    mask[2 * k, order[: n // 2]] = True
    mask[2 * k + 1] = ~mask[2 * k]
  return mask


def parse_shard(spec: str, field: str = "bench.shard") -> tuple[int, int]:
  """(k, n) from "k/n" (0 <= k < n); "" is the whole plan (0, 1). `field` names the setting in errors."""
  if not str(spec):
    return 0, 1
  try:
    k, n = (int(v) for v in str(spec).split("/"))
  except ValueError:
    raise ValueError(f"{field}={spec!r}: expected 'k/n' with 0 <= k < n, e.g. '0/2'") from None
  if not 0 <= k < n:
    raise ValueError(f"{field}={spec!r}: expected 'k/n' with 0 <= k < n")
  return k, n


def shard_models(num_models: int, spec: str) -> list[int]:
  """The models shard `spec` runs: m with m mod n = k."""
  k, n = parse_shard(spec)
  return [m for m in range(int(num_models)) if m % n == k]


# --- claims ----------------------------------------------------------------------------


def claim_and_run(folder: str, done: Callable[[], bool], work: Callable[[], None],
                  log: Callable[[str], None]) -> bool:
  """Run `work` under the lock of `folder` unless `done()`; False when another live process
  holds the claim (the unit is left to it), True when the unit is done."""
  if done():
    return True
  try:
    claim = lock.WorkdirLock(folder, log=log).acquire()
  except lock.LockHeld:
    return False
  try:
    if not done():  # another process may have finished it between the check and the claim
      work()
  finally:
    claim.release()
  return True


def wait_for(units: list[tuple[str, Callable[[], bool], Callable[[], None]]], log: Callable[[str], None],
             poll_s: float = 5.0) -> None:
  """Claim and run every unit (folder, done, work); wait for those other processes hold."""
  waiting = list(units)
  said = False
  while waiting:
    waiting = [u for u in waiting if not claim_and_run(*u, log)]
    if waiting:
      if not said:
        log(f"[memvol] bench: waiting for {[u[0] for u in waiting]} (claimed by another process)")
        said = True
      time.sleep(poll_s)


# --- sub-configs -------------------------------------------------------------------------


def model_config(config: Any, split_path: str, half: int, seed: int, num_steps: int,
                 num_samples: int | None = None) -> ml_collections.ConfigDict:
  """The config of one model's chain: its half (the npz at split_path, members train, the rest
  held out), seed (init, data order, sampling and scoring keys), train.num_steps."""
  c = copy.deepcopy(config)
  c.unlock()
  c.seed = int(seed)
  c.data.member_split_path = split_path
  c.data.num_train, c.data.num_heldout = int(half), int(half)
  c.data.num_duplicated, c.data.dup_strata = 0, ()
  c.train.num_steps = int(num_steps)
  if num_samples is not None:
    c.sample.num_samples = int(num_samples)
  c.lock()
  return c


def write_half(path: str, ids: np.ndarray, in_mask: np.ndarray) -> None:
  """The member split file of one half (data.read_member_split's format: pool ids IN, OUT),
  written once: a model's half never changes under its checkpoints."""
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    io.save_npz(path, mia_train_idxs=ids[in_mask], mia_eval_idxs=ids[~in_mask])


def run_chain(config: Any, workdir: str, stages: tuple[str, ...], log: Callable[[str], None]) -> None:
  pipeline.check_workdir(config, workdir)
  pipeline.run_chain(config, workdir, stages, log=log)


def search(config: Any, workdir: str, reference: np.ndarray, step: int | None = None,
           samples: np.ndarray | None = None) -> dict[str, Any]:
  """detect.detect of the samples of the workdir's model (given, or drawn from the checkpoint
  at `step` with the sample stage's method, number, settings and key) against the reference
  images [R, H, W, C]: nbrs (each sample's nearest references) and the copy criteria."""
  if samples is None:
    model, params, shape = loading.load_model(config, workdir, use_ema=bool(config.sample.use_ema), step=step)
    eps_fn = models.make_eps_fn(model, params, sde_lib.from_config(config.sde))
    mesh, n, bs = parallel.local_mesh(), int(config.sample.num_samples), int(config.sample.batch_size)
    method = str(config.detect.sample_method)
    samples = np.concatenate([sampling.generate(config, method, eps_fn, tuple(shape), mesh, s, min(n, s + bs))["images"]
                              for s in range(0, n, bs)])
  return detect.detect(np.clip(samples, -1, 1), reference, config)


def copy_counts(config: Any, workdir: str, reference: np.ndarray, step: int | None = None,
                samples: np.ndarray | None = None) -> np.ndarray:
  """Ratio-criterion copy counts [R] of the reference images among the samples (search)."""
  return np.asarray(search(config, workdir, reference, step, samples)["ratio"].counts, np.int64)


def copied_nn1(det: dict[str, Any]) -> np.ndarray:
  """[S] per sample the reference it copies under the ratio criterion, -1 when none."""
  return np.where(det["ratio"].copied, det["nbrs"].index[:, 0], -1).astype(np.int64)


# --- the pilot ---------------------------------------------------------------------------


def choose_regime(shares: dict[tuple[int, int], float], band: tuple[float, float]) -> tuple[int, int, bool]:
  """(N, steps, in_band): the largest pool size with a step whose share of IN images copied
  lies in [lo, hi], at its smallest such step; else the (N, steps) closest to the band
  (distance to the interval; ties: larger N, then fewer steps)."""
  lo, hi = band
  inside = [(n, s) for (n, s), v in shares.items() if lo <= v <= hi]
  if inside:
    n = max(n for n, _ in inside)
    return n, min(s for m, s in inside if m == n), True
  dist = lambda v: lo - v if v < lo else v - hi  # noqa: E731
  n, s = min(shares, key=lambda k: (dist(shares[k]), -k[0], k[1]))
  return n, s, False


def pilot_config(config: Any, workdir: str, pool_size: int) -> tuple[ml_collections.ConfigDict, str]:
  """(config, folder) of the pilot model of pool size N: half 0 of that pool's halves drawn
  with the pilot's seed, trained to max(bench.pilot_steps) with a checkpoint kept at each,
  drawing bench.max_samples samples (so the band is judged at any sample count up to it)."""
  b = config.bench
  folder = wdir.bench_pilot(workdir, pool_size)
  ids, labels = pool(config, pool_size)
  grid = sorted(int(g) for g in b.pilot_steps)
  c = model_config(config, os.path.join(folder, "half.npz"), pool_size // 2, int(config.seed) + PILOT_SEED, grid[-1],
                   int(b.max_samples))
  c.unlock()
  c.train.ckpt_every = c.train.keep_every = math.gcd(*grid)
  c.lock()
  write_half(c.data.member_split_path, ids, balanced_halves(labels, 2, int(config.data.split_seed) + PILOT_SEED)[0])
  return c, folder


def pilot_done_path(workdir: str, pool_size: int) -> str:
  return os.path.join(wdir.bench_pilot(workdir, pool_size), "pilot.json")


def run_pilot(config: Any, workdir: str, pool_size: int, log: Callable[[str], None]) -> None:
  """Train the pilot model of pool size N and search its bench.max_samples samples for copies
  of its IN images at every grid step (pilot.json: per step the share copied among the first
  sample.num_samples, those counts, the image each sample copies, seconds)."""
  c, folder = pilot_config(config, workdir, pool_size)
  s0 = int(config.sample.num_samples)
  log(f"[memvol] bench: pilot N={pool_size}: training to {c.train.num_steps} steps in {folder}")
  start = time.perf_counter()
  run_chain(c, folder, ("train",), log)
  train_s = time.perf_counter() - start
  images = data.load_split(c, folder).train.images
  rows = []
  for g in sorted(int(s) for s in config.bench.pilot_steps):
    t0 = time.perf_counter()
    nn1 = copied_nn1(search(c, folder, images, step=g))
    counts = np.bincount(nn1[:s0][nn1[:s0] >= 0], minlength=len(images))
    rows.append({"steps": g, "share_copied": float(np.mean(counts > 0)), "copied": int(np.sum(counts > 0)),
                 "copies": int(counts.sum()), "counts": counts.tolist(), "copied_nn1": nn1.tolist(),
                 "seconds": round(time.perf_counter() - t0, 1)})
    log(f"[memvol] bench: pilot N={pool_size} step {g}: {rows[-1]['copied']}/{len(counts)} IN images copied "
        f"({rows[-1]['copies']} copies in {s0} samples)")
  io.save_json(pilot_done_path(workdir, pool_size), {"pool_size": int(pool_size), "num_samples": s0,
                                                     "drawn_samples": int(c.sample.num_samples),
                                                     "train_seconds": round(train_s, 1), "grid": rows})


def size_samples(counts: np.ndarray, num_samples: int, batch: int, target: float, cap: int) -> tuple[int, float]:
  """(samples per model, r_med): r_med = the median copy rate of the copied images among
  num_samples pilot samples; enough samples that such an image is expected `target` times,
  at least num_samples, at most cap, in whole sampling batches."""
  c = np.asarray(counts)
  if not (c > 0).any():
    return int(num_samples), math.nan
  r_med = float(np.median(c[c > 0])) / num_samples
  want = max(int(num_samples), math.ceil(target / r_med))
  return int(min(int(cap), math.ceil(want / batch) * batch)), r_med


def final_share(row: dict[str, Any], num_samples: int, num_in: int) -> float:
  """The share of the pilot's IN images copied at least once among its first num_samples
  samples (the per-sample copies of a pilot row); the row's own share at its sizing count
  when it predates them."""
  nn1 = np.asarray(row.get("copied_nn1", []), np.int64)
  if not nn1.size:
    return float(row["share_copied"])
  return float(np.unique(nn1[:num_samples][nn1[:num_samples] >= 0]).size / num_in)


def choose(config: Any, workdir: str) -> dict[str, Any]:
  """bench/pilot.json from the pilots' records: the pool size, the training length and the
  samples per model, chosen from copy counts only (never scores). Each (N, steps) cell is
  sized first (size_samples on its counts among the first sample.num_samples samples), then
  judged against the band by its share copied at that final sample count."""
  b = config.bench
  band = tuple(float(v) for v in b.copied_band)
  pilots = {int(n): io.load_json(pilot_done_path(workdir, int(n))) for n in b.pilot_pool_sizes}
  bs, cap, target = int(config.sample.batch_size), int(b.max_samples), float(b.expected_copies)
  sized, shares = {}, {}
  for n, p in pilots.items():
    for r in p["grid"]:
      sized[(n, r["steps"])] = size_samples(np.asarray(r["counts"]), p["num_samples"], bs, target, cap)
      r["share_final"] = final_share(r, sized[(n, r["steps"])][0], n // 2)
      r["samples_final"] = sized[(n, r["steps"])][0]
      shares[(n, r["steps"])] = r["share_final"]
  n, steps, in_band = choose_regime(shares, band)
  s0 = pilots[n]["num_samples"]
  num_samples, r_med = sized[(n, steps)]
  at_final = all("copied_nn1" in r for p in pilots.values() for r in p["grid"])
  rule = (f"the largest pool size N whose pilot model copies a share of its N/2 IN images in [{band[0]:g}, {band[1]:g}] "
          f"at least once " + ("at the sample count the sizing gives that cell (below)" if at_final
                               else f"(among {s0} samples)")
          + ", at the smallest such training length"
          + ("" if in_band else "; no pilot lands in the band, so the (N, steps) closest to it was taken"))
  sizing = (f"median copy rate of the copied IN images at the chosen cell r_med = {r_med:.3g}; samples per model = "
            f"max({s0}, {b.expected_copies:g} / r_med) in batches of {config.sample.batch_size}, capped at {b.max_samples}"
            f": {num_samples}, so an image copied at r_med is expected {num_samples * r_med:.1f} times")
  return {"pilots": [{"pool_size": k, "num_samples": p["num_samples"], "train_seconds": p["train_seconds"],
                      "grid": [{kk: v for kk, v in r.items() if kk not in ("counts", "copied_nn1")} for r in p["grid"]]}
                     for k, p in sorted(pilots.items())],
          "band": list(band), "pool_size": n, "train_steps": steps, "in_band": in_band, "rule": rule,
          "num_samples": num_samples, "r_med": r_med, "sizing": sizing}


def ensure_pilot(config: Any, workdir: str, log: Callable[[str], None], records_dir: str) -> dict[str, Any]:
  """The pilot's choice (bench/pilot.json), running (or waiting for) the pilots first. The
  choice travels with the records: records_dir/pilot.json is adopted by a workdir without one
  (a later sitting, another machine), written there once, and a workdir whose choice differs
  from it is refused."""
  path = os.path.join(wdir.bench_dir(workdir), "pilot.json")
  kept = os.path.join(records_dir, "pilot.json")
  if os.path.exists(kept) and not os.path.exists(path):
    choice = io.load_json(kept)
    sizes = sorted(int(p["pool_size"]) for p in choice["pilots"])
    grid = sorted(int(r["steps"]) for r in choice["pilots"][0]["grid"])
    want = (sorted(int(n) for n in config.bench.pilot_pool_sizes), sorted(int(g) for g in config.bench.pilot_steps),
            [float(v) for v in config.bench.copied_band])
    if (sizes, grid, [float(v) for v in choice["band"]]) != want:
      raise ValueError(f"{kept} is the pilot of pool sizes {sizes}, steps {grid}, band {choice['band']}; the config "
                       f"asks for {want[0]}, {want[1]}, {want[2]} (bench.pilot_pool_sizes, pilot_steps, copied_band): "
                       "use a new bench.records_dir")
    io.save_json(path, choice)
    log(f"[memvol] bench: the pilot's choice adopted from {kept}")
  if not os.path.exists(path):
    wait_for([(wdir.bench_pilot(workdir, int(n)), lambda n=int(n): os.path.exists(pilot_done_path(workdir, n)),
               lambda n=int(n): run_pilot(config, workdir, n, log)) for n in config.bench.pilot_pool_sizes], log)
    io.save_json(path, choose(config, workdir))
  choice = io.load_json(path)  # as JSON reads it back, so it compares with the kept copy
  if not os.path.exists(kept):
    io.save_json(kept, choice)
  elif io.load_json(kept) != choice:
    raise ValueError(f"{path} and {kept} hold different pilot choices: this workdir ran another pilot than the "
                     "records'; use a new --workdir or bench.records_dir")
  log(f"[memvol] bench: pool N={choice['pool_size']}, {choice['train_steps']} training steps "
      f"({'in' if choice['in_band'] else 'NOT in'} the band), {choice['num_samples']} samples per model")
  return choice


def ensure_halves(config: Any, workdir: str, pool_size: int) -> dict[str, np.ndarray]:
  """bench/plan.npz: the pool's ids and labels and in_mask [M, N] (written once; a plan
  made with another pool or M is refused)."""
  path = os.path.join(wdir.bench_dir(workdir), "plan.npz")
  ids, labels = pool(config, pool_size)
  mask = balanced_halves(labels, int(config.bench.num_models), int(config.data.split_seed))
  if os.path.exists(path):
    old = io.load_npz(path)
    if not (np.array_equal(old["ids"], ids) and np.array_equal(old["in_mask"], mask)):
      raise ValueError(f"{path} holds another plan (pool or halves differ: data.split_seed, bench.num_models or "
                       "the pilot's pool size changed); use a new --workdir")
  else:
    io.save_npz(path, ids=ids, labels=labels, in_mask=mask)
  return {"ids": ids, "labels": labels, "in_mask": mask}
