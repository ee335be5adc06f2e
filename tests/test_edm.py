"""NVlabs/edm networks (memvol/models/song_unet.py, memvol/interop's SongUNet folders): parity of
the Flax SongUNet (DDPM++, NCSN++) under VP / VE / EDM preconditioning with NVlabs' own
networks and sail-sg/DiffMemorize's (encoder skips switched off) on committed fixtures (made
by scripts/make_pretrained_fixture.py with torch and each checkout; torch is not needed here), the VP schedule identity, the eps that
memvol's SDEs see, the CIFAR-10 parameter counts, the converter end to end (the numpy
mapping itself: test_interop.py), and the volume bound in the sigma parametrisation."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memvol import models, volume
from memvol import sde as sde_lib
from memvol.interop import edm, folders, networks
from memvol.models import song_unet
from memvol.models.song_unet import Preconditioned

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EDM = ("edm_ddpmpp", "edm_ncsnpp", "diffmem_ddpmpp", "diffmem_ncsnpp")  # diffmem: sail-sg/DiffMemorize's SongUNet
PRECONDS = ("vp", "ve", "edm")


def _rel(a, b):
  """Per-image relative L2 error of a against b ([B, ...])."""
  return np.linalg.norm((a - b).reshape(len(a), -1), axis=-1) / np.linalg.norm(b.reshape(len(b), -1), axis=-1)


def _denoise(model, params, x, sigma, dtype):
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  fn = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s, method=Preconditioned.denoise))
  return np.asarray(fn(params, jnp.asarray(x, dtype), jnp.asarray(sigma, dtype)))


# --- parity with NVlabs' networks --------------------------------------------------------

# float32 against NVlabs' float64: NCSN++'s Fourier embedding under VP gets 999 t, so its
# phases 2 pi f 999 t reach ~1e5 rad, where float32's spacing is ~0.01 rad: the one pairing
# held to a looser bound (measured 5.9e-5 in D, 5.9e-4 in eps at sigma 80).
F32_TOL = {("edm_ncsnpp", "vp"): (1e-4, 1e-3), ("diffmem_ncsnpp", "vp"): (1e-4, 1e-3)}


def _eps(model, params, x, sigma):
  """The port's eps (what memvol integrates) at NVlabs' (x, sigma), in float32: VP takes
  x / sqrt(1 + sigma^2) at 999 t(sigma), VE / EDM x at sigma."""
  noise, xin = sigma, x
  if model.precond == "vp":
    noise = song_unet.VP_TIME_SCALE * np.asarray(song_unet.vp_sigma_inv(jnp.asarray(sigma), 0.1, 19.9))
    xin = x / np.sqrt(1 + sigma**2).reshape(-1, 1, 1, 1)
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(xin, jnp.float32), jnp.asarray(noise, jnp.float32)))


@pytest.mark.parametrize("name", EDM)
@pytest.mark.parametrize("precond", PRECONDS)
def test_denoiser_matches_nvlabs_float32(name, precond):
  """D(x; sigma) of the Flax port equals NVlabs' (float64) within 1e-5 relative per image in
  float32, at sigma = 0.002 .. 80, for DDPM++ and NCSN++ under each preconditioning (the
  folder's own and the other two wrapped around the same weights); so does its eps against
  (x - D) / sigma, which has no cancellation at small sigma (D itself is x to 1e-3 there)."""
  folder = os.path.join(FIXTURES, name)
  ref = np.load(os.path.join(folder, "reference.npz"))
  model, params, shape = networks.load_model(folder)
  assert shape == ref["x"].shape[1:] and models.count_params(params) == int(ref["num_params"])
  np.testing.assert_allclose(ref["sigma"], [0.002, 0.02, 0.2, 2.0, 20.0, 80.0])
  model = model.clone(precond=precond)
  tol_d, tol_eps = F32_TOL.get((name, precond), (1e-5, 1e-5))
  want = ref[f"D_{precond}"]
  rel = _rel(_denoise(model, params, ref["x"], ref["sigma"], jnp.float32), want)
  assert np.all(rel < tol_d), rel
  want_eps = (ref["x"] - want) / ref["sigma"].reshape(-1, 1, 1, 1)
  rel = _rel(_eps(model, params, ref["x"], ref["sigma"]), want_eps)
  assert np.all(rel < tol_eps), rel
  assert np.all(_rel(ref["x"], want)[1:] > 1e-3)  # D is not x: a reference that can fail


@pytest.mark.parametrize("name", EDM)
def test_denoiser_matches_nvlabs_float64(x64, name):
  """In float64 the port agrees with NVlabs' float64 forward to rounding (1e-12), every
  preconditioning; and the fixture's float64 reference is NVlabs' own float32 forward to
  float32 rounding (the formulas are theirs)."""
  folder = os.path.join(FIXTURES, name)
  ref = np.load(os.path.join(folder, "reference.npz"))
  model, params, _ = networks.load_model(folder)
  for precond in PRECONDS:
    y = _denoise(model.clone(precond=precond), params, ref["x"], ref["sigma"], jnp.float64)
    assert np.all(_rel(y, ref[f"D_{precond}"]) < 1e-12), (precond, _rel(y, ref[f"D_{precond}"]))
  own = ref[f"D_{model.precond}"]
  assert np.all(_rel(ref["own_float32"], own) < (1e-4 if (name, model.precond) in F32_TOL else 1e-6))


def test_diffmemorize_skip_connections_are_read():
  """DiffMemorize's skip_connections reach the Flax SongUNet (all ones: NVlabs' network)."""
  for name, skips in (("diffmem_ddpmpp", (1, 0, 0, 1)), ("diffmem_ncsnpp", (1, 1, 0, 1))):
    model, _ = networks.model_from_config(folders.read_config(os.path.join(FIXTURES, name)))
    assert model.net.skip_connections == skips
  config = dict(folders.read_config(os.path.join(FIXTURES, "edm_ddpmpp")), skip_connections=[1, 1, 1, 1])
  assert networks.model_from_config(config)[0].net.skip_connections == ()


def test_folders_record_the_nvlabs_network():
  """The converter wrote NVlabs' class, dropped the unused augmentation layer of DDPM++
  (augment_dim 9, as EDM's CIFAR-10 pickles), and kept NCSN++'s Fourier frequencies."""
  ddpmpp = folders.read_config(os.path.join(FIXTURES, "edm_ddpmpp"))
  ncsnpp = folders.read_config(os.path.join(FIXTURES, "edm_ncsnpp"))
  assert ddpmpp["_source_class"] == "VPPrecond" and ddpmpp["precond"] == "vp"
  assert ddpmpp["_dropped_unused"] == ["map_augment.weight"] and ddpmpp["augment_dim"] == 9
  assert ncsnpp["_source_class"] == "VEPrecond" and ncsnpp["encoder_type"] == "residual"
  ref = np.load(os.path.join(FIXTURES, "edm_ddpmpp", "reference.npz"))
  assert int(ref["source_num_params"]) - int(ref["num_params"]) == 9 * 16  # map_augment [16, 9]
  ref = np.load(os.path.join(FIXTURES, "edm_ncsnpp", "reference.npz"))
  assert int(ref["num_params"]) - int(ref["source_num_params"]) == 16  # the freqs buffer [16]
  _, params, _ = networks.load_model(os.path.join(FIXTURES, "edm_ncsnpp"))
  assert params["net"]["map_noise"]["freqs"].shape == (16,)


def test_each_option_changes_the_output():
  """Every architecture switch is used: a loader that ignored one would fail parity."""
  for name, change in (("edm_ddpmpp", dict(resample_filter=(1.0, 3.0, 3.0, 1.0))),
                       ("edm_ncsnpp", dict(encoder_type="standard")), ("edm_ddpmpp", dict(attn_resolutions=())),
                       ("diffmem_ddpmpp", dict(skip_connections=())), ("diffmem_ncsnpp", dict(skip_connections=()))):
    folder = os.path.join(FIXTURES, name)
    ref = np.load(os.path.join(folder, "reference.npz"))
    model, params, _ = networks.load_model(folder)
    if "encoder_type" in change:
      params = dict(params, net={k: v for k, v in params["net"].items() if "aux_residual" not in k})
    elif "attn_resolutions" in change:
      params = dict(params, net={k: {n: w for n, w in v.items() if n not in ("qkv", "proj", "norm2")}
                                 if "_in0" not in k else v for k, v in params["net"].items()})  # in0 always attends
    other = model.clone(net=model.net.clone(**change))
    y = _denoise(other, params, ref["x"], ref["sigma"], jnp.float32)
    assert np.all(_rel(ref["x"] - y, ref["x"] - ref[f"D_{model.precond}"])[1:] > 1e-3), (name, change)


def test_state_dict_round_trips_exactly():
  from safetensors.numpy import load_file
  for name in EDM:
    folder = os.path.join(FIXTURES, name)
    model, params, _ = networks.load_model(folder)
    state = load_file(os.path.join(folder, folders.WEIGHTS_FILE))
    back = networks.state_dict_from_params(params, model)
    assert set(back) == set(state)
    for k in state:
      np.testing.assert_array_equal(back[k], state[k].astype(np.float32))


# --- the eps memvol integrates -------------------------------------------------------------


def test_edm_vp_schedule_is_memvols_vp_sde(x64):
  """EDM's VPPrecond sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) is sigma / a of
  memvol's VPSDE(beta_min 0.1, beta_max = 0.1 + 19.9), and its sigma_inv inverts it."""
  vp = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0)
  t = np.linspace(1e-5, 1.0, 101)
  edm_sigma = np.sqrt(np.expm1(0.5 * 19.9 * t**2 + 0.1 * t))
  np.testing.assert_allclose(np.asarray(vp.std(t) / vp.mean_coeff(t)), edm_sigma, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(song_unet.vp_sigma_inv(jnp.asarray(edm_sigma), 0.1, 19.9)), t, rtol=1e-10)
  assert edm.sde({"precond": "vp"}) == {"name": "vp", "beta_min": 0.1, "beta_max": 20.0}


