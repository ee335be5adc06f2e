"""Benchmark of the training loop: steps/s and images/s, compilation timed separately.

    python scripts/bench_train.py                                   # small_unet 28x28 and 14x14: a few minutes on 2 CPU cores
    python scripts/bench_train.py --models=paper_cifar10@32 --batch_sizes=8 --steps_per_call=2 --steps=2
    python scripts/bench_train.py --batch_sizes=64,256 --steps_per_call=1,50,200 --steps=1000   # on a GPU

For each model (a memvol.models named config at the given side), batch size and
train.steps_per_call S: the compile time of the multi-step program (`train.make_train_loop`;
its first call's time minus a steady call's), then `--steps` updates run as calls of S updates (the stream of
`--stream` random images on the device, indices drawn on the device), timed to the last
result, best of --rounds rounds interleaved over the settings (on CPU the updates of a call are dispatched one by one unless --fused=true, see
train.make_train_loop). "host loop" is the earlier loop, kept for comparison: one dispatch per update, the
batch gathered on the host from a precomputed permutation and copied to the device, then
`train.make_train_step` (its compile time is the single step's). Weights and data are
random: only the shapes matter for speed. Precision: train.precision (default "default").
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import jax
import numpy as np

from experiments.configs.base import get_base_config
from memvol import models, parallel, train
from memvol import sde as sde_lib


def _setup(name: str, side: int, batch: int, spc: int, precision: str):
  c = get_base_config()
  c.model = models.named_config(name)
  c.train.batch_size, c.train.steps_per_call, c.train.precision = batch, spc, precision
  channels = 3 if name == "paper_cifar10" else 1
  shape = (side, side, channels)
  model = models.get_model(c.model, shape)
  tx = train.make_optimizer(c.train)
  mesh = parallel.data_mesh()
  return c, shape, model, tx, mesh


def _fresh_state(model, tx, shape, mesh):
  return train.init_state(model, tx, jax.random.PRNGKey(0), shape, parallel.replicated(mesh))


def device_runner(name: str, side: int, batch: int, spc: int, stream: int, precision: str,
                  fused: str) -> tuple[float, Callable[[int], float]]:
  """(compile seconds, run(steps) -> seconds) of the device-resident loop; compile = the
  first call's time minus a steady call's."""
  c, shape, model, tx, mesh = _setup(name, side, batch, spc, precision)
  c.train.fused_steps = fused
  rep = parallel.replicated(mesh)
  images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (stream,) + shape).astype(np.float32), rep)
  keys = [jax.device_put(jax.random.PRNGKey(i), rep) for i in (1, 2)]
  loop = train.make_train_loop(model, sde_lib.VPSDE(), tx, c.train, mesh)
  box = {"state": _fresh_state(model, tx, shape, mesh), "seen": 0}

  def run(steps: int) -> float:
    t0 = time.perf_counter()
    done = 0
    while done < steps:
      n = min(spc, steps - done)
      box["state"], m = loop(box["state"], images, box["seen"], n, *keys)
      done, box["seen"] = done + n, box["seen"] + n * batch
    jax.block_until_ready((box["state"], m))
    return time.perf_counter() - t0

  first = run(spc)
  return max(first - run(spc), 0.0), run


def host_runner(name: str, side: int, batch: int, stream: int, precision: str
                ) -> tuple[float, Callable[[int], float]]:
  """(compile seconds, run(steps) -> seconds) of one dispatch and one host-to-device batch
  per update (the earlier loop)."""
  c, shape, model, tx, mesh = _setup(name, side, batch, 1, precision)
  shard = parallel.batch_sharded(mesh)
  images = np.random.default_rng(0).uniform(-1, 1, (stream,) + shape).astype(np.float32)
  perm = np.random.default_rng(1).permutation(stream)
  step = train.make_train_step(model, sde_lib.VPSDE(), tx, c.train, mesh)
  key = jax.device_put(jax.random.PRNGKey(1), parallel.replicated(mesh))
  box = {"state": _fresh_state(model, tx, shape, mesh), "k": 0}

  def batch_at(k: int):
    idx = perm[(k * batch + np.arange(batch)) % stream]
    return jax.device_put(images[idx], shard)

  t0 = time.perf_counter()
  compiled = step.lower(box["state"], batch_at(0), key).compile()
  compile_s = time.perf_counter() - t0

  def run(steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      box["state"], m = compiled(box["state"], batch_at(box["k"]), key)
      box["k"] += 1
    jax.block_until_ready((box["state"], m))
    return time.perf_counter() - t0

  run(1)
  return compile_s, run


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="small_unet@28,small_unet@14", help="name@side, comma-separated")
  p.add_argument("--batch_sizes", default="16,64")
  p.add_argument("--steps_per_call", default="1,10,50")
  p.add_argument("--steps", type=int, default=100, help="timed updates per setting and round")
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported")
  p.add_argument("--stream", type=int, default=512, help="training images on the device")
  p.add_argument("--precision", default="default")
  p.add_argument("--fused", default="auto", help="train.fused_steps: auto (fused unless on CPU) | true | false")
  p.add_argument("--no_host_loop", action="store_true", help="skip the one-dispatch-per-step baseline")
  args = p.parse_args()
  mesh = parallel.data_mesh()
  fused = train.fused_steps({"fused_steps": args.fused}, mesh)
  print(f"devices: {jax.devices()}  precision: {args.precision}  device loop fused: {fused}")
  rows = []
  for spec in args.models.split(","):
    name, side = spec.split("@")
    c, shape, model, _, _ = _setup(name, int(side), 1, 1, args.precision)
    params = models.count_params(models.init_params(model, jax.random.PRNGKey(0), shape))
    for batch in (int(b) for b in args.batch_sizes.split(",")):
      runners = []
      if not args.no_host_loop:
        runners.append(("host loop", *host_runner(name, int(side), batch, args.stream, args.precision)))
      for spc in (int(x) for x in args.steps_per_call.split(",")):
        runners.append((f"device loop S={spc}", *device_runner(name, int(side), batch, spc, args.stream,
                                                               args.precision, args.fused)))
      best = [float("inf")] * len(runners)
      for _ in range(args.rounds):  # interleaved, so a busy spell on a shared machine hits all alike
        for i, (_, _, run) in enumerate(runners):
          best[i] = min(best[i], run(args.steps))
      for (label, comp, _), seconds in zip(runners, best):
        rows.append((name, side, f"{params / 1e6:.2f}M", batch, label, comp, args.steps / seconds,
                     args.steps * batch / seconds))
        print(f"  {name}@{side} batch {batch} {label}: compile {comp:.1f} s, "
              f"{args.steps / seconds:.2f} steps/s", flush=True)
  print("\n| model | side | params | batch | loop | compile s | steps/s | images/s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.1f} | {r[6]:.3g} | {r[7]:.4g} |")


if __name__ == "__main__":
  main()
