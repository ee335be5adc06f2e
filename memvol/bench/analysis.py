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

Copy labels (LABELS): the tasks T2 / T3 / T5 and p_i are computed under three of them, from
the records' sample-level data (model.sample_level; records without it give the ratio label
only):
  ratio     a sample copies its nearest pool image NN1 when d1 / d2 < 1/3 (memvol's, DiffMemorize's);
            c_mi = such samples of model m whose NN1 is i; p_i as above.
  absolute  ... when d1 < tau, tau = the (floor(0.001 n) + 1)-th smallest of the n distances from
            an OUT (model, image) pair's image to that model's closest sample, pooled over models:
            at most 0.1 % of OUT pairs are copied (the criterion's false positives). p_i as above.
  closest   graded: p_i = mean over the image's OUT models of the distance from the image to the
            model's closest sample minus the mean over its IN models (how much closer a model
            comes by training on it); for T2, model m "copies" the IN images whose closest-sample
            distance is below the median over its IN images.

Three co-primary tests, fixed before any run (PRIMARIES), all on the ratio label, Holm over
the three at family alpha 0.01, each with a 95 % interval:
  P1 (replication) T2 AUROC of hutchinson@rank32 minus peer_loss: per model, the mean over
     models, paired t over models, crossed models x images bootstrap interval;
  P2 (the paper's claim, counterfactually) T3 Spearman of raw hutchinson@rank32 (mean over an
     image's IN models) with p_i against 0: image-bootstrap interval, permutation p;
  P3 (does calibration find the copies) T2 AUROC of lira_off_hutchinson@rank32 minus raw
     hutchinson@rank32, as P1.
Verdict per test: positive (the estimate > 0) or negative (< 0) when its Holm-adjusted p is
below alpha and its interval excludes 0 on the same side; else inconclusive. Beside each, the
sign of its estimate under the other labels (not tested). Everything else is secondary and
corrected together by Benjamini-Hochberg (one family): on the ratio label every score against
peer_loss on T1 and T2 (paired t over models) and on T3 and T5 (paired bootstrap over images
of the Spearman difference), and every score's T5 Spearman against 0; on the other labels every
raw score's T3 and T5 Spearman against 0; every data-only predictor's Spearman with p_i under
each label; every raw score's typicality share (Spearman over images of its IN-model mean with
its OUT-model mean) against 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from memvol import calibrate, report, stats

RANK32 = "hutchinson@rank32_log_volume"
BASELINE = "peer_loss"  # every secondary comparison is against the score a researcher tries first
CALIBRATIONS = calibrate.CALIBRATIONS
FAMILY = {"alpha": 0.01, "correction": "Holm", "label": "ratio", "level": 0.95}
PRIMARIES = (
    {"id": "P1", "name": "replication", "task": "T2_auroc", "a": RANK32, "b": BASELINE,
     "test": "paired t over models (two-sided)", "interval": "95 % crossed bootstrap of models and images"},
    {"id": "P2", "name": "the paper's claim, counterfactually", "task": "T3_spearman", "a": RANK32, "b": "0",
     "test": "permutation test over images (two-sided)", "interval": "95 % bootstrap over images"},
    {"id": "P3", "name": "does calibration find the copies", "task": "T2_auroc", "a": f"lira_off_{RANK32}", "b": RANK32,
     "test": "paired t over models (two-sided)", "interval": "95 % crossed bootstrap of models and images"},
)
LABELS = ("ratio", "absolute", "closest")
ABSOLUTE_FPR = 0.001  # the absolute label's share of OUT (model, image) pairs copied
FPRS = (0.01, 0.001)
CI_TARGET = 0.05  # the P1 / P3 interval's wanted half-width (the power calculation)
NUM_PERMUTATIONS = 10_000


def raw_needed() -> tuple[str, ...]:
  """The raw score columns the co-primary tests read."""
  return tuple(sorted({raw_of(n) for pr in PRIMARIES for n in (pr["a"], pr["b"]) if n != "0"}))


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


