"""The report: do trained and memorised images have larger log volume growth?

`run(config, workdir)` reads the workdir's results (scores/scores.csv, scores/profile_E.npz,
detect/detect.csv, the samples, the split, timings.json) and writes

  report/report.md      Findings first (both claims with p-values), then tables, then figures
  report/summary.json   the headline numbers, per estimator (CI checks they are finite)
  report/*.png          distributions, ROC, copy counts, per-class results, top/bottom-k
                        training images beside their closest sample, L(t) curves,
                        agreement between estimators

Peers (when scores.csv has peer_{name} columns for config.score.peers): section "Peers on the
same checkpoint" with one table per comparison in PEER_COMPARISONS (rows = every volume
estimator and peer; AUROC [bootstrap CI], TPR@FPR, Welch p, network passes per image, seconds
per image; best per column in bold), peers_roc_{comparison}.png (ROC curves of every score
overlaid), peers_spearman.png (Spearman matrix between scores, all images); and, from
scores/agreement.csv, the estimator agreement on the training subset (agreement.png).
Volume growth through time (`profile_section`, from scores/profile_E.npz): per estimator with a
profile, the per-window AUROC table, the bound table (excess and fraction above per group), the
first crossing times, the capped score against L, and E_profile.png; summary.json
profile.{E}.{ts, bound_t, bound_dim, window_edges, window_bound, mean_L_t, fraction_above_bound,
fraction_ever_above, median_t_above, window_auroc, window_mw_p_holm, capped.{comparison}.{L, L_capped}}.

summary.json keys: primary_estimator, estimators_list, sample_method, num_*, ratio_threshold,
alpha, alternative, fpr; claims.{trained_gt_heldout, memorised_gt_not, duplicates_gt_singletons};
estimators.{E}.{comparison key: stats.compare dict + available, supported | reason},
spearman_*, per_class, num_failed_solves, num_nonfinite, mean_nfe, status_counts;
estimator_agreement.{"A|B"}.{rho, p, n}; timings_s; not_estimated ({path: reason} of the nulls
that are expected: a statistic the data cannot give, such as Welch's p for a group of one, a
rank correlation with a constant variable, a standard error the estimator does not estimate);
undefined (paths of every other null: scripts/check_report.py fails on any); and
  peers.scores                      [names]: estimators then peers (row order of the tables)
  peers.costs.{name}                {nfe_per_image (network passes: forward + JVPs),
                                     seconds_per_image, includes_compile}
  peers.comparisons.{comparison}.{name}   stats.compare dict + available, supported | reason
  peers.best.{comparison}           {auroc, tpr_at_fpr, welch_p}: names of the best scores per
                                     column (ties all listed; [] when every score ties)
  peers.spearman                    {names: [..], rho: [[..]]} over all images
  agreement                         {n, primary, ids, estimators.{E}.{rho, p, n (vs the primary),
                                     nfe_per_image, seconds_per_image, includes_compile, mean_log_volume}}

Claims tested, per estimator E (score = E_log_volume, larger = easier to reproduce):
  1. trained vs held-out images;
  2. memorised (copied by >= 1 sample under the ratio criterion) vs the other training
     images; also planted duplicates vs singletons, Carlini-copied vs not, and memorised
     vs not among singletons only (is there an effect beyond the planted duplicates?).
A claim counts as supported when the positive group's mean is larger and the Welch p-value
(config.report.alternative, two-sided by default) is below 0.01. Every comparison uses
`memvol.stats.compare`. Statistics the data cannot give are null in summary.json and
named with their reason under `not_estimated`; any other null is listed under `undefined`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from absl import logging

from memvol import detect, io, plotting, scoring, stats
from memvol import workdir as wdir

ALPHA = 0.01                                   # significance level the claims are judged at
SUCCESS_STATUS = scoring.SUCCESS_STATUS
COMPARISONS = (  # key, positive group, negative group
    ("trained_vs_heldout", "trained", "held-out"),
    ("memorised_vs_not", "memorised", "not memorised (train)"),
    ("duplicates_vs_singletons", "planted duplicates", "singletons (train)"),
    ("carlini_vs_not", "copied (Carlini)", "not copied (Carlini, train)"),
    ("memorised_vs_not_singletons", "memorised singletons", "not memorised singletons"),
)
PEER_COMPARISONS = ("trained_vs_heldout", "memorised_vs_not", "duplicates_vs_singletons",
                    "memorised_vs_not_singletons")  # the comparisons of the peers tables
STAGE_ORDER = ("train", "sample", "score", "detect", "report")
COLORS = {"trained": "#d62728", "held-out": "#1f77b4", "memorised": "#9467bd", "duplicates": "#ff7f0e"}


# --- statistics --------------------------------------------------------------------


class NotEstimated(float):
  """NaN that is expected, with the reason: `_clean` writes it as null and records the reason
  under summary.json's `not_estimated` (every other null is `undefined`)."""

  reason: str


def not_estimated(reason: str) -> float:
  x = NotEstimated(math.nan)
  x.reason = reason
  return x


def _expected_nan(d: dict[str, Any], keys: tuple[str, ...], reason: str) -> None:
  """Mark the NaN values of d[keys] as expected, for `reason` (nothing when it is empty)."""
  for k in keys:
    if reason and isinstance(d.get(k), float) and not math.isfinite(d[k]) and not isinstance(d[k], NotEstimated):
      d[k] = not_estimated(reason)


def _spearman(v: np.ndarray, x: np.ndarray, what: str) -> dict[str, Any]:
  """stats.spearman as {rho, p, n}, its NaN marked expected when the data cannot give it."""
  rho, p, n = stats.spearman(v, x)
  out = {"rho": rho, "p": p, "n": n}
  keep = np.isfinite(v) & np.isfinite(x)
  if n < 3:
    _expected_nan(out, ("rho", "p"), "fewer than 3 images with a finite score")
  elif np.ptp(x[keep]) == 0:
    _expected_nan(out, ("rho", "p"), f"{what} is the same for every training image")
  elif np.ptp(v[keep]) == 0:
    _expected_nan(out, ("rho", "p"), "the score is the same for every training image")
  return out


def _compare_or_reason(pos: np.ndarray, neg: np.ndarray, names: tuple[str, str], rc) -> dict[str, Any]:
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
    _expected_nan(out, ("welch_t", "welch_p", "std_pos", "std_neg", "cohens_d", "hedges_g"),
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


def estimator_stats(v: np.ndarray, is_train: np.ndarray, det: dict[str, np.ndarray],
                    labels: np.ndarray, rc) -> dict[str, Any]:
  """All comparisons for one estimator. v, is_train, labels: per scored image; det: detect
  columns aligned to the training rows (v[is_train])."""
  vt = v[is_train]
  groups = comparison_groups(v, is_train, det)
  out: dict[str, Any] = {k: _compare_or_reason(*groups[k], (p, n), rc) for k, p, n in COMPARISONS}
  for key, x, what in (("spearman_copies_ratio", det["copies_ratio"], "the copy count (ratio criterion)"),
                       ("spearman_copies_carlini", det["copies_carlini"], "the copy count (Carlini)"),
                       ("spearman_dup_count", det["dup_count"], "the planted duplicate count"),
                       ("spearman_min_distance", det["min_distance"], "the distance to the closest sample")):
    out[key] = _spearman(vt, x.astype(np.float64), what)
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
      _expected_nan(row, keys + ("auroc", "auroc_lo", "auroc_hi") if n == 0 else keys[1:],
                    f"{'no' if n == 0 else 'fewer than 2'} {group} images of the class with a finite score"
                    if n < 2 else "")
    rows.append(row)
  return rows


def _clean(obj: Any, path: str, undefined: list[str], expected: dict[str, str] | None = None) -> Any:
  """NaN / inf -> None, numpy scalars -> Python. A NotEstimated NaN is recorded with its
  reason in `expected` ({path: reason}); every other NaN, inf or None in `undefined`."""
  if isinstance(obj, dict):
    return {k: _clean(v, f"{path}.{k}" if path else k, undefined, expected) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v, f"{path}[{i}]", undefined, expected) for i, v in enumerate(obj)]
  if obj is None:
    undefined.append(path)
    return None
  if isinstance(obj, NotEstimated) and expected is not None:
    expected[path] = obj.reason
    return None
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    if not math.isfinite(obj):
      undefined.append(path)
      return None
    return float(obj)
  return obj


