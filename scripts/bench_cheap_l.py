"""Cheap L: every hutchinson setting against the adaptive reference, on a trained job's images.

  python scripts/bench_cheap_l.py --workdir=runs/mnist [--out=runs/mnist/bench_cheap_l]
      [--config=experiments/configs/mnist.py] [--num_images=0] [--only=name,name] [--probe_keys=5]

Loads the job's (EMA) network and split through memvol.loading / memvol.data, scores every
image (train then held-out, the score stage's order and probe keys) with each setting of
SETTINGS (overrides of the job's score config: one code path, volume.batch_log_volume through
scoring.score_images), and prints one table row per setting: network passes per image
(forward evaluations + JVPs, as counted by the solve), seconds per image (batches that
compiled left out), mean L, Spearman with the reference, relative error of the mean and the
median / max per-image relative error against the reference, and the AUROC of every
comparison of the report (memorisation labels from <workdir>/detect/detect.csv when present).
The reference is the job's own score.estimators[0] at the config's score settings, without
a preset (default job: hutchinson, adaptive tsit5, rtol 1e-4, 4 Rademacher probes); settings with 4 probes share its probes, so their error is
the solver's alone. Each setting's scores are cached in <out>/cache/<name>_<digest>.npz (the
digest covers the options, model and images), so a rerun only computes new settings. Writes
<out>/table.md and <out>/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from memvol import data, detect, io, loading, models, parallel, report, scoring, stats, volume  # noqa: E402
from memvol import profile as profile_lib  # noqa: E402
from memvol import sde as sde_lib  # noqa: E402
from memvol import workdir as wdir  # noqa: E402

# name -> overrides of the job's score options ("reference": none). Presets by name.
SETTINGS = {
    "reference": {},
    "hutchinson@rank8": "rank8",      # euler 4 x 1
    "hutchinson@rank32": "rank32",    # heun 8 x 1
    "hutchinson@vol108": "vol108",    # Richardson of heun 18 and 9 x 1 (the next two rows)
    "heun 9 x 1": dict(solver="heun", adaptive=False, num_steps=9, num_probes=1),
    "heun 18 x 1": dict(solver="heun", adaptive=False, num_steps=18, num_probes=1),
    "heun 27 x 1": dict(solver="heun", adaptive=False, num_steps=27, num_probes=1),
    "heun 27 x 1 log_sigma": dict(solver="heun", adaptive=False, num_steps=27, num_probes=1, time_grid="log_sigma"),
    "heun 27 x 1 cv": dict(solver="heun", adaptive=False, num_steps=27, num_probes=1, control_variate=True),
    "tsit5 9 x 1": dict(solver="tsit5", adaptive=False, num_steps=9, num_probes=1),
    "heun 11 x 4": dict(solver="heun", adaptive=False, num_steps=11),
    "tsit5 3 x 4": dict(solver="tsit5", adaptive=False, num_steps=3),
}
COMPARISONS = [k for k, _, _ in report.COMPARISONS]


def options_of(config, name: str) -> volume.VolumeOptions:
  spec = SETTINGS[name]
  base = volume.parse_estimator(str(config.score.estimators[0]))[0]  # the job's estimator without a preset
  if isinstance(spec, str):
    return volume.VolumeOptions.from_config(config, f"hutchinson@{spec}")
  return volume.VolumeOptions.from_config(config, base, **spec)


def _digest(opts: volume.VolumeOptions, params_digest: str, images_digest: str, key_index: int = 0) -> str:
  o = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts) if f.name != "sde"}
  extra = [key_index] if key_index else []  # key 0 keeps the digests of caches made before keys were counted
  blob = json.dumps([o, type(opts.sde).__name__, dataclasses.asdict(opts.sde), params_digest, images_digest] + extra,
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def score_setting(eps_fn, table: scoring.ImageTable, key, opts: volume.VolumeOptions, mesh, batch_size: int,
                  log) -> dict[str, np.ndarray]:
  """Scores of every image in batches; per-image seconds (batch wall time / size) and whether
  the batch compiled."""
  n = len(table.ids)
  recs = []
  for b, start in enumerate(range(0, n, batch_size)):
    end = min(start + batch_size, n)
    t = time.perf_counter()
    out = scoring.score_images(eps_fn, table.images[start:end], table.ids[start:end], key, opts, mesh,
                               pad_to=batch_size)
    out["seconds"] = np.full(end - start, (time.perf_counter() - t) / (end - start))
    out["compiled"] = np.full(end - start, b == 0)
    recs.append(out)
    log(f"  batch {start}-{end}: {out['seconds'][0]:.2f} s/img, mean L {np.mean(out['log_volume']):.1f}")
  return {k: np.concatenate([r[k] for r in recs]) for k in recs[0] if recs[0][k] is not None}


def row_of(name: str, rec: dict[str, np.ndarray], ref: dict[str, np.ndarray], is_train, det) -> dict:
  L, Lr = rec["log_volume"].astype(np.float64), ref["log_volume"].astype(np.float64)
  rel = np.abs(L - Lr) / np.abs(Lr)
  rho, _, _ = stats.spearman(L, Lr)
  aurocs = {}
  if det is not None:
    groups = report.comparison_groups(L, is_train, det)
    for k in COMPARISONS:
      pos, neg = groups[k]
      aurocs[k] = stats.auroc(pos, neg) if len(pos) and len(neg) else float("nan")
  else:
    aurocs["trained_vs_heldout"] = stats.auroc(L[is_train], L[~is_train])
  timing = scoring.seconds_per_image(rec)
  return {"name": name, "passes_per_image": float(np.mean(rec["nfe"] + rec["num_jvps"])),
          "seconds_per_image": timing["seconds_per_image"], "mean_L": float(np.mean(L)),
          "spearman": rho, "rel_err_of_mean": float(abs(np.mean(L) - np.mean(Lr)) / abs(np.mean(Lr))),
          "median_rel_err": float(np.median(rel)), "max_rel_err": float(np.max(rel)),
          "num_failed": int(np.sum(rec["status"] != 0)), "auroc": aurocs}


def over_keys(rows: list[dict]) -> dict:
  """One row from the rows of K probe keys: every number its mean, the AUROCs with their sd
  (ddof 1; NaN for one key) under `auroc_sd`, and `num_keys`."""
  out = dict(rows[0])
  for k, v in rows[0].items():
    if isinstance(v, float):
      out[k] = float(np.mean([r[k] for r in rows]))
  out["auroc"] = {c: float(np.mean([r["auroc"][c] for r in rows])) for c in rows[0]["auroc"]}
  out["auroc_sd"] = {c: float(np.std([r["auroc"][c] for r in rows], ddof=1)) if len(rows) > 1 else float("nan")
                     for c in rows[0]["auroc"]}
  out["num_keys"] = len(rows)
  return out


def reference_profile(config, table, ref: dict[str, np.ndarray], is_train, det) -> tuple[str, dict]:
  """Where the reference's L is made and where its signal lives: per window of its profile the
  bound, mean dL of trained / held-out images, the per-window AUROC (Holm-corrected
  Mann-Whitney p over the windows, report.window_tests) and the fraction of trained images
  above the bound at the window's end."""
  opts = options_of(config, "reference")
  if "L_t" not in ref or opts.save_ts is None:
    return "", {}
  dim = profile_lib.bound_dim(opts.estimator, int(np.prod(table.images.shape[1:])), opts.K)
  z = profile_lib.summarise(opts.sde, opts.t_start, opts.t_end, np.asarray(opts.save_ts), ref["L_t"],
                            ref["log_volume"], dim)
  ok = ref["status"] == 0
  groups = {"trained_vs_heldout": (is_train & ok, ~is_train & ok)}
  if det is not None:
    mem = np.zeros(is_train.size, bool)
    mem[np.flatnonzero(is_train)] = det["copies_ratio"] > 0
    groups["memorised_vs_not"] = (mem & ok, is_train & ~mem & ok)
  tests = {k: report.window_tests(z["windows"], *g) for k, g in groups.items()}
  head = ["window (t)", "bound", "mean dL trained", "mean dL held-out", "trained above bound at end"] + [
      f"AUROC {k} (Holm p)" for k in tests]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  frac = [float(np.mean(z["excess"][is_train & ok, k] > 0)) for k in range(z["excess"].shape[1])]
  for k in range(z["windows"].shape[1]):
    cells = [f"({z['edges'][k]:.4g}, {z['edges'][k + 1]:.4g}]", f"{z['window_bound'][k]:.1f}",
             f"{np.mean(z['windows'][is_train & ok, k]):.1f}", f"{np.mean(z['windows'][~is_train & ok, k]):.1f}",
             f"{frac[k]:.2f}" if k < len(frac) else ""]
    cells += [f"{tests[c][0][k]:.3f} ({report.fmt_p(tests[c][1][k])})" for c in tests]
    lines.append("| " + " | ".join(cells) + " |")
  ever = np.isfinite(z["t_above"])
  summary = {"edges": z["edges"].tolist(), "window_bound": z["window_bound"].tolist(),
             "fraction_trained_above_at_t": frac,
             "fraction_ever_above": {"trained": float(np.mean(ever[is_train & ok])),
                                     "held-out": float(np.mean(ever[~is_train & ok]))},
             "median_t_above_trained": float(np.median(z["t_above"][is_train & ok & ever])) if (is_train & ok & ever).any()
             else float("nan"),
             "window_auroc": {k: v[0].tolist() for k, v in tests.items()},
             "L_capped_auroc_trained_vs_heldout": stats.auroc(z["L_capped"][is_train & ok], z["L_capped"][~is_train & ok])}
  text = ("Reference profile (" + f"{int(ok.sum())} images): ever above the bound: trained "
          f"{summary['fraction_ever_above']['trained']:.2f}, held-out {summary['fraction_ever_above']['held-out']:.2f}; "
          f"median first time above (trained) {summary['median_t_above_trained']:.4g}; capped-score AUROC trained vs "
          f"held-out {summary['L_capped_auroc_trained_vs_heldout']:.3f}.\n\n")
  return text + "\n".join(lines) + "\n", summary


