"""Networks trained elsewhere (memvol/pretrained.py, memvol/interop): parity with diffusers'
UNet2DModel, pytorch-ddpm's UNet and Hasegawa & Yasuda's UNet on committed fixtures (made by
scripts/make_pretrained_fixture.py with torch, diffusers and the authors' code; torch is
not needed here; the converter's numpy mapping: test_interop.py), the DDPM time map,
refusals, export round trip, the workdir's record of the weights, the second held-out source
and the pipeline without training."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from memvol import data, loading, models, pipeline, pretrained
from memvol import sde as sde_lib
from memvol import workdir as wdir
from memvol.interop import diffusers, folders, networks, pytorch_ddpm

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _eps(eps_fn, x, t):
  return np.asarray(jax.jit(jax.vmap(eps_fn))(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32)))


def _rel(a, b):
  """Per-image relative L2 error of a against b ([B, ...])."""
  return np.linalg.norm((a - b).reshape(len(a), -1), axis=-1) / np.linalg.norm(b.reshape(len(b), -1), axis=-1)


# --- parity with diffusers -------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddpm_unet", "variant_unet"])
def test_eps_fn_matches_diffusers_reference(name):
  """memvol's eps_fn at t equals UNet2DModel(x, 999 t) (float64 in torch) to 1e-4 relative,
  per image, at t = 1e-3, 0.1, 0.5, 1; ddpm_unet has DDPM's conventions, variant_unet
  diffusers' defaults, multi-head attention, 8x12 grey images and the older attention names."""
  folder = os.path.join(FIXTURES, name)
  ref = np.load(os.path.join(folder, "reference.npz"))
  eps_fn, shape = pretrained.load_eps_fn(folder)
  assert shape == ref["x"].shape[1:]
  assert models.count_params(eps_fn.params) == int(ref["num_params"])
  np.testing.assert_allclose(ref["t"], [1e-3, 0.1, 0.5, 1.0])
  y = _eps(eps_fn, ref["x"], ref["t"])
  assert np.all(_rel(y, ref["eps"]) < 1e-4), _rel(y, ref["eps"])
  assert float(np.abs(ref["eps"]).max()) > 0.1  # a reference that can fail


def test_ddpm_cifar10_config_is_memvols_paper_network():
  """google/ddpm-cifar10-32's config builds with exactly 35,746,307 params, the same
  parameter tree as models.named_config('paper_cifar10') (shapes only: no compile)."""
  model, shape = networks.model_from_config(diffusers.DDPM_CIFAR10_CONFIG)
  assert shape == (32, 32, 3)
  init = lambda m: jax.eval_shape(lambda k: models.init_params(m, k, shape), jax.random.PRNGKey(0))
  params = init(model)
  assert models.count_params(params) == 35_746_307
  paper = init(models.get_model(models.named_config("paper_cifar10"), shape))
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, paper)
  assert model.attn_resolutions == (16,) and model.downsample_padding == 0 and model.norm_eps == 1e-6


def test_ddpm_betas_are_the_vp_sde(x64):
  """alphas_cumprod of DDPM's linear betas 1e-4..0.02 (N = 1000) against a(t)^2 of the
  VP-SDE beta 0.1..20: the gaps memvol/interop/networks.py states."""
  betas = np.linspace(1e-4, 0.02, 1000)
  ac = np.cumprod(1.0 - betas)
  sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0)
  i = np.arange(1000)
  np.testing.assert_allclose(betas, np.asarray(sde.beta(i / 999)) / 1000, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(sde.time_input(i / 999)), i, atol=1e-9)  # the network's timestep
  a2 = lambda t: np.exp(2 * np.asarray(sde.log_mean_coeff(jnp.asarray(t))))
  rel_next = np.abs(a2((i + 1) / 1000) / ac - 1)
  rel_same = np.abs(a2(i / 999) / ac - 1)
  assert 0.9e-5 < rel_next[0] < 1.1e-5 and 1e-4 < rel_same[0] < 1.01e-4
  assert 0.069 < rel_next[-1] < 0.071 and 0.069 < rel_same[-1] < 0.071
  assert np.argmax(rel_next > 0.01) == 566
  # the betas' sum is exactly int_0^1 beta = 10.05, so the gap at t = 1 is the higher
  # terms of -log(1 - beta) = beta + beta^2 / 2 + beta^3 / 3 + ...
  np.testing.assert_allclose(np.log(a2(1.0) / ac[-1]), np.sum(betas**2 / 2 + betas**3 / 3), rtol=2e-4)  # + beta^4 / 4: 1.2e-4
  assert np.all(rel_next <= rel_same + 1e-12)


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("class_embed_type", "timestep"), ("num_class_embeds", 10), ("time_embedding_type", "fourier"),
    ("down_block_types", ["CrossAttnDownBlock2D", "AttnDownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]), ("resnet_time_scale_shift", "scale_shift"),
    ("downsample_type", "resnet"), ("act_fn", "gelu"), ("norm_num_groups", 5), ("sample_size", 15),
    ("center_input_sample", True), ("mid_block_type", None), ("attention_head_dim", 7),
    ("out_channels", 6), ("some_new_field", 1)])
