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
scores/agreement.csv, the estimator agreement on the training subset (agreement_subset.png).
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

from memvol import detect, io, scoring, stats
from memvol import workdir as wdir
from memvol.report.claims import (ALPHA, COMPARISONS, PEER_COMPARISONS, comparison_groups, estimator_stats,
                                  headline_claim, headline_nonfinite, rank_correlation, window_tests)
from memvol.report.figures import (COLORS, curves_figure, estimator_agreement_figure, overview_figure,
                                   per_class_figure, topk_figure)
from memvol.report.markdown import Findings, render_markdown
from memvol.report.peers import peers_section
from memvol.report.profile import profile_section
from memvol.report.tables import NotEstimated, expected_nan, fmt, fmt_ms, fmt_p, jsonable, markdown_table, not_estimated
__all__ = [  # the stage, and what other modules (mitigate, scripts, tests) use from the package
    "ALPHA", "COLORS", "COMPARISONS", "PEER_COMPARISONS", "SUCCESS_STATUS", "Findings", "NotEstimated",
    "comparison_groups", "estimator_stats", "expected_nan", "fmt", "fmt_ms", "fmt_p", "headline_nonfinite", "is_complete",
    "jsonable", "markdown_table", "not_estimated", "peers_section", "profile_section", "rank_correlation",
    "render_markdown", "run",
    "settings", "stale_reason", "window_tests",
]


SUCCESS_STATUS = scoring.SUCCESS_STATUS


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


DONE_MEANS = "outputs present, made with these settings and inputs"
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

  estimator_agreement: dict[str, Any] = {}  # every pair of estimators, all images
  for i, a in enumerate(ests):
    for b in ests[i + 1:]:
      rho, p, n = stats.spearman(values[a], values[b])
      estimator_agreement[f"{a}|{b}"] = {"rho": rho, "p": p, "n": n}
  if estimator_agreement:
    estimator_agreement_figure(ests, values, is_train, estimator_agreement, os.path.join(folder, "agreement.png"))

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
      "trained_gt_heldout": headline_claim(per_est[ests[0]]["trained_vs_heldout"], ests[0]),
      "memorised_gt_not": headline_claim(per_est[ests[0]]["memorised_vs_not"], ests[0]),
      "duplicates_gt_singletons": headline_claim(per_est[ests[0]]["duplicates_vs_singletons"], ests[0]),
  }
  nonfinite = headline_nonfinite(claims)  # on the raw numbers: jsonable turns NaN into null
  if nonfinite:
    logging.warning("report: headline numbers not finite: %s", ", ".join(nonfinite))
  undefined: list[str] = []
  expected: dict[str, str] = {}
  summary = jsonable({**info, "claims": claims, "estimators": per_est, "estimator_agreement": estimator_agreement,
                    "timings_s": timings, **peer_summary}, "", undefined, expected)
  summary["not_estimated"] = expected
  summary["undefined"] = undefined
  summary["nonfinite_headline"] = nonfinite
  findings = Findings(info=info, estimators=per_est, estimator_agreement=estimator_agreement, figures=figures,
                      notes=notes, timings=timings, det=det)
  text = render_markdown(config, findings, extra_sections=peer_md)
  io.save_json(os.path.join(folder, "summary.json"), summary)
  with io.atomic_open(os.path.join(folder, "report.md"), "w") as f:
    f.write(text)
  for name in ("summary.json", "report.md"):
    os.chmod(os.path.join(folder, name), 0o644)
  io.record_settings(folder, record)
  logging.info("report: %s", os.path.join(folder, "report.md"))
  return summary