def t2_diff_test(a: str, b: str, table: dict[str, Any], scores: dict[str, np.ndarray], IN: np.ndarray,
                 c: np.ndarray, num_bootstrap: int, seed: int = 0) -> dict[str, Any]:
  """T2 AUROC of a minus b per model: paired t over models, crossed bootstrap interval, the
  models a +-CI_TARGET t interval would need, and the sd of the two one-way bootstraps
  (models only, images only): the images' part of the crossed interval is what more models
  cannot shrink; a larger pool can. NaN (not NotEstimated) where undefined."""
  d = table[a]["T2_auroc"] - table[b]["T2_auroc"]
  t = stats.paired_t(d)
  units = primary_units(scores[a], scores[b], IN, c)
  nan = {"ci_lo": math.nan, "ci_hi": math.nan, "sd": math.nan}
  boot, by_models, by_images = ((stats.crossed_bootstrap_auroc_diff(units, IN.shape[1], num_bootstrap, seed=seed, **kw)
                                 if len(units) > 1 else nan)
                                for kw in ({}, {"images": False}, {"models": False}))
  need = math.ceil((1.96 * t["sd"] / CI_TARGET) ** 2) if math.isfinite(t["sd"]) else math.nan
  return {"estimate": t["mean"], "per_model": d, "sd": t["sd"], "n": t["n"], "t": t["t"], "p": t["p"],
          "t_ci": [t["ci_lo"], t["ci_hi"]], "ci": [boot["ci_lo"], boot["ci_hi"]], "boot_sd": boot["sd"],
          "boot_sd_models_only": by_models["sd"], "boot_sd_images_only": by_images["sd"],
          "models_for_target": need, "target_half_width": CI_TARGET,
          "positives": [int(((c[m] > 0) & IN[m]).sum()) for m in range(len(c))],
          "negatives": [int(((c[m] == 0) & IN[m]).sum()) for m in range(len(c))]}


def t3_test(a: str, table: dict[str, Any], p: np.ndarray, num_bootstrap: int, seed: int = 0) -> dict[str, Any]:
  """T3 Spearman of a with p against 0: image-bootstrap interval, permutation p."""
  r = stats.spearman_boot_perm(table[a]["T3_mean_score"], p, num_bootstrap, NUM_PERMUTATIONS, seed=seed)
  return {"estimate": r["rho"], "n": r["n"], "p": r["p"], "ci": [r["ci_lo"], r["ci_hi"]]}


def verdict(estimate: float, p_holm: float, ci: list[float], alpha: float) -> str:
  """positive / negative when p_holm < alpha and the interval excludes 0 on the estimate's
  side; else inconclusive (with the reason)."""
  lo, hi = ci
  if not (math.isfinite(estimate) and math.isfinite(p_holm)):
    return "inconclusive (no test: too few models, copies or images)"
  if p_holm < alpha and (lo > 0 or hi < 0) and (lo > 0) == (estimate > 0):
    return "positive" if estimate > 0 else "negative"
  return "inconclusive" + (" (the interval includes 0)" if lo <= 0 <= hi else f" (Holm p >= {alpha:g})")


def primary_family(by_label: dict[str, dict[str, Any]], scores: dict[str, np.ndarray], IN: np.ndarray,
                   num_bootstrap: int, seed: int = 0) -> dict[str, Any]:
  """The co-primary tests (PRIMARIES) on FAMILY's label with Holm's correction and a verdict
  each, and the sign of each estimate under the other labels present."""
  tests = []
  for pr in PRIMARIES:
    need = [n for n in (pr["a"], pr["b"]) if n != "0"]
    if any(n not in scores for n in need):
      tests.append(dict(pr) | {"estimate": math.nan, "p": math.nan, "ci": [math.nan, math.nan],
                               "missing": f"the plan does not score {' and '.join(need)}"})
      continue
    lab = by_label[FAMILY["label"]]
    r = (t2_diff_test(pr["a"], pr["b"], lab["table"], scores, IN, lab["c"], num_bootstrap, seed)
         if pr["task"] == "T2_auroc" else t3_test(pr["a"], lab["table"], lab["p"], num_bootstrap, seed))
    other = {}
    for name, lb in by_label.items():
      if name != FAMILY["label"]:
        t = lb["table"]
        other[name] = (float(np.nanmean(t[pr["a"]]["T2_auroc"] - t[pr["b"]]["T2_auroc"]))
                       if pr["task"] == "T2_auroc" else t[pr["a"]]["T3_spearman"])
    tests.append(dict(pr) | r | {"other_labels": other})
  holm = stats.holm([t["p"] for t in tests])
  for t, ph in zip(tests, holm):
    t["p_holm"] = ph
    t["verdict"] = (f"not run: {t['missing']}" if "missing" in t
                    else verdict(t["estimate"], ph, t["ci"], FAMILY["alpha"]))
    t["keeps_sign"] = {k: bool(np.sign(v) == np.sign(t["estimate"])) if math.isfinite(v) and math.isfinite(t["estimate"])
                       else report.not_estimated("the estimate is undefined under this label or the ratio one")
                       for k, v in t.get("other_labels", {}).items()}
  return dict(FAMILY) | {"tests": tests}


