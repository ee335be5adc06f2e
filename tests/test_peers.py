"""Peer scores against closed forms (Gaussian data, a perfect memoriser of one image), batch and
order independence, one compilation per batch shape, and the ValueErrors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compile_count

from memvol import analytic, peers
from memvol import sde as sde_lib

SDE = sde_lib.VPSDE()
SHAPE = (2, 2, 1)
D = 4


def _gauss(seed=0, dtype=jnp.float64):
  return analytic.random_gaussian_eps(jax.random.PRNGKey(seed), SHAPE, SDE, std_range=(0.1, 0.8), dtype=dtype)


def _x(n, seed=1, dtype=np.float64):
  return np.random.default_rng(seed).uniform(-0.8, 0.8, (n, *SHAPE)).astype(dtype)


def _np_gauss(g):
  return np.asarray(g.mu, np.float64).reshape(-1), np.asarray(g.U, np.float64), np.asarray(g.s2, np.float64)


def _ac(t):
  return float(SDE.mean_coeff(t)), float(SDE.std(t))


def _np_eps(g, x, t):
  """Closed-form eps of the Gaussian in numpy float64: sigma U diag(1/v) U^T (x - a mu)."""
  mu, u, s2 = _np_gauss(g)
  a, s = _ac(t)
  v = a**2 * s2 + s**2
  return s * u @ ((u.T @ (x.reshape(-1) - a * mu)) / v)


def test_loss_is_the_expected_denoising_loss_of_gaussian_data(x64):
  g, x0, t = _gauss(), _x(3), 0.3
  score, nfe = peers.loss(g, x0, SDE, jax.random.PRNGKey(0), t=t, num_noise=8192)
  mu, u, s2 = _np_gauss(g)
  a, s = _ac(t)
  v = a**2 * s2 + s**2
  # E_z |eps(a x0 + s z) - z|^2 = sum_i s^2 a^2 c_i^2 / v_i^2 + (a^2 s2_i / v_i)^2, c = U^T (x0 - mu)
  want = [np.sum(s**2 * a**2 * (u.T @ (x.reshape(-1) - mu)) ** 2 / v**2 + (a**2 * s2 / v) ** 2) / D for x in x0]
  np.testing.assert_allclose(-score, want, rtol=0.05)
  assert list(nfe) == [8192] * 3


def _secmi_closed_form(g, x, t_sec, k):
  """SecMI on Gaussian data: each DDIM step s -> u multiplies the eigen-coordinates of
  y - mu (y = x / a) by 1 + (p_u - p_s) p_s / (s2_i + p_s^2), p = sigma / a."""
  mu, u, s2 = _np_gauss(g)
  m = int(round(t_sec / k))
  grid = [peers.ddpm_time(0, SDE)] + [j * k for j in range(1, m)]
  p = lambda t: _ac(t)[1] / _ac(t)[0]  # noqa: E731
  f = lambda s, w: 1.0 + (p(w) - p(s)) * p(s) / (s2 + p(s) ** 2)  # noqa: E731
  c = u.T @ (x.reshape(-1) / _ac(grid[0])[0] - mu)
  for s, w in zip(grid[:-1], grid[1:]):
    c = c * f(s, w)
  back = c * f(grid[-1], t_sec) * f(t_sec, grid[-1])
  return -(_ac(grid[-1])[0] ** 2) * np.sum((back - c) ** 2)


def test_secmi_matches_ddim_on_gaussian_data(x64):
  g, x0 = _gauss(2), _x(3, seed=4)
  score, nfe = peers.secmi(g, x0, SDE, t=0.1, interval=0.01)
  np.testing.assert_allclose(score, [_secmi_closed_form(g, x, 0.1, 0.01) for x in x0], rtol=1e-9)
  assert list(nfe) == [11] * 3
  assert np.all(score < 0)


def test_secmi_and_pia_are_exact_on_a_perfect_memoriser():
  """One training image y, w = 0: eps = (x - a y) / sigma, DDIM is exact (error 0 for every
  image) and PIA's error is sum |a (x - y) / sigma|^4, 0 for the member."""
  y = _x(1, seed=5, dtype=np.float32)
  mem = analytic.memoriser_eps(y, SDE)
  x0 = np.concatenate([y, _x(2, seed=6, dtype=np.float32)])
  s_sec, _ = peers.secmi(mem, x0, SDE, t=0.1, interval=0.01)
  np.testing.assert_allclose(s_sec, 0.0, atol=1e-6)
  a, s = _ac(0.2)
  want = -np.sum(np.abs(a * (x0 - y) / s) ** 4, axis=(1, 2, 3))
  for fn in (peers.pia, peers.pian):
    score, nfe = fn(mem, x0, SDE, t=0.2)
    np.testing.assert_allclose(score, want, rtol=1e-3, atol=1e-5)
    assert score[0] == pytest.approx(0.0, abs=1e-5) and list(nfe) == [2] * 3


def test_pia_matches_the_gaussian_closed_form(x64):
  g, x0, t = _gauss(3), _x(3, seed=7), 0.2
  a, s = _ac(t)
  for fn, normalise in ((peers.pia, False), (peers.pian, True)):
    score, _ = fn(g, x0, SDE, t=t)
    want = []
    for x in x0:
      e0 = _np_eps(g, x, SDE.eps)
      if normalise:
        e0 = e0 / np.mean(np.abs(e0)) * math.sqrt(2 / math.pi)
      want.append(-np.sum(np.abs(_np_eps(g, a * x.reshape(-1) + s * e0, t) - e0) ** 4))
    np.testing.assert_allclose(score, want, rtol=1e-9)


