"""The screen stage: memorisation risk of every image of a dataset, before any training.

--mode=screen (not part of `all`), on the job's own config: every image of its split (the
training and held-out images of data.*, any source memvol reads) gets a risk.

  screen.risk = "model": K = screen.num_models reference models, each trained on a class-balanced
    random half of the images (complementary pairs, the benchmark's halves and claims: plan.py),
    score every image with config.score's estimators and peers. Per image and score, the mean and
    sd over the models that never saw it (OUT) and over those that did (IN) (risk.py). The risk
    is screen.risk_score's OUT mean, signed by screen.risk_direction: read from the digits
    benchmark's T5 under the copy label screen.copy_label (the base config says which numbers).
  screen.risk = "data": a data-only predictor (memvol.predictors; screen.data_predictor signed by
    screen.data_direction): no models, seconds.

Either way the data-only predictors (pixel and classifier-feature nearest-neighbour distances,
PNG size) stand beside the risk with their Spearman against it. Outputs in workdir/screen
(outputs.py): risk.csv, contact.png (the riskiest and safest images), histogram.png,
summary.json, report.md with the cost and the copy definition behind the risk. A job then
calibrates its scores against the reference models with score.reference=<this workdir>
(reference.py, used by the score stage).

Order of work, in every process: screen/plan.npz (the images and in_mask [K, N]); this shard's
reference models (screen.shard = "k/n": m mod n = k), each claimed by its sub-workdir's lock
and skipped when its record exists (screen.records_dir); then, once all K records exist, the
outputs (a process that finds records missing says how many and leaves the outputs to the last).
The stage takes no workdir-wide lock (OWN_LOCKS). Refused before anything is written, with one
line naming the field or file: a plan with fewer than 2 OUT models per image (K < 4 or odd), an
unknown score, predictor or direction, data the halves cannot split, a workdir made with other
data (pipeline.check_workdir), a non-finite risk.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from memvol import data, predictors, quality, report
from memvol import workdir as wdir
from memvol.bench import model as bench_model
from memvol.bench import plan as bench_plan
from memvol.screen import outputs, plan, reference
from memvol.screen import risk as risk_lib

OWN_LOCKS = True  # pipeline.run takes no workdir lock: reference models are claimed one by one
DONE_MEANS = "the screen always runs; it resumes model by model"
PREDICTORS = ("nn1_pixel", "nn5_pixel", "nn1_pixel_same_class", "nn1_feature", "nn5_feature", "png_bytes")
COPY_LABELS = {
    "ratio": "a sample whose nearest training image is closer than 1/3 of its distance to the second nearest "
             "(d1 / d2 < 1/3, L2 in pixels; Yoon et al., Gu et al.)",
    "carlini": "a sample closer to a training image than 1/3 of alpha times its mean distance to the n nearest "
               "(Carlini et al.)",
    "absolute": "a sample within an absolute L2 radius of a training image",
}


def raw_score_names(config: Any) -> list[str]:
  """The raw score columns a reference model's record can hold (bench.model.score_names)."""
  names = [c for e in config.score.estimators for c in (f"{e}_log_volume", f"{e}_L_capped")]
  return names + [f"peer_{p}" for p in config.score.peers]


def check_config(config: Any) -> None:
  """ValueError naming the field for a screen that cannot run."""
  sn = config.screen
  k = int(sn.num_models)
  if str(sn.risk) not in risk_lib.KINDS:
    raise ValueError(f"screen.risk={sn.risk!r}: expected one of {risk_lib.KINDS}")
  for field in ("risk_direction", "data_direction"):
    if str(sn[field]) not in risk_lib.DIRECTIONS:
      raise ValueError(f"screen.{field}={sn[field]!r}: expected one of {risk_lib.DIRECTIONS}")
  if str(sn.data_predictor) not in PREDICTORS:
    raise ValueError(f"screen.data_predictor={sn.data_predictor!r}: expected one of {PREDICTORS}")
  if str(sn.copy_label) not in COPY_LABELS:
    raise ValueError(f"screen.copy_label={sn.copy_label!r}: expected one of {tuple(COPY_LABELS)}")
  if str(sn.risk) == "model":
    if k < 4 or k % 2:
      raise ValueError(f"screen.num_models={k}: every image needs >= 2 OUT reference models, and models come in "
                       "complementary pairs; give an even number >= 4")
    if str(sn.risk_score) not in raw_score_names(config):
      raise ValueError(f"screen.risk_score={sn.risk_score!r} is not a score of this config; expected one of "
                       f"{raw_score_names(config)} (score.estimators, score.peers)")
    bench_plan.parse_shard(sn.shard, "screen.shard")


def stale_reason(config: Any, workdir: str) -> str | None:
  return DONE_MEANS


def is_complete(config: Any, workdir: str) -> bool:
  return False


def features(config: Any, folder: str, images: np.ndarray) -> np.ndarray | None:
  """The quality classifier's features [N, F] of the images (trained on the labelled source
  images outside the split, mitigate.classifier_*), or None when off or without such images."""
  if not config.screen.features:
    return None
  ref = quality.Reference.build(config, data.make_split(config.data), folder)
  return None if ref.model is None else quality.embed(ref.model, ref.params, images)


