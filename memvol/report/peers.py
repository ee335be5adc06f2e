"""The sections "Peers on the same checkpoint" (every volume estimator beside the peer scores
of memvol/peers.py) and "Estimator agreement on a training subset" (scores/agreement.csv)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from memvol import io, scoring, stats
from memvol import workdir as wdir
from memvol.report.claims import COMPARISONS, PEER_COMPARISONS, best_scores, compare_or_reason, comparison_groups
from memvol.report.claims import comparison_groups_all
from memvol.report.figures import roc_overlay_figure, spearman_matrix_figure, subset_agreement_figure
from memvol.report.tables import fmt, fmt_p, markdown_table, not_estimated


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
  calibrated = calibrated_rows(scores, list(values), peers)
  if peers or calibrated:
    scorers = {e: values[e] for e in values}
    costs = {}
    for e in values:
      nfe = scores.get(f"{e}_nfe", np.full(n_rows, math.nan)) + scores.get(f"{e}_jvps", np.zeros(n_rows))
      costs[e] = _cost(nfe, timing.get(e))
    for n in peers:
      scorers[n] = cols[f"peer_{n}"]
      costs[n] = _cost(cols.get(f"peer_{n}_nfe"), timing.get(f"peer_{n}"))
    for name, (raw, col) in calibrated.items():
      scorers[name], costs[name] = cols[col], costs[raw]
    rc = config.report
    comps: dict[str, dict[str, Any]] = {}
    for key in PEER_COMPARISONS:
      pos, neg = next((p, q) for k, p, q in COMPARISONS if k == key)
      comps[key] = {name: compare_or_reason(*comparison_groups(v, is_train, det)[key], (pos, neg), rc)
                    for name, v in scorers.items()}
    names_all = list(scorers)
    rho = [[stats.spearman(scorers[a], scorers[b])[0] for b in names_all] for a in names_all]
    best = {k: best_scores(comps[k]) for k in comps}
    summary["peers"] = {"scores": names_all, "costs": costs, "comparisons": comps, "best": best,
                        "spearman": {"names": names_all, "rho": rho}}
    md += ["## Peers on the same checkpoint", "",
           f"Every volume estimator ({', '.join(f'`{e}`' for e in values)}) beside the peer scores "
           f"({', '.join(f'`{n}`' for n in peers)}; memvol/peers.py), each sign-normalised so that higher = "
           "member / memorised, on the same checkpoint, images and labels. Network passes count forward "
           "evaluations plus JVPs; seconds per image (wall time on this machine, shared or not) leave out "
           "batches that compiled (marked * where every batch compiled). Best per column in bold (Welch p: "
           "smallest among scores whose difference goes the claimed way)."
           + (" `lira_off_` / `lira_on_` rows: the raw score calibrated per image against the reference models of "
              f"score.reference={config.score.get('reference')} (LiRA offline: its z against the models that never "
              "saw the image; online: the IN against the OUT Gaussian); their passes are the scored model's, the "
              "reference models' are the screen's cost." if calibrated else ""), ""]
    for key in PEER_COMPARISONS:
      pos, neg = next((p, q) for k, p, q in COMPARISONS if k == key)
      md += [f"**{pos} vs {neg}**", "", _peer_table(comps[key], costs, best[key], float(rc.fpr)), ""]
      p = os.path.join(folder, f"peers_roc_{key}.png")
      if roc_overlay_figure(f"{pos} vs {neg}", comparison_groups_all(scorers, is_train, det, key), float(rc.fpr), p):
        md += [f"![ROC, {pos} vs {neg}]({os.path.basename(p)})", ""]
    spearman_matrix_figure(names_all, np.asarray(rho, np.float64), os.path.join(folder, "peers_spearman.png"))
    md += ["Spearman correlation between scores over all images:", "", "![Spearman matrix](peers_spearman.png)", ""]
  ag_summary, ag_md = subset_agreement_section(workdir, timing, folder)
  if ag_summary:
    summary["agreement"] = ag_summary
    md += ag_md
  return summary, "\n".join(md)


def calibrated_rows(scores: dict[str, np.ndarray], estimators: list[str], peers: list[str]
                    ) -> dict[str, tuple[str, str]]:
  """{row name: (raw row name, scores.csv column)} of the calibrated columns (score.reference)
  present: lira_off_<E> / lira_on_<E> from <E>_log_volume, lira_off_<p> / lira_on_<p> from peer_<p>."""
  out = {}
  for k in scoring.CALIBRATED_PREFIXES:
    out.update({f"{k}{e}": (e, f"{k}{e}_log_volume") for e in estimators if f"{k}{e}_log_volume" in scores})
    out.update({f"{k}{p}": (p, f"{k}peer_{p}") for p in peers if f"{k}peer_{p}" in scores})
  return out


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
  return markdown_table(["score", "AUROC [95% CI]", f"TPR@{fpr:.0%}FPR", "Welch p", "network passes / image",
                 "seconds / image"], rows)


def subset_agreement_section(workdir: str, timing: dict[str, Any], folder: str) -> tuple[dict[str, Any], list[str]]:
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
        markdown_table(["estimator", "Spearman rho vs primary", "p", "n", "network passes / image",
                        "seconds / image", "mean L"], table), ""]
  rhos = {e: out["estimators"][e]["rho"] for e in ests}
  subset_agreement_figure(prim, vals, rhos, os.path.join(folder, "agreement_subset.png"))
  md += ["![Agreement on the training subset](agreement_subset.png)", ""]
  return out, md
