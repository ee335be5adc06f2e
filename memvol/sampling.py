"""Generating images from an eps-network: reverse-SDE Euler-Maruyama and the PF ODE.

Both samplers draw sample i from `fold_in(key, i)` alone, lift a one-sample function
with `jax.vmap` and shard the samples over the `data` mesh axis (parallel.py), so a
sample does not depend on the batch size, the batch it falls in or the device count.
Images come back unclipped in the data scale ([-1, 1] for a good model).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from memvol import parallel
from memvol import sde as sde_lib

Array = jax.Array


class Samples(NamedTuple):
  """images [num, *shape] float32 (unclipped); nfe [num] int32 network calls per sample."""

  images: Array
  nfe: Array


def _check(num: int, shape: Sequence[int], start: int) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  if int(num) < 1:
    raise ValueError(f"number of samples must be >= 1, got {num}")
  if not shape or min(shape) < 1:
    raise ValueError(f"sample shape must be non-empty with positive sizes, got {shape}")
  if int(start) < 0:
    raise ValueError(f"start must be >= 0, got {start}")
  return shape


def _indices(num: int, start: int) -> np.ndarray:
  return np.arange(start, start + num, dtype=np.int32)


# --- reverse SDE, Euler-Maruyama ---------------------------------------------------


def _reverse_sde_one(eps_fn: Any, sde: sde_lib.SDE, key: Array, shape: tuple[int, ...],
                     num_steps: int, denoise: bool) -> Array:
  """One sample: x_T ~ prior, then `num_steps` Euler-Maruyama steps of the reverse SDE at
  t_k = linspace(T, eps, num_steps) with dt = T / num_steps (the paper's grid)."""
  k_prior, k_noise = jax.random.split(key)
  x = sde.prior_sample(k_prior, shape)
  ts = jnp.linspace(sde.T, sde.eps, num_steps, dtype=x.dtype)
  dt = jnp.asarray(sde.T / num_steps, x.dtype)
  noise_keys = jax.random.split(k_noise, num_steps)
  keep_noise = jnp.ones((num_steps,), x.dtype)
  if denoise:
    keep_noise = keep_noise.at[-1].set(0.0)

  def step(x: Array, inp: tuple[Array, Array, Array]) -> tuple[Array, None]:
    t, k, keep = inp
    z = keep * jax.random.normal(k, shape, x.dtype)
    return sde.reverse_sde_step(eps_fn(x, t), x, t, dt, z), None

  x, _ = jax.lax.scan(step, x, (ts, noise_keys, keep_noise))
  return x


def _reverse_sde_batch(rep: tuple, indices: Array) -> Samples:
  eps_fn, sde, key, shape, num_steps, denoise = rep
  one = lambda i: _reverse_sde_one(eps_fn, sde, jax.random.fold_in(key, i), shape, num_steps, denoise)
  images = jax.vmap(one)(indices)
  return Samples(images, jnp.full(indices.shape, num_steps, jnp.int32))


def reverse_sde_sample(eps_fn: Any, sde: sde_lib.SDE, key: Array, num: int, shape: Sequence[int],
                       num_steps: int = 1000, *, denoise: bool = True, start: int = 0,
                       mesh: Mesh | None = None, pad_to: int = 0) -> Samples:
  """`num` samples [num, *shape] of the reverse SDE by Euler-Maruyama, as the paper's code:
  `num_steps` steps at t = linspace(T, eps, num_steps) with dt = T / num_steps,
  x <- x - [f(x, t) - g^2 s(x, t)] dt + g sqrt(dt) z.

  With `denoise` (default) the last step (t = eps) adds no noise, i.e. returns its mean
  (score_sde's noise removal); the paper's code adds it (a std of about
  sqrt(beta(eps) dt), 0.01 for VP): pass denoise=False for that. Sample i (i = start ..
  start + num - 1) uses only `fold_in(key, i)`. nfe = num_steps per sample. Sharded over
  `mesh` (default: this process's devices); `pad_to` fixes the padded batch size.
  """
  shape = _check(num, shape, start)
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  mesh = parallel.local_mesh() if mesh is None else mesh
  mapped = parallel.shard_map_batch(_reverse_sde_batch, mesh)
  rep = (eps_fn, sde, key, shape, int(num_steps), bool(denoise))
  return mapped(rep, _indices(num, start), pad_to=pad_to)
