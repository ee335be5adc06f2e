"""Two-group statistics for memorisation scores: tests, AUROC, TPR at low FPR, effect size.

Every two-group comparison in the report goes through `compare(pos, neg)`: `pos` is the
group expected to score higher (trained, memorised, planted duplicate), `neg` the other.
Non-finite values are dropped (and counted); an empty group is a ValueError.

Definitions
-----------
* Welch t-test: `scipy.stats.ttest_ind(pos, neg, equal_var=False)`.
* Mann-Whitney U: `scipy.stats.mannwhitneyu(pos, neg)` (U of `pos`; asymptotic or exact
  method chosen by scipy).
* AUROC: `sklearn.metrics.roc_auc_score` with pos labelled 1; equals U / (n_pos n_neg)
  with ties counted 1/2. 95% interval: percentile bootstrap, each group resampled with
  replacement at its own size (stratified), seeded, so every resample has both groups.
* TPR at FPR = f (default 1%): the ROC curve from `sklearn.metrics.roc_curve`, read at
  FPR = f by linear interpolation between its points (the ROC of a randomised threshold);
  where the curve rises vertically at exactly FPR = f the upper (largest) TPR is taken.
  With fewer than 1/f negatives this is an interpolation between FPR 0 and 1/n_neg.
* Cohen's d: (mean_pos - mean_neg) / pooled sd, pooled with n - 1 weights; Hedges' g:
  d (1 - 3 / (4 (n_pos + n_neg) - 9)).
* Spearman: `scipy.stats.spearmanr` on the pairs where both values are finite.
* Holm: the step-down Bonferroni correction of a family of m p-values (controls the
  family-wise error rate): with p_(1) <= ... <= p_(m), adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).

* Paired t over replicates: the differences d_m of two scores on replicate m (independent
  models), t = mean / (sd / sqrt(M)) on M - 1 degrees of freedom; the evidence grows with M.
* Benjamini-Hochberg: q_(i) = min_{j >= i} min(1, m p_(j) / j) (false discovery rate).
* Crossed (two-way) bootstrap: models and images resampled independently (see
  crossed_bootstrap_auroc_diff), for a mean over models of a per-model statistic of shared images.

Statistics that are undefined for the data (a group of one has no variance, a constant
variable no rank correlation) come back as NaN rather than an error.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from scipy import stats as sps
from sklearn import metrics

ALTERNATIVES = ("two-sided", "greater", "less")


def finite(x: Any, name: str = "values") -> tuple[np.ndarray, int]:
  """The finite entries of a 1-D array-like as float64, and how many were dropped."""
  a = np.asarray(x, dtype=np.float64)
  if a.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D array, got shape {a.shape}")
  keep = np.isfinite(a)
  return a[keep], int(a.size - keep.sum())


def _two_groups(pos: Any, neg: Any) -> tuple[np.ndarray, np.ndarray]:
  p, _ = finite(pos, "pos")
  n, _ = finite(neg, "neg")
  if p.size == 0:
    raise ValueError("the positive group has no finite values")
  if n.size == 0:
    raise ValueError("the negative group has no finite values")
  return p, n


def _check_alternative(alternative: str) -> None:
  if alternative not in ALTERNATIVES:
    raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def welch(pos: Any, neg: Any, alternative: str = "two-sided") -> tuple[float, float]:
  """Welch's t statistic and p-value (NaN when a group has fewer than 2 values or both
  groups have zero variance)."""
  _check_alternative(alternative)
  p, n = _two_groups(pos, neg)
  if p.size < 2 or n.size < 2:
    return math.nan, math.nan
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    r = sps.ttest_ind(p, n, equal_var=False, alternative=alternative)
  return float(r.statistic), float(r.pvalue)


def mann_whitney(pos: Any, neg: Any, alternative: str = "two-sided") -> tuple[float, float]:
  """Mann-Whitney U of `pos` and its p-value."""
  _check_alternative(alternative)
  p, n = _two_groups(pos, neg)
  r = sps.mannwhitneyu(p, n, alternative=alternative)
  return float(r.statistic), float(r.pvalue)


def auroc(pos: Any, neg: Any) -> float:
  """Area under the ROC curve for separating `pos` (label 1) from `neg` by score."""
  p, n = _two_groups(pos, neg)
  y = np.concatenate([np.ones(p.size), np.zeros(n.size)])
  return float(metrics.roc_auc_score(y, np.concatenate([p, n])))


def _auroc_rank(p: np.ndarray, n: np.ndarray) -> np.ndarray:
  """AUROC along the last axis via midranks: p [..., n1], n [..., n0] -> [...]."""
  n1, n0 = p.shape[-1], n.shape[-1]
  ranks = sps.rankdata(np.concatenate([p, n], axis=-1), axis=-1)
  u = ranks[..., :n1].sum(-1) - n1 * (n1 + 1) / 2.0
  return u / (n1 * n0)


def auroc_bootstrap_ci(pos: Any, neg: Any, num_bootstrap: int = 1000, level: float = 0.95,
                       seed: int = 0, chunk: int = 256) -> tuple[float, float]:
  """Percentile bootstrap interval of the AUROC (stratified resampling, seeded)."""
  if num_bootstrap < 1:
    raise ValueError(f"num_bootstrap must be >= 1, got {num_bootstrap}")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level}")
  p, n = _two_groups(pos, neg)
  rng = np.random.default_rng(seed)
  out = []
  for start in range(0, num_bootstrap, chunk):
    b = min(chunk, num_bootstrap - start)
    out.append(_auroc_rank(p[rng.integers(0, p.size, (b, p.size))],
                           n[rng.integers(0, n.size, (b, n.size))]))
  a = np.concatenate(out)
  lo, hi = np.quantile(a, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return float(lo), float(hi)


def roc(pos: Any, neg: Any) -> tuple[np.ndarray, np.ndarray]:
  """ROC curve points (fpr, tpr) from `sklearn.metrics.roc_curve`, pos labelled 1."""
  p, n = _two_groups(pos, neg)
  y = np.concatenate([np.ones(p.size), np.zeros(n.size)])
  fpr, tpr, _ = metrics.roc_curve(y, np.concatenate([p, n]))
  return fpr, tpr


def tpr_at_fpr(pos: Any, neg: Any, fpr: float = 0.01) -> float:
  """TPR of the ROC curve at false-positive rate `fpr` (interpolated; see module doc)."""
  if not 0.0 <= fpr <= 1.0:
    raise ValueError(f"fpr must be in [0, 1], got {fpr}")
  f, t = roc(pos, neg)
  i = int(np.searchsorted(f, fpr, side="right")) - 1  # last point with f[i] <= fpr
  if f[i] == fpr or i == f.size - 1:
    return float(t[i])
  w = (fpr - f[i]) / (f[i + 1] - f[i])
  return float(t[i] + w * (t[i + 1] - t[i]))


def cohens_d(pos: Any, neg: Any) -> float:
  """Standardised mean difference with the pooled standard deviation (NaN if undefined)."""
  p, n = _two_groups(pos, neg)
  dof = p.size + n.size - 2
  if dof < 1:
    return math.nan
  ss = ((p - p.mean()) ** 2).sum() + ((n - n.mean()) ** 2).sum()
  if ss == 0.0:
    return math.nan
  return float((p.mean() - n.mean()) / math.sqrt(ss / dof))


def hedges_g(pos: Any, neg: Any) -> float:
  """Cohen's d with the small-sample correction 1 - 3 / (4 (n_pos + n_neg) - 9)."""
  p, n = _two_groups(pos, neg)
  d = cohens_d(p, n)
  return float(d * (1.0 - 3.0 / (4.0 * (p.size + n.size) - 9.0)))


