"""Samplers on Gaussian data (closed-form eps), sharding/batch independence, the stage."""

from __future__ import annotations

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from memvol import analytic, io, parallel, sampling
from memvol import sde as sde_lib

SHAPE = (4, 4, 1)
SDE = sde_lib.VPSDE()
MU = np.linspace(-0.5, 0.5, 16, dtype=np.float32).reshape(SHAPE)
VAR = np.linspace(0.05, 0.3, 16, dtype=np.float32).reshape(SHAPE)


def gaussian_eps(x, t):
  """eps of data N(MU, diag VAR): sigma (x - a mu) / (a^2 var + sigma^2)."""
  a, s = SDE.mean_coeff(t), SDE.std(t)
  return s * (x - a * MU) / (a**2 * VAR + s**2)


def pf_map(z):
  """Exact PF-ODE map from x_T = z to x_eps for this Gaussian (per coordinate affine)."""
  a1, s1 = float(SDE.mean_coeff(SDE.T)), float(SDE.std(SDE.T))
  a0, s0 = float(SDE.mean_coeff(SDE.eps)), float(SDE.std(SDE.eps))
  return a0 * MU + np.sqrt((a0**2 * VAR + s0**2) / (a1**2 * VAR + s1**2)) * (z - a1 * MU)


def mesh(n):
  return parallel.data_mesh(jax.devices()[:n])


KEY = jax.random.PRNGKey(3)


ROTATED = analytic.random_gaussian_eps(jax.random.PRNGKey(7), SHAPE, SDE, std_range=(0.1, 0.7))


def _check_covariance(images, g, tol):
  """Sample mean and full covariance against the data's N(mu, U diag(s2) U^T)."""
  x = np.asarray(images, np.float64).reshape(len(images), -1)
  cov = np.asarray(g.U) @ np.diag(np.asarray(g.s2)) @ np.asarray(g.U).T
  n = x.shape[0]
  assert np.all(np.abs(x.mean(0) - np.asarray(g.mu).ravel()) < 0.01 + 5 * np.sqrt(np.diag(cov) / n))
  err = np.cov(x.T) - cov
  # per entry: the sampling std of a covariance estimate is sqrt((c_ii c_jj + c_ij^2) / n)
  scale = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
  assert np.all(np.abs(err) < tol * np.abs(cov).max() + 5 * scale)


def test_reverse_sde_reproduces_gaussian_moments():
  out = sampling.reverse_sde_sample(ROTATED, SDE, KEY, 2000, SHAPE, 1000, mesh=mesh(4))
  assert out.images.shape == (2000, *SHAPE) and out.images.dtype == jnp.float32
  np.testing.assert_array_equal(out.nfe, 1000)
  _check_covariance(out.images, ROTATED, 0.03)


def test_pf_ode_is_the_exact_gaussian_map_and_reproduces_moments():
  z = np.stack([SDE.prior_sample(jax.random.fold_in(KEY, i), SHAPE) for i in range(8)])
  diag = sampling.pf_ode_sample(gaussian_eps, SDE, KEY, 8, SHAPE, rtol=1e-5, atol=1e-5, mesh=mesh(4))
  np.testing.assert_allclose(diag.images, pf_map(z), atol=2e-4)
  out = sampling.pf_ode_sample(ROTATED, SDE, KEY, 2000, SHAPE, rtol=1e-5, atol=1e-5, mesh=mesh(4))
  flow = jax.vmap(lambda z: ROTATED.flow(z, SDE.T, SDE.eps))(jnp.asarray(z))
  np.testing.assert_allclose(out.images[:8], flow, atol=5e-4)
  _check_covariance(out.images, ROTATED, 0.03)
  nfe = np.asarray(out.nfe)
  assert np.all(nfe > 7) and np.all((nfe - 1) % 6 == 0)  # tsit5: 1 + 6 per step


def test_pf_ode_fixed_steps_counts_nfe():
  out = sampling.pf_ode_sample(gaussian_eps, SDE, KEY, 3, SHAPE, "heun", num_steps=50, mesh=mesh(1))
  np.testing.assert_array_equal(out.nfe, 100)
  z = np.stack([SDE.prior_sample(jax.random.fold_in(KEY, i), SHAPE) for i in range(3)])
  np.testing.assert_allclose(out.images, pf_map(z), atol=5e-3)


