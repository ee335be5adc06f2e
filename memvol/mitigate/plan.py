"""The mitigation plan: arms, selections, and each regime's and arm's config and workdir.

An arm = selection x modification x q x seed (parse_arms); `select_ids` picks its training
images; `arm_config` carries its modification in the `data` section, so arms never share a
workdir and the ordinary stages run unchanged on it.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import math
import re
from typing import Any, Callable

import ml_collections
import numpy as np

from memvol import pipeline
from memvol import workdir as wdir

SELECTIONS = ("score", "loss", "calibrated", "risk", "random", "copied", "none")
RANKED = ("score", "loss", "calibrated", "risk")  # the top k of one value per image (selection_column)
MODIFICATIONS = ("drop", "drop_epochs", "augment", "perturb")
CHAIN = ("train", "sample", "score", "detect")   # the baseline's stages
ARM_CHAIN = ("train", "sample", "detect")        # an arm's stages


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


def score_column(config: Any) -> str:
  col = str(config.mitigate.score_column)
  return col or f"{tuple(config.score.estimators)[0]}_log_volume"


SCORE_FIELDS = ("log_volume", "stderr", "prior_logp", "logp", "nfe")  # per-estimator scores.csv columns


def check_score_column(config: Any) -> None:
  """ValueError, before any baseline runs, when mitigate.score_column is no column the
  config's scoring writes (E_<field> for its estimators, peer_<name> for its peers)."""
  col = score_column(config)
  known = [f"{e}_{f}" for e in config.score.estimators for f in SCORE_FIELDS]
  known += [f"peer_{p}" for p in config.score.get("peers", ())]
  if col not in known:
    raise ValueError(f"mitigate.score_column={col!r} is not a column this config's scoring writes; "
                     f"known: {', '.join(known)}")


def selection_column(config: Any, selection: str) -> str:
  """The value a ranked selection takes its top k of: a scores.csv column, or `risk`."""
  return {"score": score_column(config), "loss": "peer_loss", "calibrated": f"lira_off_{score_column(config)}",
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


