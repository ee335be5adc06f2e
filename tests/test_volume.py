"""memvol.volume: every estimator against a closed form, the probe contract, batch and
order independence, one compilation per batch shape, costs, and the ValueErrors."""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compile_count

from memvol import analytic, trace, volume
from memvol import sde as sde_lib
from experiments.configs import base

SHAPE = (4, 4, 1)
D = 16
SDES = {"vp": sde_lib.VPSDE(), "subvp": sde_lib.SubVPSDE(), "ve": sde_lib.VESDE()}
TIGHT = dict(rtol=1e-10, atol=1e-10, max_steps=20000)


def _images(n, seed=0, shape=SHAPE):
  return jax.random.uniform(jax.random.PRNGKey(seed), (n,) + shape, minval=-1, maxval=1)


def _diagonal_gaussian(sde, seed=0):
  """A Gaussian with axis-aligned covariance: d eps / dx is diagonal."""
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(seed), SHAPE, sde, std_range=(0.05, 1.0))
  return eqx.tree_at(lambda m: m.U, g, jnp.eye(D, dtype=g.U.dtype))


class TinyNet(nn.Module):
  """A small conv eps-network with a sinusoidal time embedding (random init in tests)."""

  @nn.compact
  def __call__(self, x, t):
    freqs = jnp.asarray([1.0, 3.0, 10.0, 30.0])  # smooth in t, so solves stay short
    temb = jnp.concatenate([jnp.sin(t * freqs), jnp.cos(t * freqs)])
    h = nn.Conv(8, (3, 3))(x[None])[0] + nn.Dense(8)(temb)
    h = nn.Conv(8, (3, 3))(nn.silu(h)[None])[0]
    return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h)[None])[0] + 0.5 * x


class FlaxEps(eqx.Module):
  """A flax network as a pytree eps_fn: params are traced inputs, the module is static."""

  params: dict
  module: TinyNet = eqx.field(static=True)

  def __call__(self, x, t):
    return self.module.apply({"params": self.params}, x, t)


def _tiny_net(shape=SHAPE, seed=0, dtype=jnp.float32):
  module = TinyNet()
  params = module.init(jax.random.PRNGKey(seed), jnp.zeros(shape, dtype), jnp.asarray(0.5, dtype))["params"]
  return FlaxEps(params=jax.tree.map(lambda p: p.astype(dtype), params), module=module)


# --- exact and hutchinson against closed forms -------------------------------------------

@pytest.mark.parametrize("name", sorted(SDES))
def test_exact_matches_the_gaussian_closed_form(x64, name):
  sde = SDES[name]
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(1), SHAPE, sde, std_range=(0.02, 1.5))
  x0 = _images(2)
  t0, t1 = sde.eps, sde.T
  save = (t0, 0.1, 0.5, t1)
  res = volume.log_volume_growth(g, x0, sde=sde, estimator="exact", chunk_size=5, save_ts=save, **TIGHT)
  expected = float(g.log_volume(t0, t1))
  np.testing.assert_allclose(res.log_volume, expected, rtol=1e-6)
  np.testing.assert_allclose(res.x_T, jax.vmap(lambda x: g.flow(x, t0, t1))(x0), rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(res.prior_logp, jax.vmap(sde.prior_logp)(jnp.asarray(res.x_T)), rtol=1e-12)
  np.testing.assert_allclose(res.logp, res.prior_logp + res.log_volume, rtol=1e-12)
  np.testing.assert_allclose(res.L_t, np.tile([float(g.log_volume(t0, s)) for s in save], (2, 1)),
                             rtol=1e-6, atol=1e-8)
  assert np.all(res.status == 0) and np.all(res.log_volume_stderr == 0)
  assert np.all(res.num_jvps == res.nfe * D) and np.all(res.nfe > 0)


def test_fixed_steps_on_the_sigma_grid(x64):
  sde = SDES["vp"]
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(2), SHAPE, sde, std_range=(0.02, 1.5))
  res = volume.log_volume_growth(g, _images(1), sde=sde, estimator="exact", adaptive=False, num_steps=40)
  np.testing.assert_allclose(res.log_volume, float(g.log_volume(sde.eps, sde.T)), rtol=1e-4)
  assert res.num_steps[0] == 40 and res.num_rejected[0] == 0 and res.nfe[0] == 1 + 6 * 40
  grid = volume.time_grid(sde, sde.eps, sde.T, 40)
  assert grid[0] == sde.eps and grid[-1] == sde.T and np.all(np.diff(grid) > 0)
  assert np.diff(grid)[0] < 0.02 * np.diff(grid)[-1] and np.max(np.diff(grid)) <= 2 / 40
  np.testing.assert_allclose(np.diff(volume.time_grid(SDES["ve"], 1e-5, 1.0, 10)), (1 - 1e-5) / 10, rtol=1e-6)


