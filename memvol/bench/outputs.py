"""The benchmark's report.md and figures, from summary.json's content (analysis.summarise)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from memvol import io, plotting, report
from memvol.bench import analysis

FIGURES = ("primary.png", "propensity.png", "frontier.png", "predictors.png")
TASK_NAMES = {"T1_auroc": "T1 AUROC", "T2_auroc": "T2 AUROC", "T3_spearman": "T3 Spearman", "T5_spearman": "T5 Spearman",
              "predictor_spearman": "Spearman with p_i", "typicality_spearman": "IN-mean vs OUT-mean Spearman"}


def _ms(g: dict[str, Any], digits: int = 3) -> str:
  return report.fmt_ms(g.get("mean"), g.get("sd"), g.get("n"), digits)


def _f(x: Any) -> float:
  return math.nan if x is None else float(x)


def _ci(v: list[Any], digits: int = 3) -> str:
  return f"[{report.fmt(v[0], digits)}, {report.fmt(v[1], digits)}]"


def _sign(x: Any) -> str:
  x = _f(x)
  return "n/a" if not math.isfinite(x) else "+" if x > 0 else "-" if x < 0 else "0"


def primary_lines(s: dict[str, Any]) -> list[str]:
  """The co-primary tests, stated before their numbers, then per test the numbers, the verdict
  and whether its sign holds under the other copy labels."""
  fam = s["primary"]
  lines = [f"**Three co-primary tests (fixed before any run),** on the {fam['label']} copy label, "
           f"{fam['correction']} over the three at family alpha = {fam['alpha']:g}, each with a "
           f"{fam['level']:.0%} interval:", ""]
  for t in fam["tests"]:
    what = (f"{TASK_NAMES[t['task']]} of `{t['a']}` minus that of `{t['b']}`, per model, the mean over models"
            if t["task"] == "T2_auroc" else f"{TASK_NAMES[t['task']]} of `{t['a']}` (mean over an image's IN models) "
            "with p_i, against 0")
    lines.append(f"- {t['id']} ({t['name']}): {what}; {t['test']}, {t['interval']}.")
  lines.append("")
  rows = []
  for t in fam["tests"]:
    other = ", ".join(f"{k} {_sign(v)} ({'kept' if t['keeps_sign'].get(k) else 'flips' if t['keeps_sign'].get(k) is False else 'n/a'})"
                      for k, v in t.get("other_labels", {}).items()) or "no sample-level records"
    rows.append([t["id"], report.fmt(t["estimate"], 3), _ci(t["ci"]), report.fmt_p(t["p"]), report.fmt_p(t["p_holm"]),
                 f"**{t['verdict']}**", other])
  lines += [report.markdown_table(["test", "estimate", "95 % interval", "p", "Holm p", "verdict",
                                   "sign under the other labels"], rows), ""]
  for t in fam["tests"]:
    if "positives" in t and "models_for_target" in t:
      pos, neg = t["positives"], t["negatives"]
      lines += [f"{t['id']} detail: over M = {report.fmt(t['n'])} models with both groups, sd "
                f"{report.fmt(t['sd'], 2)} over models, t = {report.fmt(t['t'], 3)}, t interval {_ci(t['t_ci'])}; "
                f"copied / not copied IN images per model {np.mean(pos):.1f} / {np.mean(neg):.1f} (min {min(pos)} / "
                f"{min(neg)}); a +-{t['target_half_width']:g} t interval needs about "
                f"{report.fmt(t['models_for_target'])} models. Crossed bootstrap sd {report.fmt(t['boot_sd'], 2)}: "
                f"{report.fmt(t['boot_sd_models_only'], 2)} from models alone, {report.fmt(t['boot_sd_images_only'], 2)} "
                "from images alone (the images' part shrinks only with a larger pool).", ""]
  if not s["complete"]:
    lines += [f"Interim: {len(s['models_done'])} of {s['num_models_planned']} models; the tests are read at the "
              "planned M.", ""]
  return lines


def label_lines(s: dict[str, Any], names: list[str]) -> list[str]:
  """T2 / T3 / T5 of `names` under every copy label, how each label is made, and which signs
  hold under all of them."""
  labs = s["label_names"]
  if len(labs) == 1:
    return ["Copy labels: only the ratio label; these records predate the per-sample nearest-neighbour data "
            "from which the absolute and closest-sample labels are computed.", ""]
  lines = ["Copy labels (the answer depends on the label):", ""]
  lines += [f"- {k}: {s['labels'][k]['how']}." for k in labs] + [""]
  header = ["score"] + [f"{k} {t}" for k in labs for t in ("T2", "T3", "T5")]
  rows = [[f"`{n}`"] + [report.fmt(s["labels"][k]["scores"][n][c], 3) for k in labs
                        for c in ("T2_auroc", "T3_spearman", "T5_spearman")] for n in names]
  lines += [report.markdown_table(header, rows), ""]
  pairs = [f"{k} {report.fmt(v, 2)}" for k, v in s["label_rho"].items()]
  agree = [v for v in s["holds_under_all"].values() if v["score"] in names]
  held = [f"`{v['score']}` {v['task']} {_sign(next(iter(v['signs'].values())))}" for v in agree if v["agree"]]
  lines += [f"Spearman between the labels' propensities: {', '.join(pairs)}. Signs of T3 / T5 that hold under all "
            f"{len(labs)} labels ({len(held)} of {len(agree)}): {', '.join(held) or 'none'}.", ""]
  return lines


def typicality_lines(s: dict[str, Any], names: list[str]) -> list[str]:
  typ = s["typicality"]
  return ["Typicality share (Spearman over images of a score's mean over the image's IN models with its mean over "
          "its OUT models: the part of a score that belongs to the image, whoever trained on it): "
          + ", ".join(f"`{n}` {report.fmt(typ[n]['rho'], 2)}" for n in names if n in typ) + ".", ""]


def predictor_lines(s: dict[str, Any]) -> list[str]:
  """Each data-only predictor's Spearman with p_i and with the best OUT-model score, per label."""
  pr = s.get("predictors") or {}
  if not pr:
    return ["Data-only predictors: no pool.json beside the records.", ""]
  labs = [k for k in s["label_names"] if k in pr]
  names = list(pr[labs[0]]["rows"])
  header = ["predictor"] + [f"{k}: vs p_i" for k in labs] + [f"{k}: vs OUT `{pr[k]['best_out_score']}`" for k in labs]
  rows = [[f"`{n}`"] + [report.fmt(pr[k]["rows"][n]["rho_p"], 2) for k in labs]
          + [report.fmt(pr[k]["rows"][n]["rho_best_out"], 2) for k in labs] for n in names]
  best = ", ".join(f"{k} `{pr[k]['best_out_score']}` {report.fmt(pr[k]['best_out_rho'], 2)}" for k in labs)
  return ["Data-only predictors (no model; Spearman over the pool's images): distance to the nearest other pool "
          "image in pixels (k = 1, mean of k = 5, same class) and in the quality classifier's features, and the "
          f"PNG size. The best OUT-model score (T5) per label: {best}.", "",
          report.markdown_table(header, rows), ""]


