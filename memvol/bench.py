"""The benchmark stage: graded duplication, many positives, seeds, reference calibration, cost.

--mode=bench (not part of `all`). The data config describes the training set by strata
(data.dup_strata = ((d, n), ...): n distinct digits, each d times in the stream), plus
held-out digits and a third disjoint reference pool of the same size and strata
(data.role = "reference", memvol/data.py). Sub-workdirs, each running the existing chain
through pipeline.run_chain:

  workdir/bench/length/               the target config, seed bench.seeds[0], trained once to
                                      max(bench.length_grid) with a checkpoint kept at every
                                      grid step; at each step sample.num_samples reverse-SDE
                                      samples (the sample stage's settings and key) are
                                      searched for copies (detect's ratio criterion)
  workdir/bench/length.json           per grid step the share of singletons (d = 1) copied
                                      at least once, and the chosen train.num_steps: the
                                      smallest grid step whose share lies in bench.copied_band,
                                      else the step whose share is closest to the band (said
                                      so). Copy counts only, never scores.
  workdir/bench/seed<k>/target/       seed k trained to that length: train, sample, score, detect
                                      (for seed bench.seeds[0] at max(grid): bench/length itself)
  workdir/bench/seed<k>/reference/    seed k trained the same way on the reference pool: train,
                                      score (its scoring scores the reference pool and every
                                      target training and held-out image, never trained on)
  workdir/bench/seed<k>/record.json   the seed's per-image table and task metrics (the seed is
                                      done when it exists; a killed bench redoes only unfinished
                                      seeds, and their chains resume inside)

Ground truth per (seed, training image): c_i = its ratio-criterion copy count among the
target's samples (detect.csv copies_ratio), its copy rate c_i / num_samples with a Wilson
interval (stats.wilson_interval, bench.ci_level).

Scores: every score column of the target's scores.csv (per estimator E: E_log_volume and,
with a profile, E_L_capped; every peer_<name>), each higher = more memorised (scores.csv's
convention), and cal_<s> = s_target(x) - s_reference(x) (the offline likelihood-ratio
calibration). Cost per score: network passes per image (E_nfe + E_jvps; peer_<name>_nfe)
and seconds per image (scores/manifest.json), as measured in the same run; a calibrated
score costs its target plus its reference evaluation.

Tasks per score and seed: T1 trained vs held-out AUROC [bootstrap CI], TPR at report.fpr;
T2 among singletons copied (c_i > 0) vs not: AUROC [CI], TPR, #pos / #neg; T3 Spearman of
the score with c_i over all training images and within each stratum; T4 mean score and
copy rate per d (held-out as d = 0). Aggregates: mean and sd (ddof 1) over seeds.

Leaderboard (T1 AUROC, T2 AUROC, T3 Spearman): scores ranked by their mean over seeds; the
leader is compared with every other score, paired on the same images: per seed a DeLong
test for the AUROC tasks (stats.delong_paired), a paired bootstrap z (difference over
its bootstrap sd, bench.num_bootstrap resamples of the training images) for Spearman; the
per-seed z are combined by their mean (stats.mean_z: the seeds share their images, so their z
are correlated and Stouffer's sum / sqrt(K) would overstate the evidence; the mean, read as
N(0, 1), holds under any correlation). Holm over every comparison of every
leaderboard together (one family); the leader is declared the winner only when its
comparison with the runner-up survives at report's ALPHA. The leader is picked on the same
data it is tested on, which makes that one comparison somewhat optimistic.

Output: workdir/bench/summary.json (`records`: score x task x seed; `aggregates`; `tests`;
`leaderboard`, with `pareto`: the cost-accuracy front per task; `length`; `costs`),
report.md, frontier.png (T2 AUROC and T3 Spearman against passes per image, log x, sd over
seeds, Pareto front) and dose_response.png, rewritten atomically after each seed. Expected
nulls are named in `not_estimated`.
"""

from __future__ import annotations

import copy
import math
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from scipy import stats as sps

from memvol import data, detect, io, loading, models, parallel, pipeline, plotting, report, sampling, scoring, stats
from memvol import sde as sde_lib
from memvol import workdir as wdir

TARGET_CHAIN = ("train", "sample", "score", "detect")
REFERENCE_CHAIN = ("train", "score")
TASKS = ("T1_auroc", "T2_auroc", "T3_spearman")   # the leaderboard's tasks
SCALARS = ("T1_auroc", "T1_auroc_lo", "T1_auroc_hi", "T1_tpr", "T2_auroc", "T2_auroc_lo", "T2_auroc_hi",
           "T2_tpr", "T2_pos", "T2_neg", "T3_spearman", "T3_p")


# --- layout and configs --------------------------------------------------------------


