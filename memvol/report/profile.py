"""The section "Volume growth through time" (scores/profile_E.npz, memvol/profile.py)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from memvol import io, volume
from memvol import workdir as wdir
from memvol.scoring import SUCCESS_STATUS
from memvol.report.claims import COMPARISONS, compare_or_reason, comparison_groups, window_tests
from memvol.report.figures import profile_figure
from memvol.report.tables import fmt, fmt_p, markdown_table, not_estimated


def _profile_groups(is_train: np.ndarray, det: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
  """Row masks over the scored images (failed solves left out) of the profile's groups."""
  mem, dup = np.zeros(is_train.size, bool), np.zeros(is_train.size, bool)
  mem[np.flatnonzero(is_train)] = det["copies_ratio"] > 0
  dup[np.flatnonzero(is_train)] = det["dup_count"] > 1
  return {"trained": is_train & ok, "held-out": ~is_train & ok, "memorised": mem & ok,
          "not memorised": is_train & ~mem & ok, "planted duplicates": dup & ok}


def _window_list(v: np.ndarray) -> list[float]:
  """Per-window values for summary.json, a NaN (a group of the comparison with no finite
  value in the window, window_tests) named as expected."""
  return [float(x) if np.isfinite(x) else not_estimated("a group of the comparison has no finite value")
          for x in v]


def profile_section(config, workdir: str, scores: dict[str, np.ndarray], is_train: np.ndarray,
                    det: dict[str, np.ndarray], folder: str) -> tuple[dict[str, Any], str]:
  """Volume growth through time, per estimator with a profile (scores/profile_E.npz,
  memvol/profile.py): where in t the membership and memorisation signals live (per-window
  AUROC, Mann-Whitney p Holm-corrected over the windows of one comparison), the excess over
  the bound and the fraction of each group above it, the first crossing times, and the capped
  score against L. ({'profile': {E: ...}} for summary.json, markdown); empty without profiles."""
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
      aucs[key], pvals[key] = window_tests(z["windows"], pos, neg)
      aucs[f"{key}_cum"], pvals[f"{key}_cum"] = window_tests(z["L_t"], pos, neg)
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
      cap_cmp[key] = {"L": compare_or_reason(*comparison_groups(full, is_train, det)[key], (pos, neg), rc),
                      "L_capped": compare_or_reason(*comparison_groups(capped, is_train, det)[key], (pos, neg), rc)}
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
    md.append(markdown_table(["window (t)", "bound dL_max", "mean dL trained", "held-out", "memorised", "not memorised",
                      "AUROC trained vs held-out (Holm p)", "AUROC memorised vs not (Holm p)",
                      "cumulative AUROC trained vs held-out", "cumulative AUROC memorised vs not"], rows))
    md += ["", "**The bound: excess L(t) - L_max(t) and the fraction of each group above it**", ""]
    names = list(g)
    md.append(markdown_table(["t", "L_max(t)"] + [f"mean excess {n}" for n in ("trained", "held-out", "memorised", "not memorised")]
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
    md.append(markdown_table(["comparison", "AUROC L", "AUROC L_capped", "Welch p L", "Welch p L_capped", "mean L_capped (pos / neg)"],
                     [[f"{pos} vs {neg}"]
                      + ([fmt(cap_cmp[k]["L"]["auroc"], 3), fmt(cap_cmp[k]["L_capped"]["auroc"], 3),
                          fmt_p(cap_cmp[k]["L"]["welch_p"]), fmt_p(cap_cmp[k]["L_capped"]["welch_p"]),
                          f"{fmt(cap_cmp[k]['L_capped']['mean_pos'])} / {fmt(cap_cmp[k]['L_capped']['mean_neg'])}"]
                         if cap_cmp[k]["L"]["available"] and cap_cmp[k]["L_capped"]["available"]
                         else [cap_cmp[k]["L"].get("reason", cap_cmp[k]["L_capped"].get("reason", "n/a"))] + [""] * 4)
                      for k, pos, neg in COMPARISONS]))
    md += ["", f"![Profile, excess over the bound and per-window AUROC ({e})]({os.path.basename(p)})", ""]
  return ({"profile": summary} if summary else {}), "\n".join(md)
