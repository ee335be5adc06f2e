"""The screen's outputs in workdir/screen: risk.csv, contact.png, histogram.png, report.md."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from memvol import io, plotting, report

FIGURES = ("contact.png", "histogram.png")


def contact_sheet(images: np.ndarray, risk: np.ndarray, ids: np.ndarray, k: int, path: str, title: str) -> None:
  """The k riskiest images (riskiest first) above the k safest (safest last)."""
  plt = plotting.pyplot()
  order = np.argsort(-risk, kind="stable")
  k = min(int(k), len(order) // 2)
  fig, axes = plt.subplots(2, 1, figsize=(8, 8.5))
  for ax, pick, what in ((axes[0], order[:k], "riskiest"), (axes[1], order[-k:], "safest")):
    plotting.show_image(ax, plotting.image_grid(images[pick], ncol=min(8, k)) / 127.5 - 1.0)
    ax.set_title(f"{k} {what} (ids {ids[pick[0]]} .. {ids[pick[-1]]})", fontsize=9)
  fig.suptitle(title, fontsize=9)
  plotting.save_figure(fig, path)


def histogram(risk: np.ndarray, path: str, xlabel: str) -> None:
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.hist(risk, bins=min(40, max(5, len(risk) // 4)), color="C0", alpha=0.8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("images")
  ax.grid(alpha=0.3)
  plotting.save_figure(fig, path)


def _ms(g: dict[str, Any], digits: int = 3) -> str:
  return report.fmt_ms(g.get("mean"), g.get("sd"), g.get("n"), digits)


def render_markdown(s: dict[str, Any]) -> str:
  """report.md from summary.json's content."""
  r = s["risk"]
  lines = ["# memvol screen: which images will a model trained on this data copy?", "",
           f"{s['num_images']} images of data.name={s['identity']['data']['name']!r} "
           f"(shape {'x'.join(str(v) for v in s['identity']['image_shape'])}; the job's "
           f"{s['num_train']} training and {s['num_heldout']} held-out images).", "",
           f"**Risk:** {r['definition']}. Higher risk = more likely to be copied, where a copy is "
           f"**{r['copy_label_text']}**. Basis: {r['basis']}. Under another copy definition the direction can flip "
           "(on digits the pixel distance to the nearest other image predicts the copy propensity at +0.75 under the "
           "ratio label and -0.76 under an absolute-distance label).", ""]
  if s["risk_kind"] == "model":
    c = s["cost"]
    lines += [f"Reference models: {s['num_models']} on complementary class-balanced random halves (every image IN "
              f"for {s['num_models'] // 2}, OUT for {s['num_models'] // 2}), {s['train_steps']} training steps each, "
              f"every image scored with {', '.join(f'`{n}`' for n in s['scores'])}.", "",
              f"**Cost:** {report.fmt(c['total_seconds'], 3)} s of reference models in all; per model (mean ± sd (n)): "
              + ", ".join(f"{k} {_ms(v)} s" for k, v in c["per_model"].items())
              + f"; share compiling {_ms(c['compile_share'], 2)}. A data-only risk (screen.risk=data) needs no models: "
              f"{report.fmt(c['predictor_seconds'], 3)} s here.", ""]
  else:
    lines += [f"**Cost:** {report.fmt(s['cost']['predictor_seconds'], 3)} s (data-only predictors, no models).", ""]
  rows = [[f"`{k}`", report.fmt(v["rho"], 3), report.fmt_p(v["p"]), str(v["n"])] for k, v in s["predictors"].items()]
  lines += ["Data-only predictors against the risk (Spearman over images):", "",
            report.markdown_table(["predictor", "rho", "p", "n"], rows), ""]
  lines += ["Riskiest images (id, label, risk): "
            + ", ".join(f"{i} ({lab}, {report.fmt(v, 3)})" for i, lab, v in s["riskiest"]) + ".", "",
            "Outputs: `risk.csv` (per image: id in its source, label, split, risk, rank, each score's OUT- and "
            "IN-model mean, sd and count, the data-only predictors), `contact.png`, `histogram.png`. A job calibrates "
            "its scores against this screen with `--config.score.reference=<this workdir>`.", ""]
  lines += [f"![{f}]({f})" for f in FIGURES]
  return "\n".join(lines) + "\n"


def write(folder: str, s: dict[str, Any], table: list[dict[str, Any]], columns: list[str], images: np.ndarray,
          risk: np.ndarray, ids: np.ndarray, num_shown: int) -> None:
  """risk.csv, the figures, summary.json and report.md in `folder`."""
  io.save_csv(os.path.join(folder, "risk.csv"), table, columns)
  contact_sheet(images, risk, ids, num_shown, os.path.join(folder, FIGURES[0]), s["risk"]["definition"])
  histogram(risk, os.path.join(folder, FIGURES[1]), f"risk ({s['risk']['definition']})")
  io.save_json(os.path.join(folder, "summary.json"), s)
  with io.atomic_open(os.path.join(folder, "report.md"), "w") as f:
    f.write(render_markdown(s))


def check_finite(risk: np.ndarray, ids: np.ndarray, where: str) -> None:
  """ValueError naming the images whose risk is not finite (nothing is written then)."""
  bad = ids[~np.isfinite(risk)]
  if bad.size:
    raise ValueError(f"{where}: the risk of {bad.size} image(s) is not finite (ids {bad[:8].tolist()}: failed solves "
                     "in every OUT model?); nothing written")

