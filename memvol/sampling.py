"""Generating images from an eps-network: reverse-SDE Euler-Maruyama, the PF ODE (diffrax),
EDM's deterministic Heun sampler and multistep DPM-Solver++.

Every sampler draw sample i from `fold_in(key, i)` alone, lift a one-sample function
with `jax.vmap` and shard the samples over the `data` mesh axis (parallel.py), so a
sample does not depend on the batch size, the batch it falls in or the device count.
Images come back unclipped in the data scale ([-1, 1] for a good model).
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from memvol import io, numerics, parallel, parts, plotting
from memvol import sde as sde_lib
from memvol import workdir as wdir

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


def reverse_sde_grid(sde: sde_lib.SDE, num_steps: int, dtype=jnp.float32) -> tuple[Array, Array]:
  """The paper's Euler-Maruyama grid: t_k = linspace(T, eps, num_steps) and dt = T / num_steps."""
  return jnp.linspace(sde.T, sde.eps, num_steps, dtype=dtype), jnp.asarray(sde.T / num_steps, dtype)


def _reverse_sde_one(eps_fn: Any, sde: sde_lib.SDE, key: Array, shape: tuple[int, ...],
                     num_steps: int, denoise: bool) -> Array:
  """One sample: x_T ~ prior, then `num_steps` Euler-Maruyama steps of the reverse SDE on
  `reverse_sde_grid` (denoise: no noise in the last step)."""
  k_prior, k_noise = jax.random.split(key)
  x = sde.prior_sample(k_prior, shape)
  ts, dt = reverse_sde_grid(sde, num_steps, x.dtype)
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
  eps_fn, sde, key, shape, num_steps, denoise, precision = rep
  one = lambda i: _reverse_sde_one(eps_fn, sde, jax.random.fold_in(key, i), shape, num_steps, denoise)
  with numerics.precision(precision):
    images = jax.vmap(one)(indices)
  return Samples(images, jnp.full(indices.shape, num_steps, jnp.int32))


def reverse_sde_sample(eps_fn: Any, sde: sde_lib.SDE, key: Array, num: int, shape: Sequence[int],
                       num_steps: int = 1000, *, denoise: bool = True, start: int = 0,
                       mesh: Mesh | None = None, pad_to: int = 0, precision: str = "highest"
                       ) -> Samples:
  """`num` samples [num, *shape] of the reverse SDE by Euler-Maruyama, as the paper's code:
  `num_steps` steps at t = linspace(T, eps, num_steps) with dt = T / num_steps,
  x <- x - [f(x, t) - g^2 s(x, t)] dt + g sqrt(dt) z.

  With `denoise` (default) the last step (t = eps) adds no noise, i.e. returns its mean
  (score_sde's noise removal); the paper's code adds it (a std of about
  sqrt(beta(eps) dt), 0.01 for VP): pass denoise=False for that. Sample i (i = start ..
  start + num - 1) uses only `fold_in(key, i)`. nfe = num_steps per sample. Sharded over
  `mesh` (default: this process's devices); `pad_to` fixes the padded batch size.
  `precision`: the network's matmul / convolution precision (numerics.PRECISIONS).
  """
  shape = _check(num, shape, start)
  if int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  mesh = parallel.local_mesh() if mesh is None else mesh
  mapped = parallel.shard_map_batch(_reverse_sde_batch, mesh)
  rep = (eps_fn, sde, key, shape, int(num_steps), bool(denoise), numerics.check_precision(precision))
  return mapped(rep, _indices(num, start), pad_to=pad_to)


# --- probability-flow ODE ----------------------------------------------------------

_SOLVERS = {"euler": diffrax.Euler, "heun": diffrax.Heun, "midpoint": diffrax.Midpoint,
            "bosh3": diffrax.Bosh3, "tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5,
            "dopri8": diffrax.Dopri8}


def ode_solver(name: str) -> diffrax.AbstractSolver:
  """A diffrax solver by name (euler, heun, midpoint, bosh3, tsit5, dopri5, dopri8)."""
  if name not in _SOLVERS:
    raise ValueError(f"unknown ODE solver {name!r}; expected one of {sorted(_SOLVERS)}")
  return _SOLVERS[name]()


