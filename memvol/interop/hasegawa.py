"""Hasegawa & Yasuda's own UNet (masa-longriver/Quantifying_the_Ease_of_Reproduction) as a
UNet2DModel folder: their yaml config -> the folder's config, the tensors of their model
(saved whole, `torch.save` of a DataParallel(UNet)) -> the folder's weights.

Their trainer saves the training weights, not the EMA (theirs is applied only while
evaluating). Every residual block has a NIN shortcut (W [I, O], b); only those that change
the channel count use it, so the others are read and not kept.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from memvol.interop import diffusers, mapping

NAME = "hasegawa"
EXPECTED = "Hasegawa & Yasuda model file"
NORM_EPS = 1e-6  # every GroupNorm of their UNet


def read_yaml(path: str) -> dict[str, Any]:
  """Their merged config: config/model.yaml beside the dataset yaml at `path`, then the
  dataset yaml over it (their src/utils/config.load_config)."""
  import yaml
  model_yaml = os.path.join(os.path.dirname(os.path.abspath(path)), "model.yaml")
  config: dict[str, Any] = {}
  for p in (model_yaml, path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"{p} does not exist (their config/model.yaml and config/<dataset>.yaml)")
    with open(p) as f:
      config.update(yaml.safe_load(f) or {})
  return config


def _refuse(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"unsupported Hasegawa & Yasuda config: {field}={value!r} ({why})")


def folder_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The folder's config of their UNet (4 levels of channel1, channel2 x 3, 2 blocks down and
  3 up per level, attention at the second level: after both blocks down, after the last one
  up; GroupNorm eps 1e-6; Dense(temb) without a swish; time embedding w_k =
  max_positions^(-k / (emb_dim1/2 - 1)), sin then cos). ValueError naming the first value
  memvol cannot express."""
  try:
    u, data = cfg["unet"], cfg["data"]
    c1, c2, conv, temb = int(u["channel1"]), int(u["channel2"]), u["conv"], u["time_embedding"]
    groups = int(u["groupnorm"]["num_groups"])
    h, w, c = int(data["height"]), int(data["width"]), int(data["channel"])
  except (KeyError, TypeError) as e:
    raise ValueError(f"not a Hasegawa & Yasuda config (model.yaml + dataset yaml): missing {e}") from e
  for field, want in (("kernel_size", 3), ("stride", 1), ("padding", 1), ("dilation", 1)):
    if conv.get(field) != want:
      raise _refuse(f"unet.conv.{field}", conv.get(field), f"memvol's UNet has {want}")
  if float(temb.get("max_positions", 0)) != 10000:
    raise _refuse("unet.time_embedding.max_positions", temb.get("max_positions"), "memvol's is 10000")
  if int(temb["emb_dim1"]) != c1:
    raise _refuse("unet.time_embedding.emb_dim1", temb["emb_dim1"], f"must equal unet.channel1={c1}")
  if c2 % c1:
    raise _refuse("unet.channel2", c2, f"must be a multiple of unet.channel1={c1}")
  if h != w:
    raise _refuse("data.width", w, f"must equal data.height={h}: the authors' images are square")
  return {
      "_class_name": diffusers.CLASS, "sample_size": h, "in_channels": c, "out_channels": c,
      "block_out_channels": [c1, c2, c2, c2], "layers_per_block": 2,
      "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
      "norm_num_groups": groups, "norm_eps": NORM_EPS, "attention_head_dim": None, "downsample_padding": 0,
      "flip_sin_to_cos": False, "freq_shift": 1, "time_embedding_dim": int(temb["emb_dim2"]),
      "resnet_temb_act": False, "up_attention": "last", "act_fn": "silu",
      "dropout": float(u.get("dropout", 0.0)),
      "_source_sde": {k: cfg["sde"][k] for k in ("beta_min", "beta_max", "T", "eps") if k in cfg.get("sde", {})},
  }


_RES = {"norm1": "GroupNorm_1", "conv1": "Conv_1", "temb": "Dense", "norm2": "GroupNorm_2", "conv2": "Conv_2"}


def _res(src: str, dst: str, cin: int, cout: int, tdim: int) -> mapping.Spec:
  used = cin != cout  # every block has a NIN shortcut; only those that change channels use it
  return diffusers.resblock_spec(src, dst, cin, cout, tdim, _RES) + [
      (f"{src}.NIN.W", f"{dst}.conv_shortcut.weight" if used else None, (cin, cout), "nin_to_conv1x1"),
      (f"{src}.NIN.b", f"{dst}.conv_shortcut.bias" if used else None, (cout,), "same")]


