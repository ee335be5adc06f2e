"""memvol.stats against scipy / sklearn and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn import metrics

from memvol import stats


def _groups(seed=0, shift=1.0, n1=40, n0=60):
  rng = np.random.default_rng(seed)
  return rng.normal(shift, 1.0, n1), rng.normal(0.0, 2.0, n0)


def test_welch_and_mann_whitney_match_scipy():
  p, n = _groups()
  for alt in stats.ALTERNATIVES:
    ref = sps.ttest_ind(p, n, equal_var=False, alternative=alt)
    assert stats.welch(p, n, alt) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)
    ref = sps.mannwhitneyu(p, n, alternative=alt)
    assert stats.mann_whitney(p, n, alt) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-12)
  # Welch's t by hand.
  t = (p.mean() - n.mean()) / math.sqrt(p.var(ddof=1) / p.size + n.var(ddof=1) / n.size)
  assert stats.welch(p, n)[0] == pytest.approx(t, rel=1e-12)


def test_auroc_separated_identical_and_rank_formula():
  assert stats.auroc([5.0, 6.0, 7.0], [1.0, 2.0]) == 1.0
  assert stats.auroc([1.0, 2.0], [5.0, 6.0, 7.0]) == 0.0
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=2000), rng.normal(size=2000)
  assert abs(stats.auroc(a, b) - 0.5) < 0.03
  # ties count one half; the vectorised rank formula used by the bootstrap agrees with sklearn
  p, n = np.array([1.0, 2.0, 2.0, 3.0]), np.array([2.0, 0.0, 1.0])
  y = np.r_[np.ones(4), np.zeros(3)]
  ref = metrics.roc_auc_score(y, np.r_[p, n])
  assert stats.auroc(p, n) == pytest.approx(ref)
  # pairs won: p=1 -> 1 + 1/2, p=2 -> 1/2 + 2 (twice), p=3 -> 3
  assert ref == pytest.approx(9.5 / 12)
  assert stats._auroc_rank(p, n) == pytest.approx(ref)
  p2, _ = _groups(3)
  assert stats._auroc_rank(np.stack([p2, p2 + 1]), np.stack([n, n])) == pytest.approx(
      [stats.auroc(p2, n), stats.auroc(p2 + 1, n)])


def test_bootstrap_ci_contains_estimate_is_seeded_and_narrows():
  p, n = _groups(shift=0.7)
  a = stats.auroc(p, n)
  lo, hi = stats.auroc_bootstrap_ci(p, n, num_bootstrap=500, seed=0)
  assert 0.0 <= lo < a < hi <= 1.0
  assert stats.auroc_bootstrap_ci(p, n, num_bootstrap=500, seed=0) == (lo, hi)
  assert stats.auroc_bootstrap_ci(p, n, num_bootstrap=500, seed=1) != (lo, hi)
  big_p, big_n = _groups(shift=0.7, n1=800, n0=1200)
  blo, bhi = stats.auroc_bootstrap_ci(big_p, big_n, num_bootstrap=300)
  assert bhi - blo < (hi - lo) / 2.5
  # perfectly separated groups: every resample has AUROC 1
  assert stats.auroc_bootstrap_ci([3.0, 4.0], [1.0, 2.0], 50) == (1.0, 1.0)


def test_tpr_at_fpr_hand_cases():
  neg = np.arange(100, dtype=float)          # 0 .. 99
  # ROC points: (0, .5) [threshold 150], (.01, .5) [99], (.02, .5) [98], (.02, .75) [97.5]
  pos = np.array([200.0, 150.0, 97.5, -5.0])
  assert stats.tpr_at_fpr(pos, neg, 0.01) == pytest.approx(0.5)
  assert stats.tpr_at_fpr(pos, neg, 0.015) == pytest.approx(0.5)
  assert stats.tpr_at_fpr(pos, neg, 0.02) == pytest.approx(0.75)   # top of the vertical step
  assert stats.tpr_at_fpr(pos, neg, 0.0) == pytest.approx(0.5)
  assert stats.tpr_at_fpr(pos, neg, 1.0) == pytest.approx(1.0)
  # a positive between the top two negatives: the step to FPR .01 rises to TPR .75 at once
  assert stats.tpr_at_fpr([200.0, 150.0, 98.5, -5.0], neg, 0.01) == pytest.approx(0.75)
  # 10 negatives, a positive tied with the top one: the ROC runs straight from (0, .5) to
  # (.1, 1), so FPR 1% reads TPR .55
  neg10 = np.r_[5.0, np.arange(-9.0, 0.0)]
  assert stats.tpr_at_fpr([20.0, 5.0], neg10, 0.01) == pytest.approx(0.55)
  # matches np.interp on sklearn's curve where the curve has no vertical steps in the way
  p, n = _groups(5)
  f, t, _ = metrics.roc_curve(np.r_[np.ones(p.size), np.zeros(n.size)], np.r_[p, n],
                              drop_intermediate=False)
  for x in (0.05, 0.2, 0.5):
    j = np.searchsorted(f, x, side="right")
    if f[j - 1] < x:   # strictly inside a segment
      assert stats.tpr_at_fpr(p, n, x) == pytest.approx(np.interp(x, f[j - 1:j + 1], t[j - 1:j + 1]))


def test_effect_sizes_by_hand():
  p, n = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 1.0, 2.0])
  pooled = math.sqrt((p.var(ddof=1) * 3 + n.var(ddof=1) * 2) / 5)
  d = (2.5 - 1.0) / pooled
  assert stats.cohens_d(p, n) == pytest.approx(d)
  assert stats.hedges_g(p, n) == pytest.approx(d * (1 - 3 / (4 * 7 - 9)))
  assert math.isnan(stats.cohens_d([1.0], [2.0]))
  assert math.isnan(stats.cohens_d([1.0, 1.0], [1.0, 1.0]))


def test_spearman_matches_scipy_and_drops_nans():
  rng = np.random.default_rng(2)
  x = rng.normal(size=50)
  y = x + rng.normal(size=50)
  ref = sps.spearmanr(x, y)
  rho, p, m = stats.spearman(x, y)
  assert (rho, p, m) == pytest.approx((ref.statistic, ref.pvalue, 50))
  x2, y2 = np.r_[x, np.nan, 1.0], np.r_[y, 0.0, np.inf]
  assert stats.spearman(x2, y2) == pytest.approx((rho, p, 50))
  r = stats.spearman(np.ones(10), np.arange(10.0))
  assert math.isnan(r[0]) and math.isnan(r[1])
  with pytest.raises(ValueError, match="one length"):
    stats.spearman([1.0, 2.0], [1.0])


def test_compare_is_nan_safe_and_consistent():
  p, n = _groups(7)
  pn, nn = np.r_[p, np.nan, np.inf], np.r_[n, -np.inf]
  c = stats.compare(pn, nn, num_bootstrap=200, seed=3)
  assert (c["n_pos"], c["n_neg"], c["dropped_pos"], c["dropped_neg"]) == (p.size, n.size, 2, 1)
  assert c["mean_pos"] == pytest.approx(p.mean())
  assert c["welch_p"] == pytest.approx(sps.ttest_ind(p, n, equal_var=False).pvalue)
  assert c["mw_p"] == pytest.approx(sps.mannwhitneyu(p, n).pvalue)
  assert c["auroc"] == pytest.approx(stats.auroc(p, n))
  assert c["auroc_lo"] <= c["auroc"] <= c["auroc_hi"]
  assert c["tpr_at_fpr"] == pytest.approx(stats.tpr_at_fpr(p, n, 0.01))
  assert c["hedges_g"] == pytest.approx(stats.hedges_g(p, n))
  assert all(math.isfinite(v) for v in c.values() if isinstance(v, float))
  # a group of one: t-test and sd undefined (NaN), the rest still defined
  c1 = stats.compare([10.0], n, num_bootstrap=20)
  assert math.isnan(c1["welch_p"]) and math.isnan(c1["std_pos"]) and c1["auroc"] == 1.0
  with pytest.raises(ValueError, match="positive group is empty"):
    stats.compare([np.nan], n)
  with pytest.raises(ValueError, match="negative group is empty"):
    stats.compare(p, [])
  with pytest.raises(ValueError, match="alternative"):
    stats.compare(p, n, alternative="bigger")
  with pytest.raises(ValueError, match="1-D"):
    stats.compare(np.ones((2, 2)), n)


def test_holm_by_hand():
  # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max
  adj = stats.holm([0.01, 0.04, 0.03, 0.005])
  np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
  # NaN (no test) is kept and not counted in m = 2
  adj = stats.holm([0.02, np.nan, 0.5])
  np.testing.assert_allclose(adj, [0.04, np.nan, 0.5], rtol=1e-12)
  np.testing.assert_array_equal(stats.holm([0.6, 0.7]), [1.0, 1.0])   # capped at 1
  assert stats.holm([]).shape == (0,)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    stats.holm([0.5, 1.5])


def test_holm_against_the_hand_computed_adjustment():
  p = np.array([0.01, 0.04, np.nan, 0.03, 0.2])
  # sorted 0.01, 0.03, 0.04, 0.2 (m = 4): 0.04, 0.09, 0.09 (monotone), 0.2
  np.testing.assert_allclose(stats.holm(p), [0.04, 0.09, np.nan, 0.09, 0.2])
  assert np.isnan(stats.holm([np.nan])).all()
