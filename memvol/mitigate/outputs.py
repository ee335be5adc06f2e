"""The mitigation's report.md, figure and summary.json, from analysis.summarise's content."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from memvol import io, plotting, report
from memvol.mitigate.analysis import DIFFERENCES, TESTED


def fmt_group(g: dict[str, Any], m: str, digits: int = 3) -> str:
  """'mean ± sd (n)' of metric m in group g, n = the seeds with a finite value; '-' if none."""
  return report.fmt_ms(g[m + "_mean"], g[m + "_sd"], g.get(m + "_n"), digits, missing="-")


def fmt_p_holm(c: dict[str, Any], key: str) -> str:
  """'raw (Holm)' of a test cell's p-value `key` (welch_p | mw_p)."""
  return f"{report.fmt_p(c[key])} ({report.fmt_p(c.get(key + '_holm'))})"


def primary_lines(pr: dict[str, Any]) -> list[str]:
  """The pre-registered comparison, stated before its numbers, then the numbers and the verdict."""
  lines = [f"**Primary comparison (fixed before any run):** {pr['metric']} (distinct training images copied per "
           f"model) of `{pr['a']}` minus that of `{pr['b']}`; {pr['test']} at alpha = {pr['alpha']:g}, with a "
           f"{pr['interval']}. Every other test is secondary (BH q in summary.json).", ""]
  if "diff" not in pr:
    return lines + [f"Result: {pr['verdict']}.", ""]
  return lines + [f"Result over {pr['n_a']} / {pr['n_b']} models: {report.fmt(pr['mean_a'], 3)} vs "
                  f"{report.fmt(pr['mean_b'], 3)}, difference **{report.fmt(pr['diff'], 3)}** "
                  f"[{report.fmt(pr['ci'][0], 3)}, {report.fmt(pr['ci'][1], 3)}], Welch t = {report.fmt(pr['welch_t'], 3)}, "
                  f"p = {report.fmt_p(pr['welch_p'])}. **Verdict: {pr['verdict']}.**", ""]


def render_markdown(summary: dict[str, Any], figures: list[str]) -> str:
  lines = ["# memvol: acting on the score", "",
           "Arms retrain from scratch with the selected training images modified; copies = samples "
           "that copy a training image (d1/d2 < threshold), copied images = distinct training images "
           "copied; targeted = the copies the `none` arms made of the selected images (what the "
           "selection aims at); mean ± sd (n) over seeds, n = the seeds with a finite value. "
           "FD / KID / precision / recall: classifier features of the samples against the held-out images. "
           "`copied` selects the baseline's copied images, so its k differs from ceil(q N).", ""]
  for regime, base in summary["baselines"].items():
    lines += [f"## Regime `{regime}`", "",
              f"Arms done: {sum(r['regime'] == regime for r in summary['arms'])} "
              f"(all regimes: {len(summary['arms'])} of {summary.get('num_arms_planned', len(summary['arms']))} planned).", "",
              f"Baseline ({base['workdir']}, {base['num_samples']} samples x {base['sde_steps']} steps): "
              f"{base['copies']} copies, {base['copied_images']} images copied of {base['num_train']}; "
              f"FD {report.fmt(base.get('fd'))}, selection column `{base['score_column']}`.", ""]
    bad = base.get("nonfinite_score_ids", [])
    if bad:
      lines += [f"{len(bad)} training images have a non-finite selection score (ids "
                f"{', '.join(str(i) for i in bad[:20])}{' ...' if len(bad) > 20 else ''}): `score` arms ranked "
                "them below every finite score (mitigate.on_nonfinite = 'last').", ""]
    pr = summary.get("primary", {}).get(regime)
    if pr:
      lines += primary_lines(pr)
    header = ["group", "seeds", "k", "copies", "copied images", "copies sel / unsel",
              "images sel / unsel", "targeted", "FD", "KID", "precision", "recall", "final loss"]
    rows = []
    for g in (g for g in summary["groups"] if g["regime"] == regime):
      rows.append([g["group"], str(len(g["seeds"])), "/".join(str(k) for k in sorted(set(g["num_selected"]))),
                   fmt_group(g, "copies"), fmt_group(g, "copied_images"),
                   f"{fmt_group(g, 'copies_selected')} / {fmt_group(g, 'copies_unselected')}",
                   f"{fmt_group(g, 'copied_selected')} / {fmt_group(g, 'copied_unselected')}",
                   fmt_group(g, "targeted"), fmt_group(g, "fd"), fmt_group(g, "kid"),
                   fmt_group(g, "precision"), fmt_group(g, "recall"), fmt_group(g, "final_loss", 4)])
    lines += [report.markdown_table(header, rows), ""]
    tests = [t for t in summary["tests"] if t["regime"] == regime]
    if tests:
      header = ["a vs b"] + [f"{m} (Welch p / MW p)" for m in TESTED] + [f"{m} a - b" for m in DIFFERENCES]
      rows = [[f"{t['a']} vs {t['b']}"] + [f"{fmt_p_holm(t[m], 'welch_p')} / {fmt_p_holm(t[m], 'mw_p')}"
                                           for m in TESTED]
              + [report.fmt(t[f"{m}_diff"], 3) for m in DIFFERENCES] for t in tests]
      lines += ["Tests over seeds (two-sided): each p-value raw, and in parentheses Holm-adjusted over "
                f"all {len(tests) * len(TESTED)} tests of this table (Welch and Mann-Whitney as two "
                "families). `targeted` is a difference of means without a test: `score` selects the same "
                "images in every seed, so its sd is 0 by construction.", "", report.markdown_table(header, rows), ""]
    pert = [g for g in summary["groups"] if g["regime"] == regime and g["modification"] == "perturb"]
    if pert:
      header = ["group", "L before (baseline)", "L after (baseline)", "PSNR dB", "SSIM",
                "L original (retrained)", "L perturbed (retrained)"]
      keys = ("L_before_baseline", "L_after_baseline", "psnr", "ssim", "L_selected_retrained",
              "L_perturbed_retrained")
      rows = [[g["group"]] + [fmt_group(g, k, 4) for k in keys] for g in pert]
      lines += ["Perturbed images (mean over the selected images, then mean ± sd over seeds; L by the "
                "scoring estimator; retrained = the arm's own model, trained on the perturbed images):",
                "", report.markdown_table(header, rows), ""]
  lines += [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures]
  return "\n".join(lines) + "\n"


