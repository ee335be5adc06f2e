"""The volume bound L(t0 -> t) <= D log(sigma(t) / sigma(t0)) (memvol.sde.log_volume_bound):
true scores (Gaussian data, the memoriser) stay below it, the memoriser reaches it as it
sharpens, and an eps whose Jacobian trace exceeds D / sigma overshoots it by exactly the
integral of the excess rate."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate

from memvol import analytic, volume
from memvol import sde as sde_lib

SHAPE = (4, 4, 1)
D = 16
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(), "ve": sde_lib.VESDE()}
TIGHT = dict(rtol=1e-10, atol=1e-10, max_steps=20000)
SAVE = (0.01, 0.05, 0.2, 0.5, 1.0)


def _bound(sde, ts):
  return np.array([float(sde.log_volume_bound(sde.eps, t, D)) for t in ts])


def test_vp_bound_per_dimension(x64):
  sde = SDES["vp"]
  np.testing.assert_allclose(float(sde.log_volume_bound(sde.eps, sde.T, 1)), 4.558, atol=5e-4)
  np.testing.assert_allclose(float(sde.log_volume_bound(sde.eps, sde.T, 196)), 893.4, atol=0.1)
  ve = SDES["ve"]
  np.testing.assert_allclose(float(ve.log_volume_bound(0.2, 0.7, 3)), 3 * 0.5 * np.log(5000.0), rtol=1e-12)


@pytest.mark.parametrize("name", sorted(SDES))
def test_gaussian_data_stays_below_the_bound(x64, name):
  sde = SDES[name]
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(4), SHAPE, sde, std_range=(0.02, 1.5))
  res = volume.log_volume_growth(g, jax.random.uniform(jax.random.PRNGKey(0), (2,) + SHAPE, minval=-1, maxval=1),
                                 sde=sde, estimator="exact", save_ts=SAVE, **TIGHT)
  closed = np.array([float(g.log_volume(sde.eps, t)) for t in SAVE])
  np.testing.assert_allclose(res.L_t, np.tile(closed, (2, 1)), rtol=1e-6)
  gap = _bound(sde, SAVE) - closed
  assert np.all(gap > 0.1), gap  # strictly below: the data covariance is never zero


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_memoriser_approaches_the_bound_as_it_sharpens(x64, name):
  sde = SDES[name]
  data = 0.8 * jnp.sign(jax.random.normal(jax.random.PRNGKey(2), (3,) + SHAPE))  # far apart
  bound = _bound(sde, SAVE)
  profiles = []
  for width in (0.3, 0.1, 0.03, 0.0):
    m = analytic.memoriser_eps(data, sde, width=width)
    res = volume.log_volume_growth(m, data[:1] * sde.mean_coeff(sde.eps), sde=sde, estimator="exact",
                                   save_ts=SAVE, **TIGHT)
    profiles.append(res.L_t[0])
  profiles = np.array(profiles)
  assert np.all(profiles <= bound + 1e-6), profiles - bound
  assert np.all(np.diff(profiles, axis=0) > 0)  # sharper memoriser, more volume, at every t
  # w = 0 sits on the bound while the posterior is a point (t <= 0.2 here), then falls
  # below it as the other training images start to share the posterior.
  np.testing.assert_allclose(profiles[-1, :3], bound[:3], rtol=1e-6)
  assert profiles[-1, -1] < bound[-1] - 1e-3


class Overshoot(eqx.Module):
  """eps(x, t) = (1 + kappa) x / sigma(t): tr(d eps/dx) = (1 + kappa) D / sigma, above the
  largest trace any true score has."""

  kappa: jax.Array
  sde: sde_lib.SDE = eqx.field(static=True)

  def __call__(self, x, t):
    return (1.0 + self.kappa) * x / self.sde.std(t)


@pytest.mark.parametrize("name", sorted(SDES))
def test_an_eps_above_the_bound_overshoots_it_by_the_integral(x64, name):
  """L - L_max = integral kappa D g^2 / (2 sigma^2) dt = kappa D (log(sigma_t / sigma_0) -
  log(a_t / a_0)), by hand; and by quadrature."""
  sde, kappa = SDES[name], 0.25
  res = volume.log_volume_growth(Overshoot(jnp.asarray(kappa), sde),
                                 jax.random.uniform(jax.random.PRNGKey(1), (2,) + SHAPE, minval=-1, maxval=1),
                                 sde=sde, estimator="exact", save_ts=SAVE, **TIGHT)
  t0 = sde.eps
  by_hand = np.array([kappa * D * (float(sde.log_std(t) - sde.log_std(t0))
                                   - float(sde.log_mean_coeff(t) - sde.log_mean_coeff(t0))) for t in SAVE])
  rate = lambda s: kappa * D * float(sde.g2(s)) / (2 * float(sde.std(s)) ** 2)  # noqa: E731
  quad = np.array([scipy.integrate.quad(rate, t0, t, epsabs=1e-12, epsrel=1e-12, limit=200)[0] for t in SAVE])
  np.testing.assert_allclose(by_hand, quad, rtol=1e-8)
  np.testing.assert_allclose(res.L_t - _bound(sde, SAVE), np.tile(by_hand, (2, 1)), rtol=1e-6)
  np.testing.assert_allclose(res.log_volume - float(sde.log_volume_bound(t0, sde.T, D)), by_hand[-1], rtol=1e-6)
  assert np.all(by_hand > 0)