@pytest.mark.parametrize("method", ["sde", "ode", "heun", "dpm", "dpmsde"])
def test_samples_independent_of_batch_and_devices(method):
  def draw(num, start, devices, pad_to=0):
    if method.startswith("dpm"):
      return sampling.dpm_sample(gaussian_eps, SDE, KEY, num, SHAPE, 25, stochastic=method == "dpmsde", start=start,
                                 mesh=mesh(devices), pad_to=pad_to).images
    if method == "sde":
      return sampling.reverse_sde_sample(gaussian_eps, SDE, KEY, num, SHAPE, 100, start=start,
                                         mesh=mesh(devices), pad_to=pad_to).images
    if method == "heun":
      return sampling.heun_sample(gaussian_eps, SDE, KEY, num, SHAPE, 18, start=start, mesh=mesh(devices),
                                  pad_to=pad_to).images
    return sampling.pf_ode_sample(gaussian_eps, SDE, KEY, num, SHAPE, start=start,
                                  mesh=mesh(devices), pad_to=pad_to).images

  whole = np.asarray(draw(11, 0, 4))  # 11 on 4 devices: padded to 12, padding dropped
  assert whole.shape == (11, *SHAPE)
  # any batching over several devices: bitwise the same samples
  pieces = np.concatenate([draw(3, 0, 2), draw(5, 3, 4, pad_to=12), draw(3, 8, 2)])
  np.testing.assert_array_equal(pieces, whole)
  # one device: XLA compiles a program without partitioning, equal up to the last bits
  np.testing.assert_allclose(draw(11, 0, 1), whole, rtol=1e-5, atol=1e-5)
  assert not np.allclose(whole[0], whole[1])  # different samples really differ


def test_sampler_bad_input():
  with pytest.raises(ValueError, match="number of samples"):
    sampling.reverse_sde_sample(gaussian_eps, SDE, KEY, 0, SHAPE)
  with pytest.raises(ValueError, match="num_steps"):
    sampling.reverse_sde_sample(gaussian_eps, SDE, KEY, 2, SHAPE, 0)
  with pytest.raises(ValueError, match="unknown ODE solver"):
    sampling.pf_ode_sample(gaussian_eps, SDE, KEY, 2, SHAPE, "rk99")
  with pytest.raises(ValueError, match="max_steps"):
    sampling.pf_ode_sample(gaussian_eps, SDE, KEY, 2, SHAPE, rtol=1e-9, atol=1e-9, max_steps=4,
                           mesh=mesh(1))


def test_heun_is_edms_sampler_and_converges_to_the_exact_map():
  """EDM's Heun sampler on Gaussian data under VP, sub-VP and VE (0.002, 80): the same ODE in
  sigma = sigma(t) / a(t) whatever the SDE, so the same samples; second order towards the
  exact flow from x = 80 z (per coordinate mu + std (x - mu) / sqrt(std^2 + 80^2));
  18 steps (rho 7) cost 35 network calls."""
  mu, std = MU.reshape(-1), np.sqrt(VAR).reshape(-1)
  sdes = (sde_lib.VPSDE(eps=1e-5), sde_lib.SubVPSDE(eps=1e-5), sde_lib.VESDE(sigma_min=0.002, sigma_max=80.0, eps=0.0))
  z = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(KEY, i), SHAPE)) for i in range(3)])
  exact = MU + np.sqrt(VAR) / np.sqrt(VAR + 80.0**2) * (80.0 * z - MU)
  errors = {}
  for n in (18, 100):
    outs = []
    for sde in sdes:
      np.testing.assert_allclose(sampling.heun_sigmas(sde, n)[[0, -2, -1]], [80.0, 0.002, 0.0], rtol=1e-6)
      out = sampling.heun_sample(analytic.gaussian_eps(mu.reshape(SHAPE), np.diag(std**2), sde), sde, KEY, 3, SHAPE, n)
      assert np.all(np.asarray(out.nfe) == 2 * n - 1)
      outs.append(np.asarray(out.images))
    for other in outs[1:]:
      np.testing.assert_allclose(other, outs[0], atol=2e-4)
    errors[n] = float(np.abs(outs[0] - exact).max())
  assert errors[100] < 5e-3 and errors[18] / errors[100] > 15, errors  # (100 / 18)^2 = 31
  with pytest.raises(ValueError, match="heun num_steps must be >= 2"):
    sampling.heun_sample(gaussian_eps, SDE, KEY, 2, SHAPE, 1)
  assert sampling.heun_sigmas(SDE, 18)[-2] > 0.01  # clipped to sigma / a at memvol's eps = 1e-3