def plan_lines(s: dict[str, Any]) -> list[str]:
  ch = s["choice"]
  return [f"{s['num_models_planned']} models, each trained on a class-balanced random half of a pool of "
          f"{s['pool_size']} distinct images (every image IN for exactly half of them, in complementary pairs), "
          f"{ch['train_steps']} training steps, {s['num_samples']} samples per model searched for copies of the whole "
          f"pool{_sampler(s.get('sampler'))}. Regime: {ch['rule']}. Samples: {ch['sizing']}.", ""]


def _sampler(sm: dict[str, Any] | None) -> str:
  if not sm:
    return ""
  return f" (sampler `{sm['method']}`: " + ", ".join(f"{k} {v}" for k, v in sm.items() if k != "method") + ")"


def pilot_table(s: dict[str, Any]) -> list[str]:
  ch = s["choice"]
  return [report.markdown_table(["pool N", "steps", "IN copied", "share", "copies", "samples"],
                                [[str(p["pool_size"]), str(r["steps"]), str(r["copied"]), report.fmt(r["share_copied"], 3),
                                  str(r["copies"]), str(p["num_samples"])] for p in ch["pilots"] for r in p["grid"]]), ""]


def copies_lines(s: dict[str, Any]) -> list[str]:
  cp = s["copies"]
  return [f"Copy rate per (model, image): IN {report.fmt(cp['IN_rate'], 3)}, OUT {report.fmt(cp['OUT_rate'], 3)} "
          f"(the criterion's false positives); share of a model's IN images copied at least once "
          f"{_ms(cp['IN_share_copied'])}, of its OUT images {_ms(cp['OUT_share_copied'])}.", ""]