def test_richardson_cancels_the_leading_error_term(x64):
  """Heun (order 2) at n and n/2 steps: L_n + (L_n - L_n/2) / 3, and on the Gaussian closed form
  its error is far below the n-step solve's; the profile is combined the same way."""
  sde = SDES["vp"]
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(2), SHAPE, sde, std_range=(0.02, 1.5))
  x0, save = _images(2), (0.05, 0.5)
  run = lambda n, **kw: volume.log_volume_growth(g, x0, sde=sde, estimator="exact", solver="heun",  # noqa: E731
                                                 adaptive=False, num_steps=n, save_ts=save, **kw)
  fine, coarse, rich = run(18), run(9), run(18, richardson=True)
  np.testing.assert_allclose(rich.log_volume, fine.log_volume + (fine.log_volume - coarse.log_volume) / 3,
                             rtol=1e-10)
  np.testing.assert_allclose(rich.L_t, fine.L_t + (fine.L_t - coarse.L_t) / 3, rtol=1e-10)
  np.testing.assert_array_equal(rich.nfe, fine.nfe + coarse.nfe)
  np.testing.assert_array_equal(rich.num_steps, [27, 27])
  np.testing.assert_allclose(rich.x_T, fine.x_T, rtol=1e-12)
  truth = float(g.log_volume(sde.eps, sde.T))
  err_fine, err_rich = np.abs(fine.log_volume - truth), np.abs(rich.log_volume - truth)
  assert np.all(err_rich < 0.1 * err_fine), (err_fine, err_rich)


def test_vol108_preset_is_richardson_of_two_hutchinson_solves_with_one_probe_set(x64):
  """The preset's probes are the same in both solves (fold_in(key, image id)), so it equals the
  combination of two separate 1-probe heun solves; 108 passes per image."""
  sde, net = SDES["vp"], _tiny_net(dtype=jnp.float64)
  x0, key = _images(3, seed=4).astype(jnp.float64), jax.random.PRNGKey(7)
  opts = volume.VolumeOptions(sde=sde, **volume.PRESETS["vol108"])
  rich = volume.run(net, x0, opts, key=key)
  fine, coarse = (volume.run(net, x0, dataclasses.replace(opts, num_steps=n, richardson=False), key=key)
                  for n in (18, 9))
  np.testing.assert_allclose(rich.log_volume, fine.log_volume + (fine.log_volume - coarse.log_volume) / 3,
                             rtol=1e-10)
  np.testing.assert_array_equal(rich.nfe + rich.num_jvps, [108] * 3)
  by_name = volume.log_volume_growth(net, x0, sde=sde, key=key, estimator="hutchinson@vol108")
  np.testing.assert_array_equal(by_name.log_volume, rich.log_volume)
  coarser = volume.log_volume_growth(net, x0, sde=sde, key=key, estimator="hutchinson@vol108", num_steps=8)
  np.testing.assert_array_equal(coarser.nfe + coarser.num_jvps, [48] * 3)  # an option given replaces the preset's
  with pytest.raises(ValueError, match="unknown preset"):
    volume.log_volume_growth(net, x0, sde=sde, estimator="hutchinson@vol109")
  with pytest.raises(ValueError, match="richardson needs"):
    volume.VolumeOptions(sde=sde, solver="heun", adaptive=False, num_steps=9, richardson=True)
  with pytest.raises(ValueError, match="richardson needs"):
    volume.VolumeOptions(sde=sde, richardson=True)