def _nfe(solver: diffrax.AbstractSolver, num_steps: Array) -> Array:
  """Network calls of `num_steps` attempted steps (accepted + rejected)."""
  tableau = getattr(solver, "tableau", None)
  if tableau is None:  # Euler
    return num_steps
  if tableau.fsal:  # first stage reuses the previous step's last one, plus one call at init
    return 1 + (tableau.num_stages - 1) * num_steps
  return tableau.num_stages * num_steps


def _pf_ode_one(eps_fn: Any, sde: sde_lib.SDE, key: Array, shape: tuple[int, ...], solver_name: str,
                rtol: float, atol: float, num_steps: int | None, max_steps: int) -> tuple[Array, Array, Array]:
  """One sample: x_T ~ prior, PF ODE solved from T down to eps. Returns (x_eps, nfe, status)."""
  x_T = sde.prior_sample(key, shape)
  term = diffrax.ODETerm(lambda t, x, args: sde.pf_drift(eps_fn, x, t))
  solver = ode_solver(solver_name)
  span = sde.T - sde.eps
  if num_steps is None:
    controller = diffrax.PIDController(rtol=rtol, atol=atol)
    dt0 = -span / 100
  else:
    controller = diffrax.ConstantStepSize()
    dt0 = -span / num_steps
  sol = diffrax.diffeqsolve(term, solver, t0=sde.T, t1=sde.eps, dt0=dt0, y0=x_T,
                            stepsize_controller=controller, max_steps=max_steps,
                            saveat=diffrax.SaveAt(t1=True), throw=False)
  nfe = _nfe(solver, sol.stats["num_steps"]).astype(jnp.int32)
  return sol.ys[-1], nfe, jnp.asarray(sol.result._value, jnp.int32)


def _pf_ode_batch(rep: tuple, indices: Array) -> tuple[Samples, Array]:
  eps_fn, sde, key, shape, solver_name, rtol, atol, num_steps, max_steps, precision = rep

  def one(i: Array) -> tuple[Array, Array, Array]:
    return _pf_ode_one(eps_fn, sde, jax.random.fold_in(key, i), shape, solver_name, rtol, atol,
                       num_steps, max_steps)

  with numerics.precision(precision):
    images, nfe, status = jax.vmap(one)(indices)
  return Samples(images, nfe), status


def pf_ode_sample(eps_fn: Any, sde: sde_lib.SDE, key: Array, num: int, shape: Sequence[int],
                  solver: str = "tsit5", rtol: float = 1e-4, atol: float = 1e-4, *,
                  num_steps: int | None = None, max_steps: int = 4096, start: int = 0,
                  mesh: Mesh | None = None, pad_to: int = 0, precision: str = "highest") -> Samples:
  """`num` samples [num, *shape] by the probability-flow ODE, each its own diffrax solve
  from x_T ~ prior at t = T down to t = eps.

  Adaptive (PID, `rtol`/`atol`, initial step (T - eps)/100) unless `num_steps` is given
  (then fixed steps). Sample i (i = start .. start + num - 1) uses only
  `fold_in(key, i)`. nfe counts network calls per sample (accepted and rejected steps).
  A sample whose solve fails (e.g. `max_steps` reached) raises a ValueError naming it.
  Sharded over `mesh` (default: this process's devices); `pad_to` fixes the padded size.
  `precision`: the network's matmul / convolution precision (numerics.PRECISIONS).
  """
  shape = _check(num, shape, start)
  ode_solver(solver)
  if num_steps is None and not (rtol > 0 and atol > 0):
    raise ValueError(f"adaptive PF-ODE sampling needs rtol > 0 and atol > 0, got {rtol}, {atol}")
  if num_steps is not None and int(num_steps) < 1:
    raise ValueError(f"num_steps must be >= 1 (or None for adaptive), got {num_steps}")
  mesh = parallel.local_mesh() if mesh is None else mesh
  mapped = parallel.shard_map_batch(_pf_ode_batch, mesh)
  rep = (eps_fn, sde, key, shape, solver, float(rtol), float(atol),
         None if num_steps is None else int(num_steps), int(max_steps),
         numerics.check_precision(precision))
  samples, status = mapped(rep, _indices(num, start), pad_to=pad_to)
  bad = np.flatnonzero(np.asarray(status) != 0)
  if bad.size:
    raise ValueError(
        f"PF-ODE solve failed for samples {(_indices(num, start)[bad]).tolist()[:10]} "
        f"(diffrax result codes {np.asarray(status)[bad].tolist()[:10]}); raise max_steps "
        f"(now {max_steps}) or loosen rtol/atol")
  return samples