def _attn(src: str, dst: str, c: int) -> mapping.Spec:
  rows: mapping.Spec = [(f"{src}.GroupNorm.weight", f"{dst}.group_norm.weight", (c,), "same"),
                        (f"{src}.GroupNorm.bias", f"{dst}.group_norm.bias", (c,), "same")]
  for s, d in (("NIN_q", "to_q"), ("NIN_k", "to_k"), ("NIN_v", "to_v"), ("NIN_tot", "to_out.0")):
    rows += [(f"{src}.{s}.W", f"{dst}.{d}.weight", (c, c), "nin_to_linear"),
             (f"{src}.{s}.b", f"{dst}.{d}.bias", (c,), "same")]
  return rows


def spec(cfg: Mapping[str, Any]) -> mapping.Spec:
  """Every parameter of their UNet in its construction order, with its key in the folder;
  NIN shortcuts of blocks that keep their channel count map to None (unused)."""
  u = cfg["unet"]
  c1, c2, cin = int(u["channel1"]), int(u["channel2"]), int(cfg["data"]["channel"])
  d1, tdim = int(u["time_embedding"]["emb_dim1"]), int(u["time_embedding"]["emb_dim2"])
  rows: mapping.Spec = [("Conv1.weight", "conv_in.weight", (c1, cin, 3, 3), "same"), ("Conv1.bias", "conv_in.bias", (c1,), "same"),
                        ("TimeEmbedding.linear_1.weight", "time_embedding.linear_1.weight", (tdim, d1), "same"),
                        ("TimeEmbedding.linear_1.bias", "time_embedding.linear_1.bias", (tdim,), "same"),
                        ("TimeEmbedding.linear_2.weight", "time_embedding.linear_2.weight", (tdim, tdim), "same"),
                        ("TimeEmbedding.linear_2.bias", "time_embedding.linear_2.bias", (tdim,), "same")]
  res = lambda name, dst, i, o: _res(f"ResnetBlock_{name}", dst, i, o, tdim)
  conv = lambda src, dst, c: [(f"{src}.Conv.weight", f"{dst}.conv.weight", (c, c, 3, 3), "same"),
                              (f"{src}.Conv.bias", f"{dst}.conv.bias", (c,), "same")]
  down_in = [(c1, c1), (c1, c2), (c2, c2), (c2, c2)]
  for lvl in range(4):
    first, ch = down_in[lvl]
    for j in range(2):
      rows += res(f"D{lvl + 1}{j + 1}", f"down_blocks.{lvl}.resnets.{j}", first if j == 0 else ch, ch)
      if lvl == 1:
        rows += _attn(f"AttnBlock_D2{j + 1}", f"down_blocks.1.attentions.{j}", c2)
    if lvl < 3:
      rows += conv(f"Downsample_{lvl + 1}", f"down_blocks.{lvl}.downsamplers.0", ch)
  rows += res("C1", "mid_block.resnets.0", c2, c2) + _attn("AttnBlock_C", "mid_block.attentions.0", c2)
  rows += res("C2", "mid_block.resnets.1", c2, c2)
  up_in = {1: [2 * c2] * 3, 2: [2 * c2] * 3, 3: [2 * c2, 2 * c2, c2 + c1], 4: [c2 + c1, 2 * c1, 2 * c1]}
  for k in range(1, 5):
    out = c1 if k == 4 else c2
    for j in range(3):
      rows += res(f"U{k}{j + 1}", f"up_blocks.{k - 1}.resnets.{j}", up_in[k][j], out)
    if k == 3:
      rows += _attn("AttnBlock_U3", "up_blocks.2.attentions.2", c2)
    if k < 4:
      rows += conv(f"Upsample_{k}", f"up_blocks.{k - 1}.upsamplers.0", c2)
  rows += [("GroupNorm.weight", "conv_norm_out.weight", (c1,), "same"), ("GroupNorm.bias", "conv_norm_out.bias", (c1,), "same"),
           ("Conv2.weight", "conv_out.weight", (cin, c1, 3, 3), "same"), ("Conv2.bias", "conv_out.bias", (cin,), "same")]
  return rows


def check_norm_eps(eps: Mapping[str, float]) -> None:
  """Refuse a model whose GroupNorms (name -> eps) are not all NORM_EPS."""
  for name, e in eps.items():
    if e != NORM_EPS:
      raise ValueError(f"{name}: GroupNorm eps {e}, memvol's folder for this format has 1e-6")


def to_folder(state: Mapping[str, np.ndarray], cfg: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state, config) of the folder of their model's tensors (numpy, every NIN's W and b
  included) under their merged config (read_yaml). ValueError naming the first config value
  memvol cannot express; MismatchError naming the first parameter that does not fit."""
  config = folder_config(cfg)
  return mapping.map_state(mapping.unwrap(state), spec(cfg), "Hasegawa & Yasuda"), config
