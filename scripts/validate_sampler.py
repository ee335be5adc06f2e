"""Does a fast sampler find the same copies as the 1000-step reverse SDE? On a trained job's
checkpoint, each sampler draws the job's number of samples under several sampling seeds; the
script prints, per sampler and seed, the copy rate, distinct copied images, sample quality
(the quality classifier's FD / precision / recall against held-out images) and, where the
workdir holds scores, the memorised-vs-not comparison of the primary score under that
sampler's copy labels; then every pair's agreement (Jaccard of the copied sets, Spearman of
the copy counts, which images differ), same-sampler pairs being the run-to-run spread.

  python scripts/validate_sampler.py --workdir=runs/mnist --config=experiments/configs/mnist.py --samplers=sde,dpm:25:2,dpm:50:3 \
      --seeds=0,1 --out=runs/mnist/sampler_check

Samples are cached per sampler and seed in --out (a rerun resumes); the summary goes to
--out/summary.json. Sampler specs: sde (config.sample.sde_steps Euler-Maruyama steps),
heun[:steps], ode, dpm[:steps[:order[:schedule]]] (DPM-Solver++ on the PF ODE), dpmsde[:...]
(SDE-DPM-Solver++ on the reverse SDE).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from experiments import configs  # noqa: E402
from memvol import detect, io, loading, parallel, quality, sampling, scoring, stats  # noqa: E402
from memvol import workdir as wdir  # noqa: E402


def sampler_config(config, spec: str, seed_offset: int):
  """(config for one sampler spec and sampling seed, method name)."""
  c, method = sampling.with_sampler(config, spec)
  c.seed = int(config.seed) + 1000 * int(seed_offset)  # only the sampling key reads it here
  return c, method


def draw(config, workdir: str, spec: str, seed: int, out: str, log=print) -> dict[str, np.ndarray]:
  path = os.path.join(out, f"samples_{spec.replace(':', '-')}_seed{seed}.npz")
  if os.path.exists(path):
    return io.load_npz(path)
  c, method = sampler_config(config, spec, seed)
  eps_fn = loading.load_eps_fn(c, workdir, use_ema=bool(c.sample.use_ema))
  shape = tuple(detect.load_split(c, workdir).train.images.shape[1:])
  n, bs = int(c.sample.num_samples), int(c.sample.batch_size)
  start, chunks = time.time(), []
  for s in range(0, n, bs):
    chunks.append(sampling.generate(c, method, eps_fn, shape, parallel.local_mesh(), s, min(n, s + bs)))
    log(f"  {spec} seed {seed}: {min(n, s + bs)}/{n} samples, {time.time() - start:.0f} s")
  images = np.clip(np.concatenate([x["images"] for x in chunks]), -1, 1)
  result = dict(images=images, nfe=np.concatenate([x["nfe"] for x in chunks]), seconds=np.asarray(time.time() - start))
  io.save_npz(path, **result)
  return result


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", required=True, help="a trained job's workdir")
  ap.add_argument("--config", default="experiments/configs/mnist.py", help="the job's config file (path[:arg])")
  ap.add_argument("--samplers", default="sde,dpm:25:2")
  ap.add_argument("--seeds", default="0,1")
  ap.add_argument("--out", default=None, help="cache and summary folder (default: WORKDIR/sampler_check)")
  args = ap.parse_args()
  config = configs.load(args.config)
  out = args.out or os.path.join(args.workdir, "sampler_check")
  os.makedirs(out, exist_ok=True)
  specs, seeds = args.samplers.split(","), [int(s) for s in args.seeds.split(",")]
  split = detect.load_split(config, args.workdir)
  train = np.asarray(split.train.images, np.float32)
  ref = quality.Reference.build(config, split, out)
  scores_path = wdir.scores_csv(args.workdir)
  primary = scoring.estimators_of(config)[0]
  scores = scoring.read_scores(scores_path, (primary,)) if os.path.exists(scores_path) else None

  runs = {}
  for spec, seed in itertools.product(specs, seeds):
    got = draw(config, args.workdir, spec, seed, out)
    copies = detect.detect(got["images"], train, config)["ratio"]
    row = dict(spec=spec, seed=seed, nfe=float(np.mean(got["nfe"])), seconds=float(got["seconds"]),
               copy_rate=float(copies.copied.mean()), distinct=int((copies.counts > 0).sum()),
               **{k: float(v) for k, v in ref.metrics(got["images"]).items()})
    if scores is not None:
      l = scores[f"{primary}_log_volume"][scores["split"] == "train"]
      mem = copies.counts > 0
      if 0 < mem.sum() < len(mem):
        row.update(mem_auroc=stats.auroc(l[mem], l[~mem]), mem_welch_p=stats.welch(l[mem], l[~mem])[1],
                   mem_mwu_p=stats.mann_whitney(l[mem], l[~mem])[1])
    runs[spec, seed] = (row, copies)
    print(json.dumps(row), flush=True)

  pairs = []
  for (ka, (_, a)), (kb, (_, b)) in itertools.combinations(runs.items(), 2):
    ag = detect.agreement(a, b)
    ids = np.asarray(split.train.ids)
    pairs.append(dict(a=f"{ka[0]} s{ka[1]}", b=f"{kb[0]} s{kb[1]}", same_sampler=ka[0] == kb[0],
                      jaccard=ag["jaccard"], spearman=ag["spearman"],
                      only_a=ids[ag["only_a"]].tolist(), only_b=ids[ag["only_b"]].tolist()))
  print(f"\n{'pair':<34} {'Jaccard':>8} {'Spearman':>9}  copied by one only (image ids)")
  for p in pairs:
    print(f"{p['a'] + ' vs ' + p['b']:<34} {p['jaccard']:8.3f} {p['spearman']:9.3f}  {p['only_a']} | {p['only_b']}")
  io.save_json(os.path.join(out, "summary.json"), {"runs": [r for r, _ in runs.values()], "pairs": pairs})


if __name__ == "__main__":
  main()
