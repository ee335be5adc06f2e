"""The format modules of memvol/interop without torch: each source format's config
translator, spec and refusals, on numpy state dicts rebuilt from the committed fixtures'
safetensors (the converter wrote those folders from the authors' own checkpoints, so
mapping a rebuilt source state dict must give them back bit for bit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from memvol import models
from memvol.interop import diffusers, edm, folders, hasegawa, mapping, networks, pytorch_ddpm
from memvol.models import song_unet

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ROOT = os.path.join(os.path.dirname(__file__), os.pardir)

# folder layout -> source layout: the inverse of each of mapping.LAYOUTS
_FROM_FOLDER = {"same": lambda w: w, "conv1x1_to_linear": lambda w: w[:, :, None, None],
                "nin_to_linear": lambda w: w.T, "nin_to_conv1x1": lambda w: w[:, :, 0, 0].T}


def _fixture(name):
  path = os.path.join(FIXTURES, name)
  return folders.read_config(path), {k: v.astype(np.float32) for k, v in folders.read_weights(path).items()}


def _source_state(spec, state, unused=np.zeros):
  """The source state dict a spec maps onto the folder's `state`; rows the folder does not
  keep get unused(shape)."""
  return {key: unused(shape).astype(np.float32) if dst is None else _FROM_FOLDER[layout](state[dst])
          for key, dst, shape, layout in spec}


def _without_records(config):
  return {k: v for k, v in config.items() if not k.startswith("_source_") or k == "_source_sde"}


def _assert_same(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def hasegawa_cfg(channel1=128, channel2=256, emb_dim1=128, emb_dim2=256, side=32, **conv):
  """Their config/model.yaml + config/cifar10.yaml as load_config merges them (defaults)."""
  return {"unet": {"channel1": channel1, "channel2": channel2,
                   "conv": {"stride": 1, "dilation": 1, "init_scale": 1.0, "padding": 1, "kernel_size": 3, **conv},
                   "groupnorm": {"num_groups": 4 if channel1 == 8 else 32},
                   "time_embedding": {"max_positions": 10000, "emb_dim1": emb_dim1, "emb_dim2": emb_dim2},
                   "dropout": 0.1},
          "data": {"height": side, "width": side, "channel": 3}}


_DDPM_FIXTURE_FLAGS = dict(pytorch_ddpm.FLAGS, ch=32, ch_mult=[1, 1], num_res_blocks=1, img_size=8, num_groups=8)
_HASEGAWA_FIXTURE_CFG = hasegawa_cfg(channel1=8, channel2=16, emb_dim1=8, emb_dim2=16, side=16)


def test_the_package_but_networks_needs_neither_torch_nor_jax():
  """The converter runs where only torch, numpy and safetensors are installed."""
  code = ("import sys; import memvol.interop, memvol.interop.folders, memvol.interop.mapping; "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'torch')); assert not bad, bad; "
          "print(','.join(memvol.interop.SOURCES))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "diffusers,pytorch-ddpm,hasegawa,edm"


# --- each format on its fixture -----------------------------------------------------------


def test_pytorch_ddpm_fixture_maps_back_to_its_folder():
  """Its fixture's weights, laid out as its ckpt.pt's ema_model (with its float32 time
  table, under DataParallel's prefix), map to the folder the converter wrote, with the same
  config and recorded table error."""
  config, state = _fixture("pytorch_ddpm_unet")
  table = np.load(os.path.join(FIXTURES, "pytorch_ddpm_unet", "reference.npz"))["time_table"]
  source = _source_state(pytorch_ddpm.spec(_DDPM_FIXTURE_FLAGS), state)
  source[pytorch_ddpm.TIME_TABLE_KEY] = table
  got, got_config = pytorch_ddpm.to_folder({f"module.{k}": v for k, v in source.items()}, _DDPM_FIXTURE_FLAGS)
  _assert_same(got, state)
  assert got_config == _without_records(config)


def test_hasegawa_fixture_maps_back_to_its_folder():
  """Their model's tensors (the unused NIN shortcuts too) map to the folder the converter wrote."""
  config, state = _fixture("hasegawa_unet")
  rows = hasegawa.spec(_HASEGAWA_FIXTURE_CFG)
  got, got_config = hasegawa.to_folder(_source_state(rows, state, unused=np.ones), _HASEGAWA_FIXTURE_CFG)
  _assert_same(got, state)
  assert got_config == _without_records(config)
  assert sum(dst is None for _, dst, _, _ in rows) == 2 * 9  # NIN W and b of the 9 blocks that keep their channels
  with pytest.raises(ValueError, match="GroupNorm_1: GroupNorm eps 1e-05, memvol's folder for this format has 1e-6"):
    hasegawa.check_norm_eps({"GroupNorm": 1e-6, "ResnetBlock_D11.GroupNorm_1": 1e-5})


@pytest.mark.parametrize("name", ["edm_ddpmpp", "edm_ncsnpp", "diffmem_ddpmpp", "diffmem_ncsnpp"])
def test_edm_fixture_maps_back_to_its_folder(name):
  """A preconditioner's state dict (`model.` prefix, resample filter buffers, map_augment)
  and its init_kwargs map to the folder the converter wrote from NVlabs' pickle."""
  config, state = _fixture(name)
  precond = config["precond"]
  model_kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k in edm.SONG_UNET_DEFAULTS}
  precond_kwargs = {k: config[k] for k in edm.PRECOND_FIELDS[precond] if k in config}
  got_config = edm.folder_config(config["_source_class"], precond_kwargs, "SongUNet", model_kwargs)
  assert got_config == {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
  source = {f"model.{k}": v for k, v in state.items()}
  source["model.enc.8x8_down.conv0.resample_filter"] = edm.resample_kernel(config["resample_filter"])
  source.update({f"model.{k}": np.ones((16, 9), np.float32) for k in config.get("_dropped_unused", [])})
  got, dropped = edm.to_folder(source, got_config)
  _assert_same(got, state)
  assert dropped == config.get("_dropped_unused", [])


def test_diffusers_state_dicts_and_their_older_names():
  """A diffusers state dict maps as it is (the folder's config from --config or the model);
  the older attention names are the current ones; other formats' state dicts are refused
  with the --format that converts them."""
  config, state = _fixture("ddpm_unet")
  got, got_config = diffusers.to_folder({f"module.{k}": v for k, v in state.items()}, config)
  _assert_same(got, state)
  assert got_config == config
  _, old = _fixture("variant_unet")
  assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
  new = diffusers.normalise_keys(old)
  assert any(".to_q." in k for k in new) and all(v.ndim == 2 for k, v in new.items() if k.endswith(".to_q.weight"))
  for name, match in (("pytorch_ddpm_unet", "--format=pytorch-ddpm"), ("hasegawa_unet", "--format=hasegawa")):
    shapes = json.load(open(os.path.join(FIXTURES, name, "source_shapes.json")))
    with pytest.raises(ValueError, match=match):
      diffusers.to_folder({k: np.zeros(s) for k, s in shapes.items()}, config)
  with pytest.raises(ValueError, match="a bare state dict needs --config=config.json"):
    diffusers.to_folder(state, None)


@pytest.mark.parametrize("name", ["pytorch_ddpm_unet", "hasegawa_unet"])
def test_spec_is_the_source_checkpoint(name):
  """The spec lists exactly the source checkpoint's tensors, in its order and shapes
  (source_shapes.json, written from their model by the fixture script)."""
  source = json.load(open(os.path.join(FIXTURES, name, "source_shapes.json")))
  if name == "pytorch_ddpm_unet":
    spec = pytorch_ddpm.spec(_DDPM_FIXTURE_FLAGS)
  else:
    spec = hasegawa.spec(_HASEGAWA_FIXTURE_CFG)
  assert [(k, list(s)) for k, _, s, _ in spec] == list(source.items())


# --- configs and refusals -----------------------------------------------------------------


def _spec_count(spec):
  return sum(int(np.prod(s)) for _, dst, s, _ in spec if dst is not None)


def test_authors_cifar10_networks_build_with_their_parameter_counts(tmp_path):
  """pytorch-ddpm's CIFAR-10 UNet (config/CIFAR10.txt, PIA's and SecMI's victim) is DDPM's
  35,746,307-parameter network; the authors' CIFAR-10 UNet (model.yaml) has 34,204,675
  torch parameters, 493,568 of them in the NIN shortcuts of blocks that keep their channel
  count, which it never uses: 33,711,107 in memvol (shapes only: no compile)."""
  flagfile = tmp_path / "flagfile.txt"
  flagfile.write_text("--T=1000\n--attn=1\n--ch=128\n--ch_mult=1\n--ch_mult=2\n--ch_mult=2\n--ch_mult=2\n"
                      "--dropout=0.1\n--img_size=32\n--num_res_blocks=2\n--lr=0.0002\n--train\n")
  flags = pytorch_ddpm.read_flagfile(str(flagfile))
  assert flags == pytorch_ddpm.FLAGS
  sde = pytorch_ddpm.folder_config(flags)["_source_sde"]
  np.testing.assert_allclose([sde["beta_min"], sde["beta_max"]], [0.1, 20.0])  # memvol's default VP-SDE
  with pytest.raises(ValueError, match="mean_type='xstart'"):
    pytorch_ddpm.folder_config(dict(flags, mean_type="xstart"))
  for config, spec, want in ((pytorch_ddpm.folder_config(flags), pytorch_ddpm.spec(flags), 35_746_307),
                             (hasegawa.folder_config(hasegawa_cfg()), hasegawa.spec(hasegawa_cfg()), 33_711_107)):
    model, shape = networks.model_from_config(config)
    params = jax.eval_shape(lambda k: models.init_params(model, k, shape), jax.random.PRNGKey(0))
    assert models.count_params(params) == _spec_count(spec) == want  # theirs: 34,204,675 with 493,568 in unused NINs


def test_mismatched_checkpoint_is_refused_naming_the_first_parameter():
  flags = dict(pytorch_ddpm.FLAGS, ch=32, ch_mult=[1, 2], num_res_blocks=1)
  spec = pytorch_ddpm.spec(flags)
  state = {k: np.zeros(s, np.float32) for k, _, s, _ in spec}
  state[pytorch_ddpm.TIME_TABLE_KEY] = pytorch_ddpm.time_table(1000, 32)
  out, config = pytorch_ddpm.to_folder(state, flags)
  assert config["_time_table_max_abs_error"] < 1e-12 and len(out) == len(spec) - 1
  assert out["down_blocks.1.attentions.0.to_q.weight"].shape == (64, 64)  # 1x1 conv -> linear
  bad = dict(state)
  bad["upblocks.0.block1.2.weight"] = np.zeros((64, 128, 1, 1), np.float32)
  bad["downblocks.2.block1.2.weight"] = np.zeros((64, 16, 3, 3), np.float32)
  with pytest.raises(mapping.MismatchError, match=r"parameter downblocks\.2\.block1\.2\.weight has shape "
                     r"\(64, 16, 3, 3\), the config needs \(64, 32, 3, 3\)"):
    pytorch_ddpm.to_folder(bad, flags)
  with pytest.raises(mapping.MismatchError, match=r"parameter downblocks\.2\.block1\.2\.weight has shape "
                     r"\(64, 32, 3, 3\), the config needs \(32, 32, 3, 3\)"):
    pytorch_ddpm.to_folder(state, dict(flags, ch_mult=[1, 1]))
  missing = {k: v for k, v in state.items() if k != "tail.2.bias"}
  with pytest.raises(mapping.MismatchError, match=r"parameter tail\.2\.bias is missing"):
    pytorch_ddpm.to_folder(missing, flags)
  with pytest.raises(mapping.MismatchError, match=r"unexpected parameter extra\.weight"):
    pytorch_ddpm.to_folder({**state, "extra.weight": np.zeros(3)}, flags)
  shifted = {**state, pytorch_ddpm.TIME_TABLE_KEY: pytorch_ddpm.time_table(1000, 32)[:, ::-1].copy()}
  with pytest.raises(ValueError, match=r"time_embedding\.timembedding\.0\.weight: the time embedding "
                     "table is not pytorch-ddpm's"):
    pytorch_ddpm.to_folder(shifted, flags)

  small, wide = hasegawa_cfg(channel1=8, channel2=16, emb_dim1=8, emb_dim2=16), hasegawa_cfg(
      channel1=8, channel2=32, emb_dim1=8, emb_dim2=16)
  state = {k: np.zeros(s, np.float32) for k, _, s, _ in hasegawa.spec(small)}
  out, _ = hasegawa.to_folder(state, small)
  assert "down_blocks.0.resnets.0.conv_shortcut.weight" not in out  # unused NIN (8 -> 8) dropped
  assert out["down_blocks.1.resnets.0.conv_shortcut.weight"].shape == (16, 8, 1, 1)
  with pytest.raises(mapping.MismatchError, match=r"parameter ResnetBlock_D21\.Conv_1\.weight has shape "
                     r"\(16, 8, 3, 3\), the config needs \(32, 8, 3, 3\)"):
    hasegawa.to_folder(state, wide)


@pytest.mark.parametrize("section, field, value", [
    ("conv", "kernel_size", 5), ("conv", "dilation", 2), ("conv", "padding", 0),
    ("time_embedding", "max_positions", 1000), ("time_embedding", "emb_dim1", 64)])
def test_hasegawa_config_values_memvol_cannot_express_are_refused(section, field, value):
  cfg = hasegawa_cfg()
  hasegawa.folder_config(cfg)
  cfg["unet"][section][field] = value
  with pytest.raises(ValueError, match=f"unsupported Hasegawa & Yasuda config: unet.{section}.{field}="):
    hasegawa.folder_config(cfg)


def test_edm_refuses_what_memvol_cannot_express():
  """By name: iDDPMPrecond, ADM (DhariwalUNet), class labels, skip encoders, VP with M != 1000."""
  ok = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0, model_channels=128)
  config = edm.folder_config("EDMPrecond", {"sigma_data": 0.5, "sigma_min": 0, "sigma_max": float("inf")}, "SongUNet", ok)
  assert config["precond"] == "edm" and config["sigma_max"] is None and config["sigma_data"] == 0.5
  for args, match in (
      (("iDDPMPrecond", {}, "DhariwalUNet", ok), r"preconditioning='iDDPMPrecond' \(its network also predicts variances"),
      (("EDMPrecond", {}, "DhariwalUNet", ok), r"model_type='DhariwalUNet' \(ADM is not ported"),
      (("VPPrecond", {}, "SongUNet", dict(ok, label_dim=10)), r"label_dim=10 \(class-conditional"),
      (("VEPrecond", {}, "SongUNet", dict(ok, encoder_type="skip")), r"encoder_type='skip'"),
      (("VPPrecond", {"M": 500}, "SongUNet", ok), r"M=500"),
      (("VPPrecond", {}, "SongUNet", dict(ok, fancy=1)), r"fancy=1")):
    with pytest.raises(ValueError, match=f"unsupported NVlabs/edm network: {match}"):
      edm.folder_config(*args)
  assert tuple(edm.PRECONDS.values()) == song_unet.PRECONDS