# --- formatting --------------------------------------------------------------------


def fmt_p(p: Any) -> str:
  if p is None or not math.isfinite(p):
    return "n/a"
  return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def fmt(x: Any, digits: int = 4) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  return f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _comparison_rows(st: dict[str, Any], fpr: float) -> tuple[list[str], list[list[str]]]:
  header = ["comparison (pos vs neg)", "n pos / neg", "mean pos", "mean neg", "Welch p", "Mann-Whitney p",
            "AUROC [95% CI]", f"TPR@{fpr:.0%}FPR", "Hedges' g", f"supported (p<{ALPHA})"]
  rows = []
  for key, p, n in COMPARISONS:
    c = st[key]
    if not c["available"]:
      rows.append([f"{p} vs {n}", "-", "-", "-", "-", "-", "-", "-", "-", f"n/a: {c['reason']}"])
      continue
    rows.append([f"{p} vs {n}", f"{c['n_pos']} / {c['n_neg']}", fmt(c["mean_pos"]), fmt(c["mean_neg"]),
                 fmt_p(c["welch_p"]), fmt_p(c["mw_p"]),
                 f"{c['auroc']:.3f} [{c['auroc_lo']:.3f}, {c['auroc_hi']:.3f}]", fmt(c["tpr_at_fpr"], 3),
                 fmt(c["hedges_g"], 3), "yes" if c["supported"] else "no"])
  return header, rows


def _claim_sentence(c: dict[str, Any], pos: str, neg: str, what: str) -> str:
  if not c["available"]:
    return f"**{what}:** not testable: {c['reason']}."
  larger = c["mean_diff"] > 0
  verdict = ("supported" if c["supported"] else
             "not supported" + ("" if larger else " (the difference goes the other way)"))
  return (f"**{what}:** {pos} have {'larger' if larger else 'smaller'} log volume growth than {neg}: "
          f"mean {fmt(c['mean_pos'])} vs {fmt(c['mean_neg'])} (n = {c['n_pos']} vs {c['n_neg']}; "
          f"Welch p = {fmt_p(c['welch_p'])}, Mann-Whitney p = {fmt_p(c['mw_p'])}, AUROC "
          f"{c['auroc']:.3f} [{c['auroc_lo']:.3f}, {c['auroc_hi']:.3f}], Hedges' g = {fmt(c['hedges_g'], 3)}) "
          f"-> {verdict} at p < {ALPHA}.")


# --- figures -----------------------------------------------------------------------


def _hist(ax, groups: list[tuple[str, np.ndarray, str]], xlabel: str) -> None:
  vals = np.concatenate([g[1] for g in groups if g[1].size])
  bins = np.histogram_bin_edges(vals, bins=min(40, max(8, int(math.sqrt(vals.size)) * 2)))
  for name, x, color in groups:
    if x.size:
      ax.hist(x, bins=bins, density=True, histtype="stepfilled", alpha=0.3, color=color)
      ax.hist(x, bins=bins, density=True, histtype="step", color=color, lw=1.4, label=f"{name} (n={x.size})")
      ax.axvline(x.mean(), color=color, ls="--", lw=1)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("density")
  ax.legend(fontsize=8, frameon=False)


def _violin(ax, groups: list[tuple[str, np.ndarray, str]], ylabel: str) -> None:
  rng = np.random.default_rng(0)
  ticks = []
  for i, (name, x, color) in enumerate(groups):
    ticks.append(f"{name}\n(n={x.size})")
    if x.size >= 2 and np.ptp(x) > 0:
      parts = ax.violinplot([x], positions=[i], widths=0.8, showextrema=False)
      for b in parts["bodies"]:
        b.set_facecolor(color)
        b.set_alpha(0.3)
    if x.size:
      ax.scatter(i + rng.uniform(-0.12, 0.12, x.size), x, s=7, color=color, alpha=0.8, lw=0)
      ax.hlines(np.median(x), i - 0.3, i + 0.3, color="k", lw=1.2)
  ax.set_xticks(range(len(groups)), ticks, fontsize=8)
  ax.set_ylabel(ylabel)


def _roc(ax, pairs: list[tuple[str, np.ndarray, np.ndarray, str]], fpr_mark: float) -> None:
  for name, p, n, color in pairs:
    p, n = p[np.isfinite(p)], n[np.isfinite(n)]
    if p.size and n.size:
      f, t = stats.roc(p, n)
      ax.plot(f, t, color=color, lw=1.6, label=f"{name}: AUROC {stats.auroc(p, n):.3f}")
  ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1)
  ax.axvline(fpr_mark, color="0.6", lw=0.8, ls="--")
  ax.set_xlabel("false positive rate")
  ax.set_ylabel("true positive rate")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  ax.legend(fontsize=7.5, frameon=False, loc="lower right")


def overview_figure(e: str, v: np.ndarray, is_train: np.ndarray, det: dict[str, np.ndarray],
                    st: dict[str, Any], fpr: float, path: str) -> None:
  """2x2: histogram train vs held-out; violin by group; ROC curves; score vs copy count."""
  plt = plotting.pyplot()
  vt, vh = v[is_train], v[~is_train]
  fin_t, fin_h = np.isfinite(vt), np.isfinite(vh)
  mem, dup = det["copies_ratio"] > 0, det["dup_count"] > 1
  fig, axes = plt.subplots(2, 2, figsize=(11, 8.2))
  xl = f"log volume growth L ({e})"
  c = st["trained_vs_heldout"]
  _hist(axes[0, 0], [("trained", vt[fin_t], COLORS["trained"]), ("held-out", vh[fin_h], COLORS["held-out"])], xl)
  axes[0, 0].set_title("trained vs held-out" + (f": Welch p = {fmt_p(c['welch_p'])}" if c["available"] else ""),
                       fontsize=10)
  groups = [("held-out", vh[fin_h], COLORS["held-out"]),
            ("singletons,\nnot memorised", vt[fin_t & ~mem & ~dup], COLORS["trained"]),
            ("singletons,\nmemorised", vt[fin_t & mem & ~dup], COLORS["memorised"]),
            ("planted\nduplicates", vt[fin_t & dup], COLORS["duplicates"])]
  _violin(axes[0, 1], groups, xl)
  axes[0, 1].set_title("by group (memorised: copied by >= 1 sample, d1/d2 < threshold)", fontsize=10)
  _roc(axes[1, 0], [("trained vs held-out", vt, vh, COLORS["trained"]),
                    ("memorised vs not", vt[mem], vt[~mem], COLORS["memorised"]),
                    ("duplicates vs singletons", vt[dup], vt[~dup], COLORS["duplicates"])], fpr)
  axes[1, 0].set_title(f"ROC (dashed: FPR = {fpr:g})", fontsize=10)
  ax = axes[1, 1]
  rng = np.random.default_rng(1)
  cnt = det["copies_ratio"].astype(np.float64)
  jit = cnt + rng.uniform(-0.15, 0.15, cnt.size)
  ax.scatter(jit[~dup], vt[~dup], s=12, color=COLORS["trained"], alpha=0.7, lw=0, label="singletons")
  ax.scatter(jit[dup], vt[dup], s=22, color=COLORS["duplicates"], alpha=0.9, marker="D", lw=0,
             label="planted duplicates")
  if vh[fin_h].size:
    ax.axhspan(*np.percentile(vh[fin_h], [25, 75]), color=COLORS["held-out"], alpha=0.12, label="held-out IQR")
  s = st["spearman_copies_ratio"]
  ax.set_title(f"score vs copy count: Spearman rho = {fmt(s['rho'], 3)} (p = {fmt_p(s['p'])})", fontsize=10)
  ax.set_xlabel("samples copying the image (ratio criterion)")
  ax.set_xlim(-0.5, max(float(cnt.max(initial=0)), 1.0) + 0.5)
  ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
  ax.set_ylabel(xl)
  ax.legend(fontsize=8, frameon=False)
  fig.suptitle(f"Log volume growth ({e}) of training and held-out images", fontsize=12)
  fig.tight_layout()
  plotting.save_figure(fig, path)


