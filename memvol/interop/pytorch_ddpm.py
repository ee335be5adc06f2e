"""w86763777/pytorch-ddpm's UNet (the CIFAR-10, CIFAR-100, SVHN and Tiny-ImageNet victims
of PIA and SecMI) as a UNet2DModel folder: its absl flagfile -> the folder's config, its
state dict (a ckpt.pt's ema_model or net_model) -> the folder's weights.

Its time embedding table (T x ch, interleaved sin / cos) is checked against the sinusoid
memvol computes and not copied, so the network is defined between integer steps too.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from memvol.interop import diffusers, mapping

NAME = "pytorch-ddpm"
EXPECTED = "pytorch-ddpm ckpt.pt"
WEIGHTS = {"ema": "ema_model", "net": "net_model"}  # --weights -> the ckpt.pt's state dict
TIME_TABLE_KEY = "time_embedding.timembedding.0.weight"
TIME_TABLE_ATOL = 2e-4  # float32 rounding of n w_k at n < 1000 moves a table entry by < 1e-4

# Its CIFAR-10 settings (its config/CIFAR10.txt, PIA's and SecMI's victims). num_groups is
# not one of its flags: its model.py hard-codes GroupNorm(32, ...).
FLAGS: dict[str, Any] = {"T": 1000, "ch": 128, "ch_mult": [1, 2, 2, 2], "attn": [1],
                         "num_res_blocks": 2, "dropout": 0.1, "img_size": 32, "num_groups": 32,
                         "beta_1": 1e-4, "beta_T": 0.02, "mean_type": "epsilon"}
_MULTI = ("ch_mult", "attn")


def read_flagfile(path: str | None) -> dict[str, Any]:
  """The architecture flags of its absl flagfile (`--name=value` lines; ch_mult and attn
  repeat), over FLAGS."""
  flags = dict(FLAGS)
  if not path:
    return flags
  multi: dict[str, list[int]] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line.startswith("--") or "=" not in line:
        continue
      name, value = line[2:].split("=", 1)
      if name in _MULTI:
        multi.setdefault(name, []).append(int(value))
      elif name in ("T", "ch", "num_res_blocks", "img_size"):
        flags[name] = int(value)
      elif name in ("dropout", "beta_1", "beta_T"):
        flags[name] = float(value)
      elif name == "mean_type":
        flags[name] = value
  return {**flags, **multi}


def folder_config(flags: Mapping[str, Any]) -> dict[str, Any]:
  """The folder's config of UNet(T, ch, ch_mult, attn, num_res_blocks): GroupNorm(num_groups,
  default 32) and eps 1e-5 everywhere, symmetric padding 1 in the downsample, one attention
  head, time embedding w_k = 10000^(-2k / ch) with (sin, cos) interleaved."""
  if flags.get("mean_type", "epsilon") != "epsilon":
    raise ValueError(f"unsupported pytorch-ddpm flag: mean_type={flags['mean_type']!r} (memvol needs a "
                     "noise-predicting network, mean_type=epsilon)")
  ch, mult = int(flags["ch"]), [int(m) for m in flags["ch_mult"]]
  attn = sorted(int(a) for a in flags["attn"])
  if any(not 0 <= a < len(mult) for a in attn):
    raise ValueError(f"pytorch-ddpm attn={attn}: levels must be in 0..{len(mult) - 1}")
  size = int(flags["img_size"])
  return {
      "_class_name": diffusers.CLASS, "sample_size": size, "in_channels": 3, "out_channels": 3,
      "block_out_channels": [ch * m for m in mult], "layers_per_block": int(flags["num_res_blocks"]),
      "down_block_types": [diffusers.DOWN[i in attn] for i in range(len(mult))],
      "up_block_types": [diffusers.UP[i in attn] for i in reversed(range(len(mult)))],
      "norm_num_groups": int(flags["num_groups"]), "norm_eps": 1e-5, "attention_head_dim": None, "downsample_padding": 1,
      "flip_sin_to_cos": False, "freq_shift": 0, "sin_cos_interleaved": True, "act_fn": "silu",
      "num_train_timesteps": int(flags["T"]), "dropout": float(flags["dropout"]),
      # the VP-SDE its linear betas discretise (beta_i = beta(i / (T - 1)) / T): memvol's
      # config.sde must say the same (the default, 0.1 .. 20, for beta_1 1e-4, beta_T 0.02)
      "_source_sde": {"beta_min": float(flags["beta_1"]) * int(flags["T"]),
                      "beta_max": float(flags["beta_T"]) * int(flags["T"])},
  }


_RES = {"norm1": "block1.0", "conv1": "block1.2", "temb": "temb_proj.1", "norm2": "block2.0", "conv2": "block2.3"}


def _res(src: str, dst: str, cin: int, cout: int, tdim: int, attn_dst: str | None) -> mapping.Spec:
  rows = diffusers.resblock_spec(src, dst, cin, cout, tdim, _RES)
  if cin != cout:
    rows += [(f"{src}.shortcut.weight", f"{dst}.conv_shortcut.weight", (cout, cin, 1, 1), "same"),
             (f"{src}.shortcut.bias", f"{dst}.conv_shortcut.bias", (cout,), "same")]
  if attn_dst is not None:
    rows += [(f"{src}.attn.group_norm.weight", f"{attn_dst}.group_norm.weight", (cout,), "same"),
             (f"{src}.attn.group_norm.bias", f"{attn_dst}.group_norm.bias", (cout,), "same")]
    for s, d in (("proj_q", "to_q"), ("proj_k", "to_k"), ("proj_v", "to_v"), ("proj", "to_out.0")):
      rows += [(f"{src}.attn.{s}.weight", f"{attn_dst}.{d}.weight", (cout, cout, 1, 1), "conv1x1_to_linear"),
               (f"{src}.attn.{s}.bias", f"{attn_dst}.{d}.bias", (cout,), "same")]
  return rows


def spec(flags: Mapping[str, Any]) -> mapping.Spec:
  """Every parameter of its UNet, in its state dict's order, with its key in the folder
  (the time table: checked, not kept)."""
  T, ch, mult = int(flags["T"]), int(flags["ch"]), [int(m) for m in flags["ch_mult"]]
  attn, nres, tdim = {int(a) for a in flags["attn"]}, int(flags["num_res_blocks"]), 4 * int(flags["ch"])
  levels = len(mult)
  rows: mapping.Spec = [(TIME_TABLE_KEY, None, (T, ch), "same")]
  for s, d, shape in (("time_embedding.timembedding.1", "time_embedding.linear_1", (tdim, ch)),
                      ("time_embedding.timembedding.3", "time_embedding.linear_2", (tdim, tdim))):
    rows += [(f"{s}.weight", f"{d}.weight", shape, "same"), (f"{s}.bias", f"{d}.bias", (tdim,), "same")]
  rows += [("head.weight", "conv_in.weight", (ch, 3, 3, 3), "same"), ("head.bias", "conv_in.bias", (ch,), "same")]
  chs, now, n = [ch], ch, 0
  for i, m in enumerate(mult):
    for j in range(nres):
      rows += _res(f"downblocks.{n}", f"down_blocks.{i}.resnets.{j}", now, ch * m, tdim,
                   f"down_blocks.{i}.attentions.{j}" if i in attn else None)
      now, n = ch * m, n + 1
      chs.append(now)
    if i != levels - 1:
      rows += [(f"downblocks.{n}.main.weight", f"down_blocks.{i}.downsamplers.0.conv.weight", (now, now, 3, 3), "same"),
               (f"downblocks.{n}.main.bias", f"down_blocks.{i}.downsamplers.0.conv.bias", (now,), "same")]
      n += 1
      chs.append(now)
  rows += _res("middleblocks.0", "mid_block.resnets.0", now, now, tdim, "mid_block.attentions.0")
  rows += _res("middleblocks.1", "mid_block.resnets.1", now, now, tdim, None)
  n = 0
  for i in reversed(range(levels)):
    u = levels - 1 - i
    for j in range(nres + 1):
      cin = chs.pop() + now
      rows += _res(f"upblocks.{n}", f"up_blocks.{u}.resnets.{j}", cin, ch * mult[i], tdim,
                   f"up_blocks.{u}.attentions.{j}" if i in attn else None)
      now, n = ch * mult[i], n + 1
    if i != 0:
      rows += [(f"upblocks.{n}.main.weight", f"up_blocks.{u}.upsamplers.0.conv.weight", (now, now, 3, 3), "same"),
               (f"upblocks.{n}.main.bias", f"up_blocks.{u}.upsamplers.0.conv.bias", (now,), "same")]
      n += 1
  rows += [("tail.0.weight", "conv_norm_out.weight", (now,), "same"), ("tail.0.bias", "conv_norm_out.bias", (now,), "same"),
           ("tail.2.weight", "conv_out.weight", (3, now, 3, 3), "same"), ("tail.2.bias", "conv_out.bias", (3,), "same")]
  return rows


def time_table(T: int, d: int) -> np.ndarray:
  """Its TimeEmbedding table [T, d] in float64: row n = (sin n w_0, cos n w_0, sin n w_1,
  ...), w_k = 10000^(-2k / d)."""
  w = np.exp(-np.arange(0, d, 2) / d * math.log(10000.0))
  a = np.arange(T, dtype=np.float64)[:, None] * w[None, :]
  return np.stack([np.sin(a), np.cos(a)], axis=-1).reshape(T, d)


def time_table_error(table: np.ndarray) -> float:
  """max |table - time_table| of a stored table [T, d]; ValueError beyond TIME_TABLE_ATOL
  (another embedding, which memvol cannot express)."""
  err = float(np.max(np.abs(np.asarray(table, np.float64) - time_table(*table.shape))))
  if not err <= TIME_TABLE_ATOL:
    raise ValueError(f"{TIME_TABLE_KEY}: the time embedding table is not pytorch-ddpm's interleaved sinusoid "
                     f"(max deviation {err:.3g} > {TIME_TABLE_ATOL}); memvol cannot express it")
  return err


def to_folder(state: Mapping[str, np.ndarray], flags: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state, config) of the folder of its state dict (numpy) under `flags` (read_flagfile's,
  with num_groups). The config records `_time_table_max_abs_error`. ValueError naming the
  first flag memvol cannot express or the table; MismatchError naming the first parameter
  that does not fit."""
  config, rows = folder_config(flags), spec(flags)
  state = mapping.unwrap(state)
  table = state.get(TIME_TABLE_KEY)
  # the table is the spec's first row: a missing or misshapen one is map_state's to name
  err = time_table_error(table) if table is not None and table.shape == rows[0][2] else 0.0
  out = mapping.map_state(state, rows, "pytorch-ddpm")
  return out, {**config, "_time_table_max_abs_error": err}