DPM_SDES = (sde_lib.VPSDE(), sde_lib.SubVPSDE(), sde_lib.VESDE())


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_step_has_its_local_order(x64, order):
  """One DPM-Solver++ step from the exact Gaussian trajectory with exact history (steps equal
  in lambda): the error against the exact flow falls as h^(order + 1)."""
  sde, g = SDE, analytic.random_gaussian_eps(jax.random.PRNGKey(7), SHAPE, SDE, std_range=(0.1, 0.7))
  z = SDE.prior_sample(jax.random.PRNGKey(1), SHAPE, jnp.float64)
  lam0 = float(sde.log_mean_coeff(0.3) - jnp.log(sde.std(0.3)))
  t_of = lambda lam: sde.time_of_noise_ratio(jnp.exp(-jnp.asarray(lam, jnp.float64)))
  x0 = lambda t: (g.flow(z, sde.T, t) - sde.std(t) * g(g.flow(z, sde.T, t), t)) / sde.mean_coeff(t)
  errors = []
  for h in (0.2, 0.1, 0.05):
    t2, t1, t0, t_next = (t_of(lam0 + k * h) for k in (-2, -1, 0, 1))
    x = sampling.dpm_update(g.flow(z, sde.T, t0), (x0(t0), x0(t1), x0(t2)), (h, h, h),
                            sde.std(t_next) / sde.std(t0), sde.mean_coeff(t_next), jnp.asarray(order))
    errors.append(float(jnp.abs(x - g.flow(z, sde.T, t_next)).max()))
  rates = np.log2(np.asarray(errors[:-1]) / np.asarray(errors[1:]))
  assert np.all(rates > order + 0.6), (errors, rates)  # order 3 without the factor 2 in D2: 3.0


@pytest.mark.parametrize("sde", DPM_SDES, ids=["vp", "subvp", "ve"])
def test_dpm_converges_to_the_exact_gaussian_map(x64, sde):
  """Multistep DPM-Solver++ against the exact PF-ODE map of Gaussian data (full covariance),
  under VP, sub-VP and VE: 2M is second order on the log-SNR grid, 3M at least third; 20
  steps are within 2e-2 of the exact map (data of scale 1) at 20 network calls per sample."""
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(7), SHAPE, sde, std_range=(0.1, 0.7))
  z = jnp.stack([sde.prior_sample(jax.random.fold_in(KEY, i), SHAPE, jnp.float64) for i in range(3)])
  exact = np.asarray(jax.vmap(lambda z: g.flow(z, sde.T, sde.eps))(z))
  err = {}
  for order in (2, 3):
    for n in (20, 40, 80):
      out = sampling.dpm_sample(g, sde, KEY, 3, SHAPE, n, order, mesh=mesh(1))
      assert out.images.dtype == jnp.float64
      np.testing.assert_array_equal(out.nfe, n)
      err[order, n] = float(np.abs(np.asarray(out.images) - exact).max())
  for order in (2, 3):
    rates = np.log2([err[order, 20] / err[order, 40], err[order, 40] / err[order, 80]])
    assert np.all(rates > order - 0.3), (order, err, rates)
  assert err[2, 20] < 2e-2 and err[3, 20] < 1e-2


