"""Risk per image from the reference models' records (or the data alone), and the risk file.

Per image i and raw score s (higher = more memorised), over the reference models with a record:
  <s>_out_mean, <s>_out_sd, <s>_out_n   over the models that never saw i (memvol.calibrate.group_stats)
  <s>_in_mean,  <s>_in_sd,  <s>_in_n    over the models that trained on i
Model risk = +-<risk_score>_out_mean (screen.risk_direction: "lower" = a lower OUT mean is riskier);
data risk = +-<data_predictor> (memvol.predictors; screen.data_direction). Higher risk = more
likely to be copied under the copy label the direction was read under (screen.copy_label).

risk.csv: id (the image's index in its source), label, split (in the job), risk, rank (1 =
riskiest), then every score's six statistics, then the data-only predictors. `read` refuses a
file with a missing image or a non-finite risk, naming them and the file.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from memvol import calibrate, io, stats

STATS = ("out_mean", "out_sd", "out_n", "in_mean", "in_sd", "in_n")
KINDS = ("model", "data")
DIRECTIONS = ("lower", "higher")
BASE_COLUMNS = ("id", "label", "split", "risk", "rank")


def reference_stats(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  """{<score>_<stat>: [N]} over the records (STATS of every raw score the records hold)."""
  IN = np.array([r["in_mask"] for r in records], bool)
  out: dict[str, np.ndarray] = {}
  for name in records[0]["score_order"]:
    s = np.array([np.asarray(r["scores"][name], np.float64) for r in records])
    for side, group in (("out", ~IN), ("in", IN)):
      mean, sd, n = calibrate.group_stats(s, group)
      out[f"{name}_{side}_mean"], out[f"{name}_{side}_sd"], out[f"{name}_{side}_n"] = mean, sd, n.astype(np.float64)
  return out


def check_out_models(ref: dict[str, np.ndarray], ids: np.ndarray, score: str, where: str) -> None:
  """ValueError naming the images with fewer than 2 finite OUT-model scores of `score`."""
  n = ref[f"{score}_out_n"]
  bad = ids[n < calibrate.MIN_REFERENCES]
  if bad.size:
    raise ValueError(f"{where}: {bad.size} image(s) have fewer than {calibrate.MIN_REFERENCES} OUT reference models "
                     f"with a finite {score} (ids {bad[:8].tolist()}); train more reference models "
                     "(screen.num_models) or let the running ones finish")


def signed(values: np.ndarray, direction: str) -> np.ndarray:
  """values as a risk (higher = riskier) under `direction` ('higher' keeps, 'lower' negates)."""
  if direction not in DIRECTIONS:
    raise ValueError(f"a risk direction must be one of {DIRECTIONS}, got {direction!r}")
  return np.asarray(values, np.float64) * (1.0 if direction == "higher" else -1.0)


def ranks(risk: np.ndarray) -> np.ndarray:
  """1 = riskiest (ties by order)."""
  order = np.argsort(-risk, kind="stable")
  r = np.empty(len(risk), np.int64)
  r[order] = np.arange(1, len(risk) + 1)
  return r


def against_risk(risk: np.ndarray, predictors: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """Spearman {rho, p, n} of every data-only predictor with the risk."""
  out = {}
  for k, v in predictors.items():
    rho, p, n = stats.spearman(np.asarray(v, np.float64), risk)
    out[k] = {"rho": rho, "p": p, "n": n}
  return out


def rows(pool: dict[str, np.ndarray], risk: np.ndarray, ref: dict[str, np.ndarray],
         predictors: dict[str, np.ndarray]) -> tuple[list[dict[str, Any]], list[str]]:
  """risk.csv's rows and columns (floats written with repr, so they read back exactly)."""
  cols = list(BASE_COLUMNS) + list(ref) + list(predictors)
  rk = ranks(risk)
  out = []
  for i in range(len(risk)):
    row = {"id": int(pool["ids"][i]), "label": int(pool["labels"][i]), "split": str(pool["split"][i]),
           "risk": repr(float(risk[i])), "rank": int(rk[i])}
    row.update({k: repr(float(v[i])) for k, v in ref.items()})
    row.update({k: repr(float(v[i])) for k, v in predictors.items()})
    out.append(row)
  return out, cols


def read(path: str, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """risk.csv as columns (id, label int; split str; every other column float). With `ids`, the
  rows of those images in that order. ValueError naming the file and the images for a missing
  image, a repeated one or a non-finite risk."""
  try:
    table = io.load_csv(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} does not exist: screen the data first (--mode=screen)") from None
  except (UnicodeDecodeError, ValueError) as e:
    raise ValueError(f"{path} is not a risk file ({e}); rerun --mode=screen") from e
  if not table or any(c not in table[0] for c in BASE_COLUMNS):
    raise ValueError(f"{path} is not a risk file (needs columns {list(BASE_COLUMNS)}); rerun --mode=screen")
  try:
    out: dict[str, np.ndarray] = {"id": np.array([int(r["id"]) for r in table], np.int64),
                                  "label": np.array([int(r["label"]) for r in table], np.int64),
                                  "split": np.array([r["split"] for r in table])}
    for c in table[0]:
      if c not in out:
        out[c] = np.array([math.nan if (r[c] or "").strip() in ("", "nan") else float(r[c]) for r in table])
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path} is corrupt ({e}); rerun --mode=screen") from e
  if len(np.unique(out["id"])) != len(out["id"]):
    raise ValueError(f"{path} lists an image twice; rerun --mode=screen")
  bad = out["id"][~np.isfinite(out["risk"])]
  if bad.size:
    raise ValueError(f"{path}: the risk of {bad.size} image(s) is NaN or missing (ids {bad[:8].tolist()}); "
                     "rerun --mode=screen")
  if ids is None:
    return out
  pos = {int(i): k for k, i in enumerate(out["id"])}
  missing = [int(i) for i in ids if int(i) not in pos]
  if missing:
    raise ValueError(f"{path} has no row for {len(missing)} image(s) (ids {missing[:8]}): it screened other data; "
                     "rerun --mode=screen with this data config")
  idx = np.array([pos[int(i)] for i in ids], np.int64)
  return {k: v[idx] for k, v in out.items()}