def secondary_tests(by_label: dict[str, dict[str, Any]], typical: dict[str, dict[str, float]],
                    predictors: dict[str, dict[str, Any]], num_bootstrap: int) -> list[dict[str, Any]]:
  """The secondary family (module doc), with Benjamini-Hochberg q over all of it."""
  tests = []
  ratio = by_label["ratio"]
  table, p = ratio["table"], ratio["p"]
  base = table.get(BASELINE)
  skip = {(pr["a"], pr["task"]) for pr in PRIMARIES if pr["b"] == BASELINE}  # tested as co-primaries
  for n, row in table.items():
    if base is not None and n != BASELINE:
      for task in ("T1_auroc", "T2_auroc"):
        if (n, task) in skip:
          continue
        t = stats.paired_t(row[task] - base[task])
        tests.append({"label": "ratio", "score": n, "vs": BASELINE, "task": task, "diff": t["mean"], "n": t["n"],
                      "p": t["p"], "test": "paired t over models"})
      for task in ("T3", "T5"):
        ok = np.isfinite(row[f"{task}_mean_score"]) & np.isfinite(base[f"{task}_mean_score"]) & np.isfinite(p)
        if ok.sum() >= 3:
          r = stats.spearman_diff_boot(row[f"{task}_mean_score"][ok], base[f"{task}_mean_score"][ok], p[ok],
                                       num_bootstrap)
          tests.append({"label": "ratio", "score": n, "vs": BASELINE, "task": f"{task}_spearman", "diff": r["diff"],
                        "n": int(ok.sum()), "p": r["p"], "test": "paired bootstrap over images"})
    tests.append({"label": "ratio", "score": n, "vs": "0", "task": "T5_spearman", "diff": row["T5_spearman"],
                  "n": int(np.isfinite(p).sum()), "p": row["T5_p"], "test": "Spearman rho = 0"})
  for label, lb in by_label.items():
    if label != "ratio":
      for n, row in lb["table"].items():
        if raw_of(n) == n:
          tests += [{"label": label, "score": n, "vs": "0", "task": f"{task}_spearman", "diff": row[f"{task}_spearman"],
                     "n": int(np.isfinite(lb["p"]).sum()), "p": row[f"{task}_p"], "test": "Spearman rho = 0"}
                    for task in ("T3", "T5")]
    for name, r in predictors.get(label, {}).get("rows", {}).items():
      tests.append({"label": label, "score": name, "vs": "0", "task": "predictor_spearman", "diff": r["rho_p"],
                    "n": r["n"], "p": r["p"], "test": "Spearman rho = 0"})
  for n, r in typical.items():
    if raw_of(n) == n:
      tests.append({"label": "any", "score": n, "vs": "0", "task": "typicality_spearman", "diff": r["rho"], "n": r["n"],
                    "p": r["p"], "test": "Spearman rho = 0"})
  q = stats.benjamini_hochberg([t["p"] for t in tests])
  for t, v in zip(tests, q):
    t["q"] = v
    for k in ("p", "q", "diff"):
      if not math.isfinite(t[k]):
        t[k] = report.not_estimated("no test: too few models or images, or no spread")
  return tests


# --- copy labels, typicality, data-only predictors --------------------------------------


def sample_data(records: list[dict[str, Any]]) -> dict[str, np.ndarray] | None:
  """{nn_index [M, S, 2], nn_dist [M, S, 2], closest [M, N]} of the records' sample-level data,
  None unless every record has it."""
  if not records or not all("nn_index" in r for r in records):
    return None
  return {"nn_index": np.array([r["nn_index"] for r in records], np.int64),
          "nn_dist": np.array([r["nn_dist"] for r in records], np.float64),
          "closest": np.array([r["closest_dist"] for r in records], np.float64)}