def test_unsupported_config_is_refused_naming_the_field(field, value):
  config = json.load(open(os.path.join(FIXTURES, "ddpm_unet", "config.json")))
  networks.model_from_config(config)
  config[field] = value
  with pytest.raises(ValueError, match=f"unsupported UNet2DModel config: {field}="):
    networks.model_from_config(config)


def test_pickles_and_bad_folders_are_refused(tmp_path):
  for suffix in (".pt", ".pth", ".ckpt"):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not opened")
    with pytest.raises(ValueError, match="convert_torch_checkpoint.py"):
      pretrained.load_eps_fn(str(path))
  folder = tmp_path / "torch_only"
  folder.mkdir()
  shutil.copy(os.path.join(FIXTURES, "ddpm_unet", "config.json"), folder)
  (folder / "diffusion_pytorch_model.bin").write_bytes(b"not opened")
  with pytest.raises(ValueError, match="convert_torch_checkpoint.py"):
    pretrained.load_model(str(folder))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    pretrained.load_model(str(tmp_path / "missing"))


def test_weights_that_do_not_fit_are_refused(tmp_path):
  src = os.path.join(FIXTURES, "ddpm_unet")
  state = load_file(os.path.join(src, folders.WEIGHTS_FILE))
  model, shape = networks.model_from_config(folders.read_config(src))
  bad = dict(state)
  del bad["conv_in.bias"]
  bad["extra.weight"] = np.zeros(3, np.float32)
  bad["conv_out.weight"] = np.zeros((3, 24, 1, 1), np.float32)
  with pytest.raises(ValueError, match="missing conv_in.bias.*conv_out.weight: shape.*unexpected extra.weight"):
    networks.params_from_state_dict(bad, model, shape)


# --- export and the round trip ---------------------------------------------------------


def test_export_round_trip_gives_the_same_network(tmp_path):
  """A memvol UNet (multi-level, attention at 8) exported as a diffusers folder loads back
  through the one loader (loading.load_eps_fn, model.pretrained) with the same outputs."""
  cfg = models.named_config("small_unet")
  cfg.update(dict(ch=8, num_groups=4, ch_mult=(1, 2), attn_resolutions=(8,)))
  shape = (16, 16, 3)
  model = models.get_model(cfg, shape)
  shapes = jax.eval_shape(lambda k: models.init_params(model, k, shape), jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)  # every weight random: none at its zero / one init
  params = jax.tree.map(lambda p: (0.2 * rng.standard_normal(p.shape)).astype(np.float32), shapes)
  out = str(tmp_path / "exported")
  config = networks.export(model, params, shape, out)
  assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
  assert config["up_block_types"] == ["AttnUpBlock2D", "UpBlock2D"]

  from experiments.configs.base import get_base_config
  run_cfg = get_base_config()
  run_cfg.model.pretrained = out
  eps_back = loading.load_eps_fn(run_cfg, str(tmp_path / "workdir"))
  eps_here = models.make_eps_fn(model, params, sde_lib.from_config(run_cfg.sde))
  x = rng.uniform(-1, 1, (3,) + shape)
  t = np.array([1e-3, 0.3, 1.0])
  np.testing.assert_allclose(_eps(eps_back, x, t), _eps(eps_here, x, t), rtol=1e-6, atol=1e-6)
  assert float(np.abs(_eps(eps_here, x, t)).max()) > 0.1


