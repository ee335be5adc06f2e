"""Acting on the score: select training images, modify them, retrain, count copies again.

The `mitigate` stage (--mode=mitigate; not part of `all`). For each regime of
config.mitigate.regimes (the config with that regime's config.mitigate.overrides entries
"regime:section.field=value" applied) a baseline workdir holds the full chain (train,
sample, score, detect): the given workdir itself for a regime without overrides, else
workdir/mitigate/<regime>/baseline. An arm =
selection x modification x q x seed; it selects k = ceil(q N) of the N distinct training
images of the baseline and retrains from scratch in its own sub-workdir

    workdir/mitigate/<regime>/<selection>-<modification>-q<q>-seed<s>/   (none-seed<s>)

whose config carries the modification in its `data` section (data.drop_ids,
data.augment_ids, data.replace_path: see memvol/data.py), so arms never share a workdir
and the existing stages run unchanged on it (train -> sample -> detect).

Selections (`select_ids`): `score` the top k of a scores.csv column (ties by id); `loss` the
top k of the baseline's peer_loss; `calibrated` the top k of the score column calibrated
against a screen's reference models (lira_off_<column>: the baseline scored with
score.reference); `risk` the top k of a screen's risk before training (mitigate.risk_reference,
memvol/screen/); `random` k ids drawn with the arm's seed; `copied` the baseline's copied images (k =
their number, not ceil(q N)); `none` nothing (an unchanged retrain: the run-to-run spread).
Modifications: `drop` (out of the training stream), `drop_epochs` (the same, with
train.num_steps scaled by the stream's shrink, so every kept image is seen as many times as
in the baseline: the control for "fewer items, more epochs each"), `augment` (stronger
augmentation of the selected images), `perturb` (x + delta by PGD on the image's own L,
perturb.py).

An arm whose arm.json exists is done; a killed run redoes only the unfinished arm (its
stages resume inside). mitigate.adopt names the arm records of a run made elsewhere (its
summary.json, or a committed docs/results/<name>.records.json): an arm they hold for the
same baseline, selection and settings is taken from them instead of retrained. Per arm:
copies (samples that copy a training image, ratio criterion), copied_images (distinct
training images copied), both split into selected / unselected, copies_by_id, sample
quality against the held-out images (quality.py), the final training loss, and for
`perturb` L of the selected images under the retrained model. Output:
workdir/mitigate/summary.json (`arms`: one entry per arm and seed; `groups`: mean and sd
over seeds; `tests`: score vs random at equal k, Welch and Mann-Whitney over seeds, and
every group against the spread of `none`; p-values raw and Holm-adjusted over all tests of
a regime, Welch and Mann-Whitney as two families; `targeted` as a plain difference), report.md
and PNGs. Expected nulls (an sd of one seed, a metric an arm kind does not measure) are named
with their reason in summary.json's `not_estimated`, any other null in `undefined`.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import math
import os
import re
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from memvol import data, detect, io, perturb, pipeline, plotting, quality, report, scoring, stats, train
from memvol import workdir as wdir

SELECTIONS = ("score", "loss", "calibrated", "risk", "random", "copied", "none")
RANKED = ("score", "loss", "calibrated", "risk")  # the top k of one value per image (selection_column)
MODIFICATIONS = ("drop", "drop_epochs", "augment", "perturb")
CHAIN = ("train", "sample", "score", "detect")   # the baseline's stages
ARM_CHAIN = ("train", "sample", "detect")        # an arm's stages
METRICS = ("copies", "copied_images", "copies_selected", "copies_unselected", "copied_selected",
           "copied_unselected", "copies_carlini", "fd", "kid", "precision", "recall", "final_loss",
           "L_before_baseline", "L_after_baseline", "psnr", "ssim", "L_selected_retrained",
           "L_perturbed_retrained", "targeted")
TESTED = ("copies", "copied_images", "fd", "kid", "precision", "recall")   # Welch / MW over seeds, Holm per regime
# differences of means without a test: `score` selection is the same in every seed, so its
# `targeted` has sd 0 by construction and a test over seeds would be meaningless
DIFFERENCES = ("targeted",)
# The primary comparison, fixed before any run: distinct training images copied per model, the
# screen's risk x drop against random x drop at q = 10 %, two-sided Welch t over models at alpha
# 0.01 with a 95 % bootstrap interval (models resampled within each arm) of the difference of
# means. Tested in a regime holding both groups; every other test is secondary (q: BH).
PRIMARY = {"a": "risk-drop-q0.1", "b": "random-drop-q0.1", "metric": "copied_images", "alpha": 0.01,
           "test": "two-sided Welch t over models", "interval": "95 % bootstrap over models",
           "num_bootstrap": 4000}


@dataclasses.dataclass(frozen=True)
class Arm:
  """One retrain: regime, selection, modification ('' for none), q (0 for none), seed."""

  regime: str
  selection: str
  modification: str
  q: float
  seed: int

  @property
  def group(self) -> str:
    if self.selection in ("none", "copied"):  # k is not ceil(q N) for these
      return "none" if self.selection == "none" else f"copied-{self.modification}"
    return f"{self.selection}-{self.modification}-q{self.q:g}"

  @property
  def name(self) -> str:
    return f"{self.group}-seed{self.seed}"


def parse_arms(mt: Any) -> list[Arm]:
  """The arms of config.mitigate in run order (each spec once per seed, seeds inner)."""
  seeds = [int(s) for s in mt.seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"mitigate.seeds must be distinct and non-empty, got {mt.seeds}")
  regimes = tuple(mt.regimes)
  out = []
  for spec in mt.arms:
    parts = str(spec).split(":")
    if len(parts) == 2 and parts[1] == "none":
      regime, sel, mod, q = parts[0], "none", "", 0.0
    elif len(parts) == 4:
      regime, sel, mod = parts[:3]
      try:
        q = float(parts[3])
      except ValueError:
        raise ValueError(f"mitigate.arms entry {spec!r}: q={parts[3]!r} is not a number") from None
    else:
      raise ValueError(f"mitigate.arms entry {spec!r}: expected 'regime:none' or "
                       "'regime:selection:modification:q'")
    if regime not in regimes:
      raise ValueError(f"mitigate.arms entry {spec!r}: regime {regime!r} not in mitigate.regimes {regimes}")
    if sel not in SELECTIONS or (sel != "none" and mod not in MODIFICATIONS):
      raise ValueError(f"mitigate.arms entry {spec!r}: selection must be one of {SELECTIONS} and "
                       f"modification one of {MODIFICATIONS}")
    if sel not in ("none", "copied") and not 0.0 < q <= 1.0:
      raise ValueError(f"mitigate.arms entry {spec!r}: q must be in (0, 1], got {q}")
    out.extend(Arm(regime, sel, mod, q, s) for s in seeds)
  names = [(a.regime, a.name) for a in out]
  if len(set(names)) != len(names):
    raise ValueError("mitigate.arms names an arm twice")
  return out


# --- selection -----------------------------------------------------------------------


def num_selected(q: float, n: int) -> int:
  """k = ceil(q N), computed so that q N within 1e-9 of an integer is not rounded up."""
  return min(n, int(math.ceil(q * n - 1e-9)))


def select_ids(selection: str, train_ids: np.ndarray, k: int, *, scores: np.ndarray | None = None,
               copied_ids: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
  """Sorted ids of the selected training images.

  score: the k largest `scores` (aligned with train_ids; NaN last; ties broken by smaller
  id); random: k ids uniformly without replacement from np.random.default_rng(seed);
  copied: copied_ids (k ignored); none: no ids.
  """
  train_ids = np.asarray(train_ids, np.int64)
  if selection == "none":
    return np.zeros(0, np.int64)
  if selection == "copied":
    if copied_ids is None:
      raise ValueError("selection 'copied' needs copied_ids")
    return np.sort(np.asarray(copied_ids, np.int64))
  if not 0 < k <= len(train_ids):
    raise ValueError(f"k={k} must be in [1, {len(train_ids)}]")
  if selection == "score":
    if scores is None or np.shape(scores) != train_ids.shape:
      raise ValueError(f"selection 'score' needs one score per training image ({train_ids.shape})")
    s = np.asarray(scores, np.float64)
    order = np.lexsort((train_ids, np.where(np.isfinite(s), -s, np.inf)))
    return np.sort(train_ids[order[:k]])
  if selection == "random":
    return np.sort(np.random.default_rng(int(seed)).choice(np.sort(train_ids), k, replace=False))
  raise ValueError(f"unknown selection {selection!r}; expected one of {SELECTIONS}")


# --- configs and workdirs ------------------------------------------------------------


def _unlocked(config: Any) -> ml_collections.ConfigDict:
  """A deep copy of config that accepts new fields."""
  c = copy.deepcopy(config)
  c.unlock()
  return c


def _overrides(config: Any, regime: str) -> dict[tuple[str, str], Any]:
  """{(section, field): value} of the mitigate.overrides entries "regime:section.field=value"
  (value a Python literal) for `regime`."""
  out = {}
  for entry in config.mitigate.overrides:
    m = re.fullmatch(r"\s*([\w-]+)\s*:\s*(\w+)\.(\w+)\s*=(.+)", str(entry))
    if m is None:
      raise ValueError(f"mitigate.overrides entry {entry!r}: expected 'regime:section.field=value'")
    if m.group(1) != regime:
      continue
    try:
      value = ast.literal_eval(m.group(4).strip())
    except (ValueError, SyntaxError):
      raise ValueError(f"mitigate.overrides entry {entry!r}: the value is not a Python literal") from None
    out[(m.group(2), m.group(3))] = tuple(value) if isinstance(value, list) else value
  return out


def regime_config(config: Any, regime: str) -> ml_collections.ConfigDict:
  """config with the mitigate.overrides of `regime` applied (ValueError for an unknown field)."""
  c = _unlocked(config)
  for (section, field), value in _overrides(config, regime).items():
    if section not in c or not hasattr(c[section], "keys") or field not in c[section]:
      raise ValueError(f"mitigate.overrides: {regime}:{section}.{field} is not a config field")
    c[section][field] = value
  return c


def baseline_dir(config: Any, workdir: str, regime: str) -> str:
  """The workdir itself for a regime without overrides, else mitigate/<regime>/baseline."""
  return workdir if not _overrides(config, regime) else wdir.mitigate_arm(workdir, regime, "baseline")


def arm_dir(workdir: str, arm: Arm) -> str:
  return wdir.mitigate_arm(workdir, arm.regime, arm.name)


def epoch_matched_steps(num_steps: int, stream_counts: np.ndarray, train_ids: np.ndarray,
                        dropped: np.ndarray) -> int:
  """Training steps that show each kept stream item as often as `num_steps` showed it in
  the full stream: num_steps x (kept stream length) / (full stream length), rounded, >= 1.
  stream_counts: [N] times each of train_ids is in the stream."""
  counts = np.asarray(stream_counts, np.int64)
  kept = int(counts[~np.isin(train_ids, dropped)].sum())
  return max(1, int(round(num_steps * kept / int(counts.sum()))))


def arm_config(regime_cfg: Any, arm: Arm, ids: np.ndarray, replace: tuple[str, str] | None = None,
               split: Any = None) -> ml_collections.ConfigDict:
  """The arm's full config: the regime's, with the arm's seed, its sampling settings and its
  data modification (data.drop_ids / augment_ids / replace_path + replace_sha256; for
  `drop_epochs` also train.num_steps, from `split`, the regime's data.Split)."""
  c = _unlocked(regime_cfg)
  mt = c.mitigate
  c.seed = int(arm.seed)
  c.sample.methods = (c.detect.sample_method,)
  if int(mt.num_samples):
    c.sample.num_samples = int(mt.num_samples)
  if int(mt.sde_steps):
    c.sample.sde_steps = int(mt.sde_steps)
  ids = tuple(int(i) for i in ids)
  if arm.modification in ("drop", "drop_epochs"):
    c.data.drop_ids = ids
  if arm.modification == "drop_epochs":
    if split is None:
      raise ValueError("a drop_epochs arm needs the regime's split (its stream counts)")
    c.train.num_steps = epoch_matched_steps(int(c.train.num_steps), split.dup_counts,
                                            np.asarray(split.train.ids), np.asarray(ids))
  elif arm.modification == "augment":
    c.data.augment_ids = ids
    c.data.augment_shift = int(mt.augment_shift)
    c.data.augment_noise = float(mt.augment_noise)
  elif arm.modification == "perturb" and ids:
    if replace is None:
      raise ValueError("a perturb arm needs its replacement file (path, sha256)")
    c.data.replace_path, c.data.replace_sha256 = replace
  c.lock()
  return c


def run_chain(config: Any, workdir: str, stages: tuple[str, ...], log: Callable[[str], None]) -> None:
  """The given stages of memvol.pipeline on a baseline or arm workdir, skipping completed
  ones (the stage holds the top workdir's lock, which covers these sub-workdirs)."""
  pipeline.check_workdir(config, workdir)
  pipeline.run_chain(config, workdir, stages, log=log)


# --- measurements --------------------------------------------------------------------


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


def _score_column(config: Any) -> str:
  col = str(config.mitigate.score_column)
  return col or f"{tuple(config.score.estimators)[0]}_log_volume"


SCORE_FIELDS = ("log_volume", "stderr", "prior_logp", "logp", "nfe")  # per-estimator scores.csv columns


def check_score_column(config: Any) -> None:
  """ValueError, before any baseline runs, when mitigate.score_column is no column the
  config's scoring writes (E_<field> for its estimators, peer_<name> for its peers)."""
  col = _score_column(config)
  known = [f"{e}_{f}" for e in config.score.estimators for f in SCORE_FIELDS]
  known += [f"peer_{p}" for p in config.score.get("peers", ())]
  if col not in known:
    raise ValueError(f"mitigate.score_column={col!r} is not a column this config's scoring writes; "
                     f"known: {', '.join(known)}")


def selection_column(config: Any, selection: str) -> str:
  """The value a ranked selection takes its top k of: a scores.csv column, or `risk`."""
  return {"score": _score_column(config), "loss": "peer_loss", "calibrated": f"lira_off_{_score_column(config)}",
          "risk": "risk"}[selection]


def check_selections(config: Any, selections: set[str]) -> None:
  """ValueError, before any baseline runs, naming the setting a ranked selection needs."""
  if "loss" in selections and "loss" not in tuple(config.score.get("peers", ())):
    raise ValueError("selection 'loss' ranks the baseline's peer_loss: add 'loss' to score.peers")
  if "calibrated" in selections and not config.score.get("reference"):
    raise ValueError("selection 'calibrated' ranks scores calibrated against a screen: set score.reference to a "
                     "--mode=screen workdir of this data")
  if "risk" in selections and not config.mitigate.get("risk_reference"):
    raise ValueError("selection 'risk' ranks a screen's risk: set mitigate.risk_reference to a --mode=screen "
                     "workdir of this data")


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
  col = col or _score_column(config)
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


# --- the stage -----------------------------------------------------------------------


class _Regime:
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
           "score_column": _score_column(self.config), "copied_ids": self.copied.tolist(),
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


def _perturbed(reg: _Regime, arm: Arm, ids: np.ndarray, log: Callable[[str], None]) -> tuple[str, str, dict]:
  """(path, sha256, record) of the PGD-perturbed selected images under the baseline model,
  cached per selection in mitigate/<regime>/perturb/."""
  tag = hashlib.sha1(np.asarray(ids, np.int64).tobytes()).hexdigest()[:12]
  path = os.path.join(reg.folder, "perturb", f"{tag}.npz")
  if not os.path.exists(path):
    log(f"[memvol] mitigate {reg.name}: PGD on {len(ids)} images ({arm.name})")
    perturb.run(reg.config, reg.dir, ids, path)
  return os.path.abspath(path), io.file_sha256(path), io.load_npz(path)


def _check_selection(rec: dict[str, Any], ids: np.ndarray, where: str, reg: _Regime) -> None:
  if list(rec["selected_ids"]) != ids.tolist():
    raise ValueError(f"{where}: the arm selected {rec['selected_ids']} but the baseline in {reg.dir} now "
                     f"selects {ids.tolist()}: the baseline changed since the arm ran")


def load_adoptable(path: str) -> dict[str, Any]:
  """Arm records to adopt, from a mitigation summary.json or a committed <name>.records.json
  (both hold 'baselines' and 'arms'): {'path', 'baselines': {regime: record},
  'arms': {(regime, arm name): record}}."""
  s = io.load_json(path)
  if not isinstance(s, dict) or not isinstance(s.get("arms"), list) or not isinstance(s.get("baselines"), dict):
    raise ValueError(f"mitigate.adopt={path!r} holds no mitigation arm records (no 'arms' list and 'baselines')")
  return {"path": path, "baselines": s["baselines"], "arms": {(r["regime"], r["arm"]): r for r in s["arms"]}}


def adopt_arm(source: dict[str, Any], reg: _Regime, arm: Arm, cfg: Any, ids: np.ndarray) -> dict[str, Any]:
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


def run_arm(reg: _Regime, arm: Arm, workdir: str, log: Callable[[str], None],
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


DONE_MEANS = "every arm of the plan has its record"


def stale_reason(config: Any, workdir: str) -> str | None:
  """Always a reason: the stage is never skipped; it resumes arm by arm (each arm's record
  marks it done) and rewrites the summary."""
  return "the mitigation stage always runs; it resumes arm by arm"


def is_complete(config: Any, workdir: str) -> bool:
  return stale_reason(config, workdir) is None


def run(config: Any, workdir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The stage: every regime's baseline, every arm (resuming); the summary is rewritten
  after each arm, so a long run can be read while it goes (`num_arms_planned` says how
  many arms the plan has)."""
  arms = parse_arms(config.mitigate)
  for regime in dict.fromkeys(a.regime for a in arms):
    check_score_column(regime_config(config, regime))
    check_selections(regime_config(config, regime), {a.selection for a in arms if a.regime == regime})
  adopt = load_adoptable(config.mitigate.adopt) if config.mitigate.adopt else None
  regimes: dict[str, _Regime] = {}
  baselines: dict[str, dict[str, Any]] = {}
  records = []
  for arm in arms:
    if arm.regime not in regimes:
      regimes[arm.regime] = _Regime(config, workdir, arm.regime, log)
    records.append(run_arm(regimes[arm.regime], arm, workdir, log, adopt))
    baselines[arm.regime] = regimes[arm.regime].record(log)
    summary = summarise(with_targeted(records), baselines) | {"num_arms_planned": len(arms)}
    write_outputs(summary, wdir.mitigate_dir(workdir), log)
  return summary


# --- statistics and outputs ----------------------------------------------------------


def _finite(values: list[Any]) -> np.ndarray:
  return np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)


def _mean_sd(values: list[Any]) -> tuple[float, float, int]:
  """Mean, sd (ddof 1) and number of the finite values; what they cannot give is NotEstimated."""
  a = _finite(values)
  if a.size == 0:
    nothing = report.not_estimated("not measured for this group")
    return nothing, nothing, 0
  sd = float(a.std(ddof=1)) if a.size > 1 else report.not_estimated("fewer than 2 finite values")
  return float(a.mean()), sd, int(a.size)


def _test(a: list[Any], b: list[Any]) -> dict[str, float]:
  """Welch and Mann-Whitney over seeds; NotEstimated (with the reason) where undefined."""
  fa, fb = _finite(a), _finite(b)
  why = ("not measured for a group" if min(fa.size, fb.size) == 0 else
         "a group has fewer than 2 finite values" if min(fa.size, fb.size) < 2 else
         "both groups are constant" if np.ptp(fa) == 0 and np.ptp(fb) == 0 else "")
  if min(fa.size, fb.size) == 0:
    return dict.fromkeys(("welch_t", "welch_p", "mw_u", "mw_p"), report.not_estimated(why))
  (t, tp), (u, up) = stats.welch(fa, fb), stats.mann_whitney(fa, fb)
  out = {"welch_t": t, "welch_p": tp, "mw_u": u, "mw_p": up}
  report.expected_nan(out, tuple(out), why)
  return out


def _holm(tests: list[dict[str, Any]]) -> None:
  """Add welch_p_holm and mw_p_holm to every metric of `tests` (one regime's): Holm over all
  of them, Welch and Mann-Whitney as two families."""
  cells = [t[m] for t in tests for m in TESTED]
  for key in ("welch_p", "mw_p"):
    adj = stats.holm([c[key] for c in cells])
    for c, a in zip(cells, adj):
      c[key + "_holm"] = float(a) if np.isfinite(a) else c[key]  # a NaN keeps its reason


def primary_test(a: list[Any], b: list[Any], seed: int = 0) -> dict[str, Any]:
  """PRIMARY on the per-model values of its two groups: means, difference (a - b), Welch t and
  p, the bootstrap interval of the difference and the verdict."""
  fa, fb = _finite(a), _finite(b)
  out: dict[str, Any] = dict(PRIMARY) | {"n_a": int(fa.size), "n_b": int(fb.size)}
  if min(fa.size, fb.size) < 2:
    return out | {"verdict": f"not tested: {fa.size} / {fb.size} models with a value (>= 2 each needed)"}
  rng = np.random.default_rng(seed)
  nb = int(PRIMARY["num_bootstrap"])
  boot = (fa[rng.integers(0, fa.size, (nb, fa.size))].mean(1) - fb[rng.integers(0, fb.size, (nb, fb.size))].mean(1))
  t, p = stats.welch(fa, fb)
  lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
  d = float(fa.mean() - fb.mean())
  decided = math.isfinite(p) and p < PRIMARY["alpha"] and (hi < 0 or lo > 0)
  verdict = (("risk x drop copies fewer images than random x drop" if d < 0 else
              "risk x drop copies more images than random x drop") if decided else
             "inconclusive" + (" (the interval includes 0)" if lo <= 0 <= hi else f" (p >= {PRIMARY['alpha']:g})"))
  named = {k: v if math.isfinite(v) else report.not_estimated("no spread in either arm") for k, v in
           (("welch_t", t), ("welch_p", p))}
  return out | {"mean_a": float(fa.mean()), "mean_b": float(fb.mean()), "diff": d, **named, "ci": [lo, hi],
                "verdict": verdict}


def _bh(tests: list[dict[str, Any]], primary: tuple[str, str]) -> None:
  """Add welch_q_bh to every metric of `tests`: Benjamini-Hochberg over all Welch p-values but
  the primary comparison's own (the secondary family)."""
  cells = [t[m] for t in tests for m in TESTED if not ((t["a"], t["b"]) == primary and m == PRIMARY["metric"])]
  for c, q in zip(cells, stats.benjamini_hochberg([c["welch_p"] for c in cells])):
    c["welch_q_bh"] = float(q) if np.isfinite(q) else c["welch_p"]  # a NaN keeps its reason


def summarise(records: list[dict[str, Any]], baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Groups (mean, sd over seeds of METRICS), tests (score vs random at equal
  modification and q; drop_epochs vs drop at equal selection and q; every group vs `none`)
  per regime, with Holm and (secondary family) BH adjustments; PRIMARY per regime holding its
  two groups (`primary`); the arm records as `arms`."""
  groups, tests, primary = [], [], {}
  for regime in dict.fromkeys(r["regime"] for r in records):
    recs = [r for r in records if r["regime"] == regime]
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
      by_group.setdefault(r["group"], []).append(r)
    for name, rs in by_group.items():
      g = {"regime": regime, "group": name, "selection": rs[0]["selection"],
           "modification": rs[0]["modification"], "q": rs[0]["q"], "seeds": [r["seed"] for r in rs],
           "num_selected": [r["num_selected"] for r in rs]}
      for m in METRICS:
        g[m + "_mean"], g[m + "_sd"], g[m + "_n"] = _mean_sd([r.get(m) for r in rs])
      groups.append(g)
    means = {g["group"]: g for g in groups if g["regime"] == regime}

    def diff(a: str, b: str, m: str) -> float:
      d = means[a][f"{m}_mean"] - means[b][f"{m}_mean"]
      return d if np.isfinite(d) else report.not_estimated(f"{m} is not measured for a group")

    pair = lambda a, b: {"regime": regime, "a": a, "b": b,  # noqa: E731
                         **{m: _test(vals(a, m), vals(b, m)) for m in TESTED},
                         **{f"{m}_diff": diff(a, b, m) for m in DIFFERENCES}}
    regime_tests = []
    vals = lambda name, m: [r.get(m) for r in by_group.get(name, []) if r.get(m) is not None]  # noqa: E731
    for name, rs in by_group.items():
      others = []
      if rs[0]["selection"] in RANKED:
        others.append(name.replace(f"{rs[0]['selection']}-", "random-", 1))
      if rs[0]["modification"] == "drop_epochs":  # the epochs held vs not, same selection
        others.append(name.replace("-drop_epochs-", "-drop-", 1))
      for other in others:
        if other in by_group:
          regime_tests.append(pair(name, other))
      if name != "none" and "none" in by_group:
        regime_tests.append(pair(name, "none"))
    _holm(regime_tests)
    _bh(regime_tests, (PRIMARY["a"], PRIMARY["b"]))
    if PRIMARY["a"] in by_group and PRIMARY["b"] in by_group:
      primary[regime] = primary_test(vals(PRIMARY["a"], PRIMARY["metric"]), vals(PRIMARY["b"], PRIMARY["metric"]))
    tests += regime_tests
  out = {"arms": records, "groups": groups, "tests": tests, "baselines": baselines}
  return out | ({"primary": primary} if primary else {})


def fmt_group(g: dict[str, Any], m: str, digits: int = 3) -> str:
  """'mean ± sd (n)' of metric m in group g, n = the seeds with a finite value; '-' if none."""
  return report.fmt_ms(g[m + "_mean"], g[m + "_sd"], g.get(m + "_n"), digits, missing="-")


def fmt_p_holm(c: dict[str, Any], key: str) -> str:
  """'raw (Holm)' of a test cell's p-value `key` (welch_p | mw_p)."""
  return f"{report.fmt_p(c[key])} ({report.fmt_p(c.get(key + '_holm'))})"


def primary_lines(pr: dict[str, Any]) -> list[str]:
  """The pre-registered comparison, stated before its numbers, then the numbers and the verdict."""
  lines = [f"**Primary comparison (fixed before any run):** {pr['metric']} (distinct training images copied per "
           f"model) of `{pr['a']}` minus that of `{pr['b']}`; {pr['test']} at alpha = {pr['alpha']:g}, with a "
           f"{pr['interval']}. Every other test is secondary (BH q in summary.json).", ""]
  if "diff" not in pr:
    return lines + [f"Result: {pr['verdict']}.", ""]
  return lines + [f"Result over {pr['n_a']} / {pr['n_b']} models: {report.fmt(pr['mean_a'], 3)} vs "
                  f"{report.fmt(pr['mean_b'], 3)}, difference **{report.fmt(pr['diff'], 3)}** "
                  f"[{report.fmt(pr['ci'][0], 3)}, {report.fmt(pr['ci'][1], 3)}], Welch t = {report.fmt(pr['welch_t'], 3)}, "
                  f"p = {report.fmt_p(pr['welch_p'])}. **Verdict: {pr['verdict']}.**", ""]


def render_markdown(summary: dict[str, Any], figures: list[str]) -> str:
  lines = ["# memvol: acting on the score", "",
           "Arms retrain from scratch with the selected training images modified; copies = samples "
           "that copy a training image (d1/d2 < threshold), copied images = distinct training images "
           "copied; targeted = the copies the `none` arms made of the selected images (what the "
           "selection aims at); mean ± sd (n) over seeds, n = the seeds with a finite value. "
           "FD / KID / precision / recall: classifier features of the samples against the held-out images. "
           "`copied` selects the baseline's copied images, so its k differs from ceil(q N).", ""]
  for regime, base in summary["baselines"].items():
    lines += [f"## Regime `{regime}`", "",
              f"Arms done: {sum(r['regime'] == regime for r in summary['arms'])} "
              f"(all regimes: {len(summary['arms'])} of {summary.get('num_arms_planned', len(summary['arms']))} planned).", "",
              f"Baseline ({base['workdir']}, {base['num_samples']} samples x {base['sde_steps']} steps): "
              f"{base['copies']} copies, {base['copied_images']} images copied of {base['num_train']}; "
              f"FD {report.fmt(base.get('fd'))}, selection column `{base['score_column']}`.", ""]
    bad = base.get("nonfinite_score_ids", [])
    if bad:
      lines += [f"{len(bad)} training images have a non-finite selection score (ids "
                f"{', '.join(str(i) for i in bad[:20])}{' ...' if len(bad) > 20 else ''}): `score` arms ranked "
                "them below every finite score (mitigate.on_nonfinite = 'last').", ""]
    pr = summary.get("primary", {}).get(regime)
    if pr:
      lines += primary_lines(pr)
    header = ["group", "seeds", "k", "copies", "copied images", "copies sel / unsel",
              "images sel / unsel", "targeted", "FD", "KID", "precision", "recall", "final loss"]
    rows = []
    for g in (g for g in summary["groups"] if g["regime"] == regime):
      rows.append([g["group"], str(len(g["seeds"])), "/".join(str(k) for k in sorted(set(g["num_selected"]))),
                   fmt_group(g, "copies"), fmt_group(g, "copied_images"),
                   f"{fmt_group(g, 'copies_selected')} / {fmt_group(g, 'copies_unselected')}",
                   f"{fmt_group(g, 'copied_selected')} / {fmt_group(g, 'copied_unselected')}",
                   fmt_group(g, "targeted"), fmt_group(g, "fd"), fmt_group(g, "kid"),
                   fmt_group(g, "precision"), fmt_group(g, "recall"), fmt_group(g, "final_loss", 4)])
    lines += [report.markdown_table(header, rows), ""]
    tests = [t for t in summary["tests"] if t["regime"] == regime]
    if tests:
      header = ["a vs b"] + [f"{m} (Welch p / MW p)" for m in TESTED] + [f"{m} a - b" for m in DIFFERENCES]
      rows = [[f"{t['a']} vs {t['b']}"] + [f"{fmt_p_holm(t[m], 'welch_p')} / {fmt_p_holm(t[m], 'mw_p')}"
                                           for m in TESTED]
              + [report.fmt(t[f"{m}_diff"], 3) for m in DIFFERENCES] for t in tests]
      lines += ["Tests over seeds (two-sided): each p-value raw, and in parentheses Holm-adjusted over "
                f"all {len(tests) * len(TESTED)} tests of this table (Welch and Mann-Whitney as two "
                "families). `targeted` is a difference of means without a test: `score` selects the same "
                "images in every seed, so its sd is 0 by construction.", "", report.markdown_table(header, rows), ""]
    pert = [g for g in summary["groups"] if g["regime"] == regime and g["modification"] == "perturb"]
    if pert:
      header = ["group", "L before (baseline)", "L after (baseline)", "PSNR dB", "SSIM",
                "L original (retrained)", "L perturbed (retrained)"]
      keys = ("L_before_baseline", "L_after_baseline", "psnr", "ssim", "L_selected_retrained",
              "L_perturbed_retrained")
      rows = [[g["group"]] + [fmt_group(g, k, 4) for k in keys] for g in pert]
      lines += ["Perturbed images (mean over the selected images, then mean ± sd over seeds; L by the "
                "scoring estimator; retrained = the arm's own model, trained on the perturbed images):",
                "", report.markdown_table(header, rows), ""]
  lines += [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures]
  return "\n".join(lines) + "\n"


def figure(summary: dict[str, Any], path: str) -> None:
  """Per regime: copies per arm group (seeds as dots, mean ± sd) and copies against FD."""
  plt = plotting.pyplot()
  regimes = list(summary["baselines"])
  fig, axes = plt.subplots(len(regimes), 2, figsize=(11, 4.6 * len(regimes)), squeeze=False,
                           gridspec_kw={"hspace": 0.75})
  for row, regime in zip(axes, regimes):
    gs = [g for g in summary["groups"] if g["regime"] == regime]
    ax = row[0]
    for i, g in enumerate(gs):
      ys = [r["copies"] for r in summary["arms"] if r["regime"] == regime and r["group"] == g["group"]]
      ax.scatter(np.full(len(ys), i) + np.linspace(-0.12, 0.12, len(ys)), ys, s=14, alpha=0.7)
      ax.errorbar(i + 0.25, g["copies_mean"], yerr=np.nan_to_num(g["copies_sd"]), fmt="k_", capsize=3)
    ax.set_xticks(range(len(gs)), [g["group"] for g in gs], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("samples that are copies")
    ax.set_title(f"{regime}: copies per arm (dots: seeds)")
    ax.grid(alpha=0.3)
    ax = row[1]
    for g in gs:
      ax.errorbar(g["fd_mean"], g["copies_mean"], xerr=np.nan_to_num(g["fd_sd"]),
                  yerr=np.nan_to_num(g["copies_sd"]), fmt="o", capsize=3, label=g["group"])
    ax.set_xlabel("FD to held-out (classifier features; lower = better)")
    ax.set_ylabel("samples that are copies")
    ax.set_title(f"{regime}: copies vs quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  plotting.save_figure(fig, path)


def write_outputs(summary: dict[str, Any], folder: str, log: Callable[[str], None] = print) -> None:
  fig = os.path.join(folder, "copies_vs_quality.png")
  figure(summary, fig)
  undefined: list[str] = []
  expected: dict[str, str] = {}
  clean = report.jsonable(summary, "", undefined, expected)  # NaN -> null
  io.save_json(os.path.join(folder, "summary.json"), clean | {"not_estimated": expected, "undefined": undefined})
  with io.atomic_open(os.path.join(folder, "report.md"), "w") as f:
    f.write(render_markdown(summary, [fig]))
  log(f"[memvol] mitigate: summary written to {folder}/summary.json and report.md")