def markdown(rows: list[dict], ref_passes: float) -> str:
  comps = [k for k in COMPARISONS if k in rows[0]["auroc"]]
  head = ["setting", "passes / image", "x fewer", "s / image", "mean L", "Spearman", "rel. err. of mean",
          "median / max per-image rel. err."] + [f"AUROC {k}" for k in comps]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["name"], f"{r['passes_per_image']:.0f}", f"{ref_passes / r['passes_per_image']:.1f}",
             f"{r['seconds_per_image']:.3f}", f"{r['mean_L']:.1f}", f"{r['spearman']:.4f}",
             f"{100 * r['rel_err_of_mean']:.2f}%",
             f"{100 * r['median_rel_err']:.2f}% / {100 * r['max_rel_err']:.2f}%"]
    sd = r.get("auroc_sd", {})
    cells += [f"{r['auroc'][k]:.3f}" + (f" ± {sd[k]:.3f}" if np.isfinite(sd.get(k, np.nan)) else "") for k in comps]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", default="")
  ap.add_argument("--config", default="experiments/configs/mnist.py")
  ap.add_argument("--num_images", type=int, default=0, help="score only the first n images of each split (0 = all)")
  ap.add_argument("--only", default="", help="comma-separated setting names (the reference is always scored)")
  ap.add_argument("--probe_keys", type=int, default=1, help="probe keys per setting but the reference (mean ± sd)")
  args = ap.parse_args(argv)
  from experiments import configs
  config = configs.load(args.config)
  out = args.out or os.path.join(args.workdir, "bench_cheap_l")
  os.makedirs(os.path.join(out, "cache"), exist_ok=True)
  names = list(SETTINGS) if not args.only else ["reference"] + [s for s in args.only.split(",") if s != "reference"]
  unknown = [s for s in names if s not in SETTINGS]
  if unknown:
    raise SystemExit(f"unknown settings {unknown}; known: {list(SETTINGS)}")

  model, params, _ = loading.load_model(config, args.workdir, use_ema=bool(config.score.use_ema))
  eps_fn = models.make_eps_fn(model, params, sde_lib.from_config(config.sde))
  table = scoring.image_table(data.load_split(config, args.workdir))
  if args.num_images:
    keep = np.concatenate([np.flatnonzero(table.split == s)[:args.num_images] for s in ("train", "heldout")])
    table = scoring.ImageTable(*(np.asarray(a)[keep] for a in table))
  is_train = table.split == "train"
  det = None
  det_path = wdir.detect_csv(args.workdir)
  if os.path.exists(det_path):
    det = detect.align_detect(table.ids[is_train], detect.read_detect(det_path), det_path)
  mesh, key, bs = parallel.local_mesh(), scoring.score_key(config), int(config.score.batch_size)
  pdig, idig = scoring.parts.tree_digest(eps_fn), scoring.parts.digest(table.images, table.ids)
  results = {}
  for name in names:
    opts = options_of(config, name)
    results[name] = []
    for k in range(1 if name == "reference" else max(1, args.probe_keys)):
      cache = os.path.join(out, "cache", f"{name.replace(' ', '_').replace('@', '-')}_{_digest(opts, pdig, idig, k)}.npz")
      if os.path.exists(cache):
        results[name].append(io.load_npz(cache))
        print(f"[bench] {name} key {k}: cached {cache}", flush=True)
        continue
      print(f"[bench] {name} key {k}: {len(table.ids)} images", flush=True)
      rec = score_setting(eps_fn, table, key if k == 0 else jax.random.fold_in(key, k), opts, mesh, bs,
                          lambda s: print(s, flush=True))
      io.save_npz(cache, **rec)
      results[name].append(rec)
  ref = results["reference"][0]
  rows = [over_keys([row_of(n, rec, ref, is_train, det) for rec in results[n]]) for n in names]
  md = markdown(rows, rows[0]["passes_per_image"])
  prof_md, prof = reference_profile(config, table, ref, is_train, det)
  md += "\n" + prof_md
  print(md)
  with io.atomic_open(os.path.join(out, "table.md"), "w") as f:
    f.write(md)
  io.save_json(os.path.join(out, "results.json"), {"workdir": args.workdir, "num_images": int(len(table.ids)),
                                                   "memorisation_labels": det is not None, "rows": rows,
                                                   "reference_profile": prof})


if __name__ == "__main__":
  main()