def spearman(x: Any, y: Any) -> tuple[float, float, int]:
  """Spearman rho, its p-value and the number of finite pairs used (rho, p NaN when
  fewer than 3 pairs or a variable is constant)."""
  a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"spearman needs two 1-D arrays of one length, got {a.shape} and {b.shape}")
  keep = np.isfinite(a) & np.isfinite(b)
  a, b = a[keep], b[keep]
  if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return math.nan, math.nan, int(a.size)
  r = sps.spearmanr(a, b)
  return float(r.statistic), float(r.pvalue), int(a.size)


def compare(pos: Any, neg: Any, *, num_bootstrap: int = 1000, seed: int = 0,
            fpr: float = 0.01, alternative: str = "two-sided", level: float = 0.95) -> dict[str, Any]:
  """Every two-group statistic of `pos` (expected higher) against `neg`, as a flat dict.

  Keys: n_pos, n_neg, dropped_pos, dropped_neg (non-finite values left out), mean_pos,
  mean_neg, std_pos, std_neg (ddof 1), median_pos, median_neg, mean_diff, welch_t,
  welch_p, mw_u, mw_p, auroc, auroc_lo, auroc_hi (bootstrap `level` interval), fpr,
  tpr_at_fpr, cohens_d, hedges_g, alternative.
  """
  _check_alternative(alternative)
  p, dp = finite(pos, "pos")
  n, dn = finite(neg, "neg")
  if p.size == 0:
    raise ValueError(f"the positive group is empty ({dp} non-finite values dropped)")
  if n.size == 0:
    raise ValueError(f"the negative group is empty ({dn} non-finite values dropped)")
  t, tp = welch(p, n, alternative)
  u, up = mann_whitney(p, n, alternative)
  lo, hi = auroc_bootstrap_ci(p, n, num_bootstrap, level, seed)
  sd = lambda a: float(a.std(ddof=1)) if a.size > 1 else math.nan  # noqa: E731
  return {
      "n_pos": int(p.size), "n_neg": int(n.size), "dropped_pos": dp, "dropped_neg": dn,
      "mean_pos": float(p.mean()), "mean_neg": float(n.mean()),
      "std_pos": sd(p), "std_neg": sd(n),
      "median_pos": float(np.median(p)), "median_neg": float(np.median(n)),
      "mean_diff": float(p.mean() - n.mean()),
      "welch_t": t, "welch_p": tp, "mw_u": u, "mw_p": up,
      "auroc": auroc(p, n), "auroc_lo": lo, "auroc_hi": hi,
      "fpr": float(fpr), "tpr_at_fpr": tpr_at_fpr(p, n, fpr),
      "cohens_d": cohens_d(p, n), "hedges_g": hedges_g(p, n),
      "alternative": alternative,
  }


