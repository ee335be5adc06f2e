"""Moving an image down its own log volume growth: projected gradient descent on L(x + delta).

For training images x [B, H, W, C] in [-1, 1] and a trained eps-network, PGD with sign
steps minimises L(x + delta) (volume.batch_log_volume) subject to

    |delta|_inf <= eps_data = 2 * budget     and     x + delta in [-1, 1],

`budget` being a fraction of the full intensity range (8/255 = 8 grey levels of 255), so
eps_data is twice it in the [-1, 1] data scale (16/255 = 0.0627 for 8/255). Each step:
x <- Proj(x - alpha sign(grad L(x))), alpha = 2 * step_size (default 2.5 eps_data / steps,
the usual Madry et al. choice), Proj = clip to the L-inf ball around the original, then to
[-1, 1]; a last correction moves any pixel that float32 rounding of x + delta put beyond
the ball by one ulp back, so the budget holds exactly. The iterate with the lowest L
(including the start) is returned.

The differentiated L: Hutchinson with `num_probes` Rademacher probes and a fixed-step
solver (`heun`, `num_steps` steps): a fixed grid makes L a smooth function of x (an
adaptive controller's step choices are piecewise constant in x), and each PGD step draws
new probes (fold_in(key, step)) so the descent cannot overfit one probe set. The gradient
goes through the solve with diffrax's default RecursiveCheckpointAdjoint
(discretise-then-optimise: the exact gradient of the discretised L, memory O(log steps)
checkpoints of the small (x, L) state with the network's activations recomputed per step),
chosen over BacksolveAdjoint, whose backward re-integration of the PF ODE from x_T is
unstable and would give only an approximate gradient of a different discretisation. The
reverse pass differentiates through `jax.linearize`'s JVPs (second order, reverse over
forward), which needs no extra memory per probe beyond the step being recomputed.

L before / after that `run` reports are computed afresh with the scoring estimator
(config.score, independent probes, adaptive), so a drop in L is not an artefact of the
probes PGD saw. PSNR (data range 2) and SSIM (skimage, data range 2) per image.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from memvol import io, trace, volume

Array = jax.Array


def budget_to_data(budget: float) -> float:
  """L-inf radius in [-1, 1] units of a budget given as a fraction of the intensity range."""
  if not 0.0 < float(budget) <= 1.0:
    raise ValueError(f"perturbation budget must be in (0, 1] (fraction of the range), got {budget}")
  return 2.0 * float(budget)


def project(x: Array, x_adv: Array, eps: float) -> Array:
  """x_adv clipped to the L-inf ball of radius eps around x and to [-1, 1], with |x_adv - x|
  <= eps holding exactly in x's float type."""
  eps = jnp.asarray(eps, x.dtype)
  xa = jnp.clip(x + jnp.clip(x_adv - x, -eps, eps), -1.0, 1.0)
  over, under = xa - x > eps, x - xa > eps
  xa = jnp.where(over | under, jnp.nextafter(xa, x), xa)
  return xa


def probes(key: Array, image_ids: Array, shape: tuple[int, ...], dtype, opts: volume.VolumeOptions) -> Array:
  """[B, n, *shape] the Hutchinson probes volume.batch_log_volume draws for each image."""
  return jax.vmap(lambda i: trace.sample_probes(jax.random.fold_in(key, i), opts.num_probes, shape, dtype,
                                                opts.probe))(image_ids)


def log_volume(eps_fn: Any, x0: Array, probes: Array, opts: volume.VolumeOptions) -> Array:
  """L of ONE image x0 by Hutchinson with probes [n, *shape] (`probes`)
  on a fixed grid of opts.num_steps Heun (or Euler) steps of volume.time_grid: the same
  numbers as volume.batch_log_volume with these options, integrated by a jax.lax.scan
  whose steps are rematerialised (jax.checkpoint) in the reverse pass."""
  sde, dtype = opts.sde, x0.dtype
  ts = jnp.asarray(volume.time_grid(sde, opts.t_start, opts.t_end, opts.num_steps, opts.time_grid), dtype)

  def vf(t, x):
    eps, jvp = jax.linearize(lambda z: eps_fn(z, t), x)
    return sde.pf_drift_from_eps(x, t, eps).astype(dtype), (sde.eps_coeff(t) * trace.hutchinson(jvp, probes)).astype(dtype)

  @jax.checkpoint
  def step(carry, t01):
    (x, l), (t0, t1) = carry, t01
    h = t1 - t0
    dx0, dl0 = vf(t0, x)
    if opts.solver == "euler":
      return (x + h * dx0, l + h * dl0), None
    dx1, dl1 = vf(t1, x + h * dx0)
    return (x + 0.5 * h * (dx0 + dx1), l + 0.5 * h * (dl0 + dl1)), None

  (_, l), _ = jax.lax.scan(step, (x0, jnp.zeros((opts.num_probes,), dtype)), (ts[:-1], ts[1:]))
  return sde.integrated_linear_div(ts[0], ts[-1], x0.size) + jnp.mean(l)