def absolute_tau(closest: np.ndarray, IN: np.ndarray, fpr: float = ABSOLUTE_FPR) -> float:
  """The absolute label's radius: the (floor(fpr n) + 1)-th smallest of the n OUT pairs'
  closest-sample distances, so that at most a share fpr of OUT pairs has a sample within it."""
  out = np.sort(closest[~IN & np.isfinite(closest)])
  return float(out[min(int(math.floor(fpr * out.size)), out.size - 1)])


def labels(IN: np.ndarray, c: np.ndarray, num_samples: int, sample: dict[str, np.ndarray] | None
           ) -> dict[str, dict[str, Any]]:
  """Per copy label (module doc): c [M, N] (T2's copied = c > 0 among IN), p [N], and how."""
  out = {"ratio": {"c": c, "p": propensity(IN, c, num_samples)["p"],
                   "how": "a sample copies its nearest pool image when d1 / d2 < 1/3; p_i = IN copy rate - OUT rate"}}
  if sample is None:
    return out
  idx, d, closest = sample["nn_index"][..., 0], sample["nn_dist"][..., 0], sample["closest"]
  tau = absolute_tau(closest, IN)
  c_abs = np.array([np.bincount(idx[m][d[m] < tau], minlength=IN.shape[1]) for m in range(len(IN))], np.float64)
  out["absolute"] = {"c": c_abs, "p": propensity(IN, c_abs, num_samples)["p"], "tau": tau,
                     "how": (f"a sample copies its nearest pool image when d1 < tau = {tau:.4g}, the radius within "
                             f"which at most {ABSOLUTE_FPR:.1%} of OUT (model, image) pairs have a sample; "
                             "p_i = IN copy rate - OUT rate")}
  med = np.array([np.median(closest[m][IN[m]]) for m in range(len(IN))])
  out["closest"] = {"c": (closest < med[:, None]).astype(np.float64), "p": _mean_over(closest, ~IN) - _mean_over(closest, IN),
                    "how": ("p_i = mean over OUT models of the image's distance to the closest sample minus the mean "
                            "over IN models; T2's copied: the IN images closer than the model's median IN image")}
  return out


def typicality(table: dict[str, Any]) -> dict[str, dict[str, float]]:
  """Per score: Spearman over images of its IN-model mean with its OUT-model mean (how much of
  a score is a property of the image, whoever trained on it)."""
  out = {}
  for n, row in table.items():
    rho, pv, k = stats.spearman(row["T3_mean_score"], row["T5_mean_score"])
    out[n] = {"rho": rho, "p": pv, "n": k}
  return out


def predictor_table(pool: dict[str, np.ndarray], table: dict[str, Any], p: np.ndarray) -> dict[str, Any]:
  """Each data-only predictor's Spearman with p_i and with the OUT-model mean of the raw
  score whose T5 |rho| is largest (the best OUT-model score under this label)."""
  raw = [n for n in table if raw_of(n) == n and math.isfinite(table[n]["T5_spearman"])]
  best = max(raw, key=lambda n: abs(table[n]["T5_spearman"])) if raw else None
  rows = {}
  for name, v in pool.items():
    rho, pv, k = stats.spearman(v, p)
    rows[name] = {"rho_p": rho, "p": pv, "n": k,
                  "rho_best_out": stats.spearman(v, table[best]["T5_mean_score"])[0] if best else math.nan}
  return {"best_out_score": best or report.not_estimated("no raw score has a finite T5 Spearman under this label"),
          "best_out_rho": table[best]["T5_spearman"] if best else math.nan, "rows": rows}