# --- EDM's deterministic Heun sampler ------------------------------------------------


def heun_sigmas(sde: sde_lib.SDE, num_steps: int = 18, rho: float = 7.0, sigma_min: float = 0.002,
                sigma_max: float = 80.0) -> np.ndarray:
  """EDM's noise levels [num_steps + 1] (float64): (s_max^(1/rho) + i / (N - 1) (s_min^(1/rho)
  - s_max^(1/rho)))^rho, then 0, with s_min / s_max clipped to the SDE's noise ratios at eps
  and T (as EDM clips to the network's supported range)."""
  if int(num_steps) < 2:
    raise ValueError(f"heun num_steps must be >= 2, got {num_steps}")
  lo = max(float(sigma_min), float(sde.noise_ratio(jnp.asarray(sde.eps, jnp.float32))))
  hi = min(float(sigma_max), float(sde.noise_ratio(jnp.asarray(sde.T, jnp.float32))))
  if not 0 < lo < hi:
    raise ValueError(f"heun noise levels need 0 < sigma_min < sigma_max after clipping to the SDE, got {lo}, {hi}")
  i = np.arange(num_steps) / (num_steps - 1)
  return np.append((hi ** (1 / rho) + i * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho, 0.0)


def _heun_one(eps_fn: Any, sde: sde_lib.SDE, key: Array, shape: tuple[int, ...], sigmas: Array) -> Array:
  """One sample of EDM's Heun sampler (Karras et al. 2022, Algorithm 1 without churn) on
  x = x_t / a(t), whose ODE is dx / ds = eps(a(t) x, t) at s = sigma / a, t = t(s): x_0 =
  s_0 z, Heun steps between the levels, and an Euler step into s = 0."""
  x = sigmas[0] * jax.random.normal(key, shape, jnp.float32)

  def d(x: Array, s: Array) -> Array:
    t = sde.time_of_noise_ratio(s)
    return eps_fn(sde.mean_coeff(t) * x, t)

  def step(x: Array, i: Array) -> tuple[Array, None]:
    s, s_next = sigmas[i], sigmas[i + 1]
    d_cur = d(x, s)
    x_next = x + (s_next - s) * d_cur
    return x + (s_next - s) * 0.5 * (d_cur + d(x_next, s_next)), None

  x, _ = jax.lax.scan(step, x, jnp.arange(len(sigmas) - 2))
  return x - sigmas[-2] * d(x, sigmas[-2])


def _heun_batch(rep: tuple, indices: Array) -> Samples:
  eps_fn, sde, key, shape, sigmas, precision = rep
  one = lambda i: _heun_one(eps_fn, sde, jax.random.fold_in(key, i), shape, jnp.asarray(sigmas, jnp.float32))
  with numerics.precision(precision):
    images = jax.vmap(one)(indices)
  return Samples(images, jnp.full(indices.shape, 2 * (len(sigmas) - 1) - 1, jnp.int32))


def heun_sample(eps_fn: Any, sde: sde_lib.SDE, key: Array, num: int, shape: Sequence[int], num_steps: int = 18,
                rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0, *, start: int = 0,
                mesh: Mesh | None = None, pad_to: int = 0, precision: str = "highest") -> Samples:
  """`num` samples [num, *shape] by EDM's deterministic Heun sampler (generate.py's
  edm_sampler with S_churn = 0: 18 steps, rho = 7, sigma 0.002 .. 80 by default) on any
  memvol SDE through its noise ratio sigma / a; 2 num_steps - 1 network calls per sample
  (the last step is Euler). The stochastic churn is not implemented. Sample i uses only
  `fold_in(key, i)`; sharded over `mesh`, as the other samplers."""
  shape = _check(num, shape, start)
  sigmas = heun_sigmas(sde, int(num_steps), float(rho), float(sigma_min), float(sigma_max))
  mesh = parallel.local_mesh() if mesh is None else mesh
  mapped = parallel.shard_map_batch(_heun_batch, mesh)
  rep = (eps_fn, sde, key, shape, tuple(sigmas.tolist()), numerics.check_precision(precision))
  return mapped(rep, _indices(num, start), pad_to=pad_to)


# --- DPM-Solver++ (multistep, data prediction) ---------------------------------------

DPM_SCHEDULES = ("logsnr", "time_uniform", "time_quadratic", "karras")


def dpm_times(sde: sde_lib.SDE, num_steps: int, schedule: str = "logsnr", rho: float = 7.0) -> np.ndarray:
  """The DPM-Solver++ time grid [num_steps + 1] (float64, from T down to eps).

  logsnr: uniform in lambda = log(a / sigma) (DPM-Solver's choice for low-resolution
  pixel models); time_uniform / time_quadratic: uniform in t / in sqrt(t); karras: EDM's
  rho-spaced noise ratios sigma / a. Every schedule ends exactly at T and eps."""
  if int(num_steps) < 1:
    raise ValueError(f"dpm num_steps must be >= 1, got {num_steps}")
  if schedule not in DPM_SCHEDULES:
    raise ValueError(f"unknown dpm schedule {schedule!r}; expected one of {DPM_SCHEDULES}")
  n, lo, hi = int(num_steps), float(sde.eps), float(sde.T)
  u = np.linspace(0.0, 1.0, n + 1)
  if schedule == "time_uniform":
    ts = hi + u * (lo - hi)
  elif schedule == "time_quadratic":
    ts = (np.sqrt(hi) + u * (np.sqrt(lo) - np.sqrt(hi))) ** 2
  else:
    r_lo, r_hi = (float(sde.noise_ratio(jnp.asarray(t, jnp.float32))) for t in (lo, hi))
    if schedule == "logsnr":
      ratios = np.exp(np.log(r_hi) + u * (np.log(r_lo) - np.log(r_hi)))
    else:
      ratios = (r_hi ** (1 / rho) + u * (r_lo ** (1 / rho) - r_hi ** (1 / rho))) ** rho
    ts = np.asarray(sde.time_of_noise_ratio(jnp.asarray(ratios, jnp.float32)), np.float64)
  ts[0], ts[-1] = hi, lo
  if not np.all(np.diff(ts) < 0):
    raise ValueError(f"dpm {schedule} grid of {n} steps is not strictly decreasing from T = {hi} to eps = {lo}")
  return ts


def dpm_orders(num_steps: int, order: int, lower_order_final: bool = True) -> np.ndarray:
  """Order of each step [num_steps]: warm-up from 1 (a multistep method has no history yet)
  and, below 15 steps, DPM-Solver++'s lower orders in the last steps (stabler)."""
  if int(order) not in (1, 2, 3):
    raise ValueError(f"dpm order must be 1, 2 or 3, got {order}")
  i = np.arange(int(num_steps))
  orders = np.minimum(int(order), i + 1)
  if lower_order_final and num_steps < 15:
    orders = np.minimum(orders, num_steps - i)
  return orders


def dpm_update(x: Array, m: tuple[Array, Array, Array], hs: tuple[Array, Array, Array], sigma_ratio: Array,
               a_next: Array, order: Array) -> Array:
  """One DPM-Solver++ step (data prediction, Lu et al. 2022) of ONE image from t to t'.

  m = (m0, m1, m2): data predictions x0(x, t) at this point and the two before it; hs = (h,
  h1, h2): this step's and the two previous steps' increments of lambda = log(a / sigma);
  sigma_ratio = sigma(t') / sigma(t); a_next = a(t'). With phi = 1 - exp(-h),

      x' = sigma_ratio x + a' [phi D0 + (1 - phi / h) D1 + (1/2 - (h - phi) / h^2) D2],

  D0 = m0, and D1 ~ h x0', D2 ~ h^2 x0'' divided differences over lambda (order 1: D1 = D2
  = 0; order 2: D1 = (m0 - m1) / r0 and the midpoint weight phi / 2 in place of 1 - phi / h).
  D2 = 2 (D1_0 - D1_1) / (r0 + r1) is the Taylor coefficient (the multistep code of DPM-Solver
  drops the 2, which leaves the step locally third order only); the local error is O(h^(order
  + 1)) (tests/test_sampling.py)."""
  m0, m1, m2 = m
  h, h1, h2 = hs
  phi = -jnp.expm1(-h)
  r0, r1 = h1 / h, h2 / h
  d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
  second = phi * (m0 + 0.5 * d1_0)
  d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
  d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
  third = phi * m0 + (1.0 - phi / h) * d1 + (0.5 - (h - phi) / h**2) * d2
  return sigma_ratio * x + a_next * jnp.where(order == 1, phi * m0, jnp.where(order == 2, second, third))


def dpm_sde_update(x: Array, m: tuple[Array, Array], hs: tuple[Array, Array], sigma_ratio: Array, a_next: Array,
                   sigma_next: Array, order: Array, z: Array) -> Array:
  """One SDE-DPM-Solver++ step (Lu et al. 2022, the reverse SDE in data prediction, orders 1-2)
  of ONE image from t to t' with standard normal noise z:

      x' = sigma_ratio e^(-h) x + a' psi (D0 + D1 / 2) + sigma' sqrt(psi) z,   psi = 1 - e^(-2h),

  D0 = m0, D1 = (m0 - m1) / r0 at order 2 and 0 at order 1. Its marginals are the reverse
  SDE's: a stochastic sampler at the cost of the deterministic one."""
  m0, m1 = m
  h, h1 = hs
  psi = -jnp.expm1(-2.0 * h)
  d = jnp.where(order == 1, m0, m0 + 0.5 * (m0 - m1) * h / h1)
  return sigma_ratio * jnp.exp(-h) * x + a_next * psi * d + sigma_next * jnp.sqrt(psi) * z


def _dpm_one(eps_fn: Any, sde: sde_lib.SDE, key: Array, shape: tuple[int, ...], ts: Array, orders: Array,
             stochastic: bool) -> Array:
  """One sample of multistep DPM-Solver++ (or SDE-DPM-Solver++) along ts [N + 1] with step
  orders [N]: one network call per step, the previous data predictions carried along. The
  prior draw uses `key` itself, the steps' noise keys split from fold_in(key, 1)."""
  x = sde.prior_sample(key, shape, ts.dtype)
  log_a, sig = sde.log_mean_coeff(ts), sde.std(ts)
  a, lam = jnp.exp(log_a), log_a - jnp.log(sig)
  noise_keys = jax.random.split(jax.random.fold_in(key, 1), len(orders))

  def step(carry: tuple, inp: tuple[Array, Array]) -> tuple[tuple, None]:
    x, m1, m2, h1, h2 = carry
    i, k = inp
    m0 = (x - sig[i] * eps_fn(x, ts[i])) / a[i]
    h = lam[i + 1] - lam[i]
    if stochastic:
      z = jax.random.normal(k, shape, x.dtype)
      x = dpm_sde_update(x, (m0, m1), (h, h1), sig[i + 1] / sig[i], a[i + 1], sig[i + 1], orders[i], z)
    else:
      x = dpm_update(x, (m0, m1, m2), (h, h1, h2), sig[i + 1] / sig[i], a[i + 1], orders[i])
    return (x, m0, m1, h, h1), None

  one = jnp.ones((), x.dtype)  # unused history (order 1 and 2 steps) must stay finite
  init = (x, jnp.zeros_like(x), jnp.zeros_like(x), one, one)
  (x, *_), _ = jax.lax.scan(step, init, (jnp.arange(len(orders)), noise_keys))
  return x


def _dpm_batch(rep: tuple, indices: Array) -> Samples:
  eps_fn, sde, key, shape, ts, orders, stochastic, precision = rep
  dtype = jnp.result_type(float)
  one = lambda i: _dpm_one(eps_fn, sde, jax.random.fold_in(key, i), shape, jnp.asarray(ts, dtype),
                           jnp.asarray(orders, jnp.int32), stochastic)
  with numerics.precision(precision):
    images = jax.vmap(one)(indices)
  return Samples(images, jnp.full(indices.shape, len(orders), jnp.int32))


def dpm_sample(eps_fn: Any, sde: sde_lib.SDE, key: Array, num: int, shape: Sequence[int], num_steps: int = 25,
               order: int = 2, schedule: str = "logsnr", *, stochastic: bool = False, lower_order_final: bool = True,
               start: int = 0, mesh: Mesh | None = None, pad_to: int = 0, precision: str = "highest") -> Samples:
  """`num` samples [num, *shape] by multistep DPM-Solver++ (2M by default) on the PF ODE of
  any memvol SDE, or with `stochastic` by SDE-DPM-Solver++ (orders 1-2) on its reverse SDE,
  from x_T ~ prior at T to x_eps at eps on `dpm_times`: one network call per step (nfe =
  num_steps). Sample i uses only `fold_in(key, i)`; sharded over `mesh`, as the other
  samplers."""
  shape = _check(num, shape, start)
  if stochastic and int(order) > 2:
    raise ValueError(f"the stochastic dpm sampler has orders 1 and 2, got {order}")
  ts = dpm_times(sde, int(num_steps), schedule)
  orders = dpm_orders(int(num_steps), int(order), bool(lower_order_final))
  mesh = parallel.local_mesh() if mesh is None else mesh
  mapped = parallel.shard_map_batch(_dpm_batch, mesh)
  rep = (eps_fn, sde, key, shape, tuple(ts.tolist()), tuple(orders.tolist()), bool(stochastic),
         numerics.check_precision(precision))
  return mapped(rep, _indices(num, start), pad_to=pad_to)


# --- the `sample` stage ------------------------------------------------------------

METHODS = ("sde", "ode", "heun", "dpm")
_SAMPLE_STREAM = 2  # fold_in(PRNGKey(config.seed), _SAMPLE_STREAM): the sampling key


def with_sampler(config: Any, spec: str) -> tuple[Any, str]:
  """(a copy of config sampling as `spec` says, the sample method): sde | ode | heun[:steps] |
  dpm[:steps[:order[:schedule]]] (DPM-Solver++ on the PF ODE) | dpmsde[:...] (on the reverse SDE)."""
  c = config.copy_and_resolve_references()
  c.unlock()
  method, *rest = spec.split(":")
  if method in ("dpm", "dpmsde"):
    c.sample.dpm_stochastic = method == "dpmsde"
    method = "dpm"
    for key, v in zip(("dpm_steps", "dpm_order", "dpm_schedule"), rest):
      c.sample[key] = v if key == "dpm_schedule" else int(v)
  elif method == "heun" and rest:
    c.sample.heun_steps = int(rest[0])
  elif method not in METHODS:
    raise ValueError(f"unknown sampler spec {spec!r}; expected sde, ode, heun[:steps], dpm[:...] or dpmsde[:...]")
  return c, method


def sample_key(config: Any) -> Array:
  return jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _SAMPLE_STREAM)


