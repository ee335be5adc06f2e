"""One regime's baseline and one arm: selection values, retraining, copy counts, adoption."""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any, Callable

import numpy as np

from memvol import data, detect, io, perturb, quality, report, scoring, train
from memvol import workdir as wdir
from memvol.mitigate.plan import (ARM_CHAIN, CHAIN, RANKED, Arm, arm_config, arm_dir, baseline_dir, num_selected,
                                  regime_config, run_chain, score_column, select_ids, selection_column)


def _detect_table(workdir: str) -> dict[str, np.ndarray]:
  """workdir/detect/detect.csv as columns (detect.read_detect: checked, clear errors)."""
  return detect.read_detect(wdir.detect_csv(workdir))


def copy_counts(workdir: str, selected: np.ndarray) -> dict[str, Any]:
  """copies (samples copying any training image), copied_images (distinct images copied),
  each split into selected / unselected ids, Carlini's copies, and copies_by_id ({id: copies}
  of every copied training image, ids as strings), from detect.csv."""
  d = _detect_table(workdir)
  sel = np.isin(d["id"], selected)
  c = d["copies_ratio"]
  return {"copies": int(c.sum()), "copied_images": int((c > 0).sum()),
          "copies_selected": int(c[sel].sum()), "copies_unselected": int(c[~sel].sum()),
          "copied_selected": int((c[sel] > 0).sum()), "copied_unselected": int((c[~sel] > 0).sum()),
          "copies_carlini": int(d["copies_carlini"].sum()),
          "copies_by_id": {str(int(i)): int(n) for i, n in zip(d["id"], c) if n > 0}}


