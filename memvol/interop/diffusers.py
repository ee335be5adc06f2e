"""diffusers `UNet2DModel`: the folder kind that every DDPM UNet arrives as (diffusers',
pytorch-ddpm's, Hasegawa & Yasuda's), both ways, numpy and names only.

Its config.json holds UNet2DModel's constructor arguments (fields omitted take its
defaults), plus MEMVOL_FIELDS for UNets diffusers cannot build; unet_kwargs turns it into
memvol's UNet (memvol/models/unet.py) and config_of_unet back. Weights map one to one:
torch convolutions OIHW -> HWIO, linear weights transposed (mapping.to_flax), GroupNorm
weight -> scale, attention to_q / to_k / to_v / to_out.0 (or the older query / key / value
/ proj_attn, normalise_keys) -> q / k / v / proj_out (torch_key); dropout is ignored.
Config values memvol's UNet cannot express are refused, naming the field.

As a source format (`--format=diffusers`) a checkpoint is a pickled UNet2DModel or its state
dict with its config.json: nothing to translate, only other formats' state dicts to refuse.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import numpy as np

from memvol.interop import mapping

NAME = "diffusers"
EXPECTED = "diffusers UNet2DModel checkpoint"
CLASS = "UNet2DModel"

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
DOWN, UP = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Key prefixes of the other DDPM formats' state dicts, and how to convert them instead.
_OTHER_FORMATS = (
    (("ResnetBlock_", "AttnBlock_", "TimeEmbedding."),
     "this is Hasegawa & Yasuda's UNet (ResnetBlock_D11, NIN_q, ...), not a diffusers UNet2DModel: convert it with "
     "--format=hasegawa --source=THEIR_REPO --config=config/<dataset>.yaml"),
    (("downblocks.", "time_embedding.timembedding."),
     "this is a pytorch-ddpm state dict (downblocks, time_embedding.timembedding, ...): convert it with "
     "--format=pytorch-ddpm"))


# --- the folder's config <-> memvol's UNet -----------------------------------------------


def _refuse(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"unsupported UNet2DModel config: {field}={value!r} ({why})")


def unet_kwargs(config: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[int, int, int]]:
  """(memvol UNet constructor kwargs, image_shape (H, W, C)) of a UNet2DModel config (a
  config.json dict; omitted fields take UNet2DModel's defaults). ValueError naming the
  first field memvol cannot express."""
  if config.get("_class_name", CLASS) != CLASS:
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
  for field, types, allowed in (("down_block_types", down, DOWN), ("up_block_types", up, UP)):
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
  kwargs = dict(ch=ch, ch_mult=tuple(x // ch for x in chans), num_res_blocks_down=layers,
                num_res_blocks_up=layers + 1,
                attn_resolutions=tuple(hw[0] // 2 ** i for i in attn_levels), dropout=0.0,
                num_groups=groups, norm_eps=float(c["norm_eps"]), attn_head_dim=head_dim,
                downsample_padding=int(c["downsample_padding"]),
                flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
                interleave_sin_cos=c["sin_cos_interleaved"],
                temb_dim=0 if temb_dim in (None, 4 * ch) else int(temb_dim),
                resnet_temb_act=c["resnet_temb_act"], up_attn=c["up_attention"])
  return kwargs, (hw[0], hw[1], int(c["in_channels"]))


def config_of_unet(unet: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """The UNet2DModel config.json of a memvol UNet (its fields) for images (H, W, C).
  ValueError when diffusers cannot express it (extra up blocks, odd sides, ...)."""
  h, w, c = (int(s) for s in image_shape)
  levels = len(unet.ch_mult)
  if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
    raise ValueError(f"image sides {h}x{w} must divide by 2^{levels - 1}: diffusers' UNet2DModel "
                     "only halves and doubles")
  if unet.num_res_blocks_up != unet.num_res_blocks_down + 1:
    raise ValueError(f"model.num_res_blocks_up={unet.num_res_blocks_up} must be num_res_blocks_down "
                     f"+ 1 = {unet.num_res_blocks_down + 1}: UNet2DModel's up blocks take one skip each")
  attn = {int(r) for r in unet.attn_resolutions}
  is_attn = [h // 2 ** i in attn for i in range(levels)]
  extra = {field: value for field, value in (
      ("sin_cos_interleaved", unet.interleave_sin_cos), ("resnet_temb_act", unet.resnet_temb_act),
      ("up_attention", unet.up_attn)) if value != MEMVOL_FIELDS[field]}
  if unet.temb_dim:
    extra["time_embedding_dim"] = unet.temb_dim
  return {**extra,
      "_class_name": CLASS, "sample_size": [h, w] if h != w else h, "in_channels": c,
      "out_channels": c, "block_out_channels": [unet.ch * m for m in unet.ch_mult],
      "down_block_types": [DOWN[a] for a in is_attn], "up_block_types": [UP[a] for a in is_attn[::-1]],
      "layers_per_block": unet.num_res_blocks_down, "norm_num_groups": unet.num_groups,
      "norm_eps": unet.norm_eps, "attention_head_dim": unet.attn_head_dim or None,
      "downsample_padding": max(unet.downsample_padding, 0),  # SAME = 0 for even sides
      "flip_sin_to_cos": unet.flip_sin_to_cos, "freq_shift": unet.freq_shift,
      "act_fn": "silu", "center_input_sample": False, "time_embedding_type": "positional",
      "mid_block_scale_factor": 1, "dropout": float(unet.dropout),
  }


# --- names: memvol's UNet params <-> the folder's keys -------------------------------------


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


def torch_key(path: tuple[str, ...], levels: int) -> str:
  """diffusers key of the memvol UNet param at `path` (module, [submodule,] kernel|bias|scale)
  of a UNet with `levels` resolutions."""
  parts = [_module_key(path[0], levels)]
  for sub in path[1:-1]:
    mapped = _SUBMODULE.get(sub, sub)
    if mapped is not None:
      parts.append(mapped)
  parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]])
  return ".".join(parts)


def normalise_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Older diffusers attention names (query / key / value / proj_attn, possibly 1x1 convs)
  as the current to_q / to_k / to_v / to_out.0 linears."""
  out = {}
  for k, v in state.items():
    head, _, leaf = k.rpartition(".")
    mod, _, last = head.rpartition(".")
    if ".attentions." in k and last in _LEGACY_ATTN:
      k = f"{mod}.{_LEGACY_ATTN[last]}.{leaf}"
      v = mapping.LAYOUTS["conv1x1_to_linear"](v) if v.ndim == 4 else v
    out[k] = v
  return out


def resblock_spec(src: str, dst: str, cin: int, cout: int, tdim: int, names: Mapping[str, str]) -> mapping.Spec:
  """Spec rows of one residual block of a source UNet onto the folder's ResnetBlock2D at
  `dst`; `names` maps the roles norm1 conv1 temb norm2 conv2 to the source's submodule names
  (the shortcut is the caller's)."""
  return [(f"{src}.{names['norm1']}.weight", f"{dst}.norm1.weight", (cin,), "same"),
          (f"{src}.{names['norm1']}.bias", f"{dst}.norm1.bias", (cin,), "same"),
          (f"{src}.{names['conv1']}.weight", f"{dst}.conv1.weight", (cout, cin, 3, 3), "same"),
          (f"{src}.{names['conv1']}.bias", f"{dst}.conv1.bias", (cout,), "same"),
          (f"{src}.{names['temb']}.weight", f"{dst}.time_emb_proj.weight", (cout, tdim), "same"),
          (f"{src}.{names['temb']}.bias", f"{dst}.time_emb_proj.bias", (cout,), "same"),
          (f"{src}.{names['norm2']}.weight", f"{dst}.norm2.weight", (cout,), "same"),
          (f"{src}.{names['norm2']}.bias", f"{dst}.norm2.bias", (cout,), "same"),
          (f"{src}.{names['conv2']}.weight", f"{dst}.conv2.weight", (cout, cout, 3, 3), "same"),
          (f"{src}.{names['conv2']}.bias", f"{dst}.conv2.bias", (cout,), "same")]


# --- as a source format ------------------------------------------------------------------


def to_folder(state: Mapping[str, np.ndarray], config: Mapping[str, Any] | None,
              config_path: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state, config) of the folder of a UNet2DModel state dict (numpy) and its config: the
  JSON file at `config_path` if given, else `config` (a pickled model's). ValueError for
  another format's state dict, or no config."""
  state = mapping.unwrap(state)
  for prefixes, why in _OTHER_FORMATS:
    if any(k.startswith(prefixes) for k in state):
      raise ValueError(why)
  if config_path:
    with open(config_path) as f:
      config = json.load(f)
  if config is None:
    raise ValueError("a bare state dict needs --config=config.json (its UNet2DModel config)")
  return {k: np.asarray(v, np.float32) for k, v in state.items()}, dict(config)
