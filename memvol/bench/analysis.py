"""The benchmark's statistics, from the models' records alone.

Arrays over models m (rows) and pool images i (columns): IN [M, N] (model m trained on
image i), c [M, N] copy counts among S samples, s [M, N] a score (higher = more memorised).

  counterfactual propensity  p_i = mean_{m: IN} c_mi / S  -  mean_{m: OUT} c_mi / S
  LiRA offline (lira_off_)   (s_mi - mu_OUT,i) / sd_OUT,i over the image's OUT models, m left out
  LiRA online (lira_on_)     log N(s_mi; mu_IN,i, sd_IN,i) - log N(s_mi; mu_OUT,i, sd_OUT,i), m left out

Tasks per score: T1 per model AUROC of IN vs OUT, and TPR at 1 % and 0.1 % FPR over all
(model, image) pairs pooled (as LiRA reports); T2 per model, among its IN images, AUROC of
copied (c >= 1) vs not; T3 Spearman over images of the score's mean over the image's IN
models with p_i; T5 the same with the mean over its OUT models (memorisation risk before
training).

The primary comparison is fixed before any run (PRIMARY): T2 AUROC of hutchinson@rank32's log
volume minus that of peer_loss, per model; the mean over the M models; a paired t-test over
models at alpha 0.01 (two-sided), with a 95 % interval from a crossed bootstrap of models and
images (stats.crossed_bootstrap_auroc_diff). Verdict: the score with the higher T2 AUROC is
better when p < alpha and the interval excludes 0; otherwise inconclusive. Everything else is
secondary and corrected together by Benjamini-Hochberg (one family): every score against
peer_loss on T1 and T2 (paired t over models) and on T3 and T5 (paired bootstrap over images
of the Spearman difference), and every score's T5 Spearman against 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from memvol import calibrate, report, stats

PRIMARY = {"a": "hutchinson@rank32_log_volume", "b": "peer_loss", "task": "T2_auroc", "alpha": 0.01,
           "test": "paired t over models (two-sided)", "interval": "95 % crossed bootstrap of models and images"}
BASELINE = PRIMARY["b"]  # every secondary comparison is against the score a researcher tries first
CALIBRATIONS = calibrate.CALIBRATIONS
FPRS = (0.01, 0.001)
CI_TARGET = 0.05  # the primary interval's wanted half-width (the power calculation)


def arrays(records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(IN [M, N] bool, c [M, N], {score: [M, N]}) of the records, in their order."""
  names = records[0]["score_order"]
  IN = np.array([r["in_mask"] for r in records], bool)
  c = np.array([r["c"] for r in records], np.float64)
  return IN, c, {n: np.array([np.asarray(r["scores"][n], np.float64) for r in records]) for n in names}


def propensity(IN: np.ndarray, c: np.ndarray, num_samples: int) -> dict[str, np.ndarray]:
  """Per image: in_rate, out_rate (mean copy rate over its IN / OUT models) and p = their
  difference (NaN where the image has no IN or no OUT model)."""
  rate = c / float(num_samples)
  with np.errstate(invalid="ignore", divide="ignore"):
    in_rate = (rate * IN).sum(0) / IN.sum(0)
    out_rate = (rate * ~IN).sum(0) / (~IN).sum(0)
  return {"in_rate": in_rate, "out_rate": out_rate, "p": in_rate - out_rate}


lira = calibrate.lira  # LiRA's per-example calibration from the other models, one model left out


def all_scores(raw: dict[str, np.ndarray], IN: np.ndarray) -> dict[str, np.ndarray]:
  """The raw scores, then each one's LiRA offline and online forms."""
  out = dict(raw)
  for n, s in raw.items():
    for k, v in lira(s, IN).items():
      out[f"{k}_{n}"] = v
  return out


def _auroc_or_nan(pos: np.ndarray, neg: np.ndarray) -> float:
  pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
  return stats.auroc(pos, neg) if pos.size and neg.size else math.nan