def figure(summary: dict[str, Any], path: str) -> None:
  """Per regime: copies per arm group (seeds as dots, mean ± sd) and copies against FD."""
  plt = plotting.pyplot()
  regimes = list(summary["baselines"])
  fig, axes = plt.subplots(len(regimes), 2, figsize=(11, 4.6 * len(regimes)), squeeze=False,
                           gridspec_kw={"hspace": 0.75})
  for row, regime in zip(axes, regimes):
    gs = [g for g in summary["groups"] if g["regime"] == regime]
    ax = row[0]
    for i, g in enumerate(gs):
      ys = [r["copies"] for r in summary["arms"] if r["regime"] == regime and r["group"] == g["group"]]
      ax.scatter(np.full(len(ys), i) + np.linspace(-0.12, 0.12, len(ys)), ys, s=14, alpha=0.7)
      ax.errorbar(i + 0.25, g["copies_mean"], yerr=np.nan_to_num(g["copies_sd"]), fmt="k_", capsize=3)
    ax.set_xticks(range(len(gs)), [g["group"] for g in gs], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("samples that are copies")
    ax.set_title(f"{regime}: copies per arm (dots: seeds)")
    ax.grid(alpha=0.3)
    ax = row[1]
    for g in gs:
      ax.errorbar(g["fd_mean"], g["copies_mean"], xerr=np.nan_to_num(g["fd_sd"]),
                  yerr=np.nan_to_num(g["copies_sd"]), fmt="o", capsize=3, label=g["group"])
    ax.set_xlabel("FD to held-out (classifier features; lower = better)")
    ax.set_ylabel("samples that are copies")
    ax.set_title(f"{regime}: copies vs quality")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  plotting.save_figure(fig, path)


def write_outputs(summary: dict[str, Any], folder: str, log: Callable[[str], None] = print) -> None:
  fig = os.path.join(folder, "copies_vs_quality.png")
  figure(summary, fig)
  undefined: list[str] = []
  expected: dict[str, str] = {}
  clean = report.jsonable(summary, "", undefined, expected)  # NaN -> null
  io.save_json(os.path.join(folder, "summary.json"), clean | {"not_estimated": expected, "undefined": undefined})
  with io.atomic_open(os.path.join(folder, "report.md"), "w") as f:
    f.write(render_markdown(summary, [fig]))
  log(f"[memvol] mitigate: summary written to {folder}/summary.json and report.md")

