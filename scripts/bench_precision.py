"""L under each matmul / convolution precision against "highest", per estimator.

    python scripts/bench_precision.py                                  # small_unet@14, random init, CPU: ~ minutes
    python scripts/bench_precision.py --model=paper_cifar10 --num_images=4 --estimators=paper --paper_steps=200
    python scripts/bench_precision.py --config=experiments/configs/mnist.py --workdir=runs/mnist --num_images=32

Network: a trained one (--config and --workdir: the workdir's latest checkpoint, EMA
params, scored on its first training and held-out images) or a memvol.models named config
at random init (--model name[@side], output layers redrawn as scripts/bench_volume.py does,
on MNIST digits). Estimator settings are the config's `score` section (base config without
--config) with the overrides below. For each estimator and precision: the wall time of one
batch (compilation excluded unless --repeats=0), mean L, and the max / mean |L - L_highest|
over the images. On a CPU the three settings compute the same thing (XLA:CPU has no TF32 or
bfloat16 passes), so the differences are 0 there; on a GPU / TPU they are the point.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from memvol import numerics, volume
from memvol import sde as sde_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def _bench_volume():
  spec = importlib.util.spec_from_file_location("bench_volume", os.path.join(_HERE, "bench_volume.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_network(args):
  """(eps_fn, images [n, *shape], config or None, description)."""
  if args.workdir:
    from memvol import data, loading
    from experiments import configs
    config = configs.load(args.config)
    eps_fn = loading.load_eps_fn(config, args.workdir)
    split = data.load_split(config, args.workdir)
    half = args.num_images // 2
    images = np.concatenate([split.train.images[:args.num_images - half], split.heldout.images[:half]])
    return eps_fn, np.asarray(images, np.float32), config, f"trained {args.workdir}"
  bv = _bench_volume()
  eps_fn, shape, nparams = bv.build(args.model, sde_lib.VPSDE(), keep_zero_init=False)
  images = bv._images(bv.model_shape(args.model)[0], args.num_images, shape)
  return eps_fn, images, None, f"{args.model} random init ({nparams / 1e6:.2f}M params)"


def options(config, estimator: str, args) -> volume.VolumeOptions:
  if config is None:
    from experiments.configs.base import get_base_config
    config = get_base_config()
  over = {"variance_reduction": None, "save_ts": None}
  if estimator == "hutch++":
    estimator, over["variance_reduction"] = "hutchinson", "hutch++"
  if args.rtol:
    over.update(rtol=args.rtol, atol=args.rtol)
  if estimator in ("subspace", "paper"):
    over["K"] = args.K if estimator == "paper" else args.subspace_K
  if estimator == "paper":
    over["paper_steps"] = args.paper_steps
  if estimator == "exact" and args.exact_steps:
    over.update(solver="euler", adaptive=False, num_steps=args.exact_steps)
  return volume.VolumeOptions.from_config(config, estimator, **over)


def timed(eps_fn, x, opts, repeats: int):
  res, best = None, float("inf")
  for _ in range(max(repeats, 0) + 1):
    start = time.perf_counter()
    res = volume.run(eps_fn, x, opts, key=jax.random.PRNGKey(0))
    best = time.perf_counter() - start
  return res, best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="small_unet@14")
  p.add_argument("--config", default="")
  p.add_argument("--workdir", default="")
  p.add_argument("--num_images", type=int, default=4)
  p.add_argument("--estimators", default="hutchinson,exact,subspace,paper")
  p.add_argument("--precisions", default=",".join(numerics.PRECISIONS))
  p.add_argument("--rtol", type=float, default=0.0, help="rtol = atol override (0: the config's)")
  p.add_argument("--K", type=int, default=100, help="paper frame size")
  p.add_argument("--subspace_K", type=int, default=8)
  p.add_argument("--paper_steps", type=int, default=50, help="paper: steps run (the scheme uses 1000)")
  p.add_argument("--exact_steps", type=int, default=4, help="exact: fixed Euler steps (0 = adaptive)")
  p.add_argument("--repeats", type=int, default=1, help="timed runs after a warm-up (0: one run, compile included)")
  args = p.parse_args()
  if bool(args.config) != bool(args.workdir):
    raise ValueError("--config and --workdir go together")
  eps_fn, images, config, what = load_network(args)
  x = jnp.asarray(images)
  precisions = [numerics.check_precision(q) for q in args.precisions.split(",")]
  print(f"devices: {jax.devices()}\nnetwork: {what}; {len(images)} images {images.shape[1:]}")
  rows = []
  for est in args.estimators.split(","):
    base = options(config, est, args)
    ref = None
    for q in ["highest"] + [q for q in precisions if q != "highest"]:
      res, seconds = timed(eps_fn, x, dataclasses.replace(base, precision=q), args.repeats)
      L = np.asarray(res.log_volume, np.float64)
      ref = L if ref is None else ref
      diff = np.abs(L - ref)
      note = {"paper": f"K {base.K}, {base.paper_steps} steps", "subspace": f"K {base.K}",
              "exact": f"{base.solver} {base.num_steps} steps" if not base.adaptive else "adaptive"}.get(
                  est, f"{base.num_probes} probes, {base.solver} rtol {base.rtol:g}")
      rows.append((est, note, q, seconds, float(np.mean(res.nfe)), float(L.mean()), float(diff.max()),
                   float(diff.mean()), " ".join(f"{v:.2f}" for v in L[:4])))
      print(f"  {est} {q}: {seconds:.2f} s, mean L {L.mean():.3f}, max |dL| {diff.max():.3g}", flush=True)
  print(f"\n| estimator | settings | precision | s / batch of {len(images)} | NFE / image | mean L | "
        "max abs diff vs highest | mean abs diff | L of the first images |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.0f} | {r[5]:.3f} | {r[6]:.3g} | {r[7]:.3g} | {r[8]} |")
  print(f"({'compilation included' if args.repeats == 0 else 'compilation excluded'})")


if __name__ == "__main__":
  main()