def test_dpm_grids_and_bad_input():
  for schedule in sampling.DPM_SCHEDULES:
    for sde in DPM_SDES:
      ts = sampling.dpm_times(sde, 25, schedule)
      assert ts.shape == (26,) and ts[0] == sde.T and ts[-1] == sde.eps and np.all(np.diff(ts) < 0)
  lam = -np.log(np.asarray(SDE.noise_ratio(jnp.asarray(sampling.dpm_times(SDE, 10), jnp.float32))))
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-4)  # logsnr: equal steps in lambda
  np.testing.assert_array_equal(sampling.dpm_orders(25, 3)[:4], [1, 2, 3, 3])
  np.testing.assert_array_equal(sampling.dpm_orders(10, 3)[-3:], [3, 2, 1])  # lower orders at the end
  with pytest.raises(ValueError, match="dpm num_steps must be >= 1"):
    sampling.dpm_sample(gaussian_eps, SDE, KEY, 2, SHAPE, 0)
  with pytest.raises(ValueError, match="dpm order must be 1, 2 or 3"):
    sampling.dpm_sample(gaussian_eps, SDE, KEY, 2, SHAPE, 10, 4)
  with pytest.raises(ValueError, match="unknown dpm schedule"):
    sampling.dpm_sample(gaussian_eps, SDE, KEY, 2, SHAPE, 10, 2, "cosine")


@pytest.mark.parametrize("stochastic", [False, True], ids=["ode", "sde"])
def test_dpm_reproduces_gaussian_moments(stochastic):
  """2M on the PF ODE and SDE-DPM-Solver++ 2M on the reverse SDE: the data's mean and full
  covariance at 25 network calls per sample; the stochastic one draws other samples."""
  out = sampling.dpm_sample(ROTATED, SDE, KEY, 2000, SHAPE, 25, stochastic=stochastic, mesh=mesh(4))
  assert out.images.shape == (2000, *SHAPE) and out.images.dtype == jnp.float32
  _check_covariance(out.images, ROTATED, 0.03)
  if stochastic:
    ode = sampling.dpm_sample(ROTATED, SDE, KEY, 4, SHAPE, 25, mesh=mesh(4)).images
    assert not np.allclose(out.images[:4], ode, atol=1e-2)
    with pytest.raises(ValueError, match="orders 1 and 2"):
      sampling.dpm_sample(ROTATED, SDE, KEY, 4, SHAPE, 25, 3, stochastic=True)


def test_reverse_sde_denoise_only_changes_the_last_step():
  on = sampling.reverse_sde_sample(gaussian_eps, SDE, KEY, 4, SHAPE, 20, mesh=mesh(1)).images
  off = sampling.reverse_sde_sample(gaussian_eps, SDE, KEY, 4, SHAPE, 20, denoise=False, mesh=mesh(1)).images
  diff = np.asarray(off - on)
  # the last step's noise: g(eps) sqrt(dt) z with dt = T / 20
  expected_std = float(jnp.sqrt(SDE.g2(SDE.eps) * SDE.T / 20))
  assert 0.5 * expected_std < diff.std() < 1.5 * expected_std


# --- the stage ---------------------------------------------------------------------


class ScaledEps(eqx.Module):
  """A pytree eps_fn with a parameter leaf, as loading.load_eps_fn gives."""

  scale: jax.Array

  def __call__(self, x, t):
    return self.scale * gaussian_eps(x, t)


def tiny_config(**sample):
  c = get_base_config()
  c.sample.update(dict(num_samples=10, batch_size=4, methods=("sde", "ode"), sde_steps=50,
                       ode_rtol=1e-3, ode_atol=1e-3))
  c.sample.update(sample)
  return c


@pytest.fixture
def model(monkeypatch):
  holder = {"eps": ScaledEps(jnp.float32(1.0))}
  monkeypatch.setattr(sampling, "_load_model", lambda config, workdir: (holder["eps"], SHAPE))
  return holder


class Killed(Exception):
  """Stands for the process being killed mid-run."""