def test_sima_is_the_l4_norm_of_the_gaussian_eps(x64):
  g, x0 = _gauss(4), _x(3, seed=8)
  score, nfe = peers.sima(g, x0, SDE, t=0.01)
  np.testing.assert_allclose(score, [-np.sum(_np_eps(g, x, 0.01) ** 4) for x in x0], rtol=1e-9)
  assert list(nfe) == [1] * 3


def test_flipd_matches_the_gaussian_closed_form(x64):
  g, x0, t = _gauss(5), _x(3, seed=9), 0.05
  mu, u, s2 = _np_gauss(g)
  a, s = _ac(t)
  v = a**2 * s2 + s**2
  want = [-(D - s**2 * np.sum(1 / v) + np.sum(_np_eps(g, a * x, t) ** 2)) for x in x0]
  score, nfe = peers.flipd(g, x0, SDE, t=t)
  np.testing.assert_allclose(score, want, rtol=1e-9)
  assert list(nfe) == [1 + D] * 3


def test_flipd_lid_of_data_on_a_subspace_tends_to_its_dimension(x64):
  rng = np.random.default_rng(10)
  q, _ = np.linalg.qr(rng.normal(size=(D, D)))
  k = 2
  mu = rng.uniform(-0.3, 0.3, SHAPE)
  g = analytic.gaussian_eps(mu, q[:, :k] @ q[:, :k].T * 0.25, SDE)
  x0 = mu[None] + (rng.normal(size=(3, k)) @ q[:, :k].T * 0.5).reshape(3, *SHAPE)  # on the subspace
  lids = [-peers.flipd(g, x0, SDE, t=t)[0] for t in (0.05, 0.01, 0.002)]
  errs = [np.max(np.abs(lid - k)) for lid in lids]
  assert errs[0] > errs[1] > errs[2] and errs[2] < 0.01


def test_flipd_hutchinson_is_exact_for_a_diagonal_jacobian(x64):
  g = analytic.GaussianEps(mu=jnp.zeros(SHAPE), U=jnp.eye(D), s2=jnp.asarray([0.1, 0.2, 0.5, 1.0]), sde=SDE)
  x0 = _x(2, seed=11)
  exact, _ = peers.flipd(g, x0, SDE, t=0.05, trace="exact")
  hutch, nfe = peers.flipd(g, x0, SDE, jax.random.PRNGKey(3), t=0.05, trace="hutchinson", num_probes=3)
  np.testing.assert_allclose(hutch, exact, rtol=1e-12)
  assert list(nfe) == [4, 4]


def test_scores_do_not_depend_on_batch_size_or_order():
  net = analytic.memoriser_eps(_x(3, seed=12, dtype=np.float32), SDE, width=0.3)  # nonlinear in x
  x0, ids, key = _x(4, seed=13, dtype=np.float32), np.array([10, 11, 12, 13]), jax.random.PRNGKey(7)
  perm = np.array([2, 0, 3, 1])
  for name, kw in (("loss", dict(t=0.1, num_noise=3)), ("flipd", dict(t=0.05, trace="hutchinson", num_probes=2))):
    opts = peers.PeerOptions(sde=SDE, name=name, **kw)
    full, _ = peers.run(net, x0, opts, key=key, image_ids=ids)
    shuffled, _ = peers.run(net, x0[perm], opts, key=key, image_ids=ids[perm])
    single, _ = peers.run(net, x0[2:3], opts, key=key, image_ids=ids[2:3])
    np.testing.assert_allclose(shuffled, full[perm], rtol=1e-5)
    np.testing.assert_allclose(single, full[2:3], rtol=1e-5)
    other, _ = peers.run(net, x0[2:3], opts, key=key, image_ids=np.array([99]))  # other id, other noise
    assert other[0] != single[0]


def test_one_compilation_per_batch_shape():
  opts = peers.PeerOptions(sde=SDE, name="secmi", t=0.05, interval=0.01)
  compile_count.assert_one_compilation_per_batch_shape(
      lambda net, x: float(peers.run(net, x, opts)[0][0]), lambda n, seed: _x(n, seed=seed, dtype=np.float32))


@pytest.mark.parametrize("kw, match", [
    (dict(name="lira"), "unknown peer 'lira'"),
    (dict(name="loss", t=0.0), "t must be a finite number > 0"),
    (dict(name="sima", t=1.5), r"outside \(0, T\]"),
    (dict(name="loss", num_noise=0), "num_noise must be an integer >= 1"),
    (dict(name="secmi", t=0.1, interval=0.03), "whole number"),
    (dict(name="flipd", trace="svd"), "trace must be one of"),
    (dict(name="flipd", num_probes=0), "num_probes must be an integer >= 1"),
])
def test_bad_settings_are_value_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    peers.PeerOptions(sde=SDE, **kw)


def test_bad_images_are_value_errors():
  g = _gauss(dtype=jnp.float32)
  bad = _x(2, dtype=np.float32)
  bad[0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or inf"):
    peers.sima(g, bad, SDE, t=0.01)
  with pytest.raises(ValueError, match="batch"):
    peers.sima(g, np.zeros((0, *SHAPE), np.float32), SDE, t=0.01)
  with pytest.raises(ValueError, match="image_ids"):
    peers.sima(g, _x(2, dtype=np.float32), SDE, t=0.01, image_ids=np.array([1, 2, 3]))