def leaderboard_lines(s: dict[str, Any], names: list[str]) -> list[str]:
  """The leaderboard rows of `names` (in that order) with the lines that explain them."""
  board = s["leaderboard"]
  header = ["score", "T1 AUROC", "TPR@1%", "TPR@0.1%", "T2 AUROC", "T2 vs loss q", "T3 rho", "T5 rho", "T5 q",
            "passes / image", "s / image"]
  rows = [[f"`{n}`", _ms(board[n]["T1_auroc"]), report.fmt(board[n]["T1_tpr@0.01"], 3),
           report.fmt(board[n]["T1_tpr@0.001"], 3), _ms(board[n]["T2_auroc"]), report.fmt_p(board[n]["T2_q_vs_baseline"]),
           report.fmt(board[n]["T3_spearman"], 3), report.fmt(board[n]["T5_spearman"], 3), report.fmt_p(board[n]["T5_q_vs_0"]),
           _ms(board[n]["passes_per_image"], 4), _ms(board[n]["seconds_per_image"], 3)] for n in names]
  return ["Higher = more memorised; ranked by T2 (mean ± sd over models (n)). T1: IN vs OUT per model (TPRs pooled "
          "over models). T2: copied vs not among a model's IN images. T3 / T5: Spearman over images of the score "
          "averaged over the image's IN / OUT models with its counterfactual propensity p_i. q: "
          f"{s['correction']} ({s['num_secondary']} tests); `lira_off_` / `lira_on_`: LiRA's offline / online "
          "per-example calibration from the other models. Passes and seconds are the scored model's own; a "
          "calibrated score also needs the image scored by the other models (shadow models, here the plan's own).", "",
          report.markdown_table(header, rows), "",
          f"Cost-accuracy front on T2 among the raw scores (cheapest first): "
          f"{', '.join(f'`{n}`' for n in s['front_T2']) or 'none'}.", ""]


def significant(s: dict[str, Any], q: float = 0.05) -> list[dict[str, Any]]:
  """The secondary tests with q below `q`, smallest q first."""
  sig = [t for t in s["secondary"] if math.isfinite(_f(t["q"])) and t["q"] < q]
  return sorted(sig, key=lambda t: t["q"])


def secondary_lines(s: dict[str, Any], most: int = 40) -> list[str]:
  sig = significant(s)
  lines = [f"Secondary tests with q < 0.05: {len(sig)} of {s['num_secondary']}" + (":" if sig else ".")]
  lines += [f"- [{t['label']}] `{t['score']}` vs {t['vs']} on {TASK_NAMES[t['task']]}: {report.fmt(t['diff'], 3)}, "
            f"p {report.fmt_p(t['p'])}, q {report.fmt_p(t['q'])} ({t['test']})" for t in sig[:most]]
  if len(sig) > most:
    lines.append(f"- ... and {len(sig) - most} more (summary.json)")
  return lines + [""]


def cost_lines(s: dict[str, Any]) -> list[str]:
  sec = s["seconds_per_model"]
  return ["Seconds per model (mean ± sd (n)): " + ", ".join(f"{k} {_ms(v, 3)}" for k, v in sec.items())
          + f"; share of a model's time spent compiling {_ms(s['compile_share'], 2)} (the first model of a process "
          "compiles, the rest reuse its programs). Whole plan so far: "
          f"{s['seconds_total']['models'] / 3600:.2f} process-hours of models and "
          f"{s['seconds_total']['pilots'] / 3600:.2f} of pilots (train and copy search).", ""]