def _ms(v: list[float]) -> dict[str, Any]:
  a = np.asarray(v, np.float64)
  return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else report.not_estimated("one model"),
          "n": int(a.size)}


def run(config: Any, workdir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The stage (see the module doc); summary.json's content, or {} while reference models are missing."""
  check_config(config)
  sn = config.screen
  pool = plan.images(config)
  ids, n = pool["ids"], len(pool["ids"])
  folder = wdir.screen_dir(workdir)
  os.makedirs(folder, exist_ok=True)
  records: list[dict[str, Any]] = []
  if str(sn.risk) == "model":
    in_mask = plan.ensure_halves(config, workdir, pool)
    k = int(sn.num_models)
    mine = bench_plan.shard_models(k, str(sn.shard)) if sn.run_models else []
    for i, m in enumerate(mine):
      path = plan.record_path(config, workdir, m)

      def work(m: int = m, path: str = path) -> None:
        start = time.perf_counter()
        rec = plan.run_model(config, workdir, m, pool, in_mask[m], log)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        bench_model.save_record(path, rec)
        log(f"[memvol] screen: reference model {m} ({i + 1} of {len(mine)} in this shard, {k} in all) done in "
            f"{time.perf_counter() - start:.0f} s (train {rec['seconds'].get('train', 0):.0f} s, "
            f"score {rec['seconds'].get('score', 0):.0f} s, {int(in_mask[m].sum())} of {n} images IN)")

      if not bench_plan.claim_and_run(wdir.screen_model(workdir, m), lambda path=path: os.path.exists(path), work, log):
        log(f"[memvol] screen: reference model {m} is claimed by another process; left to it")
    records = bench_model.load_records(plan.records_dir(config, workdir), plan.fingerprint(config, n))
    if len(records) < k:
      log(f"[memvol] screen: {len(records)} of {k} reference models have a record; the risk is written when all do")
      return {}
  t0 = time.perf_counter()
  labels = pool["labels"] if (pool["labels"] >= 0).any() else None
  preds = predictors.data_only_predictors(pool["images"], labels, features(config, folder, pool["images"]))
  predictor_seconds = time.perf_counter() - t0
  where = f"screen of {workdir}"
  if str(sn.risk) == "model":
    ref = risk_lib.reference_stats(records)
    risk_lib.check_out_models(ref, ids, str(sn.risk_score), where)
    risk = risk_lib.signed(ref[f"{sn.risk_score}_out_mean"], str(sn.risk_direction))
    definition = (f"{'minus ' if sn.risk_direction == 'lower' else ''}the mean of `{sn.risk_score}` over the "
                  f"{int(sn.num_models) // 2} reference models that never saw the image")
  else:
    ref = {}
    if str(sn.data_predictor) not in preds:
      raise ValueError(f"screen.data_predictor={sn.data_predictor!r} is not computed on these data (no labels, or "
                       f"screen.features off); computed: {sorted(preds)}")
    risk = risk_lib.signed(preds[str(sn.data_predictor)], str(sn.data_direction))
    definition = f"{'minus ' if sn.data_direction == 'lower' else ''}`{sn.data_predictor}` (data only)"
  outputs.check_finite(risk, ids, where)
  table, columns = risk_lib.rows(pool, risk, ref, preds)
  top = np.argsort(-risk, kind="stable")[:10]
  per_model = {key: _ms([r["seconds"].get(key, np.nan) for r in records]) for key in ("train", "score", "total")
               } if records else {}
  s = {"risk_kind": str(sn.risk), "num_images": n, "num_train": int((pool["split"] == "train").sum()),
       "num_heldout": int((pool["split"] == "heldout").sum()), "num_models": int(sn.num_models) if records else 0,
       "train_steps": plan.train_steps(config), "scores": records[0]["score_order"] if records else [],
       "fingerprint": plan.fingerprint(config, n) if records else "",
       "identity": reference.identity(config, pool["images"]), "ids": ids.tolist(),
       "image_stats": data._image_stats(pool["images"]),
       "risk": {"definition": definition, "copy_label": str(sn.copy_label),
                "copy_label_text": COPY_LABELS[str(sn.copy_label)], "basis": str(sn.basis),
                "mean": float(risk.mean()), "sd": float(risk.std())},
       "predictors": risk_lib.against_risk(risk, preds),
       "riskiest": [[int(ids[i]), int(pool["labels"][i]), float(risk[i])] for i in top],
       "cost": {"total_seconds": float(sum(r["seconds"].get("total", 0.0) for r in records)),
                "per_model": per_model,
                "compile_share": _ms([r["compile_seconds"] / max(r["seconds"]["total"], 1e-9) for r in records])
                if records else {}, "predictor_seconds": predictor_seconds}}
  clean = report.jsonable(s, "", [], {})
  outputs.write(folder, clean, table, columns, pool["images"], risk, ids, int(sn.num_shown))
  log(f"[memvol] screen: risk of {n} images ({definition}; copy label {sn.copy_label}) in {wdir.risk_csv(workdir)}, "
      f"report in {os.path.join(folder, 'report.md')}")
  return clean


__all__ = ["DONE_MEANS", "OWN_LOCKS", "check_config", "is_complete", "reference", "run", "stale_reason"]