def check_config(config: Any) -> tuple[int, ...]:
  """The seeds of config.bench, checked (ValueError naming the field)."""
  b = config.bench
  seeds = tuple(int(s) for s in b.seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"bench.seeds must be distinct and non-empty, got {b.seeds}")
  grid = tuple(int(g) for g in b.length_grid)
  if not grid or min(grid) < 1 or len(set(grid)) != len(grid):
    raise ValueError(f"bench.length_grid must be distinct positive step counts, got {b.length_grid}")
  lo, hi = (float(v) for v in b.copied_band)
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"bench.copied_band must be (lo, hi) with 0 <= lo <= hi <= 1, got {b.copied_band}")
  if not data.dup_strata(config.data):
    raise ValueError("--mode=bench needs data.dup_strata ((d, n), ...) with a d = 1 stratum")
  if 1 not in [d for d, _ in data.dup_strata(config.data)]:
    raise ValueError(f"data.dup_strata={tuple(config.data.dup_strata)} has no singletons (d = 1); T2 needs them")
  if str(config.data.get("role", "target")) != "target":
    raise ValueError("--mode=bench runs on the target config (data.role='target'); it makes the reference itself")
  if config.detect.sample_method not in tuple(config.sample.methods):
    raise ValueError(f"detect.sample_method={config.detect.sample_method!r} is not in sample.methods")
  return seeds


def sub_config(config: Any, seed: int, num_steps: int, role: str = "target") -> ml_collections.ConfigDict:
  """The config of one sub-workdir: `seed` (model init, data order, sampling and scoring
  keys), train.num_steps, data.role; everything else as given."""
  c = copy.deepcopy(config)
  c.unlock()
  c.seed = int(seed)
  c.train.num_steps = int(num_steps)
  c.data.role = role
  c.lock()
  return c


def _run_chain(config: Any, workdir: str, stages: tuple[str, ...], log: Callable[[str], None]) -> None:
  pipeline.check_workdir(config, workdir)
  pipeline.run_chain(config, workdir, stages, log=log)


# --- training length -----------------------------------------------------------------


def singleton_share(counts: np.ndarray, dup: np.ndarray) -> float:
  """Share of the singletons (dup == 1) with a copy count > 0."""
  single = np.asarray(dup) == 1
  return float(np.mean(np.asarray(counts)[single] > 0)) if single.any() else math.nan


def choose_length(shares: dict[int, float], band: tuple[float, float]) -> tuple[int, bool]:
  """(steps, in_band): the smallest step whose share lies in [lo, hi]; else the step whose
  share is closest to the band (distance to the interval; ties: the smaller step)."""
  lo, hi = band
  inside = sorted(g for g, s in shares.items() if lo <= s <= hi)
  if inside:
    return inside[0], True
  dist = lambda s: lo - s if s < lo else s - hi  # noqa: E731
  return min(sorted(shares), key=lambda g: dist(shares[g])), False


def _counts_at(config: Any, workdir: str, step: int) -> np.ndarray:
  """Ratio-criterion copy counts [num_train] of the samples of the checkpoint at `step`
  (the sample stage's method, number, settings and key; detect's search)."""
  model, params, shape = loading.load_model(config, workdir, use_ema=bool(config.sample.use_ema), step=step)
  eps_fn = models.make_eps_fn(model, params, sde_lib.from_config(config.sde))
  mesh, n, bs = parallel.local_mesh(), int(config.sample.num_samples), int(config.sample.batch_size)
  method = str(config.detect.sample_method)
  images = np.concatenate([sampling.generate(config, method, eps_fn, tuple(shape), mesh, s, min(n, s + bs))["images"]
                           for s in range(0, n, bs)])
  split = data.load_split(config, workdir)
  return np.asarray(detect.detect(np.clip(images, -1, 1), split.train.images, config)["ratio"].counts, np.int64)