def with_targeted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The records, each with `targeted`: the copies its regime's `none` arms made of the
  arm's selected images (mean over those arms, from their copies_by_id; NaN for `none`
  itself or without `none` arms): how much copying a selection aims at, before any
  modification. Records only, so arms gathered from elsewhere count like local ones."""
  none: dict[str, list[dict[str, int]]] = {}
  for r in records:
    if r["selection"] == "none":
      none.setdefault(r["regime"], []).append(r["copies_by_id"])
  out = []
  for r in records:
    counts = none.get(r["regime"], [])
    val = report.not_estimated("a none arm selects nothing" if r["selection"] == "none"
                               else "the regime has no none arm")
    if r["selection"] != "none" and counts:
      val = float(np.mean([sum(c.get(str(int(i)), 0) for i in r["selected_ids"]) for c in counts]))
    out.append({**r, "targeted": val})
  return out


def final_loss(workdir: str) -> float:
  rows = train.read_log(workdir)
  return float(rows[-1]["loss"]) if rows else math.nan


def ranked_values(config: Any, workdir: str, train_ids: np.ndarray, selection: str) -> np.ndarray:
  """The values [N] (aligned with train_ids) whose top k a ranked selection takes: a column of
  the baseline's scores.csv, or the risk of mitigate.risk_reference's risk.csv (refused when
  an image is missing or its risk is NaN)."""
  if selection == "risk":
    from memvol.screen import risk as screen_risk  # noqa: PLC0415
    return screen_risk.read(wdir.risk_csv(str(config.mitigate.risk_reference)), train_ids)["risk"]
  return baseline_scores(config, workdir, train_ids, selection_column(config, selection))


def baseline_scores(config: Any, workdir: str, train_ids: np.ndarray, col: str | None = None) -> np.ndarray:
  """A column of workdir/scores/scores.csv (default: the selection column), aligned with
  train_ids; NaN where the value is missing or its solve failed (an `E_log_volume` column's
  `E_status` != 0)."""
  col = col or score_column(config)
  path = wdir.scores_csv(workdir)
  cols = scoring.read_scores(path, tuple(str(e) for e in config.score.estimators),
                             tuple(str(p) for p in config.score.get("peers", ())))
  if col not in cols:
    raise ValueError(f"selection column {col!r} (mitigate.score_column) is not a column of {path} "
                     f"(columns read: {', '.join(cols)})")
  v = cols[col].copy()
  raw = col.removeprefix("lira_off_")
  status = raw[: -len("_log_volume")] + "_status" if raw.endswith("_log_volume") else None
  if status in cols:
    v[~np.isin(cols[status], scoring.SUCCESS_STATUS)] = math.nan
  is_train = cols["split"] == "train"
  by_id = dict(zip(cols["id"][is_train].tolist(), v[is_train].tolist()))
  missing = [int(i) for i in train_ids if int(i) not in by_id]
  if missing:
    raise ValueError(f"{path} lacks training ids {missing[:8]}")
  return np.array([by_id[int(i)] for i in train_ids], np.float64)


# --- a regime's baseline and its arms -------------------------------------------------


class Regime:
  """A regime's baseline: its config, workdir, split, scores, copied ids and quality model."""

  def __init__(self, config: Any, workdir: str, name: str, log: Callable[[str], None]):
    self.name, self.config = name, regime_config(config, name)
    self.dir = baseline_dir(config, workdir, name)
    self.folder = wdir.mitigate_regime(workdir, name)
    log(f"[memvol] mitigate {name}: baseline chain in {self.dir}")
    run_chain(self.config, self.dir, CHAIN, log)
    self.split = data.load_split(self.config, self.dir)
    self.train_ids = np.asarray(self.split.train.ids, np.int64)
    self.scores = baseline_scores(self.config, self.dir, self.train_ids)
    det = _detect_table(self.dir)
    self.copied = np.sort(det["id"][det["copies_ratio"] > 0])
    self._quality = None

  def quality(self, samples: np.ndarray) -> dict[str, float]:
    if self._quality is None:
      self._quality = quality.Reference.build(self.config, self.split, self.folder)
    return self._quality.metrics(samples)

  def record(self, log: Callable[[str], None]) -> dict[str, Any]:
    """The baseline's own measurements (its sampling settings may differ from the arms')."""
    path = os.path.join(self.folder, "baseline.json")
    if os.path.exists(path):
      return io.load_json(path)
    rec = {"regime": self.name, "workdir": self.dir, "num_train": len(self.train_ids),
           "num_samples": int(self.config.sample.num_samples), "sde_steps": int(self.config.sample.sde_steps),
           "score_column": score_column(self.config), "copied_ids": self.copied.tolist(),
           "nonfinite_score_ids": np.sort(self.train_ids[~np.isfinite(self.scores)]).tolist(),
           **copy_counts(self.dir, np.zeros(0)), "final_loss": final_loss(self.dir)}
    rec.update(self.quality(detect.load_samples(self.config, self.dir)))
    io.save_json(path, rec)
    return rec


ON_NONFINITE = ("refuse", "last")


def selection(reg: Any, arm: Arm) -> dict[str, Any]:
  """{'ids': the arm's selected ids, 'nonfinite_score_ids': training ids whose selection
  score is not finite (a failed or unfinished solve), for `score` arms}. Such images are
  never ranked silently: mitigate.on_nonfinite = 'refuse' (ValueError naming them and the
  setting to change) | 'last' (ranked below every finite score, and reported)."""
  k = num_selected(arm.q, len(reg.train_ids)) if arm.selection in RANKED + ("random",) else 0
  out: dict[str, Any] = {}
  values = None
  if arm.selection in RANKED:
    values = reg.scores if arm.selection == "score" else ranked_values(reg.config, reg.dir, reg.train_ids,
                                                                       arm.selection)
    policy = str(reg.config.mitigate.on_nonfinite)
    if policy not in ON_NONFINITE:
      raise ValueError(f"mitigate.on_nonfinite={policy!r}; expected one of {ON_NONFINITE}")
    bad = np.sort(np.asarray(reg.train_ids)[~np.isfinite(values)]).tolist()
    if bad and policy == "refuse":
      sc = reg.config.score
      raise ValueError(
          f"mitigate {reg.name}: {len(bad)} of {len(reg.train_ids)} training images have no finite "
          f"{selection_column(reg.config, arm.selection)} in the baseline's scores.csv (ids {bad[:20]}): their solves failed "
          f"or hit the step budget. Raise config.score.max_steps (now {sc.max_steps}) or loosen score.rtol / "
          f"score.atol (now {sc.rtol} / {sc.atol}) and rerun --mode=score on the baseline, or set "
          "mitigate.on_nonfinite='last' to rank them below every finite score")
    out["nonfinite_score_ids"] = bad
  out["ids"] = select_ids("score" if arm.selection in RANKED else arm.selection, reg.train_ids, k, scores=values,
                          copied_ids=reg.copied, seed=arm.seed)
  return out


