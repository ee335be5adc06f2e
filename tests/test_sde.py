"""memvol.sde: the coefficients against their definitions (autodiff, quadrature, closed
forms), the expm1 forms near t = 0, the PF drift against the score form, the prior."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from memvol import sde as sde_lib

SDES = {
    "vp": sde_lib.VPSDE(),
    "subvp": sde_lib.SubVPSDE(),
    "ve": sde_lib.VESDE(),
    "vp_custom": sde_lib.VPSDE(beta_min=0.2, beta_max=12.0),
}
TS = np.array([1e-5, 1e-3, 0.01, 0.1, 0.37, 0.8, 1.0])


@pytest.mark.parametrize("name", sorted(SDES))
def test_f_lin_is_dlog_a_dt_and_g2_matches_sigma(x64, name):
  sde = SDES[name]
  t = jnp.asarray(TS)
  dlog_a = jax.vmap(jax.grad(sde.log_mean_coeff))(t)
  np.testing.assert_allclose(sde.f_lin(t), dlog_a, rtol=1e-12, atol=1e-12)
  # g^2 = d sigma^2/dt - 2 f_lin sigma^2: the marginals are exactly N(a x0, sigma^2 I).
  dvar = jax.vmap(jax.grad(lambda s: sde.std(s) ** 2))(t)
  np.testing.assert_allclose(sde.g2(t), dvar - 2 * sde.f_lin(t) * sde.std(t) ** 2, rtol=1e-9)
  np.testing.assert_allclose(sde.mean_coeff(t), np.exp(sde.log_mean_coeff(t)), rtol=1e-14)
  np.testing.assert_allclose(sde.eps_coeff(t), sde.g2(t) / (2 * sde.std(t)), rtol=1e-14)


def test_vp_closed_forms_and_small_t_accuracy(x64):
  sde = sde_lib.VPSDE()
  t = jnp.asarray(TS)
  log_a = -0.25 * TS**2 * 19.9 - 0.5 * TS * 0.1
  np.testing.assert_allclose(sde.log_mean_coeff(t), log_a, rtol=1e-14)
  np.testing.assert_allclose(sde.beta(t), 0.1 + 19.9 * TS, rtol=1e-14)
  np.testing.assert_allclose(sde.f_lin(t), -0.5 * (0.1 + 19.9 * TS), rtol=1e-14)
  # sigma^2 = 1 - a^2 accurately near t = 0, in float32 too (sqrt(1 - a^2) would cancel).
  exact = np.sqrt(-np.expm1(2 * log_a))
  np.testing.assert_allclose(sde.std(t), exact, rtol=1e-13)
  with jax.enable_x64(False):
    s32 = np.asarray(sde_lib.VPSDE().std(jnp.asarray(TS, jnp.float32)))
  np.testing.assert_allclose(s32, exact, rtol=2e-6)
  # The paper's sigma(1) / sigma(eps): ~4.56 nats per direction.
  assert float(jnp.log(sde.std(1.0) / sde.std(1e-3))) == pytest.approx(4.55775, abs=1e-4)


def test_subvp_and_ve_closed_forms(x64):
  t = jnp.asarray(TS)
  sub, vp = sde_lib.SubVPSDE(), sde_lib.VPSDE()
  log_a = np.asarray(vp.log_mean_coeff(t))
  a = np.exp(log_a)
  np.testing.assert_allclose(sub.std(t), -np.expm1(2 * log_a), rtol=1e-13)
  np.testing.assert_allclose(sub.g2(t), vp.beta(t) * (1 - a**4), rtol=1e-10)
  ve = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0)
  np.testing.assert_allclose(ve.std(t), 0.01 * 5000.0**TS, rtol=1e-13)
  np.testing.assert_allclose(ve.mean_coeff(t), 1.0)
  np.testing.assert_allclose(ve.g2(t), 2 * ve.std(t) ** 2 * math.log(5000.0), rtol=1e-13)


@pytest.mark.parametrize("name", sorted(SDES))
def test_integrated_linear_div_is_the_integral(x64, name):
  sde = SDES[name]
  d = 7
  t0, t1 = sde.eps, 0.9
  quad, _ = scipy.integrate.quad(lambda s: float(sde.linear_div(s, d)), t0, t1, epsabs=1e-12, epsrel=1e-12)
  assert float(sde.integrated_linear_div(t0, t1, d)) == pytest.approx(quad, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_pf_drift_is_f_minus_half_g2_score(x64, name):
  sde = SDES[name]
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
  eps = jax.random.normal(jax.random.PRNGKey(1), (3, 4))
  t = jnp.asarray(0.3)
  score = sde.score_from_eps(eps, t)
  np.testing.assert_allclose(score, -eps / sde.std(t), rtol=1e-14)
  expected = sde.f_lin(t) * x - 0.5 * sde.g2(t) * score
  np.testing.assert_allclose(sde.pf_drift(lambda z, s: eps, x, t), expected, rtol=1e-12)
  np.testing.assert_allclose(sde.pf_drift_from_eps(x, t, eps), expected, rtol=1e-12)


def test_marginals_perturb_time_input_and_reverse_step(x64):
  sde = sde_lib.VPSDE()
  x0, z = jnp.ones((2, 3)), jnp.full((2, 3), 0.5)
  t = jnp.asarray(0.4)
  mean, std = sde.marginal_prob(x0, t)
  np.testing.assert_allclose(mean, sde.mean_coeff(t) * x0)
  assert float(std) == pytest.approx(float(sde.std(t)))
  np.testing.assert_allclose(sde.perturb(x0, t, z), mean + std * z, rtol=1e-14)
  assert float(sde.time_input(jnp.asarray(0.5))) == pytest.approx(499.5)
  dt = 1e-3
  eps = jnp.full((2, 3), 0.2)
  stepped = sde.reverse_sde_step(eps, x0, t, dt, z)
  drift = sde.f_lin(t) * x0 - sde.g2(t) * sde.score_from_eps(eps, t)
  np.testing.assert_allclose(stepped, x0 - drift * dt + np.sqrt(sde.g2(t) * dt) * z, rtol=1e-13)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_prior_logp_and_sample(x64, name):
  sde = SDES[name]
  s = float(sde.std(sde.T))
  z = jax.random.normal(jax.random.PRNGKey(2), (4, 3, 2)) * s
  expected = scipy.stats.norm(0, s).logpdf(np.asarray(z)).sum()
  assert float(sde.prior_logp(z)) == pytest.approx(expected, rel=1e-12)
  draws = sde.prior_sample(jax.random.PRNGKey(3), (20000,), jnp.float64)
  assert float(jnp.std(draws)) == pytest.approx(s, rel=0.03)


def test_get_sde_and_from_config():
  assert isinstance(sde_lib.get_sde("ve", sigma_max=10.0), sde_lib.VESDE)
  assert sde_lib.get_sde("vp", beta_max=10.0).beta_max == 10.0
  with pytest.raises(ValueError, match=r"\['beta_maxx'\] for sde 'vp'; its fields: .*beta_max"):
    sde_lib.get_sde("vp", beta_maxx=10.0)  # a typo is refused, not dropped
  with pytest.raises(ValueError, match=r"\['sigma_max'\] for sde 'vp'"):
    sde_lib.get_sde("vp", sigma_max=3.0)
  with pytest.raises(ValueError, match=r"unknown key\(s\) \['beta_maxx'\] in the sde config"):
    sde_lib.from_config({"name": "vp", "beta_maxx": 30.0})
  # a config block holds every SDE's fields; ve leaves the beta ones aside
  assert sde_lib.from_config({"name": "ve", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0}) == sde_lib.VESDE()
  got = sde_lib.from_config({"name": "subvp", "beta_min": 0.1, "beta_max": 20.0, "T": 1.0, "eps": 1e-3})
  assert got == sde_lib.SubVPSDE()
  hash(got)
  with pytest.raises(ValueError, match="unknown sde 'vq'"):
    sde_lib.get_sde("vq")


@pytest.mark.parametrize("name", sorted(SDES))
def test_time_of_noise_ratio_inverts_sigma_over_a(x64, name):
  """EDM's sigma = sigma(t) / a(t) and back (what the Heun sampler steps in)."""
  sde = SDES[name]
  t = jnp.asarray(TS)
  np.testing.assert_allclose(np.asarray(sde.time_of_noise_ratio(sde.noise_ratio(t))), TS, rtol=1e-9, atol=1e-12)
  assert np.all(np.diff(np.asarray(sde.noise_ratio(t))) > 0)