def test_fixture_state_dict_round_trips_exactly():
  folder = os.path.join(FIXTURES, "ddpm_unet")
  model, params, _ = pretrained.load_model(folder)
  state = load_file(os.path.join(folder, folders.WEIGHTS_FILE))
  back = networks.state_dict_from_params(params, model)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k])
  assert networks.model_from_config(networks.config_from_unet(model, (16, 16, 3)))[0] == model


def test_export_refuses_what_diffusers_cannot_express(tmp_path):
  mlp = models.get_model(models.named_config("digits_mlp"), (8, 8, 1))
  with pytest.raises(ValueError, match="only memvol UNets"):
    networks.config_from_unet(mlp, (8, 8, 1))
  cfg = models.named_config("small_unet")
  cfg.ch_mult = (1, 2, 2)
  with pytest.raises(ValueError, match="divide by 2"):  # 14 -> 7 -> 4: odd sides
    networks.config_from_unet(models.get_model(cfg, (14, 14, 1)), (14, 14, 1))
  extra = models.get_model(models.named_config("small_unet"), (16, 16, 1)).clone(num_res_blocks_up=3)
  with pytest.raises(ValueError, match="num_res_blocks_up"):
    networks.config_from_unet(extra, (16, 16, 1))


# --- the workdir, the data and the pipeline --------------------------------------------


def _demo_config(tmp_path, folder):
  from experiments.configs import pretrained as pretrained_config
  c = pretrained_config.get_config("quick")
  c.model.pretrained = folder
  rng = np.random.default_rng(0)
  path = str(tmp_path / "images.npz")
  np.savez(path, images=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
  c.data.path = path
  c.data.resolution = 0
  return c


def test_workdir_records_the_weights_and_refuses_others(tmp_path):
  folder = str(tmp_path / "model")
  shutil.copytree(os.path.join(FIXTURES, "ddpm_unet"), folder)
  config = _demo_config(tmp_path, folder)
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir, mode="train", log=lambda s: None)
  record = json.load(open(wdir.pretrained_record(workdir)))
  assert record["sha256"] == folders.weights_sha256(folder)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # nothing trained
  split = data.load_split(config, workdir)
  assert len(split.train) == 4 and split.train.shape == (16, 16, 3)
  loading.load_model(config, workdir)  # same weights: accepted

  weights = os.path.join(folder, folders.WEIGHTS_FILE)
  state = load_file(weights)
  state["conv_in.bias"] = state["conv_in.bias"] + 1e-3
  save_file(state, weights)
  with pytest.raises(ValueError, match="SHA-256.*use a new --workdir"):
    pipeline.check_workdir(config, workdir)
  with pytest.raises(ValueError, match="SHA-256"):
    loading.load_eps_fn(config, workdir)
  with pytest.raises(ValueError, match="model.pretrained"):
    models.get_model(config.model, (16, 16, 3))  # never trained from scratch by mistake


def test_heldout_images_from_a_second_source(tmp_path):
  from experiments.configs.base import get_base_config
  rng = np.random.default_rng(1)
  first, second = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
  np.savez(first, images=rng.uniform(-1, 1, (10, 6, 6, 3)).astype(np.float32), labels=np.arange(10) % 2)
  np.savez(second, images=np.full((7, 6, 6, 3), -0.5, np.float32), labels=np.arange(7) % 2)
  c = get_base_config().data
  c.update(dict(name="npz", path=first, resolution=0, num_train=10, num_heldout=4, num_duplicated=0,
                heldout_name="npz", heldout_path=second))
  split = data.make_split(c)
  assert len(split.train) == 10 and len(split.heldout) == 4
  assert np.all(split.heldout.images == -0.5) and not np.any(split.train.images == -0.5)
  assert np.all(split.heldout.ids >= 10)  # offset by the first pool's size
  assert sorted(split.heldout.labels.tolist()) == [0, 0, 1, 1]  # class-balanced
  c.num_heldout = 0
  with pytest.raises(ValueError, match="num_heldout >= 1"):
    data.make_split(c)
  c.num_heldout, c.heldout_name = 4, "imagenet"
  with pytest.raises(ValueError, match="unknown data.heldout_name 'imagenet'"):
    data.make_split(c)