def holds_under_all(by_label: dict[str, dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
  """Per score and task (T3, T5): its Spearman's sign under each label and whether all agree."""
  out = {}
  for n in names:
    for task in ("T3", "T5"):
      signs = {k: float(np.sign(lb["table"][n][f"{task}_spearman"])) for k, lb in by_label.items()}
      if all(math.isfinite(v) for v in signs.values()):
        out[f"{n}:{task}"] = {"score": n, "task": task, "signs": signs, "agree": len(set(signs.values())) == 1}
  return out


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


def _clean_primary(fam: dict[str, Any]) -> dict[str, Any]:
  """The co-primary family with arrays as lists and NaNs named."""
  tests = []
  for t in fam["tests"]:
    t = dict(t)
    why = t.get("missing") or "too few models with copied and uncopied IN images, or no spread"
    if "per_model" in t:
      t["per_model"] = _named_list(t["per_model"], "no copied or no uncopied IN image in this model")
    tests.append({k: (v if k == "per_model" else _named(v, why) if not isinstance(v, list)
                      else [_named(float(x), why) for x in v] if k in ("ci", "t_ci") else v) for k, v in t.items()})
  return fam | {"tests": tests}


def summarise(records: list[dict[str, Any]], choice: dict[str, Any], num_models: int,
              num_bootstrap: int, pool: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
  """summary.json's content (NaN / NotEstimated still in it) from the finished models' records
  and, when given, the pool's data-only predictors (bench.pool.load)."""
  IN, c, raw = arrays(records)
  S = int(records[0]["num_samples"])
  choice = choice | {"r_med": _named(float(choice.get("r_med") if choice.get("r_med") is not None else math.nan),
                                     "the chosen pilot cell copied no IN image")}
  prop = propensity(IN, c, S)
  scores = all_scores(raw, IN)
  by_label = labels(IN, c, S, sample_data(records))
  for lb in by_label.values():
    lb["table"] = task_table(scores, IN, lb["c"], lb["p"])
  table = by_label["ratio"]["table"]
  primary = _clean_primary(primary_family(by_label, scores, IN, num_bootstrap))
  typical = typicality(table)
  preds = {k: predictor_table(pool, lb["table"], lb["p"]) for k, lb in by_label.items()} if pool else {}
  tests = secondary_tests(by_label, typical, preds, num_bootstrap)
  costs = {n: {k: _ms([r["costs"][raw_of(n)][k] for r in records]) for k in ("passes_per_image", "seconds_per_image")}
           for n in scores}
  board = {}
  for n in scores:
    row = table[n]
    mine = [t for t in tests if t["label"] == "ratio" and t["score"] == n]
    q2 = next((t["q"] for t in mine if t["task"] == "T2_auroc"),
              report.not_estimated("the baseline itself" if n == BASELINE else "a co-primary test, tested on its own"))
    q5 = next(t["q"] for t in mine if t["task"] == "T5_spearman" and t["vs"] == "0")
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
  undefined = "undefined on these data (no finite score, no copies, or a constant column)"
  by_label_out = {k: {"how": lb["how"], **({"tau": lb["tau"]} if "tau" in lb else {}),
                      "p": _named_list(lb["p"], "no IN or no OUT model of this image has a record"),
                      "scores": {n: _named({"T2_auroc": _ms(lb["table"][n]["T2_auroc"])["mean"],
                                            "T3_spearman": lb["table"][n]["T3_spearman"],
                                            "T5_spearman": lb["table"][n]["T5_spearman"]}, undefined) for n in names}}
                  for k, lb in by_label.items()}
  leading = [n for n in (RANK32, BASELINE, f"lira_off_{RANK32}") if n in table]
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
          "labels": by_label_out, "label_names": list(by_label),
          "label_rho": {f"{a}-{b}": _named(stats.spearman(by_label[a]["p"], by_label[b]["p"])[0], undefined)
                        for i, a in enumerate(by_label) for b in list(by_label)[i + 1:]},
          "typicality": {n: _named(v, undefined) for n, v in typical.items()},
          "predictors": {k: _named(v, "undefined on these data (a constant predictor or propensity)")
                         for k, v in preds.items()},
          "predictor_values": {k: _named_list(v, "no same-class neighbour") for k, v in (pool or {}).items()},
          "holds_under_all": holds_under_all(by_label, [n for n in names if raw_of(n) == n or n.startswith("lira_off_")]),
          "propensity": {k: _named_list(v, "no IN or no OUT model of this image has a record") for k, v in prop.items()},
          "mean_scores": {n: {k: _named_list(table[n][f"{k}_mean_score"], "no finite score of this image") for k in ("T3", "T5")}
                          for n in leading},
          "sampler": records[0].get("sampler") or report.not_estimated("records made before they named their sampler"),
          "seconds_per_model": sec, "compile_share": share,
          "seconds_total": {"models": float(sum(r["seconds"]["total"] for r in records)),
                            "pilots": float(sum(p["train_seconds"] + sum(g["seconds"] for g in p["grid"])
                                                for p in choice.get("pilots", [])))}}