@pytest.mark.parametrize("name", EDM)
def test_eps_fn_is_the_denoisers_noise(name):
  """memvol's eps_fn at (x_t, t) under the folder's default SDE is NVlabs' (x - D(x; s)) / s
  at s = sigma / a: VE feeds sigma(t) itself (noise_input "sigma"), VP 999 t on x_t = a x."""
  folder = os.path.join(FIXTURES, name)
  ref = np.load(os.path.join(folder, "reference.npz"))
  eps_fn, _ = networks.load_eps_fn(folder)
  sde = eps_fn.sde
  s = ref["sigma"][1:]  # sigma 0.02 .. 80
  if isinstance(sde, sde_lib.VPSDE):
    t = np.asarray(song_unet.vp_sigma_inv(jnp.asarray(s), 0.1, 19.9))
    assert eps_fn.model.noise_input == "t"
  else:
    assert (sde.sigma_min, sde.sigma_max) == (0.002, 80.0) and eps_fn.model.noise_input == "sigma"
    t = np.log(s / 0.002) / np.log(40000.0)
  a = np.asarray(sde.mean_coeff(t)).reshape(-1, 1, 1, 1)
  x = ref["x"][1:]
  eps = np.asarray(jax.jit(jax.vmap(eps_fn))(jnp.asarray(a * x, jnp.float32), jnp.asarray(t, jnp.float32)))
  want = (x - ref[f"D_{eps_fn.model.precond}"][1:]) / s.reshape(-1, 1, 1, 1)
  assert np.all(_rel(eps, want) < F32_TOL.get((name, eps_fn.model.precond), (0, 1e-4))[1]), _rel(eps, want)