@eqx.filter_jit
def _pgd(eps_fn: Any, x: Array, probes: Array, opts: volume.VolumeOptions, eps: Array, alpha: Array
         ) -> dict[str, Array]:
  """x [B, ...]; probes [steps + 1, B, n, ...] (step s uses probes[s]). Images go one at a
  time (lax.map): on jaxlib 0.10.2 CPU the reverse pass of a vmapped, scanned L with traced
  probes segfaults, while the per-image program runs."""
  value_grad = jax.value_and_grad(lambda x1, p1: log_volume(eps_fn, x1, p1, opts))
  bcast = lambda m: m.reshape((-1,) + (1,) * (x.ndim - 1))  # noqa: E731

  def step(carry, pr):
    xa, best_x, best_l = carry
    lv, g = jax.lax.map(lambda a: value_grad(*a), (xa, pr))
    better = lv < best_l
    best_x, best_l = jnp.where(bcast(better), xa, best_x), jnp.where(better, lv, best_l)
    return (project(x, xa - alpha * jnp.sign(g), eps), best_x, best_l), lv

  init = (x, x, jnp.full((x.shape[0],), jnp.inf, x.dtype))
  (xa, best_x, best_l), lvs = jax.lax.scan(step, init, probes[:-1])
  last = jax.lax.map(lambda a: log_volume(eps_fn, a[0], a[1], opts), (xa, probes[-1]))
  best_x = jnp.where(bcast(last < best_l), xa, best_x)
  return {"images": best_x, "L_start": lvs[0], "L_best": jnp.minimum(best_l, last),
          "L_trace": jnp.concatenate([lvs, last[None]]).T}


def pgd(eps_fn: Any, images: Any, ids: Any, key: Array, opts: volume.VolumeOptions, budget: float,
        steps: int, step_size: float = 0.0) -> dict[str, np.ndarray]:
  """PGD on L for images [B, H, W, C]; step s draws image i's probes from
  fold_in(fold_in(key, s), ids[i]). budget and step_size are fractions of the intensity
  range (step_size 0 = 2.5 budget / steps). Returns numpy: images [B, ...] (the lowest-L
  iterate), L_start [B] (step 0's estimate at the original), L_best [B] (the lowest
  estimate seen), L_trace [B, steps + 1] (the estimate at every iterate)."""
  volume.validate_inputs(images, opts)
  if np.any(np.abs(np.asarray(images)) > 1.0):
    raise ValueError("images must lie in [-1, 1]")
  if int(steps) < 1:
    raise ValueError(f"PGD steps must be >= 1, got {steps}")
  x = jnp.asarray(images)
  ids = jnp.asarray(ids, jnp.int32)
  eps = budget_to_data(budget)
  alpha = 2.0 * float(step_size) if step_size else 2.5 * eps / int(steps)
  pr = jnp.stack([probes(jax.random.fold_in(key, s), ids, x.shape[1:], x.dtype, opts)
                  for s in range(int(steps) + 1)])
  out = _pgd(eps_fn, x, pr, opts, jnp.asarray(eps, x.dtype), jnp.asarray(alpha, x.dtype))
  return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """PSNR in dB per image pair [B, ...] with data range 2 ([-1, 1]); inf when equal."""
  mse = np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2, axis=tuple(range(1, np.ndim(x))))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(4.0 / mse)