def _settings(config: Any, method: str, eps_fn: Any, shape: tuple[int, ...]) -> dict[str, Any]:
  """Everything a sample depends on (not the batch size or the device count)."""
  sp = config.sample
  s = {"method": method, "seed": int(config.seed), "sde": dict(config.sde), "shape": list(shape),
       "use_ema": bool(sp.use_ema), "params": parts.tree_digest(eps_fn),
       "precision": numerics.check_precision(sp.get("precision", "highest"), "config.sample.precision")}
  if method == "sde":
    s.update(sde_steps=int(sp.sde_steps), denoise=bool(sp.denoise))
  elif method == "dpm":
    s.update(dpm_steps=int(sp.dpm_steps), dpm_order=int(sp.dpm_order), dpm_schedule=str(sp.dpm_schedule),
             dpm_stochastic=bool(sp.dpm_stochastic))
  elif method == "heun":
    s.update(heun_steps=int(sp.heun_steps), heun_rho=float(sp.heun_rho), heun_sigma_min=float(sp.heun_sigma_min),
             heun_sigma_max=float(sp.heun_sigma_max))
  else:
    s.update(ode_solver=sp.ode_solver, ode_rtol=float(sp.ode_rtol), ode_atol=float(sp.ode_atol),
             ode_max_steps=int(sp.ode_max_steps))
  return parts.canonical(s)