def ranked(s: dict[str, Any], calibrated: bool | None = None) -> list[str]:
  """Scores ranked by T2 (those without a T2 value last); only raw or only calibrated ones
  when `calibrated` says so."""
  names = s["ranking_T2"] + [n for n in s["scores"] if n not in s["ranking_T2"]]
  if calibrated is None:
    return names
  return [n for n in names if (analysis.raw_of(n) != n) == calibrated]


def leading_names(s: dict[str, Any]) -> list[str]:
  """The raw scores and the LiRA-offline rank32 (the label table's rows)."""
  return ranked(s, calibrated=False) + [n for n in s["scores"] if n == f"lira_off_{analysis.RANK32}"]


def render_markdown(s: dict[str, Any], figures: list[str]) -> str:
  lines = ["# memvol benchmark: which training images will the model copy?", ""]
  lines += plan_lines(s) + pilot_table(s) + copies_lines(s) + primary_lines(s)
  lines += leaderboard_lines(s, ranked(s)) + label_lines(s, leading_names(s)) + typicality_lines(s, ranked(s))
  lines += predictor_lines(s) + secondary_lines(s) + cost_lines(s)
  lines += [f"![{os.path.basename(f)}]({os.path.basename(f)})" for f in figures]
  return "\n".join(lines) + "\n"


def readme_markdown(s: dict[str, Any]) -> str:
  """The README's block: the plan, the primary test and verdict, the raw scores' leaderboard,
  the calibrated ones', the significant secondary tests and the cost."""
  lines = plan_lines(s) + copies_lines(s) + primary_lines(s)
  lines += leaderboard_lines(s, ranked(s, calibrated=False))
  lines += ["The same scores after LiRA calibration:", "", report.markdown_table(
      ["score", "T1 AUROC", "TPR@0.1%", "T2 AUROC", "T5 rho"],
      [[f"`{n}`", _ms(s["leaderboard"][n]["T1_auroc"]), report.fmt(s["leaderboard"][n]["T1_tpr@0.001"], 3),
        _ms(s["leaderboard"][n]["T2_auroc"]), report.fmt(s["leaderboard"][n]["T5_spearman"], 3)]
       for n in ranked(s, calibrated=True)]), ""]
  lines += label_lines(s, leading_names(s)) + typicality_lines(s, ranked(s, calibrated=False)) + predictor_lines(s)
  lines += secondary_lines(s, most=12) + cost_lines(s)
  return "\n".join(lines).rstrip("\n")


def primary_figure(s: dict[str, Any], path: str) -> None:
  """Per-model T2 AUROC differences of the model-level co-primary tests (sorted), their mean
  and crossed bootstrap intervals."""
  plt = plotting.pyplot()
  tests = [t for t in s["primary"]["tests"] if t["task"] == "T2_auroc"]
  fig, axes = plt.subplots(1, max(1, len(tests)), figsize=(7 * max(1, len(tests)), 4.5), squeeze=False)
  for ax, t in zip(axes[0], tests):
    d = np.array([_f(v) for v in t.get("per_model", [])])
    d = np.sort(d[np.isfinite(d)])
    if d.size:
      ax.plot(np.arange(d.size), d, "o", ms=4, label="one model")
      ax.axhline(t["estimate"], color="k", lw=1.5, label=f"mean {t['estimate']:.3f}")
      lo, hi = (_f(v) for v in t["ci"])
      if math.isfinite(lo):
        ax.axhspan(lo, hi, color="C1", alpha=0.3, label=f"crossed bootstrap 95% [{lo:.3f}, {hi:.3f}]")
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "no model has copied and uncopied IN images", transform=ax.transAxes, ha="center")
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("model (sorted by its difference)")
    ax.set_ylabel(f"T2 AUROC: {t['a']} - {t['b']}", fontsize=7)
    ax.set_title(f"{t['id']} ({t['name']}): {t['verdict']}", fontsize=9)
    ax.grid(alpha=0.3)
  plotting.save_figure(fig, path)


