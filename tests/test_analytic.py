"""memvol.analytic: the closed-form eps functions against autodiff of the marginal
log-densities, and the closed-form flow / log-determinant against the PF ODE itself."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.stats as jstats
import numpy as np
import pytest

from memvol import analytic
from memvol import sde as sde_lib

SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(), "ve": sde_lib.VESDE()}


def _gaussian(sde, shape=(2, 3)):
  return analytic.random_gaussian_eps(jax.random.PRNGKey(0), shape, sde, std_range=(0.05, 1.5))


@pytest.mark.parametrize("name", sorted(SDES))
def test_gaussian_eps_is_minus_sigma_score(x64, name):
  sde = SDES[name]
  g = _gaussian(sde)
  cov0 = (g.U * g.s2) @ g.U.T
  x = jax.random.normal(jax.random.PRNGKey(1), g.mu.shape)
  for t in (1e-3, 0.2, 0.9):
    t = jnp.asarray(t)
    a, s = sde.mean_coeff(t), sde.std(t)
    cov = a**2 * cov0 + s**2 * jnp.eye(g.mu.size)
    logp = lambda z: jstats.multivariate_normal.logpdf(z.reshape(-1), a * g.mu.reshape(-1), cov)  # noqa: E731
    np.testing.assert_allclose(g(x, t), -s * jax.grad(logp)(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SDES))
def test_gaussian_flow_solves_the_pf_ode_and_has_the_closed_form_logdet(x64, name):
  sde = SDES[name]
  g = _gaussian(sde)
  x0 = jax.random.normal(jax.random.PRNGKey(2), g.mu.shape)
  t0 = jnp.asarray(sde.eps)
  for t in (0.05, 0.5, 1.0):
    t = jnp.asarray(t)
    xt, dxdt = jax.jvp(lambda s: g.flow(x0, t0, s), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(dxdt, sde.pf_drift(g, xt, t), rtol=1e-8, atol=1e-8)
    jac = jax.jacfwd(lambda z: g.flow(z, t0, t).reshape(-1))(x0).reshape(g.mu.size, -1)
    np.testing.assert_allclose(np.linalg.slogdet(np.asarray(jac))[1], g.log_volume(t0, t), rtol=1e-10)
  np.testing.assert_allclose(g.flow(x0, t0, t0), x0, rtol=1e-12)
  rate = g.drift_jacobian_rate(jnp.asarray(0.3))
  jac_v = jax.jacfwd(lambda z: sde.pf_drift(g, z, jnp.asarray(0.3)).reshape(-1))(x0).reshape(g.mu.size, -1)
  np.testing.assert_allclose(np.sort(np.linalg.eigvals(np.asarray(jac_v)).real), np.sort(rate), rtol=1e-8)


def test_gaussian_eps_from_covariance(x64):
  sde = sde_lib.VPSDE()
  rng = np.random.default_rng(0)
  b = rng.normal(size=(4, 4))
  cov = b @ b.T / 4
  g = analytic.gaussian_eps(np.zeros((2, 2)), cov, sde)
  np.testing.assert_allclose((g.U * g.s2) @ g.U.T, cov, atol=1e-12)
  with pytest.raises(ValueError, match="symmetric"):
    analytic.gaussian_eps(np.zeros(4), b, sde)
  with pytest.raises(ValueError, match="positive semi-definite"):
    analytic.gaussian_eps(np.zeros(4), -cov, sde)
  with pytest.raises(ValueError, match="shape"):
    analytic.gaussian_eps(np.zeros(3), cov, sde)


@pytest.mark.parametrize("width", [0.0, 0.1])
def test_memoriser_eps_is_minus_sigma_score_of_the_mixture(x64, width):
  sde = sde_lib.VPSDE()
  data = jax.random.uniform(jax.random.PRNGKey(3), (5, 2, 2), minval=-1, maxval=1)
  m = analytic.memoriser_eps(data, sde, width=width)
  for t in (0.01, 0.3, 1.0):
    t = jnp.asarray(t)
    a, v = sde.mean_coeff(t), m.variance(t)

    def logp(z):
      sq = jnp.sum((z[None] - a * data) ** 2, axis=(1, 2))
      return jax.scipy.special.logsumexp(-sq / (2 * v))

    x = a * data[1] + sde.std(t) * jax.random.normal(jax.random.PRNGKey(4), (2, 2))
    np.testing.assert_allclose(m(x, t), -sde.std(t) * jax.grad(logp)(x), rtol=1e-8, atol=1e-10)
  # Perfect memoriser: zero noise prediction on a (scaled) training image, and each
  # direction stretches by sigma(1) / sigma(eps).
  t = jnp.asarray(0.01)
  if width == 0.0:
    np.testing.assert_allclose(m(sde.mean_coeff(t) * data[2], t), 0.0, atol=1e-9)
    np.testing.assert_allclose(m.log_stretch(sde.eps, 1.0), np.log(sde.std(1.0) / sde.std(sde.eps)), rtol=1e-12)
  with pytest.raises(ValueError, match="width"):
    analytic.memoriser_eps(data, sde, width=-1.0)
  with pytest.raises(ValueError, match="n >= 1"):
    analytic.memoriser_eps(jnp.zeros((0, 2, 2)), sde)


def test_models_are_pytree_callables_with_traced_params():
  sde = sde_lib.VPSDE()
  g = _gaussian(sde)
  arrays, static = eqx.partition(g, eqx.is_array)
  assert len(jax.tree.leaves(arrays)) == 3 and static.sde == sde
  traces = []

  @eqx.filter_jit
  def f(model, x):
    traces.append(1)
    return model(x, jnp.asarray(0.5))

  x = jnp.ones(g.mu.shape)
  f(g, x)
  f(eqx.tree_at(lambda m: m.mu, g, g.mu + 1.0), x)  # new parameter values: no retrace
  assert len(traces) == 1