def ssim(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """SSIM per image pair [B, H, W, C] (skimage, data range 2, the largest odd window <= 7
  that fits)."""
  from skimage.metrics import structural_similarity
  side = min(x.shape[1], x.shape[2])
  win = min(7, side if side % 2 else side - 1)
  if win < 3:
    raise ValueError(f"SSIM needs images of side >= 3, got {x.shape[1:3]}")
  return np.array([structural_similarity(a, b, data_range=2.0, channel_axis=-1, win_size=win)
                   for a, b in zip(np.asarray(x, np.float64), np.asarray(y, np.float64))])


# --- used by the mitigation stage ----------------------------------------------------


def options(config: Any) -> volume.VolumeOptions:
  """The differentiated L: Hutchinson, fixed steps of mitigate.perturb_solver."""
  mt = config.mitigate
  return volume.VolumeOptions.from_config(
      config, "hutchinson", adaptive=False, solver=str(mt.perturb_solver),
      num_steps=int(mt.perturb_solve_steps), num_probes=int(mt.perturb_probes),
      variance_reduction=None, max_steps=int(mt.perturb_solve_steps), save_ts=None)


def _volumes(config: Any, eps_fn: Any, images: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """L of images under eps_fn with the first scoring estimator and its key (scoring.py)."""
  from memvol import parallel, scoring
  est = scoring.estimators_of(config)[0]
  opts = volume.VolumeOptions.from_config(config, est, save_ts=None)
  bs = min(int(config.score.batch_size), len(ids))  # a few images: no padding to the scoring batch
  out = [scoring.score_images(eps_fn, images[s:s + bs], ids[s:s + bs], scoring.score_key(config), opts,
                              parallel.local_mesh(), pad_to=bs)["log_volume"]
         for s in range(0, len(ids), bs)]
  return np.concatenate(out).astype(np.float64)


def run(config: Any, workdir: str, ids: np.ndarray, path: str) -> dict[str, np.ndarray]:
  """Perturb the training images `ids` of workdir's split under its (EMA) model; write
  `path` (npz: ids, images (perturbed), original, L_before, L_after (scoring estimator),
  pgd_L_start, pgd_L_best, psnr, ssim, linf, eps_data) atomically and return it."""
  from memvol import data, loading
  mt = config.mitigate
  split = data.load_split(config, workdir)
  ids = np.sort(np.asarray(ids, np.int64))
  if len(ids) == 0:
    raise ValueError("perturb: no ids given")
  pos = data.train_positions(split.train.ids, ids, f"perturb on {workdir}")
  x = np.asarray(split.train.images[pos], np.float32)
  eps_fn = loading.load_eps_fn(config, workdir, use_ema=bool(config.score.use_ema))
  opts, bs = options(config), min(int(mt.perturb_batch_size), len(ids))
  key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 7)
  outs = []
  for s in range(0, len(ids), bs):
    n = min(bs, len(ids) - s)
    xb = np.concatenate([x[s:s + n], np.repeat(x[s:s + 1], bs - n, axis=0)])
    ib = np.concatenate([ids[s:s + n], np.repeat(ids[s:s + 1], bs - n)])
    o = pgd(eps_fn, xb, ib, key, opts, float(mt.perturb_budget), int(mt.perturb_steps),
            float(mt.perturb_step_size))
    outs.append({k: v[:n] for k, v in o.items()})
  xp = np.concatenate([o["images"] for o in outs]).astype(np.float32)
  rec = {"ids": ids, "images": xp, "original": x,
         "L_before": _volumes(config, eps_fn, x, ids), "L_after": _volumes(config, eps_fn, xp, ids),
         "pgd_L_start": np.concatenate([o["L_start"] for o in outs]),
         "pgd_L_best": np.concatenate([o["L_best"] for o in outs]),
         "psnr": psnr(x, xp), "ssim": ssim(x, xp),
         "linf": np.abs(xp - x).reshape(len(ids), -1).max(1), "eps_data": np.float32(budget_to_data(mt.perturb_budget))}
  io.save_npz(path, **rec)
  return rec


def summary(rec: dict[str, np.ndarray]) -> dict[str, Any]:
  """Per-arm record fields: means (L_before_baseline, L_after_baseline: the scoring
  estimator under the baseline model; psnr, ssim), the per-image values (`*_all`), the
  largest |delta| (linf_max) and the budget (eps_data), both in [-1, 1] units."""
  names = {"L_before": "L_before_baseline", "L_after": "L_after_baseline", "psnr": "psnr", "ssim": "ssim"}
  out: dict[str, Any] = {}
  for k, name in names.items():
    out[name] = float(np.mean(rec[k]))
    out[name + "_all"] = np.asarray(rec[k], np.float64).tolist()
  out["linf_max"], out["eps_data"] = float(np.max(rec["linf"])), float(rec["eps_data"])
  return out


def retrained_volumes(config: Any, workdir: str, rec: dict[str, np.ndarray]) -> dict[str, Any]:
  """L of the selected images, original and perturbed, under the arm's retrained model."""
  from memvol import loading
  eps_fn = loading.load_eps_fn(config, workdir, use_ema=bool(config.score.use_ema))
  ids = np.asarray(rec["ids"], np.int64)
  lo, lp = _volumes(config, eps_fn, rec["original"], ids), _volumes(config, eps_fn, rec["images"], ids)
  return {"L_selected_retrained": float(np.mean(lo)), "L_perturbed_retrained": float(np.mean(lp)),
          "L_selected_retrained_all": lo.tolist(), "L_perturbed_retrained_all": lp.tolist()}