def test_cifar10_test_batch_as_heldout(tmp_path):
  """data.heldout_name = "cifar10_test": training images from data_batch_*, held-out from
  test_batch of the same folder (written here in CIFAR-10's python format)."""
  import pickle
  from experiments.configs.base import get_base_config
  for name, value in (("data_batch_1", 10), ("test_batch", 200)):
    batch = {b"data": np.full((6, 3072), value, np.uint8), b"labels": list(range(6))}
    with open(tmp_path / name, "wb") as f:
      pickle.dump(batch, f)
  c = get_base_config().data
  c.update(dict(name="cifar10", path=str(tmp_path), resolution=32, num_train=4, num_heldout=3,
                num_duplicated=0, heldout_name="cifar10_test"))
  split = data.make_split(c)
  np.testing.assert_allclose(split.train.images, 10 / 127.5 - 1, atol=1e-6)
  np.testing.assert_allclose(split.heldout.images, 200 / 127.5 - 1, atol=1e-6)
  assert split.heldout.shape == (32, 32, 3) and np.all(split.heldout.ids >= 6)


def test_pretrained_config_documents_its_command():
  from experiments.configs import pretrained as pretrained_config
  doc = pretrained_config.__doc__
  for needed in ("python -m experiments.main", "--config=experiments/configs/pretrained.py",
                 "Expected runtime", "Expected result", "GPU", "export_safetensors.py --random-ddpm-cifar10"):
    assert needed in doc, needed
  c = pretrained_config.get_config()
  assert c.data.heldout_name == "cifar10_test" and c.sde.beta_min == 0.1 and c.sde.beta_max == 20.0
  with pytest.raises(ValueError, match="unknown config argument"):
    pretrained_config.get_config("huge")


@pytest.mark.slow
def test_pretrained_chain_end_to_end(tmp_path):
  """The whole chain (no train, sample, score, detect, report) on the ddpm_unet fixture."""
  config = _demo_config(tmp_path, os.path.join(FIXTURES, "ddpm_unet"))
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir, log=lambda s: None)
  for stage in pipeline.STAGES[1:]:
    assert pipeline.is_complete(config, workdir, stage), stage
  summary = json.load(open(os.path.join(workdir, "report", "summary.json")))
  assert summary


# --- pytorch-ddpm's and Hasegawa & Yasuda's UNets ----------------------------------------


def _apply(model, params, x, n, dtype=jnp.float32):
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x, dtype), jnp.asarray(n, dtype)))


_AUTHORS = {"pytorch_ddpm_unet": "pytorch-ddpm", "hasegawa_unet": "hasegawa"}


@pytest.mark.parametrize("name", sorted(_AUTHORS))
def test_converted_authors_unet_matches_their_reference(name):
  """A random pytorch-ddpm UNet and a random Hasegawa & Yasuda UNet, built with their own
  code and converted by the converter, agree with their float64 torch outputs at integer
  steps n = 0, 1, 500, 999 to 1e-5 relative per image in float32; the outputs depend on n
  (the time path is exercised)."""
  folder = os.path.join(FIXTURES, name)
  ref = np.load(os.path.join(folder, "reference.npz"))
  config = folders.read_config(folder)
  assert config["_source_format"] == _AUTHORS[name]
  model, params, shape = pretrained.load_model(folder)
  assert shape == ref["x"].shape[1:] and models.count_params(params) == int(ref["num_params"])
  np.testing.assert_array_equal(ref["n"], [0, 1, 500, 999])
  y = _apply(model, params, ref["x"], ref["n"])
  assert np.all(_rel(y, ref["eps"]) < 1e-5), _rel(y, ref["eps"])
  assert float(np.abs(ref["eps"]).max()) > 0.1
  other = _apply(model, params, ref["x"], ref["n"][::-1])
  assert np.all(_rel(other, y)[[0, 3]] > 1e-3)  # n = 0 <-> 999 changes the output