def _perturbed(reg: Regime, arm: Arm, ids: np.ndarray, log: Callable[[str], None]) -> tuple[str, str, dict]:
  """(path, sha256, record) of the PGD-perturbed selected images under the baseline model,
  cached per selection in mitigate/<regime>/perturb/."""
  tag = hashlib.sha1(np.asarray(ids, np.int64).tobytes()).hexdigest()[:12]
  path = os.path.join(reg.folder, "perturb", f"{tag}.npz")
  if not os.path.exists(path):
    log(f"[memvol] mitigate {reg.name}: PGD on {len(ids)} images ({arm.name})")
    perturb.run(reg.config, reg.dir, ids, path)
  return os.path.abspath(path), io.file_sha256(path), io.load_npz(path)


def _check_selection(rec: dict[str, Any], ids: np.ndarray, where: str, reg: Regime) -> None:
  if list(rec["selected_ids"]) != ids.tolist():
    raise ValueError(f"{where}: the arm selected {rec['selected_ids']} but the baseline in {reg.dir} now "
                     f"selects {ids.tolist()}: the baseline changed since the arm ran")


def load_adoptable(path: str) -> dict[str, Any]:
  """Arm records to adopt, from a mitigation summary.json, a committed <name>.records.json
  (both hold 'baselines' and 'arms') or a records folder (mitigate.records_dir: one
  <regime>.<arm>.json per arm, <regime>.baseline.json per baseline): {'path', 'baselines':
  {regime: record}, 'arms': {(regime, arm name): record}}."""
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".json"))
    recs = [io.load_json(os.path.join(path, f)) for f in files]
    s = {"baselines": {r["regime"]: r for f, r in zip(files, recs) if f.endswith(".baseline.json")},
         "arms": [r for f, r in zip(files, recs) if not f.endswith(".baseline.json")]}
  else:
    s = io.load_json(path)
  if not isinstance(s, dict) or not isinstance(s.get("arms"), list) or not isinstance(s.get("baselines"), dict):
    raise ValueError(f"mitigate.adopt={path!r} holds no mitigation arm records (no 'arms' list and 'baselines')")
  return {"path": path, "baselines": s["baselines"], "arms": {(r["regime"], r["arm"]): r for r in s["arms"]}}


def save_record(records_dir: str, rec: dict[str, Any], arm: Arm | None = None) -> None:
  """Copy an arm's record (or, with arm None, a baseline's) to the records folder, once."""
  name = f"{rec['regime']}.{arm.name if arm is not None else 'baseline'}.json"
  path = os.path.join(records_dir, name)
  if not os.path.exists(path):
    os.makedirs(records_dir, exist_ok=True)
    io.save_json(path, {k: v for k, v in rec.items() if k not in ("adopted_from", "workdir")})