def per_class_figure(e: str, rows: list[dict[str, Any]], path: str) -> None:
  """Per class: mean score train / held-out (+- 1 SE) and the memorised count; AUROC + CI."""
  plt = plotting.pyplot()
  labels = [r["label"] for r in rows]
  x = np.arange(len(rows))
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(9, 0.9 * len(rows) + 5), 3.8))
  for off, key, se, name, color in ((-0.12, "mean_train", "se_train", "trained", COLORS["trained"]),
                                     (0.12, "mean_heldout", "se_heldout", "held-out", COLORS["held-out"])):
    a1.errorbar(x + off, [r[key] for r in rows], yerr=[r[se] if math.isfinite(r[se]) else 0.0 for r in rows],
                fmt="o", ms=5, color=color, capsize=3, lw=1.2, label=f"{name} (\u00b1 1 SE)")
  a1.grid(axis="y", color="0.9")
  a1.set_xticks(x, [f"{r['label']}\n{r['n_memorised']}/{r['n_train']}" for r in rows], fontsize=8)
  a1.set_xlabel("class, and memorised / trained images in it")
  a1.set_ylabel(f"mean log volume growth ({e})")
  a1.legend(fontsize=8, frameon=False)
  a1.set_title("mean score per class", fontsize=10)
  au = np.array([r["auroc"] for r in rows])
  err = np.array([[r["auroc"] - r["auroc_lo"], r["auroc_hi"] - r["auroc"]] for r in rows]).T
  a2.bar(x, np.nan_to_num(au), 0.6, yerr=np.nan_to_num(err), color="0.55", capsize=3)
  for i in np.flatnonzero(~np.isfinite(au)):
    a2.text(i, 0.03, "n/a", ha="center", fontsize=8)
  a2.axhline(0.5, color="k", lw=0.8, ls=":")
  a2.set_ylim(0, 1.05)
  a2.set_xticks(x, labels)
  a2.set_xlabel("class")
  a2.set_ylabel("AUROC trained vs held-out")
  a2.set_title("per-class AUROC (bootstrap 95% CI)", fontsize=10)
  fig.tight_layout()
  plotting.save_figure(fig, path)


def curves_figure(e: str, ts: np.ndarray, groups: list[tuple[str, np.ndarray, str]], path: str) -> None:
  """Cumulative L(t): mean +- 1 sd per group; right: trained - held-out mean with +- 2 SE."""
  plt = plotting.pyplot()
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.9))
  for name, L, color in groups:
    if L.shape[0] == 0:
      continue
    m, s = np.nanmean(L, 0), np.nanstd(L, 0)
    a1.plot(ts, m, color=color, lw=1.6, label=f"{name} (n={L.shape[0]})")
    a1.fill_between(ts, m - s, m + s, color=color, alpha=0.15)
  a1.set_xlabel("t")
  a1.set_ylabel(f"cumulative L(t) ({e})")
  a1.set_title("L(t): mean \u00b1 1 sd", fontsize=10)
  a1.legend(fontsize=8, frameon=False)
  (_, Lt, _), (_, Lh, _) = groups[0], groups[1]
  if Lt.shape[0] and Lh.shape[0]:
    diff = np.nanmean(Lt, 0) - np.nanmean(Lh, 0)
    se = np.sqrt(np.nanvar(Lt, 0, ddof=1) / max(Lt.shape[0], 1) + np.nanvar(Lh, 0, ddof=1) / max(Lh.shape[0], 1)) \
        if min(Lt.shape[0], Lh.shape[0]) > 1 else np.zeros_like(diff)
    a2.plot(ts, diff, color="k", lw=1.5)
    a2.fill_between(ts, diff - 2 * se, diff + 2 * se, color="0.5", alpha=0.25)
  a2.axhline(0, color="0.5", lw=0.8, ls=":")
  a2.set_xlabel("t")
  a2.set_ylabel("mean L(t): trained - held-out")
  a2.set_title("gap (band: \u00b1 2 SE)", fontsize=10)
  if ts.size and ts.min() > 0 and ts.max() / ts.min() > 50:
    a1.set_xscale("log")
    a2.set_xscale("log")
  fig.tight_layout()
  plotting.save_figure(fig, path)


def agreement_figure(ests: list[str], scores: dict[str, np.ndarray], is_train: np.ndarray,
                     agreement: dict[str, Any], path: str) -> None:
  plt = plotting.pyplot()
  pairs = [(a, b) for i, a in enumerate(ests) for b in ests[i + 1:]][:6]
  fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False)
  for ax, (a, b) in zip(axes[0], pairs):
    x, y = scores[a], scores[b]
    ax.scatter(x[is_train], y[is_train], s=9, color=COLORS["trained"], alpha=0.7, lw=0, label="trained")
    ax.scatter(x[~is_train], y[~is_train], s=9, color=COLORS["held-out"], alpha=0.7, lw=0, label="held-out")
    ag = agreement[f"{a}|{b}"]
    ax.set_title(f"Spearman rho = {fmt(ag['rho'], 3)}", fontsize=10)
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.legend(fontsize=8, frameon=False)
  fig.tight_layout()
  plotting.save_figure(fig, path)


def topk_figure(e: str, vt: np.ndarray, train_ids: np.ndarray, det: dict[str, np.ndarray], id_to_image,
                samples: np.ndarray, k: int, path: str) -> None:
  """Top-k and bottom-k training images by score, each above its closest generated sample."""
  fin = np.flatnonzero(np.isfinite(vt))
  order = fin[np.argsort(-vt[fin], kind="stable")]
  k = min(k, order.size)
  blocks = []
  for title, sel in ((f"top {k} training images by log volume growth ({e})", order[:k]),
                     (f"bottom {k} training images by log volume growth ({e})", order[::-1][:k])):
    tops = np.stack([id_to_image(int(train_ids[j])) for j in sel]) if sel.size else np.zeros((0,) + samples.shape[1:])
    bots = samples[det["closest_sample"][sel]] if sel.size else np.zeros((0,) + samples.shape[1:])
    caps = [f"L {vt[j]:.4g}\nd {det['min_distance'][j]:.2f} c {det['copies_ratio'][j]}"
            + (" dup" if det["dup_count"][j] > 1 else "") for j in sel]
    blocks.append(dict(title=title, top=tops, bottom=bots, captions=caps, row_labels=("train", "closest sample")))
  plotting.save_pairs_figure(blocks, path, title="L: score   d: L2 distance to the closest sample\n"
                             "c: samples copying it   dup: planted duplicate")


# --- stage -------------------------------------------------------------------------


def _curves(e: str, path: str, scores: dict[str, np.ndarray], is_train: np.ndarray, failed: np.ndarray,
            det: dict[str, np.ndarray], out: str) -> str:
  """Draw the L(t) figure for estimator e to `out`; return '' or a note saying why not."""
  if not os.path.exists(path):
    return f"{path} not found: L(t) curves skipped."
  z = io.load_npz(path)
  if not {"ids", "ts", "L_t"} <= set(z):
    raise ValueError(f"{path} lacks ids / ts / L_t (has {sorted(z)}); rerun --mode=score")
  L, ts = z["L_t"].astype(np.float64), z["ts"].astype(np.float64)
  if L.ndim != 2 or L.shape != (z["ids"].size, ts.size):
    raise ValueError(f"{path}: L_t has shape {L.shape}, expected [len(ids), len(ts)] = "
                     f"[{z['ids'].size}, {ts.size}]; rerun --mode=score")
  if ts.size == 0:
    return "No L(t) points were saved (config.score.profile_times = 0): curves skipped."
  split_of = {(str(sp), int(i)): k for k, (sp, i) in enumerate(zip(scores["split"], scores["id"]))}
  if "split" in z:
    keys = list(zip((str(x) for x in z["split"]), z["ids"].astype(np.int64).tolist()))
  else:
    tr, ho = set(scores["id"][is_train].tolist()), set(scores["id"][~is_train].tolist())
    if tr & ho:
      return f"{os.path.basename(path)} has no split and ids are shared between splits: curves skipped."
    keys = [("train" if i in tr else "heldout", i) for i in z["ids"].astype(np.int64).tolist()]
  rows = np.array([split_of.get(k, -1) for k in keys])
  if (rows < 0).any():
    raise ValueError(f"{path} has images that scores.csv lacks; rerun --mode=score")
  ok = ~failed[rows]
  mem_rows = set(np.flatnonzero(is_train)[det["copies_ratio"] > 0].tolist())
  in_t, in_m = is_train[rows] & ok, np.array([r in mem_rows for r in rows]) & ok
  in_h = ~is_train[rows] & ok
  curves_figure(e, ts, [("trained", L[in_t], COLORS["trained"]), ("held-out", L[in_h], COLORS["held-out"]),
                        ("memorised", L[in_m], COLORS["memorised"])], out)
  return ""


