"""Networks trained elsewhere: diffusers `UNet2DModel` folders in, and memvol UNets out.

    eps_fn, image_shape = load_eps_fn(folder, sde)       # eps_fn(x [H, W, C] in [-1, 1], t)
    model, params, image_shape = load_model(folder)      # the Flax UNet and its float32 params
    export(model, params, image_shape, out_folder)       # a memvol UNet as a diffusers folder

A folder holds `config.json` (UNet2DModel's constructor arguments) and
`diffusion_pytorch_model.safetensors`, read with safetensors' numpy API: no torch, and no
pickle is ever opened (`.pt` / `.pth` / `.ckpt` / `.bin` files are refused; convert them
with scripts/convert_torch_checkpoint.py, which needs torch). Weights map one to one onto
memvol's UNet (memvol/models/unet.py): torch convolutions OIHW -> HWIO, linear weights
transposed, GroupNorm weight -> scale, attention to_q / to_k / to_v / to_out.0 (or the
older query / key / value / proj_attn) -> q / k / v / proj_out; dropout is ignored.
Config values memvol's UNet cannot express are refused, naming the field.

Two more DDPM UNets arrive as such folders, converted by scripts/convert_torch_checkpoint.py
(which records `_source_format`): pytorch-ddpm's (`--format=pytorch-ddpm`, the victims of
PIA and SecMI) and Hasegawa & Yasuda's (`--format=hasegawa`). Their config.json adds
fields diffusers does not have (MEMVOL_FIELDS: `sin_cos_interleaved`, `resnet_temb_act`,
`up_attention`); a diffusers folder omits them and gets diffusers' network.

NVlabs/edm networks (EDM's checkpoints, and sail-sg/DiffMemorize's) arrive as folders whose
config.json has `_class_name` "SongUNet": the network's constructor arguments and `precond`
(vp | ve | edm), weights under NVlabs' names (convert_torch_checkpoint.py --format=edm). They
load as a Preconditioned SongUNet (memvol/models/song_unet.py) whose eps is NVlabs' (x - D(x;
sigma)) / sigma under the SDE its x_t needs (edm_sde: VP with EDM's betas, or VE over sigma
0.002 .. 80); check_sde refuses any other, naming the flags.

Time. diffusers' DDPM (linear betas 1e-4 .. 0.02 over N = 1000 steps) discretises the VP-SDE
with beta_min 0.1, beta_max 20 (sde.VPSDE): beta_i = beta(i / 999) / N. The network was
trained on the integer timestep i and memvol feeds it 999 t (sde.time_input, the paper's
and score_sde's convention), so t = i / 999 is the time map of the network input. The
noise levels match best one step later: alphas_cumprod[i] = prod_{j <= i} (1 - beta_j)
against a(t)^2 = exp(-int_0^t beta) at t = (i + 1) / N is off by a relative 1e-5 at i = 0
(0.99990 vs 0.99989) and 7.0% at i = 999 (4.036e-5 vs 4.319e-5: log(1 - beta) = -beta -
beta^2 / 2, and the beta^2 / 2 terms add up to 0.068 in log), beyond 1% from i = 566 on;
at t = i / 999 the gap is 1e-4 at i = 0 (a(0)^2 = 1, sigma 0 vs DDPM's 0.01) and the same
7.0% at i = 999. So memvol evaluates the network at most one DDPM step (999 t vs 1000 t - 1)
from the step whose noise level equals sigma(t), and the marginals differ by a few percent
in a^2 near t = 1, where sigma(t) = 1 - 2e-5 either way. tests/test_pretrained.py pins
these numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np

from memvol import io, models
from memvol import sde as sde_lib
from memvol import workdir as wdir
from memvol.models import song_unet
from memvol.models.song_unet import Preconditioned, SongUNet
from memvol.models.unet import UNet

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
CONVERT_HINT = ("convert it first (needs torch): python scripts/convert_torch_checkpoint.py "
                "CHECKPOINT OUT_FOLDER --config=config.json; memvol never opens pickles")

# UNet2DModel's constructor defaults (diffusers 0.42), used for fields a config.json omits.
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None, "num_train_timesteps": None,
}

# Fields of memvol's UNet beyond UNet2DModel's (their defaults are diffusers' network):
# the time embedding's (sin w_k, cos w_k) pairs side by side (pytorch-ddpm), Dense(temb)
# in each ResBlock with (True) or without (False, Hasegawa & Yasuda) a swish before it,
# and attention after "every" up block of an attention level or only its "last".
MEMVOL_FIELDS: dict[str, Any] = {"sin_cos_interleaved": False, "resnet_temb_act": True,
                                 "up_attention": "every"}

# google/ddpm-cifar10-32's config.json (Ho et al.'s CIFAR-10 network, 35,746,307 params).
DDPM_CIFAR10_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

# Fields that must keep one value (memvol's UNet has no other).
_FIXED = {"center_input_sample": False, "time_embedding_type": "positional",
          "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
          "upsample_type": "conv", "resnet_time_scale_shift": "default", "add_attention": True,
          "class_embed_type": None, "num_class_embeds": None}
_IGNORED = ("dropout", "num_train_timesteps")  # training-time only / unused by positional embeddings
_DOWN, _UP = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# --- config <-> UNet -------------------------------------------------------------------


def _refuse(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"unsupported UNet2DModel config: {field}={value!r} ({why})")


def unet_from_config(config: Mapping[str, Any]) -> tuple[UNet, tuple[int, int, int]]:
  """(memvol UNet, image_shape (H, W, C)) of a diffusers UNet2DModel config (a config.json
  dict; omitted fields take UNet2DModel's defaults). ValueError naming the first field
  memvol cannot express."""
  if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
    raise _refuse("_class_name", config["_class_name"], "only UNet2DModel folders load")
  unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS
                   and k not in MEMVOL_FIELDS)
  if unknown:
    raise _refuse(unknown[0], config[unknown[0]], "not a UNet2DModel field memvol knows")
  c = {**DIFFUSERS_DEFAULTS, **MEMVOL_FIELDS, **config}
  for field in ("sin_cos_interleaved", "resnet_temb_act"):
    if not isinstance(c[field], bool):
      raise _refuse(field, c[field], "must be true or false")
  if c["up_attention"] not in ("every", "last"):
    raise _refuse("up_attention", c["up_attention"], "supported: 'every' and 'last'")
  for field, value in _FIXED.items():
    if c[field] != value:
      raise _refuse(field, c[field], f"memvol's UNet supports only {value!r}")
  if c["act_fn"] not in ("silu", "swish"):
    raise _refuse("act_fn", c["act_fn"], "memvol's UNet uses silu")
  chans = [int(x) for x in c["block_out_channels"]]
  ch, levels = chans[0], len(chans)
  down, up = list(c["down_block_types"]), list(c["up_block_types"])
  if len(down) != levels or len(up) != levels:
    raise _refuse("down_block_types", down, f"need one down and one up block per entry of "
                  f"block_out_channels {chans}")
  for field, types, allowed in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
    bad = [b for b in types if b not in allowed]
    if bad:
      raise _refuse(field, bad[0], f"supported block types: {allowed}")
  attn_levels = [i for i, b in enumerate(down) if b == "AttnDownBlock2D"]
  if [levels - 1 - i for i, b in enumerate(up) if b == "AttnUpBlock2D"][::-1] != attn_levels:
    raise _refuse("up_block_types", up, f"attention must sit at the same resolutions on the way "
                  f"up as down_block_types {down}")
  if any(x % ch for x in chans):
    raise _refuse("block_out_channels", chans, "each must be a multiple of the first")
  temb_dim = c["time_embedding_dim"]
  if temb_dim is not None and (not isinstance(temb_dim, int) or temb_dim < 1):
    raise _refuse("time_embedding_dim", temb_dim, "must be a positive integer (None: 4 x block_out_channels[0])")
  groups = int(c["norm_num_groups"] or 0)
  if groups < 1 or any(x % groups for x in chans):
    raise _refuse("norm_num_groups", c["norm_num_groups"], f"must divide every channel count {chans}")
  if c["attn_norm_num_groups"] not in (None, groups):
    raise _refuse("attn_norm_num_groups", c["attn_norm_num_groups"], "must equal norm_num_groups")
  head_dim = c["attention_head_dim"]
  head_dim = 0 if head_dim is None else int(head_dim)
  if head_dim and any(chans[i] % head_dim for i in attn_levels + [levels - 1]):
    raise _refuse("attention_head_dim", head_dim, "must divide the channels of every attention block")
  if c["downsample_padding"] not in (0, 1):
    raise _refuse("downsample_padding", c["downsample_padding"], "supported: 0 and 1")
  if int(c["in_channels"]) != int(c["out_channels"]):
    raise _refuse("out_channels", c["out_channels"], f"must equal in_channels={c['in_channels']}")
  size = c["sample_size"]
  if size is None:
    raise _refuse("sample_size", size, "the image side must be given")
  hw = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
  if len(hw) != 2 or any(s < 1 or s % 2 ** (levels - 1) for s in hw):
    raise _refuse("sample_size", size, f"sides must divide by 2^{levels - 1} (one halving per "
                  "down block but the last)")
  layers = int(c["layers_per_block"])
  if layers < 1:
    raise _refuse("layers_per_block", layers, "must be >= 1")
  unet = UNet(ch=ch, ch_mult=tuple(x // ch for x in chans), num_res_blocks_down=layers,
              num_res_blocks_up=layers + 1,
              attn_resolutions=tuple(hw[0] // 2 ** i for i in attn_levels), dropout=0.0,
              num_groups=groups, norm_eps=float(c["norm_eps"]), attn_head_dim=head_dim,
              downsample_padding=int(c["downsample_padding"]),
              flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
              interleave_sin_cos=c["sin_cos_interleaved"],
              temb_dim=0 if temb_dim in (None, 4 * ch) else int(temb_dim),
              resnet_temb_act=c["resnet_temb_act"], up_attn=c["up_attention"])
  return unet, (hw[0], hw[1], int(c["in_channels"]))


def config_from_unet(model: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """The UNet2DModel config.json of a memvol UNet for images (H, W, C). ValueError when
  diffusers cannot express it (an MLP, extra up blocks, odd sides, ...)."""
  if not isinstance(model, UNet):
    raise ValueError(f"only memvol UNets export to diffusers, got {type(model).__name__}")
  h, w, c = (int(s) for s in image_shape)
  levels = len(model.ch_mult)
  if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
    raise ValueError(f"image sides {h}x{w} must divide by 2^{levels - 1}: diffusers' UNet2DModel "
                     "only halves and doubles")
  if model.num_res_blocks_up != model.num_res_blocks_down + 1:
    raise ValueError(f"model.num_res_blocks_up={model.num_res_blocks_up} must be num_res_blocks_down "
                     f"+ 1 = {model.num_res_blocks_down + 1}: UNet2DModel's up blocks take one skip each")
  attn = {int(r) for r in model.attn_resolutions}
  is_attn = [h // 2 ** i in attn for i in range(levels)]
  extra = {field: value for field, value in (
      ("sin_cos_interleaved", model.interleave_sin_cos), ("resnet_temb_act", model.resnet_temb_act),
      ("up_attention", model.up_attn)) if value != MEMVOL_FIELDS[field]}
  if model.temb_dim:
    extra["time_embedding_dim"] = model.temb_dim
  return {**extra,
      "_class_name": "UNet2DModel", "sample_size": [h, w] if h != w else h, "in_channels": c,
      "out_channels": c, "block_out_channels": [model.ch * m for m in model.ch_mult],
      "down_block_types": [_DOWN[a] for a in is_attn], "up_block_types": [_UP[a] for a in is_attn[::-1]],
      "layers_per_block": model.num_res_blocks_down, "norm_num_groups": model.num_groups,
      "norm_eps": model.norm_eps, "attention_head_dim": model.attn_head_dim or None,
      "downsample_padding": max(model.downsample_padding, 0),  # SAME = 0 for even sides
      "flip_sin_to_cos": model.flip_sin_to_cos, "freq_shift": model.freq_shift,
      "act_fn": "silu", "center_input_sample": False, "time_embedding_type": "positional",
      "mid_block_scale_factor": 1, "dropout": float(model.dropout),
  }


# --- NVlabs/edm SongUNet folders -------------------------------------------------------

EDM_CLASS = "SongUNet"

# SongUNet's constructor defaults (NVlabs/edm training/networks.py), used for fields a
# config.json omits; `precond` and its fields (VPPrecond / VEPrecond / EDMPrecond defaults).
SONG_UNET_DEFAULTS: dict[str, Any] = {
    "img_resolution": None, "in_channels": 3, "out_channels": 3, "label_dim": 0, "augment_dim": 0,
    "model_channels": 128, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4, "num_blocks": 4,
    "attn_resolutions": [16], "dropout": 0.1, "label_dropout": 0.0, "embedding_type": "positional",
    "channel_mult_noise": 1, "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1],
    "skip_connections": [],  # sail-sg/DiffMemorize's SongUNet: 0 / 1 per encoder skip (empty: all on)
}
PRECOND_DEFAULTS: dict[str, Any] = {"precond": "edm", "sigma_data": 0.5, "beta_d": 19.9, "beta_min": 0.1, "M": 1000,
                                    "epsilon_t": 1e-5, "sigma_min": None, "sigma_max": None, "use_fp16": False}
# training-time only (dropout, label dropout, the augmentation labels that sampling never
# passes), or used only by EDM's own sampler (the supported sigma range) / its fp16 switch
_EDM_IGNORED = ("dropout", "label_dropout", "augment_dim", "use_fp16", "epsilon_t", "sigma_min", "sigma_max")
# DDPM++ and NCSN++ as NVlabs/edm's train.py builds them for CIFAR-10 (--arch ddpmpp | ncsnpp).
EDM_CIFAR10: dict[str, dict[str, Any]] = {
    arch: {"_class_name": EDM_CLASS, "img_resolution": 32, "in_channels": 3, "out_channels": 3, "model_channels": 128,
           "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16], "augment_dim": 9, **kw}
    for arch, kw in (("ddpmpp", {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
                                 "resample_filter": [1, 1], "precond": "vp"}),
                     ("ncsnpp", {"embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
                                 "resample_filter": [1, 3, 3, 1], "precond": "ve"}))}


def _refuse_edm(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"unsupported SongUNet config: {field}={value!r} ({why})")


def song_unet_from_config(config: Mapping[str, Any]) -> tuple[Preconditioned, tuple[int, int, int]]:
  """(Preconditioned SongUNet, image_shape (H, W, C)) of an EDM folder's config.json (the
  NVlabs constructor arguments and `precond`, written by convert_torch_checkpoint.py
  --format=edm). ValueError naming the first field memvol cannot express."""
  unknown = sorted(k for k in config if not k.startswith("_") and k not in SONG_UNET_DEFAULTS
                   and k not in PRECOND_DEFAULTS)
  if unknown:
    raise _refuse_edm(unknown[0], config[unknown[0]], "not a SongUNet or preconditioning field memvol knows")
  c = {**SONG_UNET_DEFAULTS, **PRECOND_DEFAULTS, **config}
  if c["precond"] not in song_unet.PRECONDS:
    raise _refuse_edm("precond", c["precond"], f"supported: {song_unet.PRECONDS} (VPPrecond, VEPrecond, EDMPrecond)")
  if c["label_dim"]:
    raise _refuse_edm("label_dim", c["label_dim"], "class-conditional networks are not supported")
  if c["embedding_type"] not in ("positional", "fourier"):
    raise _refuse_edm("embedding_type", c["embedding_type"], "supported: 'positional' (DDPM++), 'fourier' (NCSN++)")
  if c["encoder_type"] not in ("standard", "residual"):
    raise _refuse_edm("encoder_type", c["encoder_type"], "supported: 'standard' (DDPM++), 'residual' (NCSN++)")
  if c["decoder_type"] != "standard":
    raise _refuse_edm("decoder_type", c["decoder_type"], "supported: 'standard' (DDPM++ and NCSN++)")
  if c["precond"] == "vp" and int(c["M"]) != 1000:
    raise _refuse_edm("M", c["M"], "memvol feeds a VP network 999 t, EDM's (M - 1) t with M = 1000")
  size = c["img_resolution"]
  mult = [int(m) for m in c["channel_mult"]]
  if not isinstance(size, int) or size < 1 or size % 2 ** (len(mult) - 1):
    raise _refuse_edm("img_resolution", size, f"must be a positive integer divisible by 2^{len(mult) - 1}")
  if not mult or min(mult) < 1:
    raise _refuse_edm("channel_mult", c["channel_mult"], "must be non-empty positive integers")
  if int(c["in_channels"]) != int(c["out_channels"]):
    raise _refuse_edm("out_channels", c["out_channels"], f"must equal in_channels={c['in_channels']}")
  chans = [int(c["model_channels"]) * m for m in mult]
  if int(c["model_channels"]) < 4 or any(x % min(32, x // 4) for x in chans):
    raise _refuse_edm("model_channels", c["model_channels"], f"GroupNorm's min(32, C / 4) groups must divide {chans}")
  skips = [int(k) for k in c["skip_connections"] or []]
  if skips and (len(skips) != len(mult) * (int(c["num_blocks"]) + 1) or set(skips) - {0, 1}):
    raise _refuse_edm("skip_connections", c["skip_connections"], f"one 0 or 1 per encoder skip, "
                      f"{len(mult) * (int(c['num_blocks']) + 1)} here")
  if len(c["resample_filter"]) < 1 or len(c["resample_filter"]) % 2 or sum(c["resample_filter"]) == 0:
    raise _refuse_edm("resample_filter", c["resample_filter"], "an even number of taps with a nonzero sum (side / 2, x 2)")
  net = SongUNet(img_resolution=size, in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
                 model_channels=int(c["model_channels"]), channel_mult=tuple(mult),
                 channel_mult_emb=int(c["channel_mult_emb"]), num_blocks=int(c["num_blocks"]),
                 attn_resolutions=tuple(int(r) for r in c["attn_resolutions"]), embedding_type=c["embedding_type"],
                 channel_mult_noise=int(c["channel_mult_noise"]), encoder_type=c["encoder_type"],
                 decoder_type=c["decoder_type"], resample_filter=tuple(float(f) for f in c["resample_filter"]),
                 skip_connections=() if all(skips) else tuple(skips))
  model = Preconditioned(net, precond=c["precond"], sigma_data=float(c["sigma_data"]),
                         beta_min=float(c["beta_min"]), beta_d=float(c["beta_d"]))
  return model, (size, size, int(c["in_channels"]))


def edm_sde(config: Mapping[str, Any]) -> dict[str, Any]:
  """The memvol SDE (sde config fields) an EDM folder's network is scored under: vp: VPSDE
  with beta_max = beta_min + beta_d (20 at EDM's defaults); ve / edm: VESDE over EDM's
  sampling range sigma 0.002 .. 80 (log sigma uniform in t, module song_unet)."""
  c = {**PRECOND_DEFAULTS, **config}
  if c["precond"] == "vp":
    return {"name": "vp", "beta_min": float(c["beta_min"]), "beta_max": float(c["beta_min"]) + float(c["beta_d"])}
  return {"name": "ve", "sigma_min": 0.002, "sigma_max": 80.0}


def check_sde(path: str, sde: sde_lib.SDE) -> None:
  """Refuse (ValueError naming the config fields) an SDE whose x_t is not the one an EDM
  folder's network takes: a VP network needs VPSDE with its beta_min / beta_max, a VE or
  EDM-preconditioned one VESDE (any sigma range). Other folders: no check."""
  config = read_config(path)
  if config.get("_class_name") != EDM_CLASS:
    return
  want = edm_sde(config)
  name = {sde_lib.VPSDE: "vp", sde_lib.SubVPSDE: "subvp", sde_lib.VESDE: "ve"}.get(type(sde))
  ok = name == want["name"] and (name != "vp" or (np.isclose(sde.beta_min, want["beta_min"])
                                                   and np.isclose(sde.beta_max, want["beta_max"])))
  if not ok:
    fields = " ".join(f"--config.sde.{k}={v}" for k, v in want.items())
    raise ValueError(f"{path} holds an EDM network with {config.get('precond')!r} preconditioning, which takes the "
                     f"SDE {want}; the config's SDE is {type(sde).__name__} {dataclasses.asdict(sde)}: set {fields}")


def model_from_config(config: Mapping[str, Any]) -> tuple[Any, tuple[int, int, int]]:
  """(model, image_shape) of any folder's config.json: a Preconditioned SongUNet for EDM
  folders (`_class_name` SongUNet), else memvol's UNet (unet_from_config)."""
  if config.get("_class_name") == EDM_CLASS:
    return song_unet_from_config(config)
  return unet_from_config(config)


# --- weights <-> params ----------------------------------------------------------------


def _module_key(name: str, levels: int) -> str:
  """The diffusers state-dict prefix of one top-level memvol UNet module."""
  fixed = {"conv_in": "conv_in", "temb_dense0": "time_embedding.linear_1",
           "temb_dense1": "time_embedding.linear_2", "mid_res0": "mid_block.resnets.0",
           "mid_attn": "mid_block.attentions.0", "mid_res1": "mid_block.resnets.1",
           "norm_out": "conv_norm_out", "conv_out": "conv_out"}
  if name in fixed:
    return fixed[name]
  m = re.fullmatch(r"(down|up)(\d+)_(res|attn|downsample|upsample)(\d*)", name)
  if m is None:
    raise ValueError(f"no diffusers name for memvol UNet module {name!r}")
  side, i, kind, j = m.groups()
  block = f"down_blocks.{i}" if side == "down" else f"up_blocks.{levels - 1 - int(i)}"
  sub = {"res": f"resnets.{j}", "attn": f"attentions.{j}", "downsample": "downsamplers.0.conv",
         "upsample": "upsamplers.0.conv"}[kind]
  return f"{block}.{sub}"


_SUBMODULE = {"temb_proj": "time_emb_proj", "shortcut": "conv_shortcut", "norm": "group_norm",
              "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "conv": None}


def _torch_key(path: tuple[str, ...], levels: int) -> str:
  """diffusers key of the memvol param at `path` (module, [submodule,] kernel|bias|scale)."""
  parts = [_module_key(path[0], levels)]
  for sub in path[1:-1]:
    mapped = _SUBMODULE.get(sub, sub)
    if mapped is not None:
      parts.append(mapped)
  parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]])
  return ".".join(parts)