def test_hutchinson_is_exact_on_a_diagonal_jacobian(x64):
  sde = SDES["vp"]
  g = _diagonal_gaussian(sde)
  res = volume.log_volume_growth(g, _images(2), sde=sde, key=jax.random.PRNGKey(7), estimator="hutchinson",
                                 num_probes=3, **TIGHT)
  np.testing.assert_allclose(res.log_volume, float(g.log_volume(sde.eps, sde.T)), rtol=1e-6)
  assert np.all(res.log_volume_stderr < 1e-6) and np.all(res.num_jvps == res.nfe * 3)


@pytest.mark.parametrize("num_probes,probe", [(1, "rademacher"), (4, "gaussian"), (9, "rademacher")])
def test_hutchinson_on_a_linear_map_of_known_trace(x64, num_probes, probe):
  """Each probe's integrated L_k = lin + v_k^T M v_k with M = U diag(m) U^T known in closed
  form: the result must be their mean (a missing 1/n shows) over the documented probes."""
  sde = SDES["vp"]
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(3), SHAPE, sde, std_range=(0.02, 1.5))
  key, ids = jax.random.PRNGKey(11), np.array([5, 2, 40])
  res = volume.log_volume_growth(g, _images(3), sde=sde, key=key, estimator="hutchinson",
                                 num_probes=num_probes, probe=probe, image_ids=ids, **TIGHT)
  t0, t1 = sde.eps, sde.T
  lin = float(sde.integrated_linear_div(t0, t1, D))
  m = np.asarray(g.direction_log_stretch(t0, t1)) - (lin / D)
  big_m = (np.asarray(g.U) * m) @ np.asarray(g.U).T
  for i, image_id in enumerate(ids):
    v = np.asarray(trace.sample_probes(jax.random.fold_in(key, image_id), num_probes, SHAPE,
                                       jnp.float64, probe)).reshape(num_probes, D)
    per_probe = lin + np.einsum("ki,ij,kj->k", v, big_m, v)
    assert res.log_volume[i] == pytest.approx(per_probe.mean(), rel=1e-6)
    if num_probes > 1:
      assert res.log_volume_stderr[i] == pytest.approx(per_probe.std(ddof=1) / math.sqrt(num_probes), rel=1e-5)
    else:
      assert np.isnan(res.log_volume_stderr[i])  # one probe: no spread to measure


def test_hutchinson_and_hutchpp_agree_with_exact_on_a_real_network(x64):
  shape = (8, 8, 1)
  net = _tiny_net(shape=shape, dtype=jnp.float64)
  x0 = _images(2, seed=4, shape=shape)
  kw = dict(sde=SDES["vp"], rtol=1e-6, atol=1e-6)
  exact = volume.log_volume_growth(net, x0, estimator="exact", **kw)
  hut = volume.log_volume_growth(net, x0, estimator="hutchinson", num_probes=16, **kw)
  hpp = volume.log_volume_growth(net, x0, estimator="hutchinson", num_probes=16, variance_reduction="hutch++", **kw)
  for res in (hut, hpp):
    assert np.all(np.abs(res.log_volume - exact.log_volume) < 3 * res.log_volume_stderr)
  # The shifted Hutch++ lowers the spread over probes on this random-init conv net.
  ratio = hpp.log_volume_stderr / hut.log_volume_stderr
  assert np.all(ratio < 1) and np.mean(ratio) < 0.8, ratio
  assert np.all(hpp.num_jvps == 3 * 16 * hpp.nfe)


# --- subspace and paper -----------------------------------------------------------------