def run_length(config: Any, workdir: str, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
  """The training length (bench/length.json, computed once): train seed `seed` to
  max(grid), count copies at each grid step, choose_length."""
  path = os.path.join(wdir.bench_dir(workdir), "length.json")
  if os.path.exists(path):
    return io.load_json(path)
  grid = sorted(int(g) for g in config.bench.length_grid)
  band = tuple(float(v) for v in config.bench.copied_band)
  c = sub_config(config, seed, grid[-1])
  c.unlock()
  step = math.gcd(*grid)
  c.train.ckpt_every, c.train.keep_every = step, step
  c.lock()
  folder = wdir.bench_length(workdir)
  log(f"[memvol] bench: training length from copy counts, seed {seed}, grid {grid}, in {folder}")
  _run_chain(c, folder, ("train",), log)
  dup = np.asarray(data.load_split(c, folder).dup_counts)
  rows = []
  for g in grid:
    gpath = os.path.join(folder, f"copies_step{g}.json")
    if not os.path.exists(gpath):
      start = time.perf_counter()
      counts = _counts_at(c, folder, g)
      io.save_json(gpath, {"step": g, "copies_ratio": counts.tolist(), "dup_counts": dup.tolist(),
                           "wall_s": round(time.perf_counter() - start, 1)})
    rec = io.load_json(gpath)
    counts = np.asarray(rec["copies_ratio"])
    rows.append({"steps": g, "singletons_copied_share": singleton_share(counts, dup),
                 "singletons_copied": int(np.sum((counts > 0) & (dup == 1))), "singletons": int(np.sum(dup == 1)),
                 "images_copied": int(np.sum(counts > 0)), "copies": int(counts.sum()), "wall_s": rec["wall_s"]})
    log(f"[memvol] bench: step {g}: {rows[-1]['singletons_copied']}/{rows[-1]['singletons']} singletons copied")
  chosen, in_band = choose_length({r["steps"]: r["singletons_copied_share"] for r in rows}, band)
  out = {"seed": int(seed), "grid": rows, "band": list(band), "chosen_steps": chosen, "in_band": in_band,
         "rule": (f"the smallest grid step whose seed-{seed} model copies a share of singletons in "
                  f"[{band[0]:g}, {band[1]:g}] at least once"
                  + ("" if in_band else "; no grid step lands in the band, so the step whose share is "
                     "closest to it was taken"))}
  io.save_json(path, out)
  log(f"[memvol] bench: training length {chosen} steps ({'in' if in_band else 'NOT in'} the band)")
  return out


# --- per-seed table ------------------------------------------------------------------


def score_names(config: Any, scores: dict[str, np.ndarray]) -> list[str]:
  """The raw score columns of a read scores.csv: per estimator E_log_volume (and E_L_capped
  when present), then every peer_<name> of the config that was scored."""
  out = []
  for e in config.score.estimators:
    out += [c for c in (f"{e}_log_volume", f"{e}_L_capped") if c in scores]
  return out + [f"peer_{p}" for p in config.score.peers if f"peer_{p}" in scores]


def _estimator_of(name: str) -> str:
  """The estimator (or peer_<name>) a raw score column belongs to: its cost key."""
  if name.startswith("peer_"):
    return name
  return name[: -len("_log_volume")] if name.endswith("_log_volume") else name[: -len("_L_capped")]


def _at(scores: dict[str, np.ndarray], col: str, ids: np.ndarray, where: str) -> np.ndarray:
  """Float column `col` of a read scores.csv at `ids`; NaN where its estimator's solve failed."""
  pos = {int(i): k for k, i in enumerate(scores["id"])}
  missing = [int(i) for i in ids if int(i) not in pos]
  if missing:
    raise ValueError(f"{where} lacks rows for ids {missing[:8]}; rerun --mode=score there")
  idx = np.array([pos[int(i)] for i in ids], np.int64)
  v = np.asarray(scores[col], np.float64)[idx]
  status = scores.get(f"{_estimator_of(col)}_status")
  if status is not None:
    v = np.where(np.isin(status[idx], scoring.SUCCESS_STATUS), v, math.nan)
  return v


def _costs(scores: dict[str, np.ndarray], manifest: dict[str, Any], name: str, ids: np.ndarray,
           where: str) -> tuple[float, float]:
  """(passes per image, seconds per image) of a raw score on `ids` (NaN when not recorded)."""
  key = _estimator_of(name)
  cols = [c for c in ((f"{key}_nfe",) if name.startswith("peer_") else (f"{key}_nfe", f"{key}_jvps")) if c in scores]
  passes = sum(_at(scores, c, ids, where) for c in cols) if cols else math.nan
  sec = manifest.get("seconds_per_image", {}).get(key, {}).get("seconds_per_image")
  return float(np.nanmean(passes)) if np.ndim(passes) else math.nan, math.nan if sec is None else float(sec)


def seed_table(config: Any, target: str, reference: str) -> dict[str, Any]:
  """One seed's per-image table over the target's training then held-out images: ids,
  is_train, d (0 held out), c (copy counts, 0 held out), num_samples, scores {name: [N]}
  (raw and cal_), costs {name: (passes, seconds) per image}."""
  split = data.load_split(config, target)
  ids = np.concatenate([split.train.ids, split.heldout.ids]).astype(np.int64)
  is_train = np.arange(len(ids)) < len(split.train)
  d = np.concatenate([split.dup_counts, np.zeros(len(split.heldout), np.int64)])
  det_path = wdir.detect_csv(target)
  det = detect.align_detect(np.asarray(split.train.ids), detect.read_detect(det_path), det_path)
  c = np.concatenate([det["copies_ratio"], np.zeros(len(split.heldout), np.int64)]).astype(np.int64)
  ests, peers = tuple(config.score.estimators), tuple(config.score.peers)
  (t_sc, t_path), (r_sc, r_path) = ((scoring.read_scores(wdir.scores_csv(w), ests, peers), wdir.scores_csv(w))
                                    for w in (target, reference))
  t_man, r_man = (io.load_json(wdir.scores_manifest(w)) for w in (target, reference))
  raw, cal, costs = {}, {}, {}
  for name in score_names(config, t_sc):
    s_t, s_r = _at(t_sc, name, ids, t_path), _at(r_sc, name, ids, r_path)
    raw[name], cal[f"cal_{name}"] = s_t, s_t - s_r
    (pt, st), (pr, sr) = _costs(t_sc, t_man, name, ids, t_path), _costs(r_sc, r_man, name, ids, r_path)
    costs[name], costs[f"cal_{name}"] = (pt, st), (pt + pr, st + sr)
  scores = raw | cal  # raw scores first, then the calibrated ones
  ns = int(io.load_npz(wdir.samples(target, str(config.detect.sample_method)))["images"].shape[0])
  return {"ids": ids, "is_train": is_train, "d": d, "c": c, "num_samples": ns, "scores": scores, "costs": costs}


# --- tasks ---------------------------------------------------------------------------


def task_metrics(s: np.ndarray, is_train: np.ndarray, d: np.ndarray, c: np.ndarray, num_samples: int,
                 *, fpr: float = 0.01, num_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
  """T1-T4 of one score s [N] (higher = more memorised) over images with is_train [N],
  stream count d [N] (0 held out) and copy count c [N]. NaN scores are left out; what the
  data cannot give is NotEstimated with the reason."""
  s, is_train, d, c = (np.asarray(a) for a in (s, is_train, d, c))
  ok = np.isfinite(s)
  out: dict[str, Any] = {"num_nonfinite": int((~ok).sum())}

  def two_groups(prefix: str, pos: np.ndarray, neg: np.ndarray) -> None:
    out[f"{prefix}_pos"], out[f"{prefix}_neg"] = int(pos.size), int(neg.size)
    keys = tuple(f"{prefix}_{k}" for k in ("auroc", "auroc_lo", "auroc_hi", "tpr"))
    if pos.size == 0 or neg.size == 0:
      why = f"no {'positives' if pos.size == 0 else 'negatives'} with a finite score"
      out.update(dict.fromkeys(keys, report.not_estimated(why)))
      return
    lo, hi = stats.auroc_bootstrap_ci(pos, neg, num_bootstrap, seed=seed)
    out.update(zip(keys, (stats.auroc(pos, neg), lo, hi, stats.tpr_at_fpr(pos, neg, fpr))))

  two_groups("T1", s[ok & is_train], s[ok & ~is_train])
  single = ok & is_train & (d == 1)
  two_groups("T2", s[single & (c > 0)], s[single & (c == 0)])
  sp = report.rank_correlation(s[is_train], c[is_train].astype(np.float64), "the copy count")
  out["T3_spearman"], out["T3_p"] = sp["rho"], sp["p"]
  out["T3_by_d"], out["T4"] = {}, {}
  for k in sorted(set(d[is_train].tolist())):
    m = is_train & (d == k)
    out["T3_by_d"][str(k)] = report.rank_correlation(s[m], c[m].astype(np.float64), f"the copy count of stratum d={k}")["rho"]
  for k in sorted(set(d.tolist())):
    m, mo = d == k, (d == k) & ok
    rate = c[m] / float(num_samples)
    out["T4"][str(k)] = {"n": int(m.sum()),
                         "mean_score": float(s[mo].mean()) if mo.any() else report.not_estimated("no finite score"),
                         "copy_rate": float(rate.mean())}
  return out


def seed_record(config: Any, seed: int, table: dict[str, Any], wall_s: float = math.nan) -> dict[str, Any]:
  """A seed's record: the per-image table (as lists), Wilson copy-rate intervals, and
  task_metrics of every score."""
  rc, b = config.report, config.bench
  lo, hi = stats.wilson_interval(table["c"], table["num_samples"], float(b.ci_level))
  metrics = {n: task_metrics(v, table["is_train"], table["d"], table["c"], table["num_samples"], fpr=float(rc.fpr),
                             num_bootstrap=int(rc.num_bootstrap), seed=int(rc.bootstrap_seed))
             for n, v in table["scores"].items()}
  return {"seed": int(seed), "num_samples": int(table["num_samples"]), "score_order": list(table["scores"]),
          "ids": np.asarray(table["ids"]).tolist(),
          "is_train": np.asarray(table["is_train"]).tolist(), "d": np.asarray(table["d"]).tolist(),
          "c": np.asarray(table["c"]).tolist(),
          "copy_rate_lo": lo.tolist(), "copy_rate_hi": hi.tolist(),
          "scores": {n: v.tolist() for n, v in table["scores"].items()},
          "costs": {n: {"passes_per_image": p, "seconds_per_image": t} for n, (p, t) in table["costs"].items()},
          "metrics": metrics, "wall_s": wall_s}


def target_dir(config: Any, workdir: str, seed: int, length: dict[str, Any]) -> str:
  """The seed's target workdir: bench/length itself when it is this seed's model at the
  chosen length (seed bench.seeds[0], chosen = max(grid): its chain only adds sample,
  score and detect), else bench/seed<k>/target."""
  grid = [int(g) for g in config.bench.length_grid]
  if int(seed) == int(length["seed"]) and int(length["chosen_steps"]) == max(grid):
    return wdir.bench_length(workdir)
  return wdir.bench_seed(workdir, seed, "target")


def measure_seed(config: Any, workdir: str, seed: int, length: dict[str, Any],
                 log: Callable[[str], None]) -> dict[str, Any]:
  """Run (or resume) seed `seed`'s target and reference chains; its record."""
  start = time.perf_counter()
  steps = int(length["chosen_steps"])
  target, reference = target_dir(config, workdir, seed, length), wdir.bench_seed(workdir, seed, "reference")
  log(f"[memvol] bench: seed {seed}: target chain in {target}")
  tcfg = sub_config(config, seed, steps, "target")
  _run_chain(tcfg, target, TARGET_CHAIN, log)
  log(f"[memvol] bench: seed {seed}: reference chain in {reference}")
  _run_chain(sub_config(config, seed, steps, "reference"), reference, REFERENCE_CHAIN, log)
  rec = seed_record(tcfg, seed, seed_table(tcfg, target, reference), round(time.perf_counter() - start, 1))
  return rec | {"target_dir": target, "reference_dir": reference}


def run_seed(config: Any, workdir: str, seed: int, length: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
  """The seed's record from bench/seed<k>/record.json, or measured and written there."""
  path = os.path.join(wdir.bench_seed(workdir, seed), "record.json")
  if os.path.exists(path):
    log(f"[memvol] bench: seed {seed} already done ({path})")
    return load_record(path)
  save_record(path, measure_seed(config, workdir, seed, length, log))
  return load_record(path)


def save_record(path: str, rec: dict[str, Any]) -> None:
  """A seed record as JSON: NaN as null, the expected ones named under `not_estimated`."""
  expected: dict[str, str] = {}
  io.save_json(path, report.jsonable(rec, "", [], expected) | {"not_estimated": expected})


def load_record(path: str) -> dict[str, Any]:
  """A seed record with its expected nulls back as NotEstimated (their reasons kept)."""
  rec = io.load_json(path)
  expected = rec.pop("not_estimated", {})

  def restore(obj: Any, where: str) -> Any:
    if isinstance(obj, dict):
      return {k: restore(v, f"{where}.{k}" if where else k) for k, v in obj.items()}
    if isinstance(obj, list):
      return [restore(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    return report.not_estimated(expected[where]) if obj is None and where in expected else obj

  return restore(rec, "")


# --- comparisons ---------------------------------------------------------------------


def _arrays(rec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  return (np.asarray(rec["is_train"], bool), np.asarray(rec["d"], np.int64), np.asarray(rec["c"], np.int64))


def _f(values: Any) -> np.ndarray:
  return np.array([math.nan if v is None else v for v in values], np.float64)


def _task_groups(task: str, rec: dict[str, Any], a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
  """(mask of the images `task` uses on which both scores are finite, their labels [N]:
  is_train for T1, copied for T2, the copy count for T3)."""
  is_train, d, c = _arrays(rec)
  both = np.isfinite(_f(rec["scores"][a])) & np.isfinite(_f(rec["scores"][b]))
  if task == "T1_auroc":
    return both, is_train
  if task == "T2_auroc":
    return both & is_train & (d == 1), c > 0
  return both & is_train, c


def spearman_boot_z(a: np.ndarray, b: np.ndarray, y: np.ndarray, num_bootstrap: int, seed: int = 0) -> tuple[float, float]:
  """(rho_a - rho_b, z) for two scores a, b [n] of the same images against y [n]: z = the
  difference over the sd of its paired bootstrap (images resampled with replacement)."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(y), (num_bootstrap, len(y)))

  def rho(x: np.ndarray) -> np.ndarray:
    rx, ry = sps.rankdata(x[idx], axis=1), sps.rankdata(y[idx], axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
      return (rx * ry).sum(1) / np.sqrt((rx**2).sum(1) * (ry**2).sum(1))

  diff = stats.spearman(a, y)[0] - stats.spearman(b, y)[0]
  boot = rho(a) - rho(b)
  boot = boot[np.isfinite(boot)]
  sd = float(boot.std(ddof=1)) if boot.size > 1 else math.nan
  return diff, diff / sd if sd > 0 else math.nan


def paired_z(task: str, rec: dict[str, Any], a: str, b: str, num_bootstrap: int) -> float:
  """One seed's z of score a over score b on `task` (positive: a better); NaN when the
  task's groups are too small or the two cannot be told apart on these images."""
  m, lab = _task_groups(task, rec, a, b)
  sa, sb = _f(rec["scores"][a])[m], _f(rec["scores"][b])[m]
  lab = lab[m]
  if task == "T3_spearman":
    if sa.size < 3:
      return math.nan
    return spearman_boot_z(sa, sb, lab.astype(np.float64), num_bootstrap, seed=int(rec["seed"]))[1]
  pos = lab.astype(bool)
  if pos.sum() < 2 or (~pos).sum() < 2:
    return math.nan
  return stats.delong_paired(sa[pos], sa[~pos], sb[pos], sb[~pos])["z"]


def aggregate(records: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
  """{score: {metric: {mean, sd, n}}} over seeds (SCALARS, T3 per stratum, T4, costs)."""

  def ms(values: list[Any]) -> dict[str, Any]:
    a = _f(values)
    a = a[np.isfinite(a)]
    if a.size == 0:
      return {"mean": report.not_estimated("no seed has a finite value"), "sd": report.not_estimated("no finite value"), "n": 0}
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else report.not_estimated(
        "fewer than 2 seeds with a finite value"), "n": int(a.size)}

  out = {}
  for n in names:
    ms_of = [r["metrics"][n] for r in records]
    g = {k: ms([m.get(k) for m in ms_of]) for k in SCALARS}
    for d in ms_of[0]["T3_by_d"]:
      g[f"T3_spearman_d{d}"] = ms([m["T3_by_d"].get(d) for m in ms_of])
    for d in ms_of[0]["T4"]:
      g[f"T4_mean_score_d{d}"] = ms([m["T4"][d]["mean_score"] for m in ms_of])
      g[f"T4_copy_rate_d{d}"] = ms([m["T4"][d]["copy_rate"] for m in ms_of])
    for k in ("passes_per_image", "seconds_per_image"):
      g[k] = ms([r["costs"][n][k] for r in records])
    out[n] = g
  return out


def leaderboard(records: list[dict[str, Any]], names: list[str], agg: dict[str, dict[str, Any]],
                num_bootstrap: int, alpha: float) -> dict[str, Any]:
  """Per task: scores ranked by mean; the leader against every other score (per-seed z,
  combined by their mean, two-sided p); Holm over all comparisons of all tasks together; the
  winner (the leader when its comparison with the runner-up survives at alpha, else "")."""
  boards, cells = {}, []
  for task in TASKS:
    ranked = sorted((n for n in names if math.isfinite(agg[n][task]["mean"])), key=lambda n: -agg[n][task]["mean"])
    comps = []
    for other in ranked[1:]:
      zs = [paired_z(task, r, ranked[0], other, num_bootstrap) for r in records]
      z, p = combine_or_reason(zs)
      comps.append({"a": ranked[0], "b": other, "z_per_seed": zs, "z": z, "p": p})
    boards[task] = {"ranking": ranked, "comparisons": comps}
    cells += comps
  adj = stats.holm([c["p"] for c in cells])
  for c, a in zip(cells, adj):
    c["p_holm"] = float(a) if np.isfinite(a) else report.not_estimated("no seed gives a test (too few images or tied scores)")
    for i, z in enumerate(c["z_per_seed"]):
      if not np.isfinite(z):
        c["z_per_seed"][i] = report.not_estimated("the two scores cannot be compared on this seed's images")
  for bd in boards.values():
    first = bd["comparisons"][0] if bd["comparisons"] else None
    ok = first is not None and np.isfinite(first["p_holm"]) and first["p_holm"] < alpha and first["z"] > 0
    bd["winner"] = bd["ranking"][0] if ok else ""  # "": no winner
  return {"tasks": boards, "num_comparisons": int(np.isfinite(adj).sum()), "alpha": alpha,
          "correction": "Holm over every leader-vs-other comparison of every task (one family)",
          "within_seed": "DeLong (AUROC tasks), paired bootstrap z (Spearman)",
          "across_seeds": "the mean of the per-seed z (valid under any correlation between seeds)"}


def combine_or_reason(zs: list[float]) -> tuple[float, float]:
  z, p = stats.mean_z(zs)
  if not np.isfinite(z):
    why = "no seed gives a test (too few images or tied scores)"
    return report.not_estimated(why), report.not_estimated(why)
  return z, p


# --- outputs -------------------------------------------------------------------------


def is_volume(name: str) -> bool:
  """Whether a score (raw or cal_) comes from a volume estimator rather than a peer."""
  return not name.removeprefix("cal_").startswith("peer_")


def with_cost_and(names: list[str], agg: dict[str, dict[str, Any]], task: str) -> list[str]:
  """The scores whose seed means of `task` and of passes per image are both finite."""
  return [n for n in names if np.isfinite(agg[n][task]["mean"]) and np.isfinite(agg[n]["passes_per_image"]["mean"])]


def pareto_fronts(names: list[str], agg: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per leaderboard task: the scores on the cost-accuracy front of the seed means (no other
  score has fewer passes per image and a higher mean), cheapest first, and which of them are
  volume-based."""
  out = {}
  for task in TASKS:
    ok = with_cost_and(names, agg, task)
    x = np.array([agg[n]["passes_per_image"]["mean"] for n in ok], np.float64)
    y = np.array([agg[n][task]["mean"] for n in ok], np.float64)
    front = [ok[i] for i in _pareto(x, y)] if ok else []
    out[task] = {"front": front, "volume_on_front": [n for n in front if is_volume(n)]}
  return out


def summarise(config: Any, records: list[dict[str, Any]], length: dict[str, Any], planned: int) -> dict[str, Any]:
  """summary.json's content (NaN / NotEstimated still in it)."""
  names = list(records[0]["score_order"])  # JSON sorts the keys of `metrics`
  agg = aggregate(records, names)
  lb = leaderboard(records, names, agg, int(config.bench.num_bootstrap), report.ALPHA)
  lb["pareto"] = pareto_fronts(names, agg)
  flat = [{"score": n, "seed": r["seed"], "task": k, "value": r["metrics"][n].get(k)}
          for r in records for n in names for k in SCALARS]
  strata = {str(d): int(sum(np.asarray(records[0]["d"]) == d)) for d in sorted(set(records[0]["d"]))}
  return {"seeds_done": [r["seed"] for r in records], "num_seeds_planned": planned, "scores": names,
          "strata": strata, "num_samples": records[0]["num_samples"], "length": length,
          "T2_positives": [int(np.sum((d == 1) & (c > 0))) for d, c in ((np.asarray(r["d"]), np.asarray(r["c"])) for r in records)],
          "T2_negatives": [int(np.sum((d == 1) & (c == 0))) for d, c in ((np.asarray(r["d"]), np.asarray(r["c"])) for r in records)],
          "records": flat, "per_seed": [{"seed": r["seed"], "metrics": r["metrics"], "costs": r["costs"],
                                         "wall_s": r["wall_s"]} for r in records],
          "aggregates": agg, "leaderboard": lb}


def _ms(g: dict[str, Any], digits: int = 3) -> str:
  return report.fmt_ms(g["mean"], g["sd"], g.get("n"), digits)


def render_markdown(s: dict[str, Any], figures: list[str]) -> str:
  agg, lb, L = s["aggregates"], s["leaderboard"], s["length"]
  lines = ["# memvol benchmark: which memorisation score to use", "",
           f"Seeds done: {s['seeds_done']} of {s['num_seeds_planned']} planned. Strata (d: distinct images; 0 = "
           f"held out): {s['strata']}. {s['num_samples']} samples per seed. Training length {L['chosen_steps']} "
           f"steps: {L['rule']}.", "",
           report.markdown_table(["steps", "singletons copied", "share", "images copied", "copies"],
                         [[str(r["steps"]), f"{r['singletons_copied']}/{r['singletons']}",
                           report.fmt(r["singletons_copied_share"], 3), str(r["images_copied"]), str(r["copies"])]
                          for r in L["grid"]]), "",
           f"T2 (memorised vs not among singletons) positives / negatives per seed: "
           f"{s['T2_positives']} / {s['T2_negatives']}.", "",
           "Every score: higher = more memorised; `cal_<s>` = s under the target model minus s under the reference "
           "model (trained the same way on a disjoint pool). Mean ± sd (n: seeds with a finite value). Passes = network evaluations "
           "(forward + JVP) per image; a calibrated score pays its target and its reference evaluation.", ""]
  header = ["score", "T1 AUROC", "T1 TPR", "T2 AUROC", "T2 TPR", "T3 Spearman", "passes / image", "s / image"]
  bold = {t: lb["tasks"][t]["winner"] for t in TASKS}
  rows = []
  for n in s["scores"]:
    g = agg[n]
    cell = lambda k, t=None: (f"**{_ms(g[k])}**" if t and bold[t] == n else _ms(g[k]))  # noqa: E731
    rows.append([f"`{n}`", cell("T1_auroc", "T1_auroc"), _ms(g["T1_tpr"]), cell("T2_auroc", "T2_auroc"),
                 _ms(g["T2_tpr"]), cell("T3_spearman", "T3_spearman"), _ms(g["passes_per_image"], 4),
                 _ms(g["seconds_per_image"], 3)])
  lines += [report.markdown_table(header, rows), ""]
  lines += [f"Comparisons: the leader of each task against every other score, paired on the same images "
            f"({lb['within_seed']} per seed, combined over seeds by {lb['across_seeds']}); "
            f"{lb['num_comparisons']} comparisons corrected together ({lb['correction']}). A winner is bold only "
            f"when it beats the runner-up at Holm-adjusted p < {lb['alpha']:g} (the leader is picked on the same "
            "data, which makes that comparison somewhat optimistic).", ""]
  for t in TASKS:
    bd = lb["tasks"][t]
    if not bd["ranking"]:
      lines.append(f"- {t}: no score has a finite value.")
      continue
    first = bd["comparisons"][0] if bd["comparisons"] else None
    verdict = (f"**{bd['winner']}** wins" if bd["winner"] else
               f"no winner: leader `{bd['ranking'][0]}` does not beat the runner-up after correction")
    extra = (f" (vs `{first['b']}`: z {report.fmt(first['z'], 3)}, p {report.fmt_p(first['p'])}, Holm "
             f"{report.fmt_p(first['p_holm'])})" if first else "")
    lines.append(f"- {t}: {verdict}{extra}.")
  lines += ["", "Cost-accuracy front (no other score is cheaper in passes per image and better on the seed mean; "
            "cheapest first):", ""]
  for t in TASKS:
    pf = lb["pareto"][t]
    vol = ", ".join(f"`{n}`" for n in pf["volume_on_front"]) or "none"
    lines.append(f"- {t}: " + (", ".join(f"`{n}`" for n in pf["front"]) or "no score") + f"; volume-based on it: {vol}.")
  lines += ["", "Spearman with the copy count within each stratum (mean ± sd (n) over seeds):", ""]
  ds = sorted({k[len("T3_spearman_d"):] for n in s["scores"] for k in agg[n] if k.startswith("T3_spearman_d")}, key=int)
  lines += [report.markdown_table(["score"] + [f"d={d}" for d in ds],
                          [[f"`{n}`"] + [_ms(agg[n][f"T3_spearman_d{d}"]) for d in ds] for n in s["scores"]]), ""]
  d4 = sorted({k[len("T4_copy_rate_d"):] for k in agg[s["scores"][0]] if k.startswith("T4_copy_rate_d")}, key=int)
  lines += ["Dose-response (T4): copy rate per stratum, then mean score per stratum (d = 0: held out):", "",
            report.markdown_table(["", *[f"d={d}" for d in d4]],
                          [["copy rate"] + [_ms(agg[s["scores"][0]][f"T4_copy_rate_d{d}"], 3) for d in d4]]
                          + [[f"`{n}`"] + [_ms(agg[n][f"T4_mean_score_d{d}"], 4) for d in d4] for n in s["scores"]]), ""]
  lines += [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures]
  return "\n".join(lines) + "\n"


def _pareto(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Indices of the points no other point beats in both (lower x, higher y), by x."""
  order = np.lexsort((-y, x))
  front, best = [], -np.inf
  for i in order:
    if y[i] > best:
      front.append(i)
      best = y[i]
  return np.asarray(front, np.int64)


def frontier_figure(s: dict[str, Any], path: str) -> None:
  plt = plotting.pyplot()
  agg = s["aggregates"]
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for ax, task, label in zip(axes, ("T2_auroc", "T3_spearman"),
                             ("T2 AUROC (copied vs not, singletons)", "T3 Spearman with copy count")):
    names = with_cost_and(s["scores"], agg, task)
    x = np.array([agg[n]["passes_per_image"]["mean"] for n in names])
    y = np.array([agg[n][task]["mean"] for n in names])
    e = np.nan_to_num(np.array([_f([agg[n][task]["sd"]])[0] for n in names]))  # no sd (one seed): no bar
    for xi, yi, ei, n in zip(x, y, e, names):
      ax.errorbar(xi, yi, yerr=ei, fmt="o" if n.startswith("cal_") else "s", capsize=3, alpha=0.8)
      ax.annotate(n, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if len(names):
      f = [names.index(n) for n in s["leaderboard"]["pareto"][task]["front"]]
      ax.step(x[f], y[f], "k--", where="post", lw=1, label="Pareto front")
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "no score has a finite value\n(summary.json: not_estimated)", transform=ax.transAxes,
              ha="center", va="center")
    ax.set_xscale("log")
    ax.set_xlabel("network passes per image (log)")
    ax.set_ylabel(f"{label}, mean ± sd over seeds")
    ax.grid(alpha=0.3)
  plotting.save_figure(fig, path)


def dose_figure(s: dict[str, Any], records: list[dict[str, Any]], path: str) -> None:
  """Copy rate per d (each seed, with Wilson intervals of the pooled rate) and each score's
  mean per d standardised by its held-out mean and sd (per seed, then averaged)."""
  plt = plotting.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for r in records:
    is_train, d, c = _arrays(r)
    ds = sorted(set(d[is_train].tolist()))
    k = np.array([c[is_train & (d == v)].sum() for v in ds])
    n = np.array([(is_train & (d == v)).sum() * r["num_samples"] for v in ds])
    lo, hi = stats.wilson_interval(k, n)
    axes[0].errorbar(ds, k / n, yerr=[k / n - lo, hi - k / n], fmt="o-", capsize=3, label=f"seed {r['seed']}")
  axes[0].set_xscale("log", base=2)
  axes[0].set_xlabel("times in the training stream d")
  axes[0].set_ylabel("copy rate (copies / samples), Wilson 95%")
  axes[0].legend(fontsize=8)
  for name in s["scores"]:
    per = []
    for r in records:
      is_train, d, _ = _arrays(r)
      v = _f(r["scores"][name])
      h = v[~is_train & np.isfinite(v)]
      if h.size < 2 or h.std() == 0:
        continue
      ds = sorted(set(d[is_train].tolist()))
      per.append((np.array([np.nanmean(v[is_train & (d == k)]) for k in ds]) - h.mean()) / h.std(ddof=1))
    if per:
      axes[1].plot(ds, np.mean(per, 0), "o-" if name.startswith("cal_") else "s--", label=name, lw=1)
  axes[1].set_xscale("log", base=2)
  axes[1].set_xlabel("times in the training stream d")
  axes[1].set_ylabel("mean score, in held-out sd above the held-out mean")
  axes[1].legend(fontsize=5, ncol=2)
  for ax in axes:
    ax.grid(alpha=0.3)
  plotting.save_figure(fig, path)


def write_outputs(config: Any, records: list[dict[str, Any]], length: dict[str, Any], planned: int,
                  workdir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
  folder = wdir.bench_dir(workdir)
  summary = summarise(config, records, length, planned)
  figs = [os.path.join(folder, "frontier.png"), os.path.join(folder, "dose_response.png")]
  frontier_figure(summary, figs[0])
  dose_figure(summary, records, figs[1])
  undefined: list[str] = []
  expected: dict[str, str] = {}
  clean = report.jsonable(summary, "", undefined, expected)
  io.save_json(os.path.join(folder, "summary.json"), clean | {"not_estimated": expected, "undefined": undefined})
  with io.atomic_open(os.path.join(folder, "report.md"), "w") as f:
    f.write(render_markdown(summary, figs))
  log(f"[memvol] bench: {len(records)} of {planned} seeds; summary written to {folder}/summary.json and report.md")
  return clean


DONE_MEANS = "every seed of the plan has its record"


def stale_reason(config: Any, workdir: str) -> str | None:
  """Always a reason: the stage is never skipped; it resumes seed by seed (each seed's
  record marks it done) and rewrites the summary."""
  return "the benchmark stage always runs; it resumes seed by seed"


def is_complete(config: Any, workdir: str) -> bool:
  return stale_reason(config, workdir) is None


def run(config: Any, workdir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The stage: the training length (once), then every seed's chains (resuming), the
  outputs rewritten after each seed."""
  seeds = check_config(config)
  length = run_length(config, workdir, seeds[0], log)
  records, summary = [], {}
  for seed in seeds:
    records.append(run_seed(config, workdir, seed, length, log))
    summary = write_outputs(config, records, length, len(seeds), workdir, log)
  return summary