def _family(p: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(p [m] as float64, an all-NaN output [m], the indices of the finite p in ascending order):
  the shared start of a multiple-testing correction. ValueError for a p outside [0, 1]."""
  a = np.asarray(p, np.float64).reshape(-1)
  keep = np.flatnonzero(np.isfinite(a))
  if ((a[keep] < 0) | (a[keep] > 1)).any():
    raise ValueError(f"p-values must be in [0, 1], got {a[keep][(a[keep] < 0) | (a[keep] > 1)].tolist()}")
  return a, np.full(a.shape, math.nan), keep[np.argsort(a[keep], kind="stable")]


def holm(p: Any) -> np.ndarray:
  """Holm-adjusted p-values of one family, in the input order [m]; NaN entries (no test)
  stay NaN and are not counted in m."""
  a, out, order = _family(p)
  m = order.size
  out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * a[order]))
  return out


def paired_t(d: Any, level: float = 0.95) -> dict[str, float]:
  """One-sample t over the finite paired differences d [n] (one per independent replicate):
  {mean, sd (ddof 1), n, se, t, p (two-sided), ci_lo, ci_hi (the t interval at `level`)};
  t, p and the interval NaN for n < 2 or sd = 0."""
  a, _ = finite(d, "differences")
  n = int(a.size)
  mean = float(a.mean()) if n else math.nan
  sd = float(a.std(ddof=1)) if n > 1 else math.nan
  out = {"mean": mean, "sd": sd, "n": n, "se": math.nan, "t": math.nan, "p": math.nan,
         "ci_lo": math.nan, "ci_hi": math.nan}
  if n < 2 or not sd > 0:
    return out
  se = sd / math.sqrt(n)
  t = mean / se
  q = float(sps.t.ppf(0.5 + level / 2.0, n - 1))
  return out | {"se": se, "t": t, "p": float(2 * sps.t.sf(abs(t), n - 1)), "ci_lo": mean - q * se,
                "ci_hi": mean + q * se}


def benjamini_hochberg(p: Any) -> np.ndarray:
  """Benjamini-Hochberg adjusted p-values (q-values) of one family, in the input order [m]:
  with p_(1) <= ... <= p_(m), q_(i) = min_{j >= i} min(1, m p_(j) / j). Controls the false
  discovery rate under independence or positive dependence. NaN entries stay NaN and are not
  counted in m."""
  a, out, order = _family(p)
  m = order.size
  q = a[order] * m / np.arange(1, m + 1)
  out[order] = np.minimum(1.0, np.minimum.accumulate(q[::-1])[::-1])
  return out


def auroc_kernel(pos: Any, neg: Any) -> np.ndarray:
  """psi [P, Q]: 1 where pos_p > neg_q, 1/2 on a tie, 0 below; its mean is the AUROC."""
  p, n = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  return (p[:, None] > n[None, :]) + 0.5 * (p[:, None] == n[None, :])


def crossed_bootstrap_auroc_diff(units: list[tuple[np.ndarray, np.ndarray, np.ndarray]], num_images: int,
                                 num_bootstrap: int = 2000, level: float = 0.95, seed: int = 0,
                                 models: bool = True, images: bool = True) -> dict[str, Any]:
  """Two-way (crossed) bootstrap of the mean over replicates (models) of an AUROC difference.

  units: per model (pos [P] and neg [Q] image indices in [0, num_images), kernel [P, Q] =
  auroc_kernel of score a minus that of score b on those images). Each resample draws the
  models with replacement and, independently, the images with replacement (the same image
  weights for every model: images and models are crossed random factors); a model's AUROC
  difference under image weights v is sum v_p v_q K_pq / (sum v_p sum v_q), undefined (left out)
  when its resampled positives or negatives are empty. Returns {estimate (the plain mean),
  ci_lo, ci_hi (percentile interval at `level`), sd (of the resamples), draws [num_bootstrap]}.
  models / images False keeps that factor fixed (weights 1): the two one-way bootstraps say
  how much of the spread each factor makes."""
  if not units:
    raise ValueError("crossed_bootstrap_auroc_diff needs at least one model")
  rng = np.random.default_rng(seed)
  m = len(units)
  v = rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=num_bootstrap).astype(np.float64)
  w = rng.multinomial(m, np.full(m, 1.0 / m), size=num_bootstrap).astype(np.float64)
  v, w = (x if on else np.ones_like(x) for x, on in ((v, images), (w, models)))
  vals = np.full((num_bootstrap, m), math.nan)
  for j, (pos, neg, kernel) in enumerate(units):
    vp, vn = v[:, np.asarray(pos, np.int64)], v[:, np.asarray(neg, np.int64)]
    den = vp.sum(1) * vn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
      vals[:, j] = np.einsum("bp,pq,bq->b", vp, np.asarray(kernel, np.float64), vn) / den
  ok = np.isfinite(vals) & (w > 0)
  with np.errstate(invalid="ignore", divide="ignore"):  # a resample with no defined model: left out
    draws = np.where(ok, vals * w, 0.0).sum(1) / np.where(ok, w, 0.0).sum(1)
  draws = draws[np.isfinite(draws)]
  lo, hi = np.quantile(draws, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  return {"estimate": float(np.mean([k.mean() for _, _, k in units])), "ci_lo": float(lo), "ci_hi": float(hi),
          "sd": float(draws.std(ddof=1)), "draws": draws}


def _rho_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Spearman rho of each row pair of x, y [B, n] (NaN for a constant row)."""
  rx, ry = sps.rankdata(x, axis=1), sps.rankdata(y, axis=1)
  rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    return (rx * ry).sum(1) / np.sqrt((rx**2).sum(1) * (ry**2).sum(1))


def spearman_boot_perm(x: Any, y: Any, num_bootstrap: int, num_permutations: int, level: float = 0.95,
                       seed: int = 0) -> dict[str, float]:
  """Spearman rho of x, y [n] (finite pairs) against 0: {rho, n, ci_lo, ci_hi (percentile
  bootstrap over the pairs at `level`), p (two-sided permutation p, (1 + #|rho*| >= |rho|) /
  (1 + num_permutations), y permuted)}; NaN where rho is undefined."""
  rho, _, n = spearman(x, y)
  a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
  keep = np.isfinite(a) & np.isfinite(b)
  a, b = a[keep], b[keep]
  if not math.isfinite(rho):
    return {"rho": rho, "n": n, "ci_lo": math.nan, "ci_hi": math.nan, "p": math.nan}
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, (num_bootstrap, n))
  boot = _rho_rows(a[idx], b[idx])
  lo, hi = np.quantile(boot[np.isfinite(boot)], [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
  perm = _rho_rows(np.broadcast_to(a, (num_permutations, n)), rng.permuted(np.broadcast_to(b, (num_permutations, n)), axis=1))
  p = (1.0 + np.sum(np.abs(perm) >= abs(rho) - 1e-12)) / (1.0 + num_permutations)
  return {"rho": rho, "n": n, "ci_lo": float(lo), "ci_hi": float(hi), "p": float(p)}


def spearman_diff_boot(a: np.ndarray, b: np.ndarray, y: np.ndarray, num_bootstrap: int, seed: int = 0
                       ) -> dict[str, float]:
  """rho(a, y) - rho(b, y) for two scores a, b [n] of the same units against y [n], with
  its paired bootstrap (units resampled with replacement): {diff, sd, z = diff / sd, p
  (two-sided, normal)}; z and p NaN when the bootstrap has no spread."""
  a, b, y = (np.asarray(v, np.float64) for v in (a, b, y))
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(y), (num_bootstrap, len(y)))
  diff = spearman(a, y)[0] - spearman(b, y)[0]
  boot = _rho_rows(a[idx], y[idx]) - _rho_rows(b[idx], y[idx])
  boot = boot[np.isfinite(boot)]
  sd = float(boot.std(ddof=1)) if boot.size > 1 else math.nan
  if not sd > 0 or not math.isfinite(diff):
    return {"diff": diff, "sd": sd, "z": math.nan, "p": math.nan}
  z = diff / sd
  return {"diff": diff, "sd": sd, "z": z, "p": float(2 * sps.norm.sf(abs(z)))}