def predictors_figure(s: dict[str, Any], path: str) -> None:
  """p_i under each copy label against the pixel distance to the nearest other pool image."""
  plt = plotting.pyplot()
  labs = s["label_names"]
  fig, axes = plt.subplots(1, len(labs), figsize=(5 * len(labs), 4), squeeze=False)
  nn1 = np.array([_f(v) for v in s.get("predictor_values", {}).get("nn1_pixel", [])])
  for ax, k in zip(axes[0], labs):
    p = np.array([_f(v) for v in s["labels"][k]["p"]])
    if nn1.size == p.size:
      ax.scatter(nn1, p, s=10, alpha=0.7)
      rho = s["predictors"][k]["rows"]["nn1_pixel"]["rho_p"]
      ax.set_title(f"{k} label: Spearman {report.fmt(rho, 3)}", fontsize=9)
    else:
      ax.text(0.5, 0.5, "no pool.json beside the records", transform=ax.transAxes, ha="center")
    ax.set_xlabel("pixel distance to the nearest other pool image")
    ax.set_ylabel(f"p_i ({k} label)")
    ax.grid(alpha=0.3)
  plotting.save_figure(fig, path)


def propensity_figure(s: dict[str, Any], path: str) -> None:
  """p_i against the primary pair's scores averaged over the image's IN (T3) and OUT (T5) models."""
  plt = plotting.pyplot()
  p = np.array([_f(v) for v in s["propensity"]["p"]])
  names = list(s["mean_scores"])
  fig, axes = plt.subplots(len(names) or 1, 2, figsize=(11, 4 * max(1, len(names))), squeeze=False)
  for row, n in zip(axes, names):
    for ax, task in zip(row, ("T3", "T5")):
      v = np.array([_f(x) for x in s["mean_scores"][n][task]])
      ax.scatter(v, p, s=10, alpha=0.7)
      rho = s["leaderboard"][n][f"{task}_spearman"]
      ax.set_title(f"{task}: {n}, Spearman {report.fmt(rho, 3)}", fontsize=9)
      ax.set_xlabel(f"score averaged over the image's {'IN' if task == 'T3' else 'OUT'} models")
      ax.set_ylabel("copy propensity p_i (IN rate - OUT rate)")
      ax.grid(alpha=0.3)
  plotting.save_figure(fig, path)


def frontier_figure(s: dict[str, Any], path: str) -> None:
  """T2 AUROC (mean ± sd over models) against network passes per image, with the front."""
  plt = plotting.pyplot()
  board = s["leaderboard"]
  fig, ax = plt.subplots(figsize=(9, 5.5))
  names = [n for n in s["scores"] if math.isfinite(_f(board[n]["T2_auroc"]["mean"]))
           and math.isfinite(_f(board[n]["passes_per_image"]["mean"]))]
  for n in names:
    x, y = board[n]["passes_per_image"]["mean"], board[n]["T2_auroc"]["mean"]
    kind = n.split("_")[0] + "_" + n.split("_")[1] if n.startswith("lira_") else "raw"
    ax.errorbar(x, y, yerr=np.nan_to_num(_f(board[n]["T2_auroc"]["sd"])), capsize=2, alpha=0.7,
                fmt={"raw": "s", "lira_off": "o", "lira_on": "^"}[kind], color="C0" if analysis.is_volume(n) else "C3")
    ax.annotate(n, (x, y), fontsize=5, xytext=(3, 3), textcoords="offset points")
  front = s["front_T2"]
  if front:
    ax.step([board[n]["passes_per_image"]["mean"] for n in front], [board[n]["T2_auroc"]["mean"] for n in front],
            "k--", where="post", lw=1, label="front of the raw scores (blue: volume, red: peers; s raw, o LiRA offline, ^ online)")
    ax.legend(fontsize=7)
  ax.axhline(0.5, color="grey", lw=0.8, ls=":")
  ax.set_xscale("log")
  ax.set_xlabel("network passes per image (log)")
  ax.set_ylabel("T2 AUROC (copied vs not among IN), mean ± sd over models")
  ax.grid(alpha=0.3)
  plotting.save_figure(fig, path)


def write(s: dict[str, Any], folder: str) -> list[str]:
  """The figures and report.md in `folder`; the figures' paths."""
  figs = [os.path.join(folder, f) for f in FIGURES]
  for fn, path in zip((primary_figure, propensity_figure, frontier_figure, predictors_figure), figs):
    fn(s, path)
  with io.atomic_open(os.path.join(folder, "report.md"), "w") as f:
    f.write(render_markdown(s, figs))
  return figs