OUTPUTS = ("report.md", "summary.json")


def settings(config, workdir: str) -> dict[str, Any]:
  """What the report depends on: the report section, the estimators and copy criterion it
  reads, and digests of its input files (timings.json is left out: it changes on every run
  and only fills the wall-time table)."""
  ests = [str(e) for e in config.score.estimators]
  files = {"scores.csv": wdir.scores_csv(workdir), "detect.csv": wdir.detect_csv(workdir),
           "nn.npz": wdir.nn(workdir), "samples": wdir.samples(workdir, config.detect.sample_method)}
  files.update({f"profile_{e}.npz": wdir.profile(workdir, e) for e in ests})
  return {"report": io.config_to_dict(config.report), "estimators": ests,
          "detect": {k: io.config_to_dict(config.detect)[k] for k in ("sample_method", "ratio_threshold")},
          "data": io.config_to_dict(config.data),
          "inputs": {k: io.file_digest(p) for k, p in sorted(files.items())}}


def stale_reason(config, workdir: str) -> str | None:
  """None when report/ holds a report made with this config from the current inputs;
  otherwise why not (for --mode=all)."""
  return io.stale_reason(wdir.report_dir(workdir), settings(config, workdir), OUTPUTS)


def is_complete(config, workdir: str) -> bool:
  return stale_reason(config, workdir) is None


def run(config, workdir: str, split: Any = None) -> dict[str, Any]:
  """Write report/report.md, report/summary.json and the PNGs, then report/settings.json
  (what made them; a rerun with other settings or inputs rewrites them); returns the
  summary. `split` defaults to memvol.data.load_split (needed for the training images)."""
  ests = [str(e) for e in config.score.estimators]
  if not ests:
    raise ValueError("config.score.estimators is empty: nothing to report")
  rc = config.report
  folder = wdir.report_dir(workdir)
  io.forget_settings(folder)
  record = settings(config, workdir)
  scores_path, detect_path = wdir.scores_csv(workdir), wdir.detect_csv(workdir)
  scores = scoring.read_scores(scores_path, tuple(ests), tuple(str(p) for p in config.score.get("peers", ())))
  is_train = scores["split"] == "train"
  if not is_train.any():
    raise ValueError(f"{scores_path} has no training rows; rerun --mode=score")
  det = detect.align_detect(scores["id"][is_train], detect.read_detect(detect_path), detect_path)
  samples = detect.load_samples(config, workdir)
  if int(det["closest_sample"].max(initial=0)) >= samples.shape[0]:
    raise ValueError(f"{detect_path} refers to sample {int(det['closest_sample'].max())} but "
                     f"{wdir.samples(workdir, config.detect.sample_method)} has {samples.shape[0]}: rerun --mode=detect")
  split = detect.load_split(config, workdir) if split is None else split
  train_pos = {int(i): k for k, i in enumerate(np.asarray(split.train.ids))}
  train_images = np.asarray(split.train.images, np.float32)

  def id_to_image(i: int) -> np.ndarray:
    if i not in train_pos:
      raise ValueError(f"training id {i} of scores.csv is not in the split; the scores come from "
                       "another data config: rerun --mode=score in this workdir")
    return train_images[train_pos[i]]

  timings_path = wdir.timings(workdir)
  timings = io.load_json(timings_path) if os.path.exists(timings_path) else {}
  nn_path = wdir.nn(workdir)
  nn = io.load_npz(nn_path) if os.path.exists(nn_path) else {}

  per_est: dict[str, Any] = {}
  figures: dict[str, list[tuple[str, str]]] = {}
  notes: dict[str, list[str]] = {}
  values: dict[str, np.ndarray] = {}
  for e in ests:
    v = scores[f"{e}_log_volume"].copy()
    failed = (~np.isin(scores[f"{e}_status"], SUCCESS_STATUS) if f"{e}_status" in scores
              else np.zeros(v.size, bool))
    v[failed] = math.nan
    values[e] = v
    st = estimator_stats(v, is_train, det, scores["label"], rc)
    st["num_failed_solves"] = int(failed.sum())
    st["num_nonfinite"] = int((~np.isfinite(v) & ~failed).sum())
    if f"{e}_stderr" in scores:  # NaN = not estimated (subspace, paper, one probe)
      se = scores[f"{e}_stderr"][~failed]
      st["median_stderr"] = (float(np.nanmedian(se)) if np.isfinite(se).any()
                             else not_estimated("not estimated by this estimator"))
    if f"{e}_nfe" in scores:
      st["mean_nfe"] = float(np.nanmean(scores[f"{e}_nfe"])) if np.isfinite(scores[f"{e}_nfe"]).any() else math.nan
    if f"{e}_status" in scores:
      vals, counts = np.unique(scores[f"{e}_status"], return_counts=True)
      st["status_counts"] = {str(a): int(b) for a, b in zip(vals, counts)}
    per_est[e] = st
    figures[e], notes[e] = [], []
    if np.isfinite(v).any():
      p = os.path.join(folder, f"{e}_overview.png")
      overview_figure(e, v, is_train, det, st, float(rc.fpr), p)
      figures[e].append(("Distributions, ROC curves and score vs copy count", os.path.basename(p)))
    if st["per_class"]:
      p = os.path.join(folder, f"{e}_per_class.png")
      per_class_figure(e, st["per_class"], p)
      figures[e].append(("Per-class mean score, memorised counts and AUROC", os.path.basename(p)))
    else:
      notes[e].append("No class labels (all -1): per-class results skipped.")
    p = os.path.join(folder, f"{e}_topk.png")
    topk_figure(e, v[is_train], scores["id"][is_train], det, id_to_image, samples, int(rc.top_k), p)
    figures[e].append(("Top-k and bottom-k training images beside their closest generated sample",
                       os.path.basename(p)))
    p = os.path.join(folder, f"{e}_curves.png")
    note = _curves(e, wdir.profile(workdir, e), scores, is_train, failed, det, p)
    if note:
      notes[e].append(note)
    else:
      figures[e].append(("Cumulative log volume growth L(t) along the ODE", os.path.basename(p)))

  agreement: dict[str, Any] = {}
  for i, a in enumerate(ests):
    for b in ests[i + 1:]:
      rho, p, n = stats.spearman(values[a], values[b])
      agreement[f"{a}|{b}"] = {"rho": rho, "p": p, "n": n}
  if agreement:
    agreement_figure(ests, values, is_train, agreement, os.path.join(folder, "agreement.png"))

  peer_summary, peer_md = peers_section(config, workdir, scores, values, is_train, det, folder)
  prof_summary, prof_md = profile_section(config, workdir, scores, is_train, det, folder)
  peer_summary, peer_md = {**peer_summary, **prof_summary}, peer_md + "\n" + prof_md
  mem = det["copies_ratio"] > 0
  info = {
      "primary_estimator": ests[0], "estimators_list": ests,
      "sample_method": str(config.detect.sample_method), "num_samples": int(samples.shape[0]),
      "num_train": int(is_train.sum()), "num_heldout": int((~is_train).sum()),
      "num_memorised_ratio": int(mem.sum()), "num_memorised_carlini": int((det["copies_carlini"] > 0).sum()),
      "num_planted_duplicates": int((det["dup_count"] > 1).sum()),
      "num_copied_samples_ratio": int(np.asarray(nn["copied_ratio"]).sum()) if "copied_ratio" in nn else None,
      "ratio_threshold": float(config.detect.ratio_threshold), "alpha": ALPHA,
      "alternative": str(rc.alternative), "fpr": float(rc.fpr),
  }
  claims = {
      "trained_gt_heldout": _claim(per_est[ests[0]]["trained_vs_heldout"], ests[0]),
      "memorised_gt_not": _claim(per_est[ests[0]]["memorised_vs_not"], ests[0]),
      "duplicates_gt_singletons": _claim(per_est[ests[0]]["duplicates_vs_singletons"], ests[0]),
  }
  nonfinite = headline_nonfinite(claims)  # on the raw numbers: _clean turns NaN into null
  if nonfinite:
    logging.warning("report: headline numbers not finite: %s", ", ".join(nonfinite))
  undefined: list[str] = []
  expected: dict[str, str] = {}
  summary = _clean({**info, "claims": claims, "estimators": per_est, "estimator_agreement": agreement,
                    "timings_s": timings, **peer_summary}, "", undefined, expected)
  summary["not_estimated"] = expected
  summary["undefined"] = undefined
  summary["nonfinite_headline"] = nonfinite
  text = render_markdown(config, info, per_est, agreement, figures, notes, timings, det, scores, is_train,
                         extra_sections=peer_md)
  io.save_json(os.path.join(folder, "summary.json"), summary)
  with io.atomic_open(os.path.join(folder, "report.md"), "w") as f:
    f.write(text)
  for name in ("summary.json", "report.md"):
    os.chmod(os.path.join(folder, name), 0o644)
  io.record_settings(folder, record)
  logging.info("report: %s", os.path.join(folder, "report.md"))
  return summary


