"""The mitigation's statistics over models: groups, tests (Holm; BH over the secondary family)
and the primary comparison fixed before any run."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from memvol import report, stats
from memvol.mitigate.plan import RANKED

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