def _to_flax(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T if w.ndim == 2 else w


def _to_torch(w: np.ndarray) -> np.ndarray:
  return w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T if w.ndim == 2 else w


def _normalise_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Older diffusers attention names (query / key / value / proj_attn, possibly 1x1 convs)
  as the current to_q / to_k / to_v / to_out.0 linears."""
  out = {}
  for k, v in state.items():
    head, _, leaf = k.rpartition(".")
    mod, _, last = head.rpartition(".")
    if ".attentions." in k and last in _LEGACY_ATTN:
      k = f"{mod}.{_LEGACY_ATTN[last]}.{leaf}"
      v = v.reshape(v.shape[:2]) if v.ndim == 4 else v
    out[k] = v
  return out


def _key_fn(model: Any) -> Any:
  """names (a param's path) -> its torch state-dict key, for memvol's UNet (diffusers names)
  or a Preconditioned SongUNet (NVlabs names)."""
  if isinstance(model, Preconditioned):
    return song_unet.torch_key
  levels = len(model.ch_mult)
  return lambda names: _torch_key(names, levels)


def params_from_state_dict(state: Mapping[str, np.ndarray], model: UNet | Preconditioned,
                           image_shape: tuple[int, int, int]) -> Any:
  """memvol params (float32) of a torch-layout state dict for `model` (diffusers names for
  a UNet, NVlabs' for a SongUNet). ValueError listing missing, unexpected or misshapen weights."""
  state = _normalise_keys(state) if isinstance(model, UNet) else dict(state)
  shapes = jax.eval_shape(lambda k: models.init_params(model, k, image_shape), jax.random.PRNGKey(0))
  key_fn = _key_fn(model)
  used, problems = set(), []

  def take(path, leaf):
    names = tuple(getattr(p, "key", p) for p in path)
    key = key_fn(names)
    if key not in state:
      problems.append(f"missing {key}")
      return np.zeros(leaf.shape, np.float32)
    used.add(key)
    w = _to_flax(np.asarray(state[key], np.float32))
    if w.shape != leaf.shape:
      problems.append(f"{key}: shape {_to_torch(w).shape}, expected {_to_torch(np.zeros(leaf.shape)).shape}")
      return np.zeros(leaf.shape, np.float32)
    return w

  params = jax.tree_util.tree_map_with_path(take, shapes)
  problems += [f"unexpected {k}" for k in sorted(set(state) - used)]
  if problems:
    raise ValueError(f"the weights do not fit the config's {type(model).__name__} ({len(problems)} problem(s)): "
                     + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else ""))
  return params


def state_dict_from_params(params: Any, model: UNet | Preconditioned) -> dict[str, np.ndarray]:
  """The torch state dict (float32 numpy, torch layouts) of memvol UNet params (diffusers
  names) or SongUNet params (NVlabs names)."""
  key_fn = _key_fn(model)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {key_fn(tuple(getattr(p, "key", p) for p in path)):
          np.ascontiguousarray(_to_torch(np.asarray(leaf, np.float32))) for path, leaf in flat}


# --- folders ---------------------------------------------------------------------------


def _check_folder(path: str) -> tuple[str, str]:
  """(config.json, weights) paths of a diffusers folder; clear errors otherwise."""
  path = str(path)
  if path.lower().endswith(PICKLE_SUFFIXES):
    raise ValueError(f"{path} is a torch pickle; {CONVERT_HINT}")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"pretrained model folder {path!r} does not exist (expected a diffusers "
                            f"UNet2DModel folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
  cfg, weights = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
  if not os.path.exists(weights):
    pickles = sorted(f for f in os.listdir(path) if f.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
      raise ValueError(f"{path} holds {pickles[0]}, a torch pickle, and no {WEIGHTS_FILE}; {CONVERT_HINT}")
    raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
  if not os.path.exists(cfg):
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (UNet2DModel's config)")
  return cfg, weights


def read_config(path: str) -> dict[str, Any]:
  """The folder's config.json as a dict."""
  cfg, _ = _check_folder(path)
  try:
    with open(cfg) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg} is not valid JSON ({e})") from e


def read_weights(path: str) -> dict[str, np.ndarray]:
  """The folder's safetensors as numpy arrays; ValueError naming the file when it is not
  a complete safetensors file (truncated, garbage)."""
  from safetensors.numpy import load_file
  _, weights = _check_folder(path)
  try:
    return load_file(weights)
  except Exception as e:  # safetensors raises its own SafetensorError, or OSError / ValueError
    raise ValueError(f"{weights} is not a readable safetensors file ({type(e).__name__}: {e}); expected the "
                     "weights written by scripts/convert_torch_checkpoint.py or pretrained.export") from e


def load_model(path: str) -> tuple[UNet | Preconditioned, Any, tuple[int, int, int]]:
  """(model, float32 params, image_shape) of a diffusers UNet2DModel folder or an EDM
  SongUNet folder."""
  model, image_shape = model_from_config(read_config(path))
  params = params_from_state_dict(read_weights(path), model, image_shape)
  return model, jax.device_put(params), image_shape


def default_sde(path: str) -> sde_lib.SDE:
  """The SDE a folder's network was trained on: EDM folders' edm_sde, the converter's
  `_source_sde` (VP betas of pytorch-ddpm / Hasegawa & Yasuda), else the VP-SDE beta 0.1
  .. 20 that DDPM's linear betas discretise."""
  config = read_config(path)
  if config.get("_class_name") == EDM_CLASS:
    fields = edm_sde(config)
  else:
    fields = {"name": "vp", "beta_min": 0.1, "beta_max": 20.0}
    fields.update({k: v for k, v in config.get("_source_sde", {}).items() if k in ("beta_min", "beta_max")})
  return sde_lib.get_sde(**fields)


def load_eps_fn(path: str, sde: sde_lib.SDE | None = None) -> tuple[models.EpsFn, tuple[int, int, int]]:
  """(eps_fn(x [H, W, C] in [-1, 1], t) -> [H, W, C], image_shape) of a folder, under
  `sde` (default: default_sde, the one it was trained on; a DDPM network sees 999 t, an
  EDM VE / EDM one sigma(t)). ValueError for an SDE an EDM network cannot take."""
  model, params, image_shape = load_model(path)
  sde = default_sde(path) if sde is None else sde
  check_sde(path, sde)
  return models.make_eps_fn(model, params, sde), image_shape


def save_folder(path: str, config: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> None:
  """Write config.json + diffusion_pytorch_model.safetensors to `path`, both atomically."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path, prefix=".weights.", suffix=".tmp")
  os.close(fd)
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp, metadata={"format": "pt"})
    shutil.move(tmp, os.path.join(path, WEIGHTS_FILE))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  io.save_json(os.path.join(path, CONFIG_FILE), dict(config))


def export(model: UNet, params: Any, image_shape: tuple[int, ...], path: str) -> dict[str, Any]:
  """Write a memvol UNet as a diffusers UNet2DModel folder at `path`; returns its config.
  The export loads back (load_model) to the same network."""
  config = config_from_unet(model, image_shape)
  save_folder(path, config, state_dict_from_params(params, model))
  return config


# --- the workdir's record of the weights -------------------------------------------------


def weights_sha256(path: str) -> str:
  """SHA-256 (hex) of the folder's safetensors file."""
  _, weights = _check_folder(path)
  return io.file_sha256(weights)


def check_weights(path: str, workdir: str) -> str:
  """Record the SHA-256 of the weights at `path` in workdir/pretrained.json the first time;
  afterwards refuse (ValueError) weights whose SHA-256 differs. Returns the hash."""
  digest = weights_sha256(path)
  record = wdir.pretrained_record(workdir)
  if not os.path.exists(record):
    io.save_json(record, {"path": os.path.abspath(path), "sha256": digest, "config": read_config(path)})
    return digest
  old = io.load_json(record)
  if old.get("sha256") != digest:
    raise ValueError(f"{path}/{WEIGHTS_FILE} has SHA-256 {digest[:16]}..., but workdir {workdir} "
                     f"was made with weights {str(old.get('sha256'))[:16]}... ({old.get('path')}); "
                     "use a new --workdir for other weights")
  return digest


def run(config: Any, workdir: str) -> None:
  """The `train` stage of a pretrained config: nothing to train; records the weights'
  SHA-256 and the train / held-out split (data.prepare) that later stages read."""
  from memvol import data
  path = str(config.model.pretrained)
  digest = check_weights(path, workdir)
  _, image_shape = model_from_config(read_config(path))
  check_sde(path, sde_lib.from_config(config.sde))
  split = data.prepare(config, workdir)
  if tuple(split.train.shape) != tuple(image_shape):
    raise ValueError(f"the data's images have shape {split.train.shape} but {path} takes "
                     f"{tuple(image_shape)}; set data.resolution (and data.channels)")
  print(f"[memvol] pretrained {path} (sha256 {digest[:12]}): no training; {data.describe(split)}")


DONE_MEANS = "the weights and the split are recorded"


def stale_reason(config: Any, workdir: str) -> str | None:
  """Always a reason: the pretrained `train` stage only verifies (cheap), so it always runs."""
  return "a pretrained model: its weights and split are verified on every run"


def is_complete(config: Any, workdir: str) -> bool:
  return stale_reason(config, workdir) is None
