"""LiRA's per-example calibration of a score against models that did or did not train on an image.

A score s of image i by a model is compared with the same score of i by reference models:
those that never saw i (OUT) and those that trained on it (IN). Carlini et al. 2022 (LiRA):

  offline   (s - mu_OUT,i) / sd_OUT,i
  online    log N(s; mu_IN,i, sd_IN,i) - log N(s; mu_OUT,i, sd_OUT,i)

Two uses, one formula: the benchmark calibrates each of its models against the plan's other
models (`lira`: the scored model left out of its own reference set), and a job's score stage
calibrates its one model against a screen's reference models (`group_stats` then `offline`,
`online`). Statistics need >= 2 finite reference scores and a positive sd, else NaN.
"""

from __future__ import annotations

import math

import numpy as np

CALIBRATIONS = ("lira_off", "lira_on")  # the column prefixes of the calibrated forms
MIN_REFERENCES = 2  # reference scores an image needs for a mean and an sd


def _finish(n: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, sd ddof 1) from counts, sums and sums of squares; NaN where n < 2 or sd = 0."""
  with np.errstate(invalid="ignore", divide="ignore"):
    mean = s1 / n
    var = (s2 - n * mean**2) / (n - 1)
  sd = np.sqrt(np.maximum(var, 0.0))
  bad = (n < MIN_REFERENCES) | ~(sd > 0)
  return np.where(bad, math.nan, mean), np.where(bad, math.nan, sd)


def group_stats(s: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean [N], sd [N], n [N]) of s [M, N] over the models of `group` [M, N] (bool) with a
  finite score, per image; mean and sd NaN where fewer than 2 remain or they agree exactly."""
  ok = group & np.isfinite(s)
  v = np.where(ok, s, 0.0)
  n = ok.sum(0)
  mean, sd = _finish(n, v.sum(0), (v**2).sum(0))
  return mean, sd, n


def leave_one_out_stats(s: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, sd ddof 1) [M, N] of s over the models of `group` for each image, model m left out;
  NaN where fewer than 2 finite values remain."""
  ok = group & np.isfinite(s)
  v = np.where(ok, s, 0.0)
  return _finish(ok.sum(0)[None] - ok, v.sum(0)[None] - v, (v**2).sum(0)[None] - v**2)


def offline(s: np.ndarray, mu_out: np.ndarray, sd_out: np.ndarray) -> np.ndarray:
  """LiRA offline: (s - mu_OUT) / sd_OUT (broadcasting)."""
  return (s - mu_out) / sd_out


def online(s: np.ndarray, mu_in: np.ndarray, sd_in: np.ndarray, mu_out: np.ndarray,
           sd_out: np.ndarray) -> np.ndarray:
  """LiRA online: log N(s; mu_IN, sd_IN) - log N(s; mu_OUT, sd_OUT), the 2 pi terms cancelled."""
  return (-0.5 * ((s - mu_in) / sd_in) ** 2 - np.log(sd_in)) - (-0.5 * offline(s, mu_out, sd_out) ** 2
                                                                  - np.log(sd_out))


def lira(s: np.ndarray, IN: np.ndarray) -> dict[str, np.ndarray]:
  """Each model's score s [M, N] calibrated against the other models (IN [M, N] bool): offline
  and online forms [M, N], the scored model left out of its own reference set."""
  mo, so = leave_one_out_stats(s, ~IN)
  mi, si = leave_one_out_stats(s, IN)
  return {"lira_off": offline(s, mo, so), "lira_on": online(s, mi, si, mo, so)}
