"""report.md, one function per section."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from memvol.report.claims import ALPHA, COMPARISONS
from memvol.scoring import SUCCESS_STATUS
from memvol.report.tables import fmt, fmt_p, markdown_table

STAGE_ORDER = ("train", "sample", "score", "detect", "report")


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


@dataclasses.dataclass(frozen=True)
class Findings:
  """What report.md is written from: info (summary.json's top-level numbers), estimators
  ({E: estimator_stats + solve counts}), estimator_agreement ({"A|B": {rho, p, n}} over all
  images), figures ({E: [(caption, file)]}), notes ({E: [text]}), timings ({stage: s}) and
  det (detect columns aligned to the training rows)."""

  info: dict[str, Any]
  estimators: dict[str, Any]
  estimator_agreement: dict[str, Any]
  figures: dict[str, list[tuple[str, str]]]
  notes: dict[str, list[str]]
  timings: dict[str, Any]
  det: dict[str, np.ndarray]


def render_markdown(config, f: Findings, extra_sections: str = "") -> str:
  """report.md: the findings first, then one section per estimator, the agreement between
  estimators, `extra_sections` (peers, profile), the copies and the stage wall times."""
  out = header_section(config, f.info) + findings_section(f)
  for e in f.info["estimators_list"]:
    out += estimator_section(config, e, f.estimators[e], f.figures[e], f.notes[e], f.info)
  out += estimator_agreement_section(f.estimator_agreement)
  if extra_sections:
    out += ["", extra_sections.rstrip("\n")]
  out += copies_section() + wall_times_section(f.timings)
  out.append("")
  return "\n".join(out)


def header_section(config, info: dict[str, Any]) -> list[str]:
  """The title, the data, the estimators and the numerics."""
  e0 = info["primary_estimator"]
  out = ["# memvol report", ""]
  out.append(f"Data `{config.data.name}` ({info['num_train']} distinct training images, "
             f"{info['num_planted_duplicates']} of them planted duplicates, {info['num_heldout']} held-out); "
             f"{info['num_samples']} `{info['sample_method']}` samples searched for copies; "
             f"estimators: {', '.join(f'`{e}`' for e in info['estimators_list'])} (primary: `{e0}`). "
             "Score = log volume growth L of the probability-flow ODE map from the image to the latent "
             "(larger = more latent volume flows onto the image = easier to reproduce).")
  out += ["", f"Matmul / convolution precision: scores `{config.score.get('precision', 'highest')}`, "
          f"samples `{config.sample.get('precision', 'highest')}` (`highest` = float32, as on CPU; "
          "`high` / `default` = TF32 on GPUs, bfloat16 passes on TPUs)."]
  return out


def findings_section(f: Findings) -> list[str]:
  """Both claims (primary estimator) in sentences, the copy counts and the correlations."""
  info, det = f.info, f.det
  st0 = f.estimators[info["primary_estimator"]]
  thr = info["ratio_threshold"]
  out = ["", "## Findings", ""]
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
  return out


def estimator_section(config, e: str, st: dict[str, Any], figures: list[tuple[str, str]], notes: list[str],
                      info: dict[str, Any]) -> list[str]:
  """The comparisons, correlations, per-class table, solve counts and figures of estimator e."""
  thr = info["ratio_threshold"]
  out = ["", f"## Estimator `{e}`", ""]
  header, rows = _comparison_rows(st, info["fpr"])
  out.append(markdown_table(header, rows))
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
  out.append(markdown_table(["variable", "rho", "p", "n"], sp_rows))
  if st["per_class"]:
    out += ["", "Per class (AUROC: trained vs held-out within the class):", ""]
    out.append(markdown_table(
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
  extra += notes
  if extra:
    out += [""] + [f"- {x}" for x in extra]
  for caption, fname in figures:
    out += ["", f"**{caption}**", "", f"![{caption}]({fname})"]
  return out


def estimator_agreement_section(agreement: dict[str, Any]) -> list[str]:
  """Spearman between every pair of estimators over all images."""
  if not agreement:
    return []
  return ["", "## Agreement between estimators", "",
          markdown_table(["pair", "Spearman rho", "p", "n"],
                         [[k.replace("|", " vs "), fmt(v["rho"], 3), fmt_p(v["p"]), str(v["n"])]
                          for k, v in agreement.items()]),
          "", "![Agreement between estimators](agreement.png)"]


def copies_section() -> list[str]:
  return ["", "## Copies found", "",
          "Samples (top) above their nearest training image (bottom): [../detect/copies.png](../detect/copies.png)",
          "", "![copies](../detect/copies.png)"]


def wall_times_section(timings: dict[str, Any]) -> list[str]:
  """Seconds per stage (timings.json), in the chain's order."""
  out = ["", "## Stage wall times", ""]
  if timings:
    order = [k for k in STAGE_ORDER if k in timings] + sorted(k for k in timings if k not in STAGE_ORDER)
    out.append(markdown_table(["stage", "seconds"], [[k, f"{float(timings[k]):.1f}"] for k in order]
                              + [["total", f"{sum(float(v) for v in timings.values()):.1f}"]]))
  else:
    out.append("No timings.json in the workdir (stages were not run through the entry point).")
  return out