def headline_nonfinite(claims: dict[str, Any]) -> list[str]:
  """Paths of the numbers of testable claims (p-values, mean difference, AUROC) that are not
  finite, checked before `_clean` turns NaN into null (CI fails on any)."""
  return [f"claims.{k}.{f}" for k, c in claims.items() if c["testable"]
          for f in ("welch_p", "mw_p", "mean_diff", "auroc") if not math.isfinite(float(c[f]))]


def _claim(c: dict[str, Any], e: str) -> dict[str, Any]:
  if not c["available"]:
    return {"estimator": e, "testable": False, "supported": False, "reason": c["reason"]}
  return {"estimator": e, "testable": True, "supported": c["supported"], "welch_p": c["welch_p"],
          "mw_p": c["mw_p"], "mean_diff": c["mean_diff"], "auroc": c["auroc"]}


def render_markdown(config, info, per_est, agreement, figures, notes, timings, det, scores, is_train,
                    extra_sections: str = "") -> str:
  e0 = info["primary_estimator"]
  st0 = per_est[e0]
  thr = info["ratio_threshold"]
  out = ["# memvol report", ""]
  out.append(f"Data `{config.data.name}` ({info['num_train']} distinct training images, "
             f"{info['num_planted_duplicates']} of them planted duplicates, {info['num_heldout']} held-out); "
             f"{info['num_samples']} `{info['sample_method']}` samples searched for copies; "
             f"estimators: {', '.join(f'`{e}`' for e in info['estimators_list'])} (primary: `{e0}`). "
             "Score = log volume growth L of the probability-flow ODE map from the image to the latent "
             "(larger = more latent volume flows onto the image = easier to reproduce).")
  out += ["", f"Matmul / convolution precision: scores `{config.score.get('precision', 'highest')}`, samples `{config.sample.get('precision', 'highest')}` (`highest` = float32, as on CPU; `high` / `default` = TF32 on GPUs, bfloat16 passes on TPUs)."]
  out += ["", "## Findings", ""]
  out.append("- " + _claim_sentence(st0["trained_vs_heldout"], "trained images", "held-out images",
                                    "Claim 1, trained vs held-out"))
  n_mem = info["num_memorised_ratio"]
  out.append(f"- **Memorisation labels:** {n_mem} of {info['num_train']} training images are copied by at least "
             f"one of the {info['num_samples']} samples (d(x', NN1) / d(x', NN2) < {thr:.3g}); "
             f"{info['num_memorised_carlini']} under Carlini et al.'s criterion; "
             f"{int(((det['copies_ratio'] > 0) & (det['dup_count'] > 1)).sum())} of the "
             f"{info['num_planted_duplicates']} planted duplicates are copied.")
  claim2 = _claim_sentence(st0["memorised_vs_not"], "memorised training images",
                           "the other training images", "Claim 2, memorised vs not memorised")
  if not st0["memorised_vs_not"]["available"] and n_mem == 0:
    claim2 += (" No sample copies a training image; the planted duplicates (next line) are the ground-truth "
               "test of the same claim. More samples (config.sample.num_samples) or longer training give copies.")
  out.append("- " + claim2)
  out.append("- " + _claim_sentence(st0["duplicates_vs_singletons"], "planted duplicates", "singletons",
                                    "Planted duplicates (ground truth) vs singletons"))
  s = st0["spearman_copies_ratio"]
  if math.isfinite(s["rho"]):
    out.append(f"- Spearman correlation of the score with the copy count over training images: rho = "
               f"{fmt(s['rho'], 3)} (p = {fmt_p(s['p'])}).")
  else:
    out.append("- Spearman correlation of the score with the copy count: undefined (the copy count is the "
               "same for every training image).")
  pc = [r for r in st0["per_class"] if math.isfinite(r["mean_train"])]
  if pc:
    top = max(pc, key=lambda r: r["mean_train"])
    low = min(pc, key=lambda r: r["mean_train"])
    out.append(f"- Per class: class {top['label']} has the highest mean training score ({fmt(top['mean_train'])}, "
               f"{top['n_memorised']}/{top['n_train']} memorised) and class {low['label']} the lowest "
               f"({fmt(low['mean_train'])}, {low['n_memorised']}/{low['n_train']} memorised); simple images can "
               "score high without being copied, so compare within a class (table below).")
  if info["alternative"] != "two-sided":
    out.append(f"- p-values are one-sided (`{info['alternative']}`).")
  else:
    out.append("- p-values are two-sided; a claim is supported when the difference is in the stated "
               f"direction and Welch p < {ALPHA}.")

  for e in info["estimators_list"]:
    st = per_est[e]
    out += ["", f"## Estimator `{e}`", ""]
    header, rows = _comparison_rows(st, info["fpr"])
    out.append(_table(header, rows))
    out.append("")
    out.append("AUROC interval: stratified percentile bootstrap "
               f"({int(config.report.num_bootstrap)} resamples). TPR@{info['fpr']:.0%}FPR: ROC curve "
               "(sklearn roc_curve) linearly interpolated at that FPR. Memorised: copied by >= 1 sample "
               f"under d1/d2 < {thr:.3g}; planted duplicates: dup_count > 1.")
    out.append("")
    sp_rows = [[name, fmt(st[k]["rho"], 3), fmt_p(st[k]["p"]), str(st[k]["n"])] for k, name in (
        ("spearman_copies_ratio", "copy count (ratio criterion)"),
        ("spearman_copies_carlini", "copy count (Carlini)"),
        ("spearman_dup_count", "planted duplicate count"),
        ("spearman_min_distance", "L2 distance to the closest sample"))]
    out.append("Spearman correlation of the score with, over training images:")
    out.append("")
    out.append(_table(["variable", "rho", "p", "n"], sp_rows))
    if st["per_class"]:
      out += ["", "Per class (AUROC: trained vs held-out within the class):", ""]
      out.append(_table(
          ["class", "n train / held-out", "mean train", "mean held-out", "memorised", "AUROC [95% CI]"],
          [[str(r["label"]), f"{r['n_train']} / {r['n_heldout']}", fmt(r["mean_train"]), fmt(r["mean_heldout"]),
            str(r["n_memorised"]),
            "n/a" if not math.isfinite(r["auroc"]) else f"{r['auroc']:.3f} [{r['auroc_lo']:.3f}, {r['auroc_hi']:.3f}]"]
           for r in st["per_class"]]))
    extra = []
    if st["num_failed_solves"]:
      extra.append(f"{st['num_failed_solves']} solves did not succeed (status not in {list(SUCCESS_STATUS)}); "
                   "their scores are left out of every statistic.")
    if st["num_nonfinite"]:
      extra.append(f"{st['num_nonfinite']} images have a non-finite score and are left out of every statistic.")
    if "median_stderr" in st:
      extra.append("per-image standard error of L: not estimated (NaN) for this estimator."
                   if not math.isfinite(st["median_stderr"]) else
                   f"median per-image standard error of L (over probes): {fmt(st['median_stderr'], 3)}.")
    if "mean_nfe" in st:
      extra.append(f"mean network evaluations per image: {fmt(st['mean_nfe'])}.")
    if "status_counts" in st:
      extra.append("solver status counts: " + ", ".join(f"`{k or '(empty)'}`: {n}" for k, n in st["status_counts"].items()) + ".")
    extra += notes[e]
    if extra:
      out += [""] + [f"- {x}" for x in extra]
    for caption, fname in figures[e]:
      out += ["", f"**{caption}**", "", f"![{caption}]({fname})"]

  if agreement:
    out += ["", "## Agreement between estimators", ""]
    out.append(_table(["pair", "Spearman rho", "p", "n"],
                      [[k.replace("|", " vs "), fmt(v["rho"], 3), fmt_p(v["p"]), str(v["n"])] for k, v in agreement.items()]))
    out += ["", "![Agreement between estimators](agreement.png)"]

  if extra_sections:
    out += ["", extra_sections.rstrip("\n")]

  out += ["", "## Copies found", ""]
  out.append(f"Samples (top) above their nearest training image (bottom): [../detect/copies.png](../detect/copies.png)")
  out += ["", "![copies](../detect/copies.png)"]

  out += ["", "## Stage wall times", ""]
  if timings:
    order = [k for k in STAGE_ORDER if k in timings] + sorted(k for k in timings if k not in STAGE_ORDER)
    out.append(_table(["stage", "seconds"], [[k, f"{float(timings[k]):.1f}"] for k in order]
                      + [["total", f"{sum(float(v) for v in timings.values()):.1f}"]]))
  else:
    out.append("No timings.json in the workdir (stages were not run through the entry point).")
  out.append("")
  return "\n".join(out)