@pytest.mark.parametrize("name, tol", [("hasegawa_unet", 1e-12), ("pytorch_ddpm_unet", 2e-6)])
def test_converted_authors_unet_float64(x64, name, tol):
  """In float64 the authors' UNet agrees to 1e-12; pytorch-ddpm's to 2e-6 (measured 9e-7),
  the float32 rounding of its lookup table, which memvol replaces by the exact sinusoid."""
  folder = os.path.join(FIXTURES, name)
  ref = np.load(os.path.join(folder, "reference.npz"))
  model, params, _ = pretrained.load_model(folder)
  y = _apply(model, params, ref["x"], ref["n"], jnp.float64)
  assert np.all(_rel(y, ref["eps"]) < tol), _rel(y, ref["eps"])


def test_pytorch_ddpm_time_table_is_the_interleaved_sinusoid(x64):
  """pytorch-ddpm's table (stored by the fixture, float32 as torch builds it) is memvol's
  interleaved sinusoid at integer n: in float32 to 1.9e-6 (87% of the entries bit for bit;
  sin / cos of XLA and torch differ in the last bits), against the float64 sinusoid to its
  float32 rounding (3.3e-5, recorded by the converter);
  between integers the sinusoid is continuous (|d e / dn| <= max w_k = 1)."""
  from memvol.models.unet import timestep_embedding
  folder = os.path.join(FIXTURES, "pytorch_ddpm_unet")
  table = np.load(os.path.join(folder, "reference.npz"))["time_table"]
  n = np.arange(len(table), dtype=np.float64)
  emb = lambda t, dt: np.asarray(timestep_embedding(jnp.asarray(t, dt), table.shape[1], freq_shift=0,
                                                    interleave=True))
  with jax.enable_x64(False):
    e32 = emb(n, jnp.float32)
  assert float(np.abs(e32 - table).max()) <= 4e-6 and np.mean(e32 == table) > 0.8
  exact = pytorch_ddpm.time_table(*table.shape)
  np.testing.assert_allclose(emb(n, jnp.float64), exact, atol=1e-12)
  err = float(np.abs(table.astype(np.float64) - exact).max())
  assert 1e-6 < err < 1e-4
  np.testing.assert_allclose(folders.read_config(folder)["_time_table_max_abs_error"], err, rtol=1e-6)
  half = emb(n[:-1] + 0.5, jnp.float64)
  assert np.all(np.abs(half - exact[:-1]) <= 0.5 + 1e-12) and np.all(np.isfinite(half))


def test_interleaved_embedding_and_plain_temb_are_used():
  """Each option changes the output (a loader that ignored one would fail parity): the
  concatenated embedding for pytorch-ddpm's UNet, the swish before Dense(temb) for the
  authors'."""
  for name, change in (("pytorch_ddpm_unet", dict(interleave_sin_cos=False)),
                       ("hasegawa_unet", dict(resnet_temb_act=True))):
    folder = os.path.join(FIXTURES, name)
    ref = np.load(os.path.join(folder, "reference.npz"))
    model, params, _ = pretrained.load_model(folder)
    assert all(getattr(model, k) != v for k, v in change.items())
    y = _apply(model.clone(**change), params, ref["x"], ref["n"])
    assert np.all(_rel(y, ref["eps"])[1:] > 1e-3), (name, _rel(y, ref["eps"]))


def test_memvol_fields_are_checked_and_exported():
  config = folders.read_config(os.path.join(FIXTURES, "hasegawa_unet"))
  for field, value in (("up_attention", "first"), ("resnet_temb_act", "no"), ("sin_cos_interleaved", 1)):
    with pytest.raises(ValueError, match=f"unsupported UNet2DModel config: {field}="):
      networks.model_from_config({**config, field: value})
  model, shape = networks.model_from_config(config)
  back = networks.config_from_unet(model, shape)
  assert back["up_attention"] == "last" and back["resnet_temb_act"] is False and back["time_embedding_dim"] == 16
  assert networks.model_from_config(back)[0] == model
  plain = networks.config_from_unet(*networks.model_from_config(diffusers.DDPM_CIFAR10_CONFIG))
  assert not set(plain) & set(diffusers.MEMVOL_FIELDS)  # a diffusers network exports as before