def per_model(s: np.ndarray, IN: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
  """T1_auroc [M] (IN vs OUT) and T2_auroc [M] (copied vs not among IN) of one score."""
  t1 = np.array([_auroc_or_nan(s[m][IN[m]], s[m][~IN[m]]) for m in range(len(s))])
  t2 = np.array([_auroc_or_nan(s[m][IN[m] & (c[m] > 0)], s[m][IN[m] & (c[m] == 0)]) for m in range(len(s))])
  return {"T1_auroc": t1, "T2_auroc": t2}


def _mean_over(s: np.ndarray, group: np.ndarray) -> np.ndarray:
  ok = group & np.isfinite(s)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(ok, s, 0.0).sum(0) / ok.sum(0)


def task_table(scores: dict[str, np.ndarray], IN: np.ndarray, c: np.ndarray, p: np.ndarray) -> dict[str, Any]:
  """Per score: per-model T1 / T2 AUROCs, pooled TPRs, T3 / T5 Spearman with p."""
  out = {}
  for n, s in scores.items():
    pm = per_model(s, IN, c)
    pos, neg = s[IN], s[~IN]
    pos, neg = pos[np.isfinite(pos)], neg[np.isfinite(neg)]
    row: dict[str, Any] = {k: v for k, v in pm.items()}
    for f in FPRS:
      row[f"T1_tpr@{f:g}"] = stats.tpr_at_fpr(pos, neg, f) if pos.size and neg.size else math.nan
    for task, group in (("T3", IN), ("T5", ~IN)):
      row[f"{task}_mean_score"] = _mean_over(s, group)
      rho, pv, _ = stats.spearman(row[f"{task}_mean_score"], p)
      row[f"{task}_spearman"], row[f"{task}_p"] = rho, pv
    out[n] = row
  return out


def primary_units(a: np.ndarray, b: np.ndarray, IN: np.ndarray, c: np.ndarray
                  ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Per model with both groups: (copied IN image indices, not-copied IN image indices,
  auroc_kernel(a) - auroc_kernel(b)) on the images where both scores are finite."""
  units = []
  for m in range(len(a)):
    ok = IN[m] & np.isfinite(a[m]) & np.isfinite(b[m])
    pos, neg = np.flatnonzero(ok & (c[m] > 0)), np.flatnonzero(ok & (c[m] == 0))
    if pos.size and neg.size:
      units.append((pos, neg, stats.auroc_kernel(a[m][pos], a[m][neg]) - stats.auroc_kernel(b[m][pos], b[m][neg])))
  return units


def primary_test(table: dict[str, Any], scores: dict[str, np.ndarray], IN: np.ndarray, c: np.ndarray,
                 num_bootstrap: int, seed: int = 0) -> dict[str, Any]:
  """The pre-registered comparison (PRIMARY): per-model differences, paired t, crossed
  bootstrap interval, verdict, the models a +-CI_TARGET t interval would need, and the sd of
  the two one-way bootstraps (models only, images only): the images' part of the crossed
  interval is what more models cannot shrink; a larger pool can."""
  a, b = PRIMARY["a"], PRIMARY["b"]
  out: dict[str, Any] = dict(PRIMARY)
  if a not in scores or b not in scores:
    return out | {"verdict": f"not run: the plan does not score {a} and {b}"}
  d = table[a]["T2_auroc"] - table[b]["T2_auroc"]
  t = stats.paired_t(d)
  units = primary_units(scores[a], scores[b], IN, c)
  nan = {"ci_lo": math.nan, "ci_hi": math.nan, "sd": math.nan}
  boot, by_models, by_images = ((stats.crossed_bootstrap_auroc_diff(units, IN.shape[1], num_bootstrap, seed=seed, **kw)
                                 if len(units) > 1 else nan)
                                for kw in ({}, {"images": False}, {"models": False}))
  lo, hi = boot["ci_lo"], boot["ci_hi"]
  better = "volume" if t["mean"] > 0 else "loss"
  decided = t["p"] < PRIMARY["alpha"] and (lo > 0 or hi < 0) and (lo > 0) == (t["mean"] > 0)
  verdict = (f"{better} better" if decided else
             "inconclusive" + (" (the interval includes 0)" if lo <= 0 <= hi else f" (p >= {PRIMARY['alpha']:g})"))
  need = math.ceil((1.96 * t["sd"] / CI_TARGET) ** 2) if math.isfinite(t["sd"]) else math.nan
  why = (f"{t['n']} model(s) with both copied and uncopied IN images: no paired test" if t["n"] < 2
         else "the per-model differences have no spread")
  t, boot_sd, lo, hi, need, sd_m, sd_i = (_named(v, why) for v in (t, boot["sd"], lo, hi, need, by_models["sd"],
                                                                     by_images["sd"]))
  return out | {"per_model": [_named(float(v), "no copied or no uncopied IN image in this model") for v in d],
                "mean": t["mean"], "sd": t["sd"], "n": t["n"], "t": t["t"], "p": t["p"],
                "t_ci": [t["ci_lo"], t["ci_hi"]], "boot_ci": [lo, hi], "boot_sd": boot_sd, "verdict": verdict,
                "models_for_target": need, "target_half_width": CI_TARGET, "boot_sd_models_only": sd_m,
                "boot_sd_images_only": sd_i,
                "positives": [int(((c[m] > 0) & IN[m]).sum()) for m in range(len(c))],
                "negatives": [int(((c[m] == 0) & IN[m]).sum()) for m in range(len(c))]}


def secondary_tests(table: dict[str, Any], p: np.ndarray, num_bootstrap: int) -> list[dict[str, Any]]:
  """The secondary family (module doc), with Benjamini-Hochberg q over all of it."""
  tests = []
  base = table.get(BASELINE)
  for n, row in table.items():
    if base is not None and n != BASELINE:
      for task in ("T1_auroc", "T2_auroc"):
        if task == PRIMARY["task"] and n == PRIMARY["a"]:
          continue  # the primary comparison is tested on its own
        t = stats.paired_t(row[task] - base[task])
        tests.append({"score": n, "vs": BASELINE, "task": task, "diff": t["mean"], "n": t["n"], "p": t["p"],
                      "test": "paired t over models"})
      for task in ("T3", "T5"):
        ok = np.isfinite(row[f"{task}_mean_score"]) & np.isfinite(base[f"{task}_mean_score"]) & np.isfinite(p)
        if ok.sum() >= 3:
          r = stats.spearman_diff_boot(row[f"{task}_mean_score"][ok], base[f"{task}_mean_score"][ok], p[ok],
                                       num_bootstrap)
          tests.append({"score": n, "vs": BASELINE, "task": f"{task}_spearman", "diff": r["diff"], "n": int(ok.sum()),
                        "p": r["p"], "test": "paired bootstrap over images"})
    tests.append({"score": n, "vs": "0", "task": "T5_spearman", "diff": row["T5_spearman"], "n": int(np.isfinite(p).sum()),
                  "p": row["T5_p"], "test": "Spearman rho = 0"})
  q = stats.benjamini_hochberg([t["p"] for t in tests])
  for t, v in zip(tests, q):
    t["q"] = v
    for k in ("p", "q", "diff"):
      if not math.isfinite(t[k]):
        t[k] = report.not_estimated("no test: too few models or images, or no spread")
  return tests


def _named(v: Any, reason: str) -> Any:
  """v with its NaNs (a float, or a dict's float values) as NotEstimated for `reason`."""
  if isinstance(v, dict):
    return {k: _named(x, reason) for k, x in v.items()}
  return report.not_estimated(reason) if isinstance(v, float) and not math.isfinite(v) else v


def _named_list(v: np.ndarray, reason: str) -> list[float]:
  return [_named(float(x), reason) for x in v]


def _ms(v: np.ndarray) -> dict[str, Any]:
  a = np.asarray(v, np.float64)
  a = a[np.isfinite(a)]
  if not a.size:
    return {"mean": report.not_estimated("no model has a finite value"), "sd": report.not_estimated("no value"), "n": 0}
  return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if a.size > 1 else report.not_estimated("one model"),
          "n": int(a.size)}


def pareto(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Indices of the points no other point beats in both (lower x, higher y), by x."""
  order = np.lexsort((-y, x))
  front, best = [], -np.inf
  for i in order:
    if y[i] > best:
      front.append(i)
      best = y[i]
  return np.asarray(front, np.int64)


def raw_of(name: str) -> str:
  """The raw score a (possibly calibrated) score is computed from."""
  for k in CALIBRATIONS:
    if name.startswith(f"{k}_"):
      return name[len(k) + 1:]
  return name


def is_volume(name: str) -> bool:
  return not raw_of(name).startswith("peer_")


def summarise(records: list[dict[str, Any]], choice: dict[str, Any], num_models: int,
              num_bootstrap: int) -> dict[str, Any]:
  """summary.json's content (NaN / NotEstimated still in it) from the finished models' records."""
  IN, c, raw = arrays(records)
  S = int(records[0]["num_samples"])
  prop = propensity(IN, c, S)
  scores = all_scores(raw, IN)
  table = task_table(scores, IN, c, prop["p"])
  primary = primary_test(table, scores, IN, c, num_bootstrap)
  tests = secondary_tests(table, prop["p"], num_bootstrap)
  costs = {n: {k: _ms([r["costs"][raw_of(n)][k] for r in records]) for k in ("passes_per_image", "seconds_per_image")}
           for n in scores}
  board = {}
  for n in scores:
    row = table[n]
    q2 = next((t["q"] for t in tests if t["score"] == n and t["task"] == "T2_auroc"),
              report.not_estimated("the baseline itself" if n == BASELINE else "the primary comparison, tested on its own"))
    q5 = next(t["q"] for t in tests if t["score"] == n and t["task"] == "T5_spearman" and t["vs"] == "0")
    board[n] = _named({"T1_auroc": _ms(row["T1_auroc"]), **{f"T1_tpr@{f:g}": row[f"T1_tpr@{f:g}"] for f in FPRS},
                       "T2_auroc": _ms(row["T2_auroc"]), "T2_q_vs_baseline": q2, "T3_spearman": row["T3_spearman"],
                       "T5_spearman": row["T5_spearman"], "T5_q_vs_0": q5, **costs[n]},
                      "undefined on these data (no finite score, no copies, or a constant column)")
  names = list(scores)
  ok = [n for n in names if math.isfinite(board[n]["T2_auroc"]["mean"])]
  priced = [n for n in ok if raw_of(n) == n and math.isfinite(board[n]["passes_per_image"]["mean"])]
  front = [priced[i] for i in pareto(np.array([board[n]["passes_per_image"]["mean"] for n in priced]),
                                     np.array([board[n]["T2_auroc"]["mean"] for n in priced]))] if priced else []
  sec = {k: _ms([r["seconds"].get(k, math.nan) for r in records]) for k in ("train", "sample", "score", "detect", "total")}
  share = _ms([r["compile_seconds"] / r["seconds"]["total"] for r in records])
  return {"models_done": [r["model"] for r in records], "num_models_planned": int(num_models),
          "complete": len(records) == int(num_models), "pool_size": int(IN.shape[1]), "num_samples": S,
          "num_bootstrap": int(num_bootstrap),
          "choice": choice, "scores": names, "primary": primary, "leaderboard": board,
          "ranking_T2": sorted(ok, key=lambda n: -board[n]["T2_auroc"]["mean"]), "front_T2": front,
          "secondary": tests, "num_secondary": int(sum(math.isfinite(t["p"]) for t in tests)),
          "correction": "Benjamini-Hochberg over the whole secondary family",
          "copies": {"IN_rate": float(c[IN].mean() / S), "OUT_rate": float(c[~IN].mean() / S),
                     "IN_share_copied": _ms([(c[m][IN[m]] > 0).mean() for m in range(len(c))]),
                     "OUT_share_copied": _ms([(c[m][~IN[m]] > 0).mean() for m in range(len(c))])},
          "propensity": {k: _named_list(v, "no IN or no OUT model of this image has a record") for k, v in prop.items()},
          "mean_scores": {n: {k: _named_list(table[n][f"{k}_mean_score"], "no finite score of this image") for k in ("T3", "T5")}
                          for n in (PRIMARY["a"], PRIMARY["b"]) if n in table},
          "seconds_per_model": sec, "compile_share": share}