def _check_config(config: Any) -> tuple[str, ...]:
  sp = config.sample
  methods = tuple(sp.methods)
  if not methods:
    raise ValueError("config.sample.methods is empty; name at least one of " + ", ".join(METHODS))
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown config.sample.methods {unknown}; expected any of {METHODS}")
  if int(sp.num_samples) < 1:
    raise ValueError(f"config.sample.num_samples must be >= 1, got {sp.num_samples}")
  if int(sp.batch_size) < 1:
    raise ValueError(f"config.sample.batch_size must be >= 1, got {sp.batch_size}")
  numerics.check_precision(sp.get("precision", "highest"), "config.sample.precision")
  if "dpm" in methods:
    dpm_times(sde_lib.from_config(config.sde), int(sp.dpm_steps), str(sp.dpm_schedule))
    dpm_orders(int(sp.dpm_steps), int(sp.dpm_order))
    if bool(sp.dpm_stochastic) and int(sp.dpm_order) > 2:
      raise ValueError(f"config.sample.dpm_stochastic has orders 1 and 2, got dpm_order={sp.dpm_order}")
  return methods


def generate(config: Any, method: str, eps_fn: Any, shape: tuple[int, ...], mesh: Mesh,
              start: int, end: int) -> dict[str, np.ndarray]:
  sp, sde = config.sample, sde_lib.from_config(config.sde)
  key, num, pad = sample_key(config), end - start, int(sp.batch_size)
  if method == "sde":
    out = reverse_sde_sample(eps_fn, sde, key, num, shape, int(sp.sde_steps),
                             denoise=bool(sp.denoise), start=start, mesh=mesh, pad_to=pad,
                             precision=sp.precision)
  elif method == "dpm":
    out = dpm_sample(eps_fn, sde, key, num, shape, int(sp.dpm_steps), int(sp.dpm_order), str(sp.dpm_schedule),
                     stochastic=bool(sp.dpm_stochastic), start=start, mesh=mesh, pad_to=pad, precision=sp.precision)
  elif method == "heun":
    out = heun_sample(eps_fn, sde, key, num, shape, int(sp.heun_steps), float(sp.heun_rho), float(sp.heun_sigma_min),
                      float(sp.heun_sigma_max), start=start, mesh=mesh, pad_to=pad, precision=sp.precision)
  else:
    out = pf_ode_sample(eps_fn, sde, key, num, shape, sp.ode_solver, float(sp.ode_rtol),
                        float(sp.ode_atol), max_steps=int(sp.ode_max_steps), start=start,
                        mesh=mesh, pad_to=pad, precision=sp.precision)
  return {"images": np.asarray(out.images, np.float32), "nfe": np.asarray(out.nfe)}


