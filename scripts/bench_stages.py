"""The default job's three costly stages, before and after, on the same cores in one run.

  python scripts/bench_stages.py [--workdir=runs/mnist] [--config=experiments/configs/mnist.py]

On the job's network (a trained workdir's EMA weights, or random weights at the config's
shapes without --workdir) it prints, each as wall and process-CPU seconds (CPU time moves
less than wall time on a shared machine):
- a 2048^2 float32 matmul under jit: the machine's GFLOP/s, the yardstick;
- training: steps/s of the device loop at the config's batch, GFLOP per update from XLA's
  cost analysis, and the GFLOP/s that makes;
- sampling: samples/s of every sampler spec in --samplers (sde: config.sample.sde_steps
  Euler-Maruyama steps; dpm:N:order DPM-Solver++ on the PF ODE, dpmsde:N:order on the reverse
  SDE), network calls per sample;
- scoring: seconds per image of every estimator in --estimators (the primary hutchinson
  reference and its presets), network passes per image.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import device_runner  # noqa: E402
from experiments import configs  # noqa: E402
from memvol import data, loading, models, parallel, sampling, scoring, train  # noqa: E402
from memvol import sde as sde_lib  # noqa: E402


def timed(fn: Callable[[], object], repeats: int = 1) -> tuple[float, float]:
  """(wall s, process CPU s) of the best of `repeats` calls of fn after one warm-up call."""
  jax.block_until_ready(fn())
  best = (float("inf"), float("inf"))
  for _ in range(repeats):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    best = min(best, (time.perf_counter() - w0, time.process_time() - c0))
  return best


def matmul_gflops() -> tuple[float, float]:
  a = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  wall, cpu = timed(lambda: f(a), 3)
  return 2 * 2048**3 / wall / 1e9, 2 * 2048**3 / cpu / 1e9


def train_flops(config, shape) -> float:
  """FLOP of one update at config.train.batch_size (XLA's cost analysis of the train step)."""
  mesh = parallel.data_mesh()
  model, tx = models.get_model(config.model, shape), train.make_optimizer(config.train)
  state = train.init_state(model, tx, jax.random.PRNGKey(0), shape, parallel.replicated(mesh))
  step = train.make_train_step(model, sde_lib.from_config(config.sde), tx, config.train, mesh)
  batch = jnp.zeros((int(config.train.batch_size),) + tuple(shape), jnp.float32)
  cost = step.lower(state, batch, jax.random.PRNGKey(1)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="experiments/configs/mnist.py")
  p.add_argument("--workdir", default=None, help="a trained job (else random weights)")
  p.add_argument("--train_steps", type=int, default=20)
  p.add_argument("--samplers", default="sde,dpmsde:50:2,dpm:25:2")
  p.add_argument("--num_samples", type=int, default=16)
  p.add_argument("--estimators", default="hutchinson,hutchinson@vol108,hutchinson@rank32,hutchinson@rank8")
  p.add_argument("--num_images", type=int, default=8)
  args = p.parse_args()
  config = configs.load(args.config)
  sde = sde_lib.from_config(config.sde)
  if args.workdir:
    eps_fn = loading.load_eps_fn(config, args.workdir)
    images = np.asarray(data.load_split(config, args.workdir).train.images[:args.num_images], np.float32)
  else:
    pool = data.load_pool(config.data)
    images = np.asarray(pool.images[:args.num_images], np.float32)
    model = models.get_model(config.model, images.shape[1:])
    eps_fn = models.make_eps_fn(model, models.init_params(model, jax.random.PRNGKey(0), images.shape[1:]), sde)
  shape = images.shape[1:]
  mesh = parallel.local_mesh()
  print(f"devices {jax.devices()}, {os.cpu_count()} CPUs, network {'trained: ' + args.workdir if args.workdir else 'random'}")

  mm_wall, mm_cpu = matmul_gflops()
  print(f"\nmatmul 2048^2 float32: {mm_wall:.1f} GFLOP/s wall, {mm_cpu:.1f} GFLOP/s per CPU-second")

  flops = train_flops(config, shape)
  _, run = device_runner("small_unet", shape[0], int(config.train.batch_size), 10, 512, "default", "auto")
  c0 = time.process_time()
  wall = run(args.train_steps)
  cpu = time.process_time() - c0
  gflops = flops * args.train_steps / wall / 1e9
  print(f"\ntraining small_unet at {shape[0]}x{shape[1]}, batch {config.train.batch_size}: {flops / 1e9:.2f} GFLOP per update, "
        f"{args.train_steps / wall:.2f} steps/s wall, {cpu / args.train_steps:.3f} CPU-s per step, "
        f"{gflops:.1f} GFLOP/s ({gflops / mm_wall:.0%} of the matmul's)")

  print("\n| sampler | network calls / sample | samples/s wall | samples/s per CPU-s | vs sde |")
  print("|---|---|---|---|---|")
  base = None
  for spec in args.samplers.split(","):
    c, method = sampling.with_sampler(config, spec)
    n = max(2, args.num_samples // 8) if method == "sde" else args.num_samples  # 1000 steps: fewer samples
    c.sample.batch_size = n
    out = {}

    def draw():
      out.update(sampling.generate(c, method, eps_fn, shape, mesh, 0, n))
      return out["images"]
    wall, cpu = timed(draw)
    nfe = int(np.mean(out["nfe"]))
    rate = n / wall
    base = base or rate
    print(f"| {spec} | {nfe} | {rate:.3g} | {n / cpu:.3g} | {rate / base:.1f}x |", flush=True)

  print("\n| estimator | passes / image | s / image wall | s / image CPU | vs first |")
  print("|---|---|---|---|---|")
  ids = np.arange(len(images))
  first = None
  for est in args.estimators.split(","):
    opts = scoring.options(config, est)
    rec = {}

    def score():
      rec.update(scoring.score_images(eps_fn, images, ids, jax.random.PRNGKey(1), opts, mesh))
      return rec["log_volume"]
    wall, cpu = timed(score)
    passes = float(np.mean(rec["nfe"] + rec["num_jvps"]))
    per = wall / len(images)
    first = first or per
    print(f"| `{est}` | {passes:.0f} | {per:.3g} | {cpu / len(images):.3g} | {first / per:.1f}x |", flush=True)


if __name__ == "__main__":
  main()