def test_subspace_on_linear_flows(x64):
  sde = SDES["vp"]
  t0, t1 = sde.eps, sde.T
  iso = analytic.random_gaussian_eps(jax.random.PRNGKey(5), SHAPE, sde, std_range=(0.3, 0.3), isotropic=True)
  res = volume.log_volume_growth(iso, _images(2), sde=sde, estimator="subspace", K=5, **TIGHT)
  per_direction = float(iso.direction_log_stretch(t0, t1)[0])
  np.testing.assert_allclose(res.log_volume, 5 * per_direction, rtol=1e-6)
  np.testing.assert_allclose(res.x_T, jax.vmap(lambda x: iso.flow(x, t0, t1))(_images(2)), rtol=1e-6, atol=1e-8)
  assert np.all(np.isnan(res.logp)) and np.all(res.num_jvps == 5 * res.nfe)
  assert np.all(np.isnan(res.log_volume_stderr))  # key-dependent, not estimated: NaN, never 0
  # K = D: the frame spans everything and the sum of log|R_ii| is the full log-determinant.
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(6), SHAPE, sde, std_range=(0.02, 1.5))
  full = volume.log_volume_growth(g, _images(1), sde=sde, estimator="subspace", K=D, save_ts=(t0, 0.3, t1), **TIGHT)
  np.testing.assert_allclose(full.log_volume, float(g.log_volume(t0, t1)), rtol=1e-6)
  np.testing.assert_allclose(full.L_t[0], [0.0, float(g.log_volume(t0, 0.3)), float(g.log_volume(t0, t1))],
                             rtol=1e-3, atol=1e-6)  # linear interpolation between steps
  fixed = volume.log_volume_growth(g, _images(1), sde=sde, estimator="subspace", K=D, adaptive=False, num_steps=60)
  np.testing.assert_allclose(fixed.log_volume, float(g.log_volume(t0, t1)), rtol=1e-4)
  assert fixed.nfe[0] == 7 * 60


def _euler_log_factors(rate_fn, t0, t1, n):
  ts = np.linspace(t0, t1, n)
  dt = (t1 - t0) / (n - 1)
  return np.log(np.abs(1 + dt * np.array([float(rate_fn(jnp.asarray(t))) for t in ts])))


def test_paper_on_an_isotropic_linear_flow_is_the_product_of_euler_factors(x64):
  sde = SDES["vp"]
  iso = analytic.random_gaussian_eps(jax.random.PRNGKey(8), SHAPE, sde, std_range=(0.2, 0.2), isotropic=True)
  n, k = 200, 6
  res = volume.log_volume_growth(iso, _images(2), sde=sde, estimator="paper", K=k, paper_steps=n,
                                 save_ts=(sde.eps, 1.0))
  factors = _euler_log_factors(lambda t: iso.drift_jacobian_rate(t)[0], sde.eps, sde.T, n)
  np.testing.assert_allclose(res.log_volume, k * factors.sum(), rtol=1e-9)
  np.testing.assert_allclose(res.L_t[:, 0], 0.0, atol=1e-12)
  assert np.all(res.nfe == n * (k + 1)) and np.all(res.num_steps == n) and np.all(np.isnan(res.logp))
  assert np.all(np.isnan(res.log_volume_stderr))  # not estimated
  # The center follows the same Euler recursion: x_T is the Euler solution.
  x = np.asarray(_images(2)[0], np.float64)
  mu = np.asarray(iso.mu)
  ts, dt = np.linspace(sde.eps, sde.T, n), (sde.T - sde.eps) / (n - 1)
  for t in ts:
    x = x + dt * np.asarray(sde.pf_drift(iso, jnp.asarray(x), jnp.asarray(t)))
  np.testing.assert_allclose(res.x_T[0], x, rtol=1e-9)
  del mu


def test_paper_on_the_perfect_memoriser(x64):
  sde = SDES["vp"]
  # One training image: the memoriser is exactly linear, so the Euler product is exact.
  data = _images(1, seed=9)
  one = analytic.memoriser_eps(data, sde)
  res = volume.log_volume_growth(one, data, sde=sde, estimator="paper", K=3)
  rate = lambda t: sde.f_lin(t) + sde.g2(t) / (2 * sde.std(t) ** 2)  # noqa: E731
  euler = _euler_log_factors(rate, sde.eps, sde.T, 1000).sum()
  np.testing.assert_allclose(res.log_volume, 3 * euler, rtol=1e-7)
  # Several training images, radius 0.05, 1000 steps: about K log(sigma(1)/sigma(eps)).
  _memoriser_about_k_log_ratio(sde, k=20, shape=(6, 6, 1), num_scored=1, euler=euler)


def test_paper_on_the_perfect_memoriser_at_the_papers_k(x64):
  sde = SDES["vp"]
  rate = lambda t: sde.f_lin(t) + sde.g2(t) / (2 * sde.std(t) ** 2)  # noqa: E731
  euler = _euler_log_factors(rate, sde.eps, sde.T, 1000).sum()
  _memoriser_about_k_log_ratio(sde, k=100, shape=(8, 8, 2), num_scored=2, euler=euler)