def test_the_wrong_sde_is_refused(tmp_path):
  """A VE / EDM network under a VP SDE (or a VP one under other betas) gets x_t on the
  wrong scale: refused naming the config fields to set."""
  with pytest.raises(ValueError, match=r"edm_ncsnpp holds an EDM network with 've'.*--config.sde.name=ve"):
    networks.load_eps_fn(os.path.join(FIXTURES, "edm_ncsnpp"), sde_lib.VPSDE())
  with pytest.raises(ValueError, match=r"--config.sde.name=vp --config.sde.beta_min=0.1 --config.sde.beta_max=20.0"):
    networks.check_sde(os.path.join(FIXTURES, "edm_ddpmpp"), sde_lib.VPSDE(beta_max=10.0))
  networks.check_sde(os.path.join(FIXTURES, "edm_ncsnpp"), sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0))
  networks.check_sde(os.path.join(FIXTURES, "ddpm_unet"), sde_lib.VESDE())  # no check for DDPM folders


def test_ve_bound_in_the_sigma_parametrisation(x64):
  """EDM's ODE dx/dsigma = (x - D(x; sigma)) / sigma is memvol's VESDE(0.002, 80) in log-sigma
  time (eps_coeff = d sigma / dt). The optimal denoiser's Jacobian is Cov[x0 | x] / sigma^2
  >= 0, so tr d eps / dx <= D / sigma and L(sigma0 -> sigma1) <= D log(sigma1 / sigma0): for
  Gaussian data N(mu, s^2 I), D* = mu + s^2 (x - mu) / (s^2 + sigma^2) and L = D / 2
  log((s^2 + sigma1^2) / (s^2 + sigma0^2)), below the bound and reaching it as s -> 0."""
  sde = sde_lib.VESDE(sigma_min=0.002, sigma_max=80.0, eps=0.0)
  t = jnp.linspace(0.0, 1.0, 7)
  np.testing.assert_allclose(np.asarray(sde.eps_coeff(t)), np.asarray(sde.std(t)) * np.log(40000.0), rtol=1e-12)
  shape, dim = (2, 2, 1), 4
  mu = jnp.asarray([0.3, -0.2, 0.1, 0.5]).reshape(shape)
  np.testing.assert_allclose(float(sde.log_volume_bound(0.0, 1.0, dim)), dim * np.log(40000.0), rtol=1e-12)
  x0 = mu + 0.1
  for s in (0.5, 0.05, 0.0):
    def eps_fn(x, t, s=s):
      sig = sde.std(t)
      denoised = mu + s**2 * (x - mu) / (s**2 + sig**2)
      return (x - denoised) / sig
    res = volume.log_volume_growth(eps_fn, x0[None], sde=sde, estimator="exact", save_ts=(0.5, 1.0),
                                   rtol=1e-10, atol=1e-10, max_steps=20000)
    sig = np.asarray(sde.std(jnp.asarray([0.5, 1.0])))
    closed = dim / 2 * np.log((s**2 + sig**2) / (s**2 + 0.002**2))
    np.testing.assert_allclose(res.L_t[0], closed, rtol=1e-7)
    bound = dim * np.log(sig / 0.002)
    assert np.all(res.L_t[0] <= bound + 1e-7)
    if s == 0.0:
      np.testing.assert_allclose(res.L_t[0], bound, rtol=1e-7)