def test_edm_checks_resample_filters_and_drops_map_augment():
  config = {"resample_filter": [1, 3, 3, 1]}
  f = edm.resample_kernel([1, 3, 3, 1])
  np.testing.assert_allclose(f[0, 0], song_unet.resample_kernel([1, 3, 3, 1]), rtol=1e-7)
  assert f.shape == (1, 1, 4, 4) and abs(float(f.sum()) - 1) < 1e-7
  state = {"model.enc.8x8_down.conv0.resample_filter": f, "model.enc.8x8_down.conv0.weight": np.ones((2, 2, 3, 3)),
           "model.map_augment.weight": np.ones((16, 9))}
  out, dropped = edm.to_folder(state, config)
  assert set(out) == {"enc.8x8_down.conv0.weight"} and dropped == ["map_augment.weight"]
  with pytest.raises(ValueError, match=r"model.enc.8x8_down.conv0.resample_filter: resample filter .* is not the one of "
                     r"resample_filter=\[1, 1\]"):
    edm.to_folder(state, {"resample_filter": [1, 1]})
  with pytest.raises(mapping.MismatchError, match="outside the preconditioner"):
    edm.to_folder({"sigma_grid": np.ones(3)}, config)


def test_folder_written_reads_back(tmp_path):
  """folders.write then read: the config and float32 weights, and the hash of the file."""
  config, state = _fixture("hasegawa_unet")
  out = str(tmp_path / "copy")
  folders.write(out, config, state)
  assert folders.read_config(out) == config
  _assert_same(load_file(os.path.join(out, folders.WEIGHTS_FILE)), state)
  assert len(folders.weights_sha256(out)) == 64 and not [f for f in os.listdir(out) if f.endswith(".tmp")]