def _memoriser_about_k_log_ratio(sde, k, shape, num_scored, euler):
  data = _images(4, seed=10, shape=shape)
  mem = analytic.memoriser_eps(data, sde)
  res = volume.log_volume_growth(mem, data[:num_scored], sde=sde, estimator="paper", K=k, chunk_size=51)
  ideal = k * float(jnp.log(sde.std(1.0) / sde.std(sde.eps)))
  np.testing.assert_allclose(res.log_volume, ideal, rtol=0.04)
  np.testing.assert_allclose(res.log_volume, k * euler, rtol=0.005)


# --- the profile L(t) and the control variate ----------------------------------------------

@pytest.mark.parametrize("case", [dict(estimator="exact"), dict(estimator="hutchinson", num_probes=3),
                                  dict(estimator="exact", control_variate=True),
                                  dict(estimator="hutchinson", num_probes=2, control_variate=True)])
def test_profile_matches_the_closed_form_at_every_time(x64, case):
  """A diagonal Gaussian: Hutchinson is exact, the profile is the closed form at each t, its
  last value (t1) is L, and the excess below the bound is what the closed form says."""
  sde = SDES["vp"]
  g = _diagonal_gaussian(sde, seed=5)
  save = volume.profile_times(sde, sde.eps, sde.T, 6)
  res = volume.log_volume_growth(g, _images(2), sde=sde, key=jax.random.PRNGKey(2), save_ts=save, **case, **TIGHT)
  closed = np.array([float(g.log_volume(sde.eps, t)) for t in save])
  np.testing.assert_allclose(res.L_t, np.tile(closed, (2, 1)), rtol=1e-6)
  np.testing.assert_array_equal(res.L_t[:, -1], res.log_volume)
  bound = np.array([float(sde.log_volume_bound(sde.eps, t, D)) for t in save])
  assert np.all(res.L_t < bound)


def test_control_variate_is_the_same_estimate_on_a_network(x64):
  """Rademacher probes: v^T v = D, so the control variate changes the integrand the solver
  sees, not the estimate (to the tolerance)."""
  sde, net, x0 = SDES["vp"], _tiny_net(dtype=jnp.float64), _images(2, seed=4)
  kw = dict(sde=sde, key=jax.random.PRNGKey(5), estimator="hutchinson", num_probes=2)
  ref = volume.log_volume_growth(net, x0, **kw, **TIGHT)
  cv = volume.log_volume_growth(net, x0, control_variate=True, **kw, **TIGHT)
  np.testing.assert_allclose(cv.log_volume, ref.log_volume, rtol=1e-7)


def test_control_variate_makes_the_memoriser_exact_at_any_step_count(x64):
  """One training image, w = 0: eps = (x - a y) / sigma, so tr J = D / sigma and the integrand
  left with the control variate is 0: one Euler step gives L = L_max exactly (without it, the
  solver must integrate D g^2 / (2 sigma^2), which one step cannot)."""
  sde = SDES["vp"]
  data = _images(1, seed=21)
  net = analytic.memoriser_eps(data, sde)
  kw = dict(sde=sde, estimator="hutchinson", num_probes=2, adaptive=False, solver="euler", num_steps=1)
  bound = float(sde.log_volume_bound(sde.eps, sde.T, D))
  cv = volume.log_volume_growth(net, data, control_variate=True, **kw)
  plain = volume.log_volume_growth(net, data, **kw)
  np.testing.assert_allclose(cv.log_volume, bound, rtol=1e-12)
  assert abs(plain.log_volume[0] - bound) > 10


def test_profile_does_not_depend_on_batch_size():
  sde = SDES["vp"]
  net = analytic.memoriser_eps(_images(3, seed=13), sde, width=0.3)
  x0, ids = _images(3, seed=12), np.array([4, 5, 6])
  save = volume.profile_times(sde, sde.eps, sde.T, 4)
  kw = dict(sde=sde, key=jax.random.PRNGKey(3), estimator="hutchinson", num_probes=2, rtol=1e-4, atol=1e-4,
            save_ts=save)
  full = volume.log_volume_growth(net, x0, image_ids=ids, **kw)
  single = volume.log_volume_growth(net, x0[1:2], image_ids=ids[1:2], **kw)
  assert full.L_t.shape == (3, 4)
  np.testing.assert_allclose(single.L_t, full.L_t[1:2], rtol=1e-4, atol=1e-3)  # float32, other batch