# --- configs and the CIFAR-10 networks ---------------------------------------------------


def test_cifar10_networks_have_nvlabs_parameter_counts():
  """EDM's CIFAR-10 DDPM++ and NCSN++ (train.py's --arch ddpmpp / ncsnpp, augment_dim 9):
  NVlabs' constructors count 55,733,891 and 56,397,827 parameters; memvol's port has them
  without map_augment (9 x 128 = 1,152, unused in sampling) and with NCSN++'s 128 Fourier
  frequencies (a buffer in torch): 55,732,739 and 56,395,651 (shapes only: no compile)."""
  for arch, want in (("ddpmpp", 55_732_739), ("ncsnpp", 56_395_651)):
    model, shape = networks.model_from_config(edm.EDM_CIFAR10[arch])
    assert shape == (32, 32, 3)
    params = jax.eval_shape(lambda k: models.init_params(model, k, shape), jax.random.PRNGKey(0))
    assert models.count_params(params) == want, arch
  assert 55_733_891 - 9 * 128 == 55_732_739 and 56_397_827 - 9 * 256 + 128 == 56_395_651


@pytest.mark.parametrize("field, value", [
    ("precond", "iddpm"), ("label_dim", 10), ("embedding_type", "learned"), ("encoder_type", "skip"),
    ("decoder_type", "skip"), ("M", 500), ("img_resolution", 17), ("model_channels", 132), ("out_channels", 6),
    ("skip_connections", [1, 0, 1]), ("skip_connections", [1, 2, 1, 1]),
    ("resample_filter", [1, 2, 1]), ("some_new_field", 1)])
