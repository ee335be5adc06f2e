"""The report's figures, one function per figure; each draws to `path` (PNG)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from memvol import plotting, stats
from memvol.report.tables import fmt, fmt_p

COLORS = {"trained": "#d62728", "held-out": "#1f77b4", "memorised": "#9467bd", "duplicates": "#ff7f0e"}


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


def estimator_agreement_figure(ests: list[str], scores: dict[str, np.ndarray], is_train: np.ndarray,
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


def subset_agreement_figure(primary: np.ndarray, values: dict[str, np.ndarray], rhos: dict[str, float],
                            path: str) -> None:
  """One scatter per agreement estimator E: its L against the primary estimator's on the
  training subset (primary [n], values {E: [n]}, rhos {E: Spearman rho})."""
  plt = plotting.pyplot()
  fig, axes = plt.subplots(1, len(values), figsize=(3.8 * len(values), 3.5), squeeze=False)
  for ax, (e, v) in zip(axes[0], values.items()):
    ax.scatter(primary, v, s=12, color=COLORS["trained"], lw=0)
    ax.set_xlabel("primary estimator (scores.csv)")
    ax.set_ylabel(e)
    ax.set_title(f"Spearman rho = {fmt(rhos[e], 3)}", fontsize=10)
  fig.tight_layout()
  plotting.save_figure(fig, path)