def test_profile_and_presets_compile_once_per_batch_shape():
  sde = SDES["vp"]
  save = volume.profile_times(sde, sde.eps, sde.T, 5)
  for opts in (volume.VolumeOptions(sde=sde, estimator="hutchinson", num_probes=2, rtol=1e-3, atol=1e-3, save_ts=save),
               volume.VolumeOptions(sde=sde, estimator="hutchinson", save_ts=save, **volume.PRESETS["rank8"])):
    compile_count.assert_one_compilation_per_batch_shape(
        lambda net, x, opts=opts: float(volume.run(net, x, opts).L_t[0, 2]), _images)


# --- batch, order, compilation, costs ---------------------------------------------------

def test_scores_do_not_depend_on_batch_size_or_order():
  sde = SDES["vp"]
  net = analytic.memoriser_eps(_images(3, seed=13), sde, width=0.3)  # nonlinear in x
  x0, ids = _images(4, seed=12), np.array([10, 11, 12, 13])
  key = jax.random.PRNGKey(3)
  kw = dict(sde=sde, key=key, estimator="hutchinson", num_probes=2, rtol=1e-4, atol=1e-4)
  full = volume.log_volume_growth(net, x0, image_ids=ids, **kw)
  perm = np.array([2, 0, 3, 1])
  shuffled = volume.log_volume_growth(net, x0[perm], image_ids=ids[perm], **kw)
  single = volume.log_volume_growth(net, x0[2:3], image_ids=ids[2:3], **kw)
  np.testing.assert_allclose(shuffled.log_volume, full.log_volume[perm], rtol=1e-5)
  np.testing.assert_allclose(shuffled.log_volume_stderr, full.log_volume_stderr[perm], rtol=1e-4)
  np.testing.assert_allclose(single.log_volume, full.log_volume[2:3], rtol=1e-5)
  np.testing.assert_array_equal(shuffled.num_steps, full.num_steps[perm])
  # The same image under another id draws other probes.
  other = volume.log_volume_growth(net, x0[2:3], image_ids=np.array([99]), **kw)
  assert other.log_volume[0] != single.log_volume[0]


def test_one_compilation_per_batch_shape():
  opts = volume.VolumeOptions(sde=SDES["vp"], estimator="hutchinson", num_probes=2, rtol=1e-3, atol=1e-3)
  compile_count.assert_one_compilation_per_batch_shape(
      lambda net, x: float(volume.run(net, x, opts).log_volume[0]), _images)


def test_nfe_counts_network_evaluations():
  count = [0]
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(1), SHAPE, SDES["vp"])

  def eps_fn(x, t):
    jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
    return g(x, t)

  cases = [dict(estimator="exact", solver="tsit5"),  # FSAL, adaptive
           dict(estimator="hutchinson", solver="bosh3", adaptive=False, num_steps=7, num_probes=2),
           dict(estimator="subspace", solver="heun", K=3)]  # own loop, first step chosen by PID
  for case in cases:
    count[0] = 0
    res = volume.log_volume_growth(eps_fn, _images(1), sde=SDES["vp"], rtol=1e-3, atol=1e-3, **case)
    jax.effects_barrier()
    assert res.nfe[0] == count[0] and res.num_steps[0] + res.num_rejected[0] > 2, case


def test_max_steps_reports_status_without_raising():
  sde = SDES["vp"]
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(1), SHAPE, sde)
  for est in ("exact", "subspace"):
    res = volume.log_volume_growth(g, _images(1), sde=sde, estimator=est, K=2, max_steps=3)
    assert res.status[0] == 1 and res.num_steps[0] + res.num_rejected[0] == 3


# --- options, config and errors --------------------------------------------------------