def test_unsupported_song_unet_config_is_refused_naming_the_field(field, value):
  config = json.load(open(os.path.join(FIXTURES, "edm_ddpmpp", "config.json")))
  networks.model_from_config(config)
  config[field] = value
  with pytest.raises(ValueError, match=f"unsupported SongUNet config: {field}="):
    networks.model_from_config(config)


_CONVERT_EDM = r'''
import json, os, pickle, sys
import numpy as np
import torch
from safetensors.numpy import load_file
root, fixture, tmp = sys.argv[1:4]
sys.path.insert(0, os.path.join(root, "scripts"))
import convert_torch_checkpoint as conv
from memvol.interop import edm

class SongUNet(torch.nn.Module):  # stand-ins named as NVlabs' classes, carrying what the converter reads
  def __init__(self, **kw):
    super().__init__()
    self.init_kwargs = kw

class VPPrecond(torch.nn.Module):
  def __init__(self, state, **kw):
    super().__init__()
    self.init_kwargs, self.model, self.state = {}, SongUNet(**kw), state
  def state_dict(self):
    return {k: torch.from_numpy(v) for k, v in self.state.items()}

config = json.load(open(os.path.join(fixture, "config.json")))
kw = {k: v for k, v in config.items() if not k.startswith("_") and k != "precond"}
state = {"model." + k: v.astype(np.float32) for k, v in load_file(os.path.join(fixture, "diffusion_pytorch_model.safetensors")).items()}
state["model.map_augment.weight"] = np.ones((16, 9), np.float32)
state["model.enc.8x8_down.conv0.resample_filter"] = edm.resample_kernel([1, 1])
snapshot = os.path.join(tmp, "network-snapshot-000001.pkl")
with open(snapshot, "wb") as f:
  pickle.dump({"ema": VPPrecond(state, **kw), "loss_fn": None}, f)
os.makedirs(os.path.join(tmp, "edm", "torch_utils"))
conv.main([snapshot, os.path.join(tmp, "out"), "--format=edm", "--edm_repo=" + os.path.join(tmp, "edm")])
'''


def test_converter_writes_the_fixture_folder_from_an_edm_pickle(tmp_path):
  """--format=edm end to end on a pickle whose objects stand in for NVlabs' (their class
  names, init_kwargs, `model`, a state dict with a resample filter buffer and map_augment):
  the folder written is the committed fixture's, weights bit for bit (needs torch, run in a
  subprocess; the fixtures themselves were converted from NVlabs' own pickles)."""
  if importlib.util.find_spec("torch") is None:  # not importorskip: torch must stay out of this process
    pytest.skip("torch is not installed")
  import subprocess
  import sys
  from safetensors.numpy import load_file
  fixture = os.path.join(FIXTURES, "edm_ddpmpp")
  root = os.path.join(os.path.dirname(FIXTURES), os.pardir)
  proc = subprocess.run([sys.executable, "-c", _CONVERT_EDM, root, fixture, str(tmp_path)], capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / "out"
  got, want = load_file(str(out / folders.WEIGHTS_FILE)), load_file(os.path.join(fixture, folders.WEIGHTS_FILE))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k].astype(np.float32))
  config, fixture_config = folders.read_config(str(out)), folders.read_config(fixture)
  assert config.pop("_source_checkpoint") == "network-snapshot-000001.pkl"
  fixture_config.pop("_source_checkpoint")
  assert config == fixture_config