def adopt_arm(source: dict[str, Any], reg: Regime, arm: Arm, cfg: Any, ids: np.ndarray) -> dict[str, Any]:
  """The record of `arm` from `source` (load_adoptable), checked to be this arm of this
  baseline: the same copied baseline images, selection and training / sampling settings
  (ValueError naming what differs). An arm run elsewhere then counts as done here."""
  rec = source["arms"][(arm.regime, arm.name)]
  where = f"mitigate.adopt={source['path']}, arm {arm.regime}/{arm.name}"
  base = source["baselines"].get(arm.regime) or {}
  if base.get("copied_ids") != reg.copied.tolist() or base.get("num_train") != len(reg.train_ids):
    raise ValueError(f"{where}: its baseline copied {base.get('copied_ids')} of {base.get('num_train')} images, "
                     f"the baseline in {reg.dir} {reg.copied.tolist()} of {len(reg.train_ids)}: not the same baseline")
  _check_selection(rec, ids, where, reg)
  want = {"num_samples": int(cfg.sample.num_samples), "sde_steps": int(cfg.sample.sde_steps),
          "train_steps": int(cfg.train.num_steps)}
  differ = {k: (rec.get(k), v) for k, v in want.items() if rec.get(k) != v}
  if differ:
    raise ValueError(f"{where}: settings differ from this config's (record, config): {differ}")
  if "copies_by_id" not in rec:
    raise ValueError(f"{where}: the record has no copies_by_id (made by an older memvol)")
  return {k: v for k, v in rec.items() if k != "targeted"} | {"adopted_from": os.path.abspath(source["path"])}


def run_arm(reg: Regime, arm: Arm, workdir: str, log: Callable[[str], None],
            adopt: dict[str, Any] | None = None) -> dict[str, Any]:
  """Run (or resume) one arm, or take it from `adopt` (load_adoptable) where that has it;
  its record, also written to <arm dir>/arm.json."""
  folder = arm_dir(workdir, arm)
  path = os.path.join(folder, "arm.json")
  start = time.perf_counter()
  sel = selection(reg, arm)
  ids = sel["ids"]
  if os.path.exists(path):
    rec = io.load_json(path)
    if "copies_by_id" not in rec:  # a record made before records kept the copies of each image
      rec["copies_by_id"] = copy_counts(folder, ids)["copies_by_id"]
      io.save_json(path, rec)
    _check_selection(rec, ids, path, reg)
    return rec
  if adopt is not None and (arm.regime, arm.name) in adopt["arms"]:
    # the PGD file is not needed to read the arm's settings
    cfg = arm_config(reg.config, arm, ids, ("", "") if arm.modification == "perturb" else None, reg.split)
    rec = adopt_arm(adopt, reg, arm, cfg, ids)
    io.save_json(path, rec)
    log(f"[memvol] mitigate {reg.name}: {arm.name} adopted from {adopt['path']}: {rec['copies']} copies")
    return rec
  if arm.selection != "none" and len(ids) == 0:
    log(f"[memvol] mitigate {reg.name}: {arm.name} selects no image (the baseline copied none); "
        "it is the same as `none`")
  replace, pert = None, None
  if arm.modification == "perturb" and len(ids):
    p, sha, pert = _perturbed(reg, arm, ids, log)
    replace = (p, sha)
  cfg = arm_config(reg.config, arm, ids, replace, reg.split)
  log(f"[memvol] mitigate {reg.name}: arm {arm.name}, {len(ids)} selected")
  run_chain(cfg, folder, ARM_CHAIN, log)
  rec: dict[str, Any] = {"regime": arm.regime, "arm": arm.name, "group": arm.group,
                         "selection": arm.selection, "modification": arm.modification or "none",
                         "q": arm.q, "seed": arm.seed, "num_selected": int(len(ids)),
                         "selected_ids": ids.tolist(),
                         **{k: v for k, v in sel.items() if k != "ids"}, "num_samples": int(cfg.sample.num_samples),
                         "sde_steps": int(cfg.sample.sde_steps), "train_steps": int(cfg.train.num_steps),
                         **copy_counts(folder, ids),
                         "final_loss": final_loss(folder)}
  rec.update(reg.quality(detect.load_samples(cfg, folder)))
  if pert is not None:
    rec.update(perturb.summary(pert))
    rec.update(perturb.retrained_volumes(cfg, folder, pert))
  rec["wall_s"] = round(time.perf_counter() - start, 1)
  io.save_json(path, rec)
  log(f"[memvol] mitigate {reg.name}: {arm.name} done in {rec['wall_s']:.0f} s: {rec['copies']} copies, "
      f"{rec['copied_images']} images copied ({rec['copied_selected']} selected)")
  return rec