# --- peers on the same checkpoint ---------------------------------------------------


def _cost(nfe: np.ndarray | None, timing: dict[str, Any] | None) -> dict[str, Any]:
  """nfe_per_image, seconds_per_image and (when timed) includes_compile; what was not
  measured is marked NotEstimated."""
  t = timing or {}
  out = {"nfe_per_image": float(np.nanmean(nfe)) if nfe is not None and np.isfinite(nfe).any()
         else not_estimated("no network-evaluation count in scores.csv")}
  if t.get("seconds_per_image") is None:
    out["seconds_per_image"] = not_estimated("not timed (no entry in scores/manifest.json)")
  else:
    out["seconds_per_image"], out["includes_compile"] = t["seconds_per_image"], t.get("includes_compile", False)
  return out


def peers_section(config, workdir: str, scores: dict[str, np.ndarray], values: dict[str, np.ndarray],
                  is_train: np.ndarray, det: dict[str, np.ndarray], folder: str) -> tuple[dict[str, Any], str]:
  """The peers comparison (tables, ROC overlays, Spearman matrix) and the estimator agreement:
  ({'peers': ..., 'agreement': ...} for summary.json, markdown). Empty when scores.csv has no
  peer columns. scores: scoring.read_scores of scores.csv, with the configured peers."""
  names = [str(p) for p in config.score.get("peers", ())]
  cols = scores
  peers = [n for n in names if f"peer_{n}" in cols]
  manifest_path = wdir.scores_manifest(workdir)
  manifest = io.load_json(manifest_path) if os.path.exists(manifest_path) else {}
  timing = manifest.get("seconds_per_image", {})
  n_rows = scores["id"].size
  summary: dict[str, Any] = {}
  md: list[str] = []
  if peers:
    scorers = {e: values[e] for e in values}
    costs = {}
    for e in values:
      nfe = scores.get(f"{e}_nfe", np.full(n_rows, math.nan)) + scores.get(f"{e}_jvps", np.zeros(n_rows))
      costs[e] = _cost(nfe, timing.get(e))
    for n in peers:
      scorers[n] = cols[f"peer_{n}"]
      costs[n] = _cost(cols.get(f"peer_{n}_nfe"), timing.get(f"peer_{n}"))
    rc = config.report
    comps: dict[str, dict[str, Any]] = {}
    for key in PEER_COMPARISONS:
      pos, neg = next((p, q) for k, p, q in COMPARISONS if k == key)
      comps[key] = {name: _compare_or_reason(*comparison_groups(v, is_train, det)[key], (pos, neg), rc)
                    for name, v in scorers.items()}
    names_all = list(scorers)
    rho = [[stats.spearman(scorers[a], scorers[b])[0] for b in names_all] for a in names_all]
    best = {k: _best(comps[k]) for k in comps}
    summary["peers"] = {"scores": names_all, "costs": costs, "comparisons": comps, "best": best,
                        "spearman": {"names": names_all, "rho": rho}}
    md += ["## Peers on the same checkpoint", "",
           f"Every volume estimator ({', '.join(f'`{e}`' for e in values)}) beside the peer scores "
           f"({', '.join(f'`{n}`' for n in peers)}; memvol/peers.py), each sign-normalised so that higher = "
           "member / memorised, on the same checkpoint, images and labels. Network passes count forward "
           "evaluations plus JVPs; seconds per image (wall time on this machine, shared or not) leave out "
           "batches that compiled (marked * where every batch compiled). Best per column in bold (Welch p: smallest among scores whose difference goes "
           "the claimed way).", ""]
    for key in PEER_COMPARISONS:
      pos, neg = next((p, q) for k, p, q in COMPARISONS if k == key)
      md += [f"**{pos} vs {neg}**", "", _peer_table(comps[key], costs, best[key], float(rc.fpr)), ""]
      p = os.path.join(folder, f"peers_roc_{key}.png")
      if roc_overlay_figure(f"{pos} vs {neg}", comparison_groups_all(scorers, is_train, det, key), float(rc.fpr), p):
        md += [f"![ROC, {pos} vs {neg}]({os.path.basename(p)})", ""]
    spearman_matrix_figure(names_all, np.asarray(rho, np.float64), os.path.join(folder, "peers_spearman.png"))
    md += ["Spearman correlation between scores over all images:", "", "![Spearman matrix](peers_spearman.png)", ""]
  ag_summary, ag_md = agreement_section(workdir, timing, folder)
  if ag_summary:
    summary["agreement"] = ag_summary
    md += ag_md
  return summary, "\n".join(md)


