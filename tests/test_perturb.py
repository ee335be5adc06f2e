"""PGD on an image's own log volume growth: the budget, the differentiated L (equal to the
volume engine's, gradient against finite differences), a real drop of L on a closed-form
memoriser, PSNR / SSIM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memvol import analytic, perturb, volume
from memvol import sde as sde_lib

SDE = sde_lib.VPSDE()


def _opts(**kw):
  base = dict(sde=SDE, estimator="hutchinson", solver="heun", adaptive=False, num_steps=8, num_probes=4,
              max_steps=8)
  return volume.VolumeOptions(**{**base, **kw})


def _memoriser(shape, dtype, n=3, spread=0.3, width=0.1):
  data = jax.random.uniform(jax.random.PRNGKey(0), (n,) + shape, dtype, -spread, spread)
  return data, analytic.memoriser_eps(data, SDE, width=width)


def test_projection_respects_the_budget_exactly():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (64, 5, 5, 1)).astype(np.float32)
  x[:, 0] = 1.0  # at the edge of the range
  eps = perturb.budget_to_data(8 / 255)
  assert eps == pytest.approx(16 / 255)
  for scale in (0.01, 0.2, 3.0):
    xa = np.asarray(perturb.project(jnp.asarray(x), jnp.asarray(x + scale * rng.normal(size=x.shape).astype(np.float32)), eps))
    assert xa.dtype == np.float32
    assert np.max(np.abs(xa - x)) <= np.float32(eps)     # float32 arithmetic, no tolerance
    assert xa.min() >= -1.0 and xa.max() <= 1.0
  with pytest.raises(ValueError, match="budget"):
    perturb.budget_to_data(0.0)


def test_differentiated_l_equals_the_volume_engine(x64):
  data, eps_fn = _memoriser((4, 4, 1), jnp.float64)
  x = data[:2] + 0.01
  key = jax.random.PRNGKey(3)
  for solver in ("heun", "euler"):
    opts = _opts(solver=solver)
    pr = perturb.probes(key, jnp.arange(2), x.shape[1:], x.dtype, opts)
    mine = jax.vmap(lambda a, p: perturb.log_volume(eps_fn, a, p, opts))(x, pr)
    ref = volume.batch_log_volume(eps_fn, x, jnp.arange(2), key, opts)["log_volume"]
    np.testing.assert_allclose(np.asarray(mine), np.asarray(ref), rtol=1e-12)


def test_gradient_matches_finite_differences(x64):
  data, eps_fn = _memoriser((2, 2, 1), jnp.float64, spread=0.2, width=0.15)
  opts = _opts(num_steps=6, num_probes=2)
  x = data[0] + 0.03
  pr = perturb.probes(jax.random.PRNGKey(1), jnp.array([0]), x.shape, x.dtype, opts)[0]
  f = jax.jit(lambda z: perturb.log_volume(eps_fn, z, pr, opts))
  g = jax.grad(f)(x)
  assert float(jnp.linalg.norm(g)) > 1e-3  # a real gradient, not zero
  rng = np.random.default_rng(0)
  h = 1e-5
  for _ in range(3):
    v = jnp.asarray(rng.normal(size=x.shape))
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(g, v)), float(fd), rtol=1e-6, atol=1e-9)


def test_pgd_lowers_l_on_a_memoriser_within_budget(x64):
  data, eps_fn = _memoriser((4, 4, 1), jnp.float64)
  x = np.asarray(data[:2])
  out = perturb.pgd(eps_fn, x, np.arange(2), jax.random.PRNGKey(1), _opts(), 8 / 255, 5)
  assert np.max(np.abs(out["images"] - x)) <= 16 / 255
  assert np.all(out["L_best"] <= out["L_start"]) and out["L_trace"].shape == (2, 6)
  exact = lambda z: volume.log_volume_growth(eps_fn, z, sde=SDE, estimator="exact", adaptive=False,  # noqa: E731
                                             solver="heun", num_steps=32).log_volume
  before, after = exact(x), exact(out["images"])
  assert np.all(after < before - 1.0), (before, after)  # judged by the exact trace, not the probes PGD saw
  with pytest.raises(ValueError, match="steps"):
    perturb.pgd(eps_fn, x, np.arange(2), jax.random.PRNGKey(1), _opts(), 8 / 255, 0)


def test_psnr_and_ssim():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (3, 14, 14, 1))
  assert np.all(np.isinf(perturb.psnr(x, x))) and np.allclose(perturb.ssim(x, x), 1.0)
  y = x + 0.1  # mse 0.01: 10 log10(4 / 0.01)
  np.testing.assert_allclose(perturb.psnr(x, y), 10 * np.log10(400.0))
  s = perturb.ssim(x, x + rng.normal(0, 0.3, x.shape))
  assert np.all(s < 0.9) and np.all(s > -1)
  with pytest.raises(ValueError, match="side"):
    perturb.ssim(x[:, :2, :2], x[:, :2, :2])