def test_run_writes_samples_resumes_and_skips(tmp_path, model, monkeypatch):
  cfg = tiny_config()
  ref_dir, dir_ = str(tmp_path / "ref"), str(tmp_path / "w")
  sampling.run(cfg, ref_dir, log=lambda s: None)
  for m in ("sde", "ode"):
    z = io.load_npz(os.path.join(ref_dir, "samples", f"samples_{m}.npz"))
    assert z["images"].shape == (10, *SHAPE) and z["images"].dtype == np.float32
    assert z["images"].min() >= -1 and z["images"].max() <= 1 and z["nfe"].shape == (10,)
    assert os.path.getsize(os.path.join(ref_dir, "samples", f"grid_{m}.png")) > 0
  assert sampling.is_complete(cfg, ref_dir)

  # interrupted after 2 batches of the first method
  real, calls, kill = sampling.generate, [], [3]

  def flaky(*args):
    calls.append(args[-2:])
    if len(calls) == kill[0]:
      kill[0] = 0
      raise Killed
    return real(*args)

  monkeypatch.setattr(sampling, "generate", flaky)
  with pytest.raises(Killed):
    sampling.run(cfg, dir_, log=lambda s: None)
  assert not sampling.is_complete(cfg, dir_)
  calls.clear()
  sampling.run(cfg, dir_, log=lambda s: None)
  assert calls[0] == (8, 10)  # resumed at the third batch of 'sde'
  for m in ("sde", "ode"):
    a = io.load_npz(os.path.join(ref_dir, "samples", f"samples_{m}.npz"))
    b = io.load_npz(os.path.join(dir_, "samples", f"samples_{m}.npz"))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  calls.clear()
  sampling.run(cfg, dir_, log=lambda s: None)
  assert calls == []  # complete: nothing recomputed


def test_run_refuses_mixing_settings_and_models(tmp_path, model):
  d = str(tmp_path / "w")
  sampling.run(tiny_config(methods=("sde",)), d, log=lambda s: None)
  with pytest.raises(ValueError, match="sde_steps.*delete"):
    sampling.run(tiny_config(methods=("sde",), sde_steps=60), d, log=lambda s: None)
  model["eps"] = ScaledEps(jnp.float32(0.9))  # another checkpoint
  assert not sampling.is_complete(tiny_config(methods=("sde",)), d)
  with pytest.raises(ValueError, match="params"):
    sampling.run(tiny_config(methods=("sde",)), d, log=lambda s: None)


def test_run_bad_config(tmp_path, model):
  for kw, msg in [(dict(num_samples=0), "num_samples"), (dict(methods=("gan",)), "unknown"),
                  (dict(methods=()), "empty"), (dict(batch_size=0), "batch_size")]:
    with pytest.raises(ValueError, match=msg):
      sampling.run(tiny_config(**kw), str(tmp_path / "w"), log=lambda s: None)


def test_run_dpm_records_its_settings(tmp_path, model):
  d = str(tmp_path / "w")
  sampling.run(tiny_config(methods=("dpm",), dpm_steps=12, dpm_order=3), d, log=lambda s: None)
  z = io.load_npz(os.path.join(d, "samples", "samples_dpm.npz"))
  np.testing.assert_array_equal(z["nfe"], 12)
  assert '"dpm_order": 3' in str(z["settings"]) and '"dpm_schedule": "logsnr"' in str(z["settings"])
  with pytest.raises(ValueError, match="dpm_steps.*delete"):
    sampling.run(tiny_config(methods=("dpm",), dpm_steps=13, dpm_order=3), d, log=lambda s: None)
  for kw, msg in [(dict(dpm_order=4), "dpm order"), (dict(dpm_schedule="cosine"), "unknown dpm schedule"),
                  (dict(dpm_steps=0), "dpm num_steps"), (dict(dpm_stochastic=True, dpm_order=3), "orders 1 and 2")]:
    with pytest.raises(ValueError, match=msg):
      sampling.run(tiny_config(methods=("dpm",), **kw), str(tmp_path / "bad"), log=lambda s: None)
    assert not os.path.exists(str(tmp_path / "bad" / "samples"))


def test_with_sampler_reads_a_spec():
  c = get_base_config()
  d, method = sampling.with_sampler(c, "dpmsde:50:2:karras")
  assert method == "dpm" and d.sample.dpm_stochastic and d.sample.dpm_steps == 50 and d.sample.dpm_schedule == "karras"
  assert not c.sample.dpm_stochastic and c.sample.dpm_steps == 25  # the config itself is untouched
  assert sampling.with_sampler(c, "heun:9")[0].sample.heun_steps == 9 and sampling.with_sampler(c, "sde")[1] == "sde"
  with pytest.raises(ValueError, match="unknown sampler spec"):
    sampling.with_sampler(c, "gan")