def comparison_groups_all(scorers: dict[str, np.ndarray], is_train: np.ndarray, det: dict[str, np.ndarray],
                          key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  return {name: comparison_groups(v, is_train, det)[key] for name, v in scorers.items()}


def _best(comp: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
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


def _peer_table(comp: dict[str, dict[str, Any]], costs: dict[str, dict[str, Any]], best: dict[str, Any],
                fpr: float) -> str:
  fin = lambda x: x is not None and math.isfinite(x)  # noqa: E731
  nfe_best = min((c["nfe_per_image"] for c in costs.values() if fin(c["nfe_per_image"])), default=None)
  sec_best = min((c["seconds_per_image"] for c in costs.values() if fin(c["seconds_per_image"])), default=None)
  bold = lambda text, on: f"**{text}**" if on else text  # noqa: E731
  rows = []
  for name, c in comp.items():
    k = costs[name]
    nfe = k["nfe_per_image"]
    sec = k["seconds_per_image"]
    cost = [bold(fmt(nfe, 4), fin(nfe) and nfe == nfe_best),
            bold(f"{sec:.3g}" + ("*" if k.get("includes_compile") else ""), sec == sec_best) if fin(sec) else "n/a"]
    if not c["available"]:
      rows.append([f"`{name}`", f"n/a: {c['reason']}", "-", "-"] + cost)
      continue
    rows.append([f"`{name}`",
                 bold(f"{c['auroc']:.3f} [{c['auroc_lo']:.3f}, {c['auroc_hi']:.3f}]", name in best["auroc"]),
                 bold(fmt(c["tpr_at_fpr"], 3), name in best["tpr_at_fpr"]),
                 bold(fmt_p(c["welch_p"]), name in best["welch_p"])
                 + ("" if c["mean_diff"] > 0 else " (wrong way)")] + cost)
  return _table(["score", "AUROC [95% CI]", f"TPR@{fpr:.0%}FPR", "Welch p", "network passes / image",
                 "seconds / image"], rows)


def roc_overlay_figure(title: str, groups: dict[str, tuple[np.ndarray, np.ndarray]], fpr: float, path: str) -> bool:
  """ROC curves of every score for one comparison on one axis; False (no file) when a group is empty."""
  if not any(np.isfinite(p).any() and np.isfinite(n).any() for p, n in groups.values()):
    return False
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(5.6, 5.0))
  cmap = plt.get_cmap("tab10")
  _roc(ax, [(name, p, n, cmap(i % 10)) for i, (name, (p, n)) in enumerate(groups.items())], fpr)
  ax.set_title(title, fontsize=10)
  plotting.save_figure(fig, path)
  return True


def spearman_matrix_figure(names: list[str], rho: np.ndarray, path: str) -> None:
  plt = plotting.pyplot()
  k = len(names)
  fig, ax = plt.subplots(figsize=(0.55 * k + 2.5, 0.5 * k + 2.0))
  im = ax.imshow(np.where(np.isfinite(rho), rho, 0.0), cmap="RdBu_r", vmin=-1, vmax=1)
  for i in range(k):
    for j in range(k):
      ax.text(j, i, "n/a" if not np.isfinite(rho[i, j]) else f"{rho[i, j]:.2f}", ha="center", va="center", fontsize=7)
  ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(k), names, fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Spearman rho")
  ax.set_title("Spearman correlation between scores (all images)", fontsize=10)
  plotting.save_figure(fig, path)


def agreement_section(workdir: str, timing: dict[str, Any], folder: str) -> tuple[dict[str, Any], list[str]]:
  """Spearman of each agreement estimator with the primary on the training subset of
  scores/agreement.csv, and its network passes / seconds per image ({} and [] without the file)."""
  path = wdir.agreement_csv(workdir)
  cols = scoring.read_agreement(path)
  if not cols:
    return {}, []
  ests = [c[: -len("_log_volume")] for c in cols if c.endswith("_log_volume") and c != "primary_log_volume"]
  prim = cols["primary_log_volume"]
  vals = {e: cols[f"{e}_log_volume"] for e in ests}
  nfe = {e: cols[f"{e}_nfe_total"] for e in ests}
  out = {"n": int(cols["id"].size), "ids": cols["id"].tolist(), "estimators": {}}
  table = []
  for e in ests:
    rho, p, n = stats.spearman(prim, vals[e])
    c = _cost(nfe[e], timing.get(f"agreement_{e}"))
    out["estimators"][e] = {"rho": rho, "p": p, "n": n, **c, "mean_log_volume": float(np.nanmean(vals[e]))}
    sec = c["seconds_per_image"]
    table.append([f"`{e}`", fmt(rho, 3), fmt_p(p), str(n), fmt(c["nfe_per_image"]),
                  "n/a" if not math.isfinite(sec) else f"{sec:.3g}" + ("*" if c.get("includes_compile") else ""),
                  fmt(float(np.nanmean(vals[e])))])
  md = ["## Estimator agreement on a training subset", "",
        f"The first {out['n']} training images scored again with {', '.join(f'`{e}`' for e in ests)}; Spearman "
        "correlation of each with the primary estimator's score (scores.csv) and its cost. Does the full-trace "
        "Hutchinson score rank images like the authors' K = 100 metric?", "",
        _table(["estimator", "Spearman rho vs primary", "p", "n", "network passes / image", "seconds / image",
                "mean L"], table), ""]
  plt = plotting.pyplot()
  fig, axes = plt.subplots(1, len(ests), figsize=(3.8 * len(ests), 3.5), squeeze=False)
  for ax, e in zip(axes[0], ests):
    ax.scatter(prim, vals[e], s=12, color=COLORS["trained"], lw=0)
    ax.set_xlabel("primary estimator (scores.csv)")
    ax.set_ylabel(e)
    ax.set_title(f"Spearman rho = {fmt(out['estimators'][e]['rho'], 3)}", fontsize=10)
  fig.tight_layout()
  plotting.save_figure(fig, os.path.join(folder, "agreement_subset.png"))
  md += ["![Agreement on the training subset](agreement_subset.png)", ""]
  return out, md


# --- volume growth through time: the profile and the bound ---------------------------


def _profile_groups(is_train: np.ndarray, det: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
  """Row masks over the scored images (failed solves left out) of the profile's groups."""
  mem, dup = np.zeros(is_train.size, bool), np.zeros(is_train.size, bool)
  mem[np.flatnonzero(is_train)] = det["copies_ratio"] > 0
  dup[np.flatnonzero(is_train)] = det["dup_count"] > 1
  return {"trained": is_train & ok, "held-out": ~is_train & ok, "memorised": mem & ok,
          "not memorised": is_train & ~mem & ok, "planted duplicates": dup & ok}


def _window_tests(x: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _window_list(v: np.ndarray) -> list[float]:
  """Per-window values for summary.json, a NaN (a group of the comparison with no finite
  value in the window, _window_tests) named as expected."""
  return [float(x) if np.isfinite(x) else not_estimated("a group of the comparison has no finite value")
          for x in v]


def profile_figure(e: str, z: dict[str, np.ndarray], groups: dict[str, np.ndarray], aucs: dict[str, np.ndarray],
                   path: str) -> None:
  """Left: mean L(t) per group and the bound L_max(t). Middle: excess L - L_max, mean +- 1 sd,
  memorised vs not (and held-out). Right: per-window AUROC against t."""
  plt = plotting.pyplot()
  ts = z["ts"]
  colors = {"trained": COLORS["trained"], "held-out": COLORS["held-out"], "memorised": COLORS["memorised"],
            "not memorised": "#2ca02c", "planted duplicates": COLORS["duplicates"]}
  fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4))
  for name, m in groups.items():
    if m.any():
      a1.plot(ts, np.nanmean(z["L_t"][m], 0), color=colors[name], lw=1.5, label=f"{name} (n={int(m.sum())})")
  a1.plot(ts, z["bound_t"], color="k", lw=1.2, ls="--", label="bound D log(sigma(t)/sigma(eps))")
  a1.set_ylabel(f"cumulative L(t) ({e}), nats")
  a1.set_title("mean profile per group", fontsize=10)
  a1.legend(fontsize=7, frameon=False)
  for name in ("memorised", "not memorised", "held-out"):
    m = groups[name]
    if m.any():
      mu, sd = np.nanmean(z["excess"][m], 0), np.nanstd(z["excess"][m], 0)
      a2.plot(ts, mu, color=colors[name], lw=1.5, label=name)
      a2.fill_between(ts, mu - sd, mu + sd, color=colors[name], alpha=0.15)
  a2.axhline(0, color="k", lw=0.8, ls="--")
  a2.set_ylabel("excess L(t) - L_max(t), nats")
  a2.set_title("excess over the bound: mean \u00b1 1 sd (> 0: network error)", fontsize=10)
  a2.legend(fontsize=7, frameon=False)
  mid = np.sqrt(z["edges"][:-1] * z["edges"][1:]) if z["edges"][0] > 0 else 0.5 * (z["edges"][:-1] + z["edges"][1:])
  for key, label, color in (("trained_vs_heldout", "trained vs held-out", COLORS["trained"]),
                            ("memorised_vs_not", "memorised vs not", COLORS["memorised"])):
    a3.plot(mid, aucs[key], "o-", color=color, lw=1.3, ms=3, label=f"{label} (window)")
    a3.plot(ts, aucs[f"{key}_cum"], ":", color=color, lw=1.3, label=f"{label} (cumulative L(t))")
  a3.axhline(0.5, color="0.5", lw=0.8, ls=":")
  a3.set_ylim(0, 1)
  a3.set_ylabel("AUROC")
  a3.set_title("where in t the signal lives", fontsize=10)
  a3.legend(fontsize=7, frameon=False)
  for ax in (a1, a2, a3):
    ax.set_xlabel("t")
    if ts.size and ts.min() > 0 and ts.max() / ts.min() > 50:
      ax.set_xscale("log")
  fig.tight_layout()
  plotting.save_figure(fig, path)


def profile_section(config, workdir: str, scores: dict[str, np.ndarray], is_train: np.ndarray,
                    det: dict[str, np.ndarray], folder: str) -> tuple[dict[str, Any], str]:
  """Volume growth through time, per estimator with a profile (scores/profile_E.npz,
  memvol/profile.py): where in t the membership and memorisation signals live (per-window
  AUROC, Mann-Whitney p Holm-corrected over the windows of one comparison), the excess over
  the bound and the fraction of each group above it, the first crossing times, and the capped
  score against L. ({'profile': {E: ...}} for summary.json, markdown); empty without profiles."""
  from memvol import volume  # presets: named settings of the volume engine
  rc = config.report
  summary: dict[str, Any] = {}
  md: list[str] = []
  for e in [str(x) for x in config.score.estimators]:
    path = wdir.profile(workdir, e)
    if not os.path.exists(path):
      continue
    z = io.load_npz(path)
    if z["ts"].size == 0 or "excess" not in z:
      continue
    if not (np.array_equal(z["ids"], scores["id"]) and np.array_equal(z["split"].astype(str), scores["split"])):
      raise ValueError(f"{path} is not in the row order of scores.csv; rerun --mode=score")
    ok = (np.isin(scores[f"{e}_status"], SUCCESS_STATUS) if f"{e}_status" in scores else np.ones(is_train.size, bool))
    ok &= np.isfinite(z["L_t"]).all(axis=1)
    g = _profile_groups(is_train, det, ok)
    ts, edges, dim = z["ts"], z["edges"], int(z["bound_dim"])
    L = scores[f"{e}_log_volume"]
    aucs, pvals = {}, {}
    for key, pos, neg in (("trained_vs_heldout", g["trained"], g["held-out"]),
                          ("memorised_vs_not", g["memorised"], g["not memorised"])):
      aucs[key], pvals[key] = _window_tests(z["windows"], pos, neg)
      aucs[f"{key}_cum"], pvals[f"{key}_cum"] = _window_tests(z["L_t"], pos, neg)
    empty = not_estimated("the group is empty")
    frac = {name: [float(np.mean(z["excess"][m, k] > 0)) if m.any() else empty for k in range(ts.size)]
            for name, m in g.items()}
    ever = {name: float(np.mean(np.isfinite(z["t_above"][m]))) if m.any() else empty for name, m in g.items()}
    t_cross = {name: float(np.median(z["t_above"][m][np.isfinite(z["t_above"][m])]))
               if m.any() and np.isfinite(z["t_above"][m]).any()
               else empty if not m.any() else not_estimated("no image of the group is above the bound")
               for name, m in g.items()}
    capped = np.where(ok, z["L_capped"], math.nan)
    full = np.where(ok, L, math.nan)
    cap_cmp = {}
    for key, pos, neg in COMPARISONS:
      cap_cmp[key] = {"L": _compare_or_reason(*comparison_groups(full, is_train, det)[key], (pos, neg), rc),
                      "L_capped": _compare_or_reason(*comparison_groups(capped, is_train, det)[key], (pos, neg), rc)}
    p = os.path.join(folder, f"{e}_profile.png")
    profile_figure(e, z, g, aucs, p)
    summary[e] = {"ts": ts.tolist(), "bound_t": z["bound_t"].tolist(), "bound_dim": dim,
                  "window_edges": edges.tolist(), "window_bound": z["window_bound"].tolist(),
                  "mean_L_t": {n: (np.nanmean(z["L_t"][m], 0).tolist() if m.any() else empty) for n, m in g.items()},
                  "fraction_above_bound": frac, "fraction_ever_above": ever, "median_t_above": t_cross,
                  "window_auroc": {k: _window_list(v) for k, v in aucs.items()},
                  "window_mw_p_holm": {k: _window_list(v) for k, v in pvals.items()},
                  "capped": cap_cmp}
    base, preset = volume.parse_estimator(e)
    md += [f"## Volume growth through time (`{e}`)", "",
           f"The profile L(t) = L(eps -> t) at {ts.size} times geometric in sigma (config.score.profile_times), "
           f"from the same solve as L, against the bound L_max(t) = {dim} log(sigma(t) / sigma(eps)) that every true "
           f"score respects (memvol/sde.py; {fmt(z['bound_t'][-1])} nats at T): whatever lies above it is the "
           "network's error, not volume. Windows are (t_{k-1}, t_k]; window AUROCs rank the growth dL_k inside the "
           "window, cumulative ones L(t_k). p: two-sided Mann-Whitney, Holm-corrected over the windows of one "
           "comparison (windows of the cumulative columns separately)."]
    if preset and preset.startswith("rank"):
      md += ["", f"`{e}` is a rank preset: a few fixed steps, so its values are a ranking statistic, not a volume; "
             "its excess over the bound is mostly discretisation error (BUILD.md, cheap L)."]
    md += ["", "**Where in t the signal lives**", ""]
    rows = []
    for k in range(edges.size - 1):
      cum = k < ts.size
      rows.append([f"({edges[k]:.4g}, {edges[k + 1]:.4g}]", fmt(z["window_bound"][k], 3)]
                  + [fmt(np.nanmean(z["windows"][g[n], k]), 3) if g[n].any() else "n/a"
                     for n in ("trained", "held-out", "memorised", "not memorised")]
                  + [f"{fmt(aucs[c][k], 3)} ({fmt_p(pvals[c][k])})" for c in ("trained_vs_heldout", "memorised_vs_not")]
                  + ([fmt(aucs[f"{c}_cum"][k], 3) for c in ("trained_vs_heldout", "memorised_vs_not")] if cum else ["", ""]))
    md.append(_table(["window (t)", "bound dL_max", "mean dL trained", "held-out", "memorised", "not memorised",
                      "AUROC trained vs held-out (Holm p)", "AUROC memorised vs not (Holm p)",
                      "cumulative AUROC trained vs held-out", "cumulative AUROC memorised vs not"], rows))
    md += ["", "**The bound: excess L(t) - L_max(t) and the fraction of each group above it**", ""]
    names = list(g)
    md.append(_table(["t", "L_max(t)"] + [f"mean excess {n}" for n in ("trained", "held-out", "memorised", "not memorised")]
                     + [f"above: {n}" for n in names],
                     [[f"{t:.4g}", fmt(z["bound_t"][k], 4)]
                      + [fmt(np.nanmean(z["excess"][g[n], k]), 3) if g[n].any() else "n/a"
                         for n in ("trained", "held-out", "memorised", "not memorised")]
                      + [fmt(frac[n][k], 3) for n in names] for k, t in enumerate(ts)]))
    md += ["", "Ever above the bound (at some profile time) and the median first profile time above it: "
           + "; ".join(f"{n} {fmt(ever[n], 3)} (median t {fmt(t_cross[n], 3)})" for n in names) + ".", "",
           "**A score that respects the bound**: L_capped = sum over windows of min(dL_k, dL_max,k) (memvol/profile.py: "
           "equal to L for every true score, never above L_max(T), and L minus the error the bound proves window "
           "by window).", ""]
    md.append(_table(["comparison", "AUROC L", "AUROC L_capped", "Welch p L", "Welch p L_capped", "mean L_capped (pos / neg)"],
                     [[f"{pos} vs {neg}"]
                      + ([fmt(cap_cmp[k]["L"]["auroc"], 3), fmt(cap_cmp[k]["L_capped"]["auroc"], 3),
                          fmt_p(cap_cmp[k]["L"]["welch_p"]), fmt_p(cap_cmp[k]["L_capped"]["welch_p"]),
                          f"{fmt(cap_cmp[k]['L_capped']['mean_pos'])} / {fmt(cap_cmp[k]['L_capped']['mean_neg'])}"]
                         if cap_cmp[k]["L"]["available"] and cap_cmp[k]["L_capped"]["available"]
                         else [cap_cmp[k]["L"].get("reason", cap_cmp[k]["L_capped"].get("reason", "n/a"))] + [""] * 4)
                      for k, pos, neg in COMPARISONS]))
    md += ["", f"![Profile, excess over the bound and per-window AUROC ({e})]({os.path.basename(p)})", ""]
  return ({"profile": summary} if summary else {}), "\n".join(md)