def test_options_from_config_and_hashable():
  cfg = base.get_base_config()
  opts = volume.VolumeOptions.from_config(cfg.score, "hutchinson")
  assert opts.sde == sde_lib.VPSDE() and opts.num_probes == cfg.score.num_probes
  assert opts.variance_reduction is None and len(opts.save_ts) == cfg.score.profile_times
  assert opts.save_ts[0] > opts.t_start and opts.save_ts[-1] == opts.t_end
  log_sigma = np.log([float(opts.sde.std(t)) for t in (opts.t_start,) + opts.save_ts])
  np.testing.assert_allclose(np.diff(log_sigma), np.diff(log_sigma)[0], rtol=1e-5)  # geometric in sigma
  cfg.score.profile_times = (0.1, 0.5)
  assert volume.VolumeOptions.from_config(cfg.score, "exact").save_ts == (0.1, 0.5)
  cfg.score.profile_times = 0
  assert volume.VolumeOptions.from_config(cfg.score, "exact").save_ts is None
  rank = volume.VolumeOptions.from_config(cfg.score, "hutchinson@rank8")
  assert (rank.estimator, rank.solver, rank.adaptive, rank.num_steps, rank.num_probes) == ("hutchinson", "euler", False, 4, 1)
  for bad in ("hutchinson@nope", "exact@rank8", "trace"):
    with pytest.raises(ValueError, match="unknown"):
      volume.VolumeOptions.from_config(cfg.score, bad)
  cfg.sde.name = "ve"
  whole = volume.VolumeOptions.from_config(cfg, "paper", K=8)
  assert isinstance(whole.sde, sde_lib.VESDE) and whole.K == 8 and whole.t_start == whole.sde.eps
  assert hash(opts) == hash(volume.VolumeOptions.from_config(base.get_base_config().score, "hutchinson"))
  cfg.score.variance_reduction = "hutch++"
  assert volume.VolumeOptions.from_config(cfg, "hutchinson").variance_reduction == "hutch++"


@pytest.mark.parametrize("kwargs,match", [
    (dict(estimator="trace"), "unknown estimator 'trace'"),
    (dict(solver="rk45"), "unknown solver 'rk45'"),
    (dict(probe="sobol"), "unknown probe 'sobol'"),
    (dict(variance_reduction="antithetic"), "unknown variance_reduction 'antithetic'"),
    (dict(t0=0.5, t1=0.5), "t0 < t1"),
    (dict(t0=0.9, t1=0.1), "t0 < t1"),
    (dict(t0=0.0), "sigma"),
    (dict(solver="euler"), "no error estimate"),
    (dict(num_probes=0), "num_probes"),
    (dict(rtol=-1.0), "rtol"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(save_ts=(0.5, 0.2)), "non-decreasing"),
    (dict(save_ts=(0.5, 2.0)), r"\[t0, t1\]"),
    (dict(estimator="subspace", K=17), "K=17 exceeds"),
    (dict(time_grid="cubic"), "unknown time_grid 'cubic'"),
])
def test_bad_options_raise(kwargs, match):
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(1), SHAPE, SDES["vp"])
  with pytest.raises(ValueError, match=match):
    volume.log_volume_growth(g, _images(1), sde=SDES["vp"], **kwargs)


def test_bad_images_raise():
  sde = SDES["vp"]
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(1), SHAPE, sde)
  good = np.asarray(_images(2))
  bad_cases = [
      (good[0, :, :, 0].reshape(-1), "rank >= 2"),
      (good.reshape(2, 8, 2, 1), "must return the image's shape|shape"),
      (good.astype(np.int32), "floating point"),
      (np.where(np.arange(D).reshape(SHAPE) == 3, np.nan, good), "2 NaN or inf"),
      (np.where(np.arange(D).reshape(SHAPE) == 3, np.inf, good), "NaN or inf"),
      (good[:0], "at least one"),
  ]
  for x0, match in bad_cases:
    with pytest.raises(ValueError, match=match):
      volume.log_volume_growth(g, x0, sde=sde)
  with pytest.raises(ValueError, match="image_ids must be 2 integers"):
    volume.log_volume_growth(g, good, sde=sde, image_ids=[1, 2, 3])
  with pytest.raises(ValueError, match="opts must be a VolumeOptions"):
    volume.validate_inputs(good, {"estimator": "exact"})
