"""The statistics of the report's comparisons: the groups of each claim, memvol.stats.compare
on them (or the reason it cannot run), per-class results, the headline claims and the
per-window tests of the profile."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from memvol import stats
from memvol.report.tables import expected_nan

ALPHA = 0.01                                   # significance level the claims are judged at


COMPARISONS = (  # key, positive group, negative group
    ("trained_vs_heldout", "trained", "held-out"),
    ("memorised_vs_not", "memorised", "not memorised (train)"),
    ("duplicates_vs_singletons", "planted duplicates", "singletons (train)"),
    ("carlini_vs_not", "copied (Carlini)", "not copied (Carlini, train)"),
    ("memorised_vs_not_singletons", "memorised singletons", "not memorised singletons"),
)


PEER_COMPARISONS = ("trained_vs_heldout", "memorised_vs_not", "duplicates_vs_singletons",
                    "memorised_vs_not_singletons")  # the comparisons of the peers tables


def rank_correlation(v: np.ndarray, x: np.ndarray, what: str) -> dict[str, Any]:
  """stats.spearman as {rho, p, n}, its NaN marked expected when the data cannot give it."""
  rho, p, n = stats.spearman(v, x)
  out = {"rho": rho, "p": p, "n": n}
  keep = np.isfinite(v) & np.isfinite(x)
  if n < 3:
    expected_nan(out, ("rho", "p"), "fewer than 3 images with a finite score")
  elif np.ptp(x[keep]) == 0:
    expected_nan(out, ("rho", "p"), f"{what} is the same for every training image")
  elif np.ptp(v[keep]) == 0:
    expected_nan(out, ("rho", "p"), "the score is the same for every training image")
  return out


def compare_or_reason(pos: np.ndarray, neg: np.ndarray, names: tuple[str, str], rc) -> dict[str, Any]:
  """stats.compare, or {'available': False, 'reason': ...} when a group is empty."""
  for vals, name in ((pos, names[0]), (neg, names[1])):
    if vals.size == 0:
      return {"available": False, "reason": f"the group '{name}' is empty"}
    if np.isfinite(vals).sum() == 0:
      return {"available": False, "reason": f"no image of the group '{name}' has a finite score"}
  out = stats.compare(pos, neg, num_bootstrap=int(rc.num_bootstrap), seed=int(rc.bootstrap_seed),
                      fpr=float(rc.fpr), alternative=str(rc.alternative))
  out["available"] = True
  out["supported"] = bool(out["mean_diff"] > 0 and out["welch_p"] < ALPHA)
  if min(out["n_pos"], out["n_neg"]) < 2:
    expected_nan(out, ("welch_t", "welch_p", "std_pos", "std_neg", "cohens_d", "hedges_g"),
                  "a group has fewer than 2 finite values")
  return out


def comparison_groups(v: np.ndarray, is_train: np.ndarray, det: dict[str, np.ndarray]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """(positive, negative) score groups of every comparison in COMPARISONS. v: per scored
  image; det: detect columns aligned to the training rows (v[is_train])."""
  vt, vh = v[is_train], v[~is_train]
  mem = det["copies_ratio"] > 0
  car = det["copies_carlini"] > 0
  dup = det["dup_count"] > 1
  return {
      "trained_vs_heldout": (vt, vh),
      "memorised_vs_not": (vt[mem], vt[~mem]),
      "duplicates_vs_singletons": (vt[dup], vt[~dup]),
      "carlini_vs_not": (vt[car], vt[~car]),
      "memorised_vs_not_singletons": (vt[mem & ~dup], vt[~mem & ~dup]),
  }


def comparison_groups_all(scorers: dict[str, np.ndarray], is_train: np.ndarray, det: dict[str, np.ndarray],
                          key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  return {name: comparison_groups(v, is_train, det)[key] for name, v in scorers.items()}


def estimator_stats(v: np.ndarray, is_train: np.ndarray, det: dict[str, np.ndarray],
                    labels: np.ndarray, rc) -> dict[str, Any]:
  """All comparisons for one estimator. v, is_train, labels: per scored image; det: detect
  columns aligned to the training rows (v[is_train])."""
  vt = v[is_train]
  groups = comparison_groups(v, is_train, det)
  out: dict[str, Any] = {k: compare_or_reason(*groups[k], (p, n), rc) for k, p, n in COMPARISONS}
  for key, x, what in (("spearman_copies_ratio", det["copies_ratio"], "the copy count (ratio criterion)"),
                       ("spearman_copies_carlini", det["copies_carlini"], "the copy count (Carlini)"),
                       ("spearman_dup_count", det["dup_count"], "the planted duplicate count"),
                       ("spearman_min_distance", det["min_distance"], "the distance to the closest sample")):
    out[key] = rank_correlation(vt, x.astype(np.float64), what)
  out["per_class"] = per_class_stats(v, is_train, labels, det["copies_ratio"] > 0, rc)
  return out


def per_class_stats(v, is_train, labels, mem_train, rc) -> list[dict[str, Any]]:
  """Per class (label >= 0): counts, mean scores, memorised count, AUROC train vs held-out."""
  lt, lh = labels[is_train], labels[~is_train]
  vt, vh = v[is_train], v[~is_train]
  rows = []
  for c in sorted(set(int(x) for x in labels if x >= 0)):
    a, b = vt[lt == c], vh[lh == c]
    a_f, b_f = a[np.isfinite(a)], b[np.isfinite(b)]
    row = {"label": c, "n_train": int(a_f.size), "n_heldout": int(b_f.size),
           "mean_train": float(a_f.mean()) if a_f.size else math.nan,
           "mean_heldout": float(b_f.mean()) if b_f.size else math.nan,
           "se_train": float(a_f.std(ddof=1) / math.sqrt(a_f.size)) if a_f.size > 1 else math.nan,
           "se_heldout": float(b_f.std(ddof=1) / math.sqrt(b_f.size)) if b_f.size > 1 else math.nan,
           "n_memorised": int(mem_train[lt == c].sum()),
           "auroc": math.nan, "auroc_lo": math.nan, "auroc_hi": math.nan}
    if a_f.size and b_f.size:
      row["auroc"] = stats.auroc(a_f, b_f)
      row["auroc_lo"], row["auroc_hi"] = stats.auroc_bootstrap_ci(
          a_f, b_f, int(rc.num_bootstrap), seed=int(rc.bootstrap_seed) + c + 1)
    for n, group, keys in ((a_f.size, "training", ("mean_train", "se_train")),
                           (b_f.size, "held-out", ("mean_heldout", "se_heldout"))):
      expected_nan(row, keys + ("auroc", "auroc_lo", "auroc_hi") if n == 0 else keys[1:],
                    f"{'no' if n == 0 else 'fewer than 2'} {group} images of the class with a finite score"
                    if n < 2 else "")
    rows.append(row)
  return rows


def headline_nonfinite(claims: dict[str, Any]) -> list[str]:
  """Paths of the numbers of testable claims (p-values, mean difference, AUROC) that are not
  finite, checked before `jsonable` turns NaN into null (CI fails on any)."""
  return [f"claims.{k}.{f}" for k, c in claims.items() if c["testable"]
          for f in ("welch_p", "mw_p", "mean_diff", "auroc") if not math.isfinite(float(c[f]))]


def headline_claim(c: dict[str, Any], e: str) -> dict[str, Any]:
  if not c["available"]:
    return {"estimator": e, "testable": False, "supported": False, "reason": c["reason"]}
  return {"estimator": e, "testable": True, "supported": c["supported"], "welch_p": c["welch_p"],
          "mw_p": c["mw_p"], "mean_diff": c["mean_diff"], "auroc": c["auroc"]}


def best_scores(comp: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
  """Per column, the names of the best scores (ties all count; none when every score ties)."""
  ok = {n: c for n, c in comp.items() if c["available"]}

  def pick(key: str, sign: float, cand: dict[str, dict[str, Any]]) -> list[str]:
    vals = {n: sign * c[key] for n, c in cand.items() if math.isfinite(c[key])}
    if not vals or (len(set(vals.values())) == 1 and len(vals) > 1):
      return []
    top = max(vals.values())
    return [n for n, v in vals.items() if v == top]

  right_way = {n: c for n, c in ok.items() if c["mean_diff"] > 0}
  return {"auroc": pick("auroc", 1, ok), "tpr_at_fpr": pick("tpr_at_fpr", 1, ok),
          "welch_p": pick("welch_p", -1, right_way)}


def window_tests(x: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per column of x [N, W]: AUROC of pos vs neg rows and the Holm-adjusted (over the W
  columns) two-sided Mann-Whitney p. NaN where a group is empty."""
  au, p = np.full(x.shape[1], math.nan), np.full(x.shape[1], math.nan)
  if pos.any() and neg.any():
    for k in range(x.shape[1]):
      a, b = x[pos, k], x[~np.isnan(x[:, k]) & neg, k]
      a = a[np.isfinite(a)]
      if a.size and b.size:
        au[k] = stats.auroc(a, b)
        p[k] = stats.mann_whitney(a, b)[1]
  return au, stats.holm(p)