def _load_model(config: Any, workdir: str) -> tuple[Any, tuple[int, ...]]:
  """(eps_fn, image_shape) of the workdir's latest checkpoint (EMA if sample.use_ema)."""
  from memvol import loading, models  # the stage's input; imported here to keep this module light
  model, params, shape = loading.load_model(config, workdir, use_ema=bool(config.sample.use_ema))
  return models.make_eps_fn(model, params, sde_lib.from_config(config.sde)), tuple(shape)


def run(config: Any, workdir: str, log: Any = print) -> None:
  """The `sample` stage: config.sample.num_samples images per method in
  config.sample.methods, written to samples/samples_{method}.npz (images [M, H, W, C]
  float32 clipped to [-1, 1], nfe [M], settings) and samples/grid_{method}.png.

  Batches of config.sample.batch_size are committed to samples/parts/{method}/ as they
  finish, so an interrupted run resumes; methods already complete are skipped. Each
  process of a multi-host run makes its share of batches; process 0 merges.
  """
  methods = _check_config(config)
  eps_fn, shape = _load_model(config, workdir)
  mesh = parallel.local_mesh()
  sp = config.sample
  n, bs = int(sp.num_samples), int(sp.batch_size)
  root = wdir.samples_dir(workdir)
  for method in methods:
    settings = _settings(config, method, eps_fn, shape)
    if _complete(workdir, method, settings, n):
      log(f"[memvol] samples_{method}: already complete, skipped")
      continue
    _refuse_overwrite(wdir.samples(workdir, method), settings, root)
    folder = wdir.sample_parts(workdir, method)
    parts.run_batches(
        folder, n, bs, settings,
        lambda s, e, m=method: generate(config, m, eps_fn, shape, mesh, s, e),
        root=root, desc=f"sample {method}", unit="sample",
        postfix=lambda a: {"nfe": f"{np.mean(a['nfe']):.0f}"}, log=log)
    if parallel.is_main_process():
      merged = parts.merge_parts(folder, n, bs, settings, root=root)
      images = np.clip(merged["images"], -1.0, 1.0).astype(np.float32)
      io.save_npz(wdir.samples(workdir, method), images=images, nfe=merged["nfe"],
                  settings=np.asarray(json.dumps(settings, sort_keys=True)))
      h = images.shape[1]
      plotting.save_image_grid(images[:64], wdir.sample_grid(workdir, method),
                               scale=max(1, 56 // h))
      log(f"[memvol] samples_{method}: {n} samples, mean nfe {float(np.mean(merged['nfe'])):.1f}, "
          f"written to {wdir.samples(workdir, method)}")
    parallel.sync_processes(f"memvol-samples-{method}")


def _saved_settings(path: str) -> dict[str, Any] | None:
  """The settings recorded in a samples file; None if it is missing, corrupt or has none."""
  if not os.path.exists(path):
    return None
  try:
    saved = io.load_npz(path)
    return json.loads(str(saved["settings"])) | {"_num": int(saved["images"].shape[0])}
  except (ValueError, KeyError):
    return None


def _complete(workdir: str, method: str, settings: dict[str, Any], n: int) -> bool:
  return _saved_settings(wdir.samples(workdir, method)) == settings | {"_num": n}


def _refuse_overwrite(path: str, settings: dict[str, Any], root: str) -> None:
  """Never replace samples made with other settings (only more/fewer of the same)."""
  saved = _saved_settings(path)
  if saved is not None:
    saved.pop("_num")
    if saved != settings:
      raise ValueError(
          f"{path} holds samples made with other settings ({'; '.join(io.config_diff(saved, settings))}); "
          f"they are not overwritten. Use a new --workdir, or delete {root} to resample.")


DONE_MEANS = "samples of every configured method exist, made with these settings and this model"


def stale_reason(config: Any, workdir: str) -> str | None:
  """None when every configured method's samples exist for these settings and this model;
  otherwise why not."""
  why = "samples are missing, partial, or were made with other settings or another model"
  try:
    methods = _check_config(config)
    eps_fn, shape = _load_model(config, workdir)
  except (FileNotFoundError, ValueError):
    return why
  n = int(config.sample.num_samples)
  return None if all(_complete(workdir, m, _settings(config, m, eps_fn, shape), n) for m in methods) else why


def is_complete(config: Any, workdir: str) -> bool:
  return stale_reason(config, workdir) is None
