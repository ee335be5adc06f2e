"""The benchmark stage: which training images will the model copy? Many models on random halves.

--mode=bench (not part of `all`). A pool of N distinct images and M models, model m trained
on a class-balanced random half (complementary pairs: every image IN for exactly M/2 models),
with its own init and data order, so models are independent replicates and each model's
OUT half is its held-out set (plan.py). Per model (model.py): train, sample S images, score
every pool image with every estimator and peer of config.score, count copies of every pool
image (ratio criterion), write records/m<k>.json. From the records (analysis.py): the
counterfactual propensity p_i, LiRA calibration, tasks T1 (membership), T2 (which IN images
are copied), T3 / T5 (per-image propensity from the IN / OUT models), the pre-registered
three co-primary tests (Holm) and the Benjamini-Hochberg-corrected secondary family, under
three copy labels (ratio, absolute, closest sample).

Order of work, in every process (shards included):
  1. the pilot (bench/pilot/n<N>/, one unit per candidate N in bench.pilot_pool_sizes): a
     model trained to max(bench.pilot_steps) with a checkpoint kept at each step, whose copies
     of its IN images are counted at each; bench/pilot.json chooses N, the training length and
     the samples per model from copy counts only (plan.choose), kept beside the records too
     (pilot.json there), so a later sitting or another machine adopts it instead of rerunning
     the pilots. Units are claimed; a process that finds one claimed waits for it.
  2. bench/plan.npz: the pool and in_mask [M, N]; pool.json beside the records: the pool's
     data-only predictors (pool.py), computed once by whichever process claims it.
  3. this shard's models (bench.shard = "k/n": m mod n = k), each claimed by its sub-workdir's
     lock, skipped when its record exists (in bench.records_dir, e.g. committed records of an
     earlier sitting) or another live process holds it.
  4. summary.json, report.md and the figures from every record present (complete when all M
     are); any process may write them, atomically. With bench.run_models = False a process
     does only this (a gather while shards still run, or over records copied in).

Scale-out: any number of processes (two single-threaded ones on a 2-core machine, a SLURM
array, a pod's hosts) on one shared workdir, each with its own --config.bench.shard. The
stage takes no workdir-wide lock (OWN_LOCKS): it claims its units itself.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from memvol import io, report
from memvol import workdir as wdir
from memvol.bench import analysis, model, outputs, plan, pool

OWN_LOCKS = True  # pipeline.run takes no workdir lock for this stage: units are claimed one by one
DONE_MEANS = "every model of the plan has its record"


def check_config(config: Any) -> None:
  """ValueError naming the field for a plan that cannot run."""
  b = config.bench
  m = int(b.num_models)
  if m < 2 or m % 2:
    raise ValueError(f"bench.num_models={m}: models come in complementary pairs; give an even number >= 2")
  sizes = [int(n) for n in b.pilot_pool_sizes]
  if not sizes or any(n < 4 or n % 2 for n in sizes) or len(set(sizes)) != len(sizes):
    raise ValueError(f"bench.pilot_pool_sizes={tuple(b.pilot_pool_sizes)}: distinct even pool sizes >= 4")
  grid = [int(g) for g in b.pilot_steps]
  if not grid or min(grid) < 1 or len(set(grid)) != len(grid):
    raise ValueError(f"bench.pilot_steps={tuple(b.pilot_steps)}: distinct positive step counts")
  lo, hi = (float(v) for v in b.copied_band)
  if not 0.0 <= lo <= hi <= 1.0:
    raise ValueError(f"bench.copied_band must be (lo, hi) with 0 <= lo <= hi <= 1, got {tuple(b.copied_band)}")
  plan.parse_shard(b.shard)
  for field in ("member_split_path", "heldout_name"):
    if config.data.get(field):
      raise ValueError(f"--mode=bench draws the pool and halves itself: unset data.{field}")
  if config.detect.sample_method not in tuple(config.sample.methods):
    raise ValueError(f"detect.sample_method={config.detect.sample_method!r} is not in sample.methods")
  for n in analysis.raw_needed():
    field, name = (("score.peers", n.removeprefix("peer_")) if n.startswith("peer_")
                   else ("score.estimators", n.removesuffix("_log_volume")))
    if name not in tuple(config.score[field.split(".")[1]]):
      raise ValueError(f"the co-primary tests (memvol.bench.analysis.PRIMARIES) read {n}: {field} must include {name!r}")


def stale_reason(config: Any, workdir: str) -> str | None:
  """Always a reason: the stage is never skipped; it resumes model by model."""
  return "the benchmark stage always runs; it resumes model by model"


def is_complete(config: Any, workdir: str) -> bool:
  return stale_reason(config, workdir) is None


def write_outputs(config: Any, workdir: str, records: list[dict[str, Any]], choice: dict[str, Any],
                  log: Callable[[str], None] = print) -> dict[str, Any]:
  """summary.json, report.md and figures in workdir/bench from `records`; the clean summary."""
  folder = wdir.bench_dir(workdir)
  summary = analysis.summarise(records, choice, int(config.bench.num_models), int(config.bench.num_bootstrap),
                               pool.load(model.records_dir(config, workdir)))
  undefined: list[str] = []
  expected: dict[str, str] = {}
  clean = report.jsonable(summary, "", undefined, expected)
  io.save_json(os.path.join(folder, "summary.json"), clean | {"not_estimated": expected, "undefined": undefined})
  outputs.write(clean, folder)
  verdicts = ", ".join(f"{t['id']} {t['verdict']}" for t in clean["primary"]["tests"])
  log(f"[memvol] bench: {len(records)} of {config.bench.num_models} models; {verdicts}; "
      f"summary in {folder}/summary.json and report.md")
  return clean


def run(config: Any, workdir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The stage (see the module doc); the summary of every record present."""
  check_config(config)
  rdir = model.records_dir(config, workdir)
  choice = plan.ensure_pilot(config, workdir, log, rdir)
  halves = plan.ensure_halves(config, workdir, int(choice["pool_size"]))
  fp = model.fingerprint(config, choice)
  plan.wait_for([(os.path.join(wdir.bench_dir(workdir), "pool"), lambda: os.path.exists(os.path.join(rdir, pool.FILE)),
                  lambda: pool.ensure(config, halves["ids"], halves["labels"], rdir,
                                      os.path.join(wdir.bench_dir(workdir), "pool")))], log)
  mine = plan.shard_models(int(config.bench.num_models), str(config.bench.shard)) if config.bench.run_models else []
  for i, m in enumerate(mine):
    path = model.record_path(config, workdir, m)

    def work(m: int = m, path: str = path) -> None:
      start = time.perf_counter()
      log(f"[memvol] bench: model {m} ({i + 1} of {len(mine)} in this shard)")
      rec = model.run_model(config, workdir, m, choice, halves, log)
      os.makedirs(rdir, exist_ok=True)
      model.save_record(path, rec)
      log(f"[memvol] bench: model {m} done in {time.perf_counter() - start:.0f} s "
          f"({sum(rec['c'])} copies, compile {rec['compile_seconds']:.0f} s)")

    if not plan.claim_and_run(wdir.bench_model(workdir, m), lambda path=path: os.path.exists(path), work, log):
      log(f"[memvol] bench: model {m} is claimed by another process; left to it")
  records = model.load_records(rdir, fp)
  if not records:
    log("[memvol] bench: no model record yet; nothing to summarise")
    return {}
  return write_outputs(config, workdir, records, choice, log)
