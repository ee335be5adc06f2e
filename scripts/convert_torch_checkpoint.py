"""Convert a torch checkpoint into a folder memvol loads (config.json +
diffusion_pytorch_model.safetensors). Needs torch, which memvol itself does not depend on:
run it in a separate venv (diffusers only for pickled UNet2DModels).

  python3.11 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch safetensors numpy pyyaml
  /tmp/venv-torch/bin/python scripts/convert_torch_checkpoint.py CKPT OUT [--format=...]

--format=diffusers (default): a diffusers UNet2DModel, either pickled whole
  (torch.save(model): its state dict and config are used) or as a state dict (.pt / .pth /
  .ckpt / .bin, also nested under "state_dict", "ema", "ema_model" or "model", with or
  without DataParallel's "module." prefix) with --config=config.json, its UNet2DModel config.
--format=pytorch-ddpm: a ckpt.pt of w86763777/pytorch-ddpm's trainer (the CIFAR-10,
  CIFAR-100, SVHN and Tiny-ImageNet victims of PIA and SecMI), with --weights=ema (the
  ema_model state dict, default; the one PIA and SecMI attack) or net. The architecture comes
  from --flagfile (that trainer's absl flagfile: logdir/flagfile.txt or config/CIFAR10.txt;
  ch, ch_mult, attn, num_res_blocks, T, img_size), default its CIFAR-10 settings;
  --num-groups for a fork that changes its hard-coded GroupNorm(32). Its time
  embedding table (T x ch, interleaved sin / cos) is checked against the sinusoid memvol
  computes and not copied. Loaded with torch.load(weights_only=True): no code runs.
--format=hasegawa: a model file of Hasegawa & Yasuda's trainer
  (masa-longriver/Quantifying_the_Ease_of_Reproduction: torch.save of the whole
  DataParallel(UNet)), unpickled with --source=THEIR_REPO on sys.path, and --config=their
  dataset yaml (config/cifar10.yaml; config/model.yaml beside it is merged in, as their
  load_config does). Their trainer saves the training weights, not the EMA (theirs is
  applied only while evaluating). Every NIN layer's W and b are read from the module,
  registered as parameters or not (created with `.to(device)`, they are plain tensors when
  the device is a GPU, so absent from its state dict and never trained).

--format=edm: an NVlabs/edm network (Karras et al.; also what sail-sg/DiffMemorize trains):
  a network-snapshot-*.pkl (--weights=ema, default) or a training-state-*.pt (--weights=net),
  unpickled with --edm_repo=A_CHECKOUT_OF_NVlabs/edm on sys.path (its torch_utils and dnnlib).
  SongUNet (DDPM++, NCSN++) under VPPrecond, VEPrecond or EDMPrecond; config.json holds the
  network's constructor kwargs and `precond` (memvol/models/song_unet.py), the weights keep
  NVlabs' names without the `model.` prefix. Buffers are weights: NCSN++'s Fourier `freqs`
  are kept, every resample_filter is checked against the config's filter (memvol computes
  it), and the augmentation layer map_augment (augment_dim 9 in EDM's CIFAR-10 pickles),
  which sampling never uses, is dropped and listed in `_dropped_unused`. Refused by name:
  iDDPMPrecond, DhariwalUNet (ADM), class labels, skip encoders / decoders. Pickles written
  under numpy 2 (numpy._core) need numpy >= 2 in this venv.

The folder's config.json records `_source_format`, `_source_checkpoint` and (pytorch-ddpm,
edm) `_source_weights`. A file that is not a checkpoint of the named format (garbage, empty,
truncated, another format's) ends the run with one line naming it, and nothing is written.
A checkpoint whose shapes do not fit its config is refused, naming the first parameter; so
is every config value memvol's network cannot express. When memvol (jax,
flax) is importable too, the folder is loaded back; otherwise check it where memvol runs:
  python -c "from memvol import pretrained; pretrained.load_model('OUT')"

torch.load of a whole module (diffusers, hasegawa) and every NVlabs/edm pickle (the
persistence module stores the network's source and executes it on load) unpickle CKPT,
which runs code: convert only checkpoints you trust. memvol never unpickles weights itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Mapping

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG_FILE, WEIGHTS_FILE = "config.json", "diffusion_pytorch_model.safetensors"  # = memvol.pretrained's
NESTED = ("state_dict", "ema", "ema_model", "model")
FORMATS = ("diffusers", "pytorch-ddpm", "hasegawa", "edm")
EXPECTED = {"diffusers": "diffusers UNet2DModel checkpoint", "pytorch-ddpm": "pytorch-ddpm ckpt.pt",  # what a file should be
            "hasegawa": "Hasegawa & Yasuda model file", "edm": "NVlabs/edm network-snapshot .pkl or training-state .pt"}
TIME_TABLE_KEY = "time_embedding.timembedding.0.weight"
TIME_TABLE_ATOL = 2e-4  # float32 rounding of n w_k at n < 1000 moves a table entry by < 1e-4

# pytorch-ddpm's CIFAR-10 settings (its config/CIFAR10.txt, PIA's and SecMI's victims).
# num_groups is not one of its flags: its model.py hard-codes GroupNorm(32, ...).
DDPM_FLAGS: dict[str, Any] = {"T": 1000, "ch": 128, "ch_mult": [1, 2, 2, 2], "attn": [1],
                              "num_res_blocks": 2, "dropout": 0.1, "img_size": 32, "num_groups": 32,
                              "beta_1": 1e-4, "beta_T": 0.02, "mean_type": "epsilon"}
_DDPM_MULTI = ("ch_mult", "attn")

# A spec row: (source key, memvol-folder key or None = not used, source shape, layout change).
Spec = list[tuple[str, "str | None", tuple[int, ...], str]]


class MismatchError(ValueError):
  """A checkpoint that does not fit its config."""


# --- pytorch-ddpm (pure numpy) ---------------------------------------------------------


def read_ddpm_flagfile(path: str | None) -> dict[str, Any]:
  """The architecture flags of pytorch-ddpm's absl flagfile (`--name=value` lines; ch_mult
  and attn repeat), over DDPM_FLAGS."""
  flags = dict(DDPM_FLAGS)
  if not path:
    return flags
  multi: dict[str, list[int]] = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line.startswith("--") or "=" not in line:
        continue
      name, value = line[2:].split("=", 1)
      if name in _DDPM_MULTI:
        multi.setdefault(name, []).append(int(value))
      elif name in ("T", "ch", "num_res_blocks", "img_size"):
        flags[name] = int(value)
      elif name in ("dropout", "beta_1", "beta_T"):
        flags[name] = float(value)
      elif name == "mean_type":
        flags[name] = value
  return {**flags, **multi}


def ddpm_config(flags: Mapping[str, Any]) -> dict[str, Any]:
  """memvol's folder config of pytorch-ddpm's UNet(T, ch, ch_mult, attn, num_res_blocks):
  GroupNorm(num_groups, default 32) and eps 1e-5 everywhere, symmetric padding 1 in the downsample, one
  attention head, time embedding w_k = 10000^(-2k / ch) with (sin, cos) interleaved."""
  if flags.get("mean_type", "epsilon") != "epsilon":
    raise ValueError(f"unsupported pytorch-ddpm flag: mean_type={flags['mean_type']!r} (memvol needs a "
                     "noise-predicting network, mean_type=epsilon)")
  ch, mult = int(flags["ch"]), [int(m) for m in flags["ch_mult"]]
  attn = sorted(int(a) for a in flags["attn"])
  if any(not 0 <= a < len(mult) for a in attn):
    raise ValueError(f"pytorch-ddpm attn={attn}: levels must be in 0..{len(mult) - 1}")
  size = int(flags["img_size"])
  return {
      "_class_name": "UNet2DModel", "sample_size": size, "in_channels": 3, "out_channels": 3,
      "block_out_channels": [ch * m for m in mult], "layers_per_block": int(flags["num_res_blocks"]),
      "down_block_types": ["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(mult))],
      "up_block_types": ["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(mult)))],
      "norm_num_groups": int(flags["num_groups"]), "norm_eps": 1e-5, "attention_head_dim": None, "downsample_padding": 1,
      "flip_sin_to_cos": False, "freq_shift": 0, "sin_cos_interleaved": True, "act_fn": "silu",
      "num_train_timesteps": int(flags["T"]), "dropout": float(flags["dropout"]),
      # the VP-SDE its linear betas discretise (beta_i = beta(i / (T - 1)) / T): memvol's
      # config.sde must say the same (the default, 0.1 .. 20, for beta_1 1e-4, beta_T 0.02)
      "_source_sde": {"beta_min": float(flags["beta_1"]) * int(flags["T"]),
                      "beta_max": float(flags["beta_T"]) * int(flags["T"])},
  }


def _resblock(src: str, dst: str, cin: int, cout: int, tdim: int, names: Mapping[str, str]) -> Spec:
  """Rows of one residual block; `names` maps the roles norm1 conv1 temb norm2 conv2 to the
  source's submodule names (shortcut: see callers)."""
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


_DDPM_RES = {"norm1": "block1.0", "conv1": "block1.2", "temb": "temb_proj.1", "norm2": "block2.0",
             "conv2": "block2.3"}


def _ddpm_res(src: str, dst: str, cin: int, cout: int, tdim: int, attn_dst: str | None) -> Spec:
  rows = _resblock(src, dst, cin, cout, tdim, _DDPM_RES)
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


def ddpm_spec(flags: Mapping[str, Any]) -> Spec:
  """Every parameter of pytorch-ddpm's UNet, in its state dict's order, with its key in
  memvol's folder (diffusers names)."""
  T, ch, mult = int(flags["T"]), int(flags["ch"]), [int(m) for m in flags["ch_mult"]]
  attn, nres, tdim = {int(a) for a in flags["attn"]}, int(flags["num_res_blocks"]), 4 * int(flags["ch"])
  levels = len(mult)
  rows: Spec = [(TIME_TABLE_KEY, None, (T, ch), "time_table")]
  for s, d, shape in (("time_embedding.timembedding.1", "time_embedding.linear_1", (tdim, ch)),
                                     ("time_embedding.timembedding.3", "time_embedding.linear_2", (tdim, tdim))):
    rows += [(f"{s}.weight", f"{d}.weight", shape, "same"), (f"{s}.bias", f"{d}.bias", (tdim,), "same")]
  rows += [("head.weight", "conv_in.weight", (ch, 3, 3, 3), "same"), ("head.bias", "conv_in.bias", (ch,), "same")]
  chs, now, n = [ch], ch, 0
  for i, m in enumerate(mult):
    for j in range(nres):
      rows += _ddpm_res(f"downblocks.{n}", f"down_blocks.{i}.resnets.{j}", now, ch * m, tdim,
                        f"down_blocks.{i}.attentions.{j}" if i in attn else None)
      now, n = ch * m, n + 1
      chs.append(now)
    if i != levels - 1:
      rows += [(f"downblocks.{n}.main.weight", f"down_blocks.{i}.downsamplers.0.conv.weight", (now, now, 3, 3), "same"),
               (f"downblocks.{n}.main.bias", f"down_blocks.{i}.downsamplers.0.conv.bias", (now,), "same")]
      n += 1
      chs.append(now)
  rows += _ddpm_res("middleblocks.0", "mid_block.resnets.0", now, now, tdim, "mid_block.attentions.0")
  rows += _ddpm_res("middleblocks.1", "mid_block.resnets.1", now, now, tdim, None)
  n = 0
  for i in reversed(range(levels)):
    u = levels - 1 - i
    for j in range(nres + 1):
      cin = chs.pop() + now
      rows += _ddpm_res(f"upblocks.{n}", f"up_blocks.{u}.resnets.{j}", cin, ch * mult[i], tdim,
                        f"up_blocks.{u}.attentions.{j}" if i in attn else None)
      now, n = ch * mult[i], n + 1
    if i != 0:
      rows += [(f"upblocks.{n}.main.weight", f"up_blocks.{u}.upsamplers.0.conv.weight", (now, now, 3, 3), "same"),
               (f"upblocks.{n}.main.bias", f"up_blocks.{u}.upsamplers.0.conv.bias", (now,), "same")]
      n += 1
  rows += [("tail.0.weight", "conv_norm_out.weight", (now,), "same"), ("tail.0.bias", "conv_norm_out.bias", (now,), "same"),
           ("tail.2.weight", "conv_out.weight", (3, now, 3, 3), "same"), ("tail.2.bias", "conv_out.bias", (3,), "same")]
  return rows


def ddpm_time_table(T: int, d: int) -> np.ndarray:
  """pytorch-ddpm's TimeEmbedding table [T, d] in float64: row n = (sin n w_0, cos n w_0,
  sin n w_1, ...), w_k = 10000^(-2k / d)."""
  w = np.exp(-np.arange(0, d, 2) / d * math.log(10000.0))
  a = np.arange(T, dtype=np.float64)[:, None] * w[None, :]
  return np.stack([np.sin(a), np.cos(a)], axis=-1).reshape(T, d)


# --- Hasegawa & Yasuda's UNet (pure numpy) ---------------------------------------------


def read_hasegawa_yaml(path: str) -> dict[str, Any]:
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


def hasegawa_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """memvol's folder config of their UNet (4 levels of channel1, channel2 x 3, 2 blocks
  down and 3 up per level, attention at the second level: after both blocks down, after
  the last one up; GroupNorm eps 1e-6; Dense(temb) without a swish; time embedding
  w_k = max_positions^(-k / (emb_dim1/2 - 1)), sin then cos). ValueError naming the first
  value memvol cannot express."""
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
      "_class_name": "UNet2DModel", "sample_size": h, "in_channels": c, "out_channels": c,
      "block_out_channels": [c1, c2, c2, c2], "layers_per_block": 2,
      "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
      "norm_num_groups": groups, "norm_eps": 1e-6, "attention_head_dim": None, "downsample_padding": 0,
      "flip_sin_to_cos": False, "freq_shift": 1, "time_embedding_dim": int(temb["emb_dim2"]),
      "resnet_temb_act": False, "up_attention": "last", "act_fn": "silu",
      "dropout": float(u.get("dropout", 0.0)),
      "_source_sde": {k: cfg["sde"][k] for k in ("beta_min", "beta_max", "T", "eps") if k in cfg.get("sde", {})},
  }


_HASEGAWA_RES = {"norm1": "GroupNorm_1", "conv1": "Conv_1", "temb": "Dense", "norm2": "GroupNorm_2",
                 "conv2": "Conv_2"}


def _hasegawa_res(src: str, dst: str, cin: int, cout: int, tdim: int) -> Spec:
  used = cin != cout  # every block has a NIN shortcut; only those that change channels use it
  return _resblock(src, dst, cin, cout, tdim, _HASEGAWA_RES) + [
      (f"{src}.NIN.W", f"{dst}.conv_shortcut.weight" if used else None, (cin, cout), "nin_to_conv1x1"),
      (f"{src}.NIN.b", f"{dst}.conv_shortcut.bias" if used else None, (cout,), "same")]


def _hasegawa_attn(src: str, dst: str, c: int) -> Spec:
  rows: Spec = [(f"{src}.GroupNorm.weight", f"{dst}.group_norm.weight", (c,), "same"),
                (f"{src}.GroupNorm.bias", f"{dst}.group_norm.bias", (c,), "same")]
  for s, d in (("NIN_q", "to_q"), ("NIN_k", "to_k"), ("NIN_v", "to_v"), ("NIN_tot", "to_out.0")):
    rows += [(f"{src}.{s}.W", f"{dst}.{d}.weight", (c, c), "nin_to_linear"),
             (f"{src}.{s}.b", f"{dst}.{d}.bias", (c,), "same")]
  return rows


def hasegawa_spec(cfg: Mapping[str, Any]) -> Spec:
  """Every parameter of their UNet in its construction order, with its key in memvol's
  folder; NIN shortcuts of blocks that keep their channel count map to None (unused)."""
  u = cfg["unet"]
  c1, c2, cin = int(u["channel1"]), int(u["channel2"]), int(cfg["data"]["channel"])
  d1, tdim = int(u["time_embedding"]["emb_dim1"]), int(u["time_embedding"]["emb_dim2"])
  rows: Spec = [("Conv1.weight", "conv_in.weight", (c1, cin, 3, 3), "same"), ("Conv1.bias", "conv_in.bias", (c1,), "same"),
                ("TimeEmbedding.linear_1.weight", "time_embedding.linear_1.weight", (tdim, d1), "same"),
                ("TimeEmbedding.linear_1.bias", "time_embedding.linear_1.bias", (tdim,), "same"),
                ("TimeEmbedding.linear_2.weight", "time_embedding.linear_2.weight", (tdim, tdim), "same"),
                ("TimeEmbedding.linear_2.bias", "time_embedding.linear_2.bias", (tdim,), "same")]
  res = lambda name, dst, i, o: _hasegawa_res(f"ResnetBlock_{name}", dst, i, o, tdim)
  conv = lambda src, dst, c: [(f"{src}.Conv.weight", f"{dst}.conv.weight", (c, c, 3, 3), "same"),
                              (f"{src}.Conv.bias", f"{dst}.conv.bias", (c,), "same")]
  down_in = [(c1, c1), (c1, c2), (c2, c2), (c2, c2)]
  for lvl in range(4):
    first, ch = down_in[lvl]
    for j in range(2):
      rows += res(f"D{lvl + 1}{j + 1}", f"down_blocks.{lvl}.resnets.{j}", first if j == 0 else ch, ch)
      if lvl == 1:
        rows += _hasegawa_attn(f"AttnBlock_D2{j + 1}", f"down_blocks.1.attentions.{j}", c2)
    if lvl < 3:
      rows += conv(f"Downsample_{lvl + 1}", f"down_blocks.{lvl}.downsamplers.0", ch)
  rows += res("C1", "mid_block.resnets.0", c2, c2) + _hasegawa_attn("AttnBlock_C", "mid_block.attentions.0", c2)
  rows += res("C2", "mid_block.resnets.1", c2, c2)
  up_in = {1: [2 * c2] * 3, 2: [2 * c2] * 3, 3: [2 * c2, 2 * c2, c2 + c1], 4: [c2 + c1, 2 * c1, 2 * c1]}
  for k in range(1, 5):
    out = c1 if k == 4 else c2
    for j in range(3):
      rows += res(f"U{k}{j + 1}", f"up_blocks.{k - 1}.resnets.{j}", up_in[k][j], out)
    if k == 3:
      rows += _hasegawa_attn("AttnBlock_U3", "up_blocks.2.attentions.2", c2)
    if k < 4:
      rows += conv(f"Upsample_{k}", f"up_blocks.{k - 1}.upsamplers.0", c2)
  rows += [("GroupNorm.weight", "conv_norm_out.weight", (c1,), "same"), ("GroupNorm.bias", "conv_norm_out.bias", (c1,), "same"),
           ("Conv2.weight", "conv_out.weight", (cin, c1, 3, 3), "same"), ("Conv2.bias", "conv_out.bias", (cin,), "same")]
  return rows


# --- NVlabs/edm (pure numpy) -----------------------------------------------------------

EDM_PRECONDS = {"VPPrecond": "vp", "VEPrecond": "ve", "EDMPrecond": "edm"}
# The preconditioners' constructor fields memvol records (the rest: img_resolution,
# img_channels, label_dim, model_type go to the network's own fields).
EDM_PRECOND_FIELDS = {"vp": ("beta_d", "beta_min", "M", "epsilon_t", "use_fp16"),
                      "ve": ("sigma_min", "sigma_max", "use_fp16"),
                      "edm": ("sigma_min", "sigma_max", "sigma_data", "use_fp16")}
EDM_NET_FIELDS = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim", "model_channels",
                  "channel_mult", "channel_mult_emb", "num_blocks", "attn_resolutions", "dropout", "label_dropout",
                  "embedding_type", "channel_mult_noise", "encoder_type", "decoder_type", "resample_filter",
                  "skip_connections")  # the last: sail-sg/DiffMemorize's SongUNet
EDM_UNUSED = ("map_augment.weight",)  # the augmentation-label layer: sampling never passes labels


def _refuse_edm(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"unsupported NVlabs/edm network: {field}={value!r} ({why})")


def _json_value(v: Any) -> Any:
  if isinstance(v, (list, tuple)):
    return [_json_value(x) for x in v]
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v.item() if hasattr(v, "item") else v


def edm_config(precond_class: str, precond_kwargs: Mapping[str, Any], model_class: str,
               model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """memvol's folder config of an NVlabs/edm network: the preconditioner's class name and
  constructor kwargs (`init_kwargs` of the pickled object), its inner model's class name and
  kwargs. ValueError naming what memvol cannot express (iDDPMPrecond, DhariwalUNet, class
  labels); infinite sigma limits become null."""
  if precond_class not in EDM_PRECONDS:
    why = ("its network also predicts variances and its c_noise indexes a 1000-step sigma grid; not ported"
           if precond_class == "iDDPMPrecond" else f"supported: {sorted(EDM_PRECONDS)}")
    raise _refuse_edm("preconditioning", precond_class, why)
  if model_class != "SongUNet":
    why = "ADM is not ported" if model_class == "DhariwalUNet" else "supported: SongUNet (DDPM++, NCSN++)"
    raise _refuse_edm("model_type", model_class, why)
  precond = EDM_PRECONDS[precond_class]
  if int(model_kwargs.get("label_dim", 0) or 0):
    raise _refuse_edm("label_dim", model_kwargs["label_dim"], "class-conditional networks are not supported")
  unknown = sorted(k for k in model_kwargs if k not in EDM_NET_FIELDS)
  if unknown:
    raise _refuse_edm(unknown[0], model_kwargs[unknown[0]], "not a SongUNet argument memvol knows")
  config = {"_class_name": "SongUNet", "precond": precond,
            **{k: _json_value(v) for k, v in model_kwargs.items()},
            **{k: _json_value(precond_kwargs[k]) for k in EDM_PRECOND_FIELDS[precond] if k in precond_kwargs}}
  for field, allowed in (("encoder_type", ("standard", "residual")), ("decoder_type", ("standard",)),
                         ("embedding_type", ("positional", "fourier"))):
    if field in config and config[field] not in allowed:
      raise _refuse_edm(field, config[field], f"supported: {allowed}")
  if precond == "vp" and int(config.get("M", 1000)) != 1000:
    raise _refuse_edm("M", config["M"], "memvol feeds a VP network 999 t, EDM's (M - 1) t with M = 1000")
  return config


def edm_resample_kernel(taps) -> np.ndarray:
  """NVlabs' registered resample filter buffer [1, 1, k, k] of its taps, in float32."""
  f = np.asarray(taps, np.float32)
  return (np.outer(f, f) / np.square(f.sum()))[None, None].astype(np.float32)


def edm_state(state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
  """(memvol-folder state dict, dropped keys) of an NVlabs/edm preconditioner's state dict
  (numpy, keys `model.<...>`): the `model.` prefix removed; every resample_filter buffer
  checked to equal the config's filter and dropped (memvol computes it); map_augment dropped.
  Shapes are checked when memvol loads the folder. ValueError naming a buffer that differs."""
  taps = config.get("resample_filter", [1, 1])
  want = edm_resample_kernel(taps)
  out, dropped = {}, []
  for key, w in state.items():
    if not key.startswith("model."):
      raise MismatchError(f"the NVlabs/edm checkpoint has {key}, outside the preconditioner's `model`")
    name = key.removeprefix("model.")
    if name.endswith(".resample_filter"):
      if w.shape != want.shape or not np.array_equal(np.asarray(w, np.float32), want):
        raise ValueError(f"{key}: resample filter {np.asarray(w).reshape(-1)[:4].tolist()}... is not the one of "
                         f"resample_filter={taps}; memvol cannot express it")
    elif name in EDM_UNUSED:
      dropped.append(name)
    else:
      out[name] = np.ascontiguousarray(np.asarray(w, np.float32))
  return out, dropped


# --- the mapping (pure numpy) ----------------------------------------------------------


_LAYOUT = {"same": lambda w: w, "conv1x1_to_linear": lambda w: w.reshape(w.shape[:2]),
           "nin_to_linear": lambda w: w.T, "nin_to_conv1x1": lambda w: w.T[:, :, None, None]}


def map_state(state: Mapping[str, np.ndarray], spec: Spec, what: str) -> tuple[dict[str, np.ndarray], float]:
  """(memvol-folder state dict float32, max |time table - sinusoid| or 0) of a source state
  dict (numpy) by its spec. MismatchError naming the first parameter (in the spec's order)
  that is missing or misshapen, else the first unexpected one; ValueError for a time table
  that is not the sinusoid."""
  out, table_err = {}, 0.0
  for key, dst, shape, layout in spec:
    if key not in state:
      raise MismatchError(f"the {what} checkpoint does not fit its config: parameter {key} is missing "
                          f"(the config needs shape {shape})")
    w = np.asarray(state[key])
    if tuple(w.shape) != tuple(shape):
      raise MismatchError(f"the {what} checkpoint does not fit its config: parameter {key} has shape "
                          f"{tuple(w.shape)}, the config needs {tuple(shape)}")
    if layout == "time_table":
      table_err = float(np.max(np.abs(w.astype(np.float64) - ddpm_time_table(*shape))))
      if not table_err <= TIME_TABLE_ATOL:
        raise ValueError(f"{key}: the time embedding table is not pytorch-ddpm's interleaved sinusoid "
                         f"(max deviation {table_err:.3g} > {TIME_TABLE_ATOL}); memvol cannot express it")
    elif dst is not None:
      out[dst] = np.ascontiguousarray(_LAYOUT[layout](w.astype(np.float32)))
  known = {row[0] for row in spec}
  extra = [k for k in state if k not in known]
  if extra:
    raise MismatchError(f"the {what} checkpoint does not fit its config: unexpected parameter {extra[0]}"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  return out, table_err


# --- torch ----------------------------------------------------------------------------


def sniff(path: str) -> str:
  """What the file at `path` is by its first bytes: "zip" (torch.save's archive), "pickle"
  (protocol 2+: a plain pickle or torch's legacy format), "empty" or "unknown".
  FileNotFoundError when it does not exist."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (or is not a file)")
  with open(path, "rb") as f:
    head = f.read(4)
  if not head:
    return "empty"
  return "zip" if head == b"PK\x03\x04" else "pickle" if head[:1] == b"\x80" else "unknown"


def load_checkpoint(path: str, what: str, weights_only: bool) -> Any:
  """torch.load(path) (on the CPU), or one ValueError naming `path` and `what` was expected
  when the file is not one: empty, garbage, truncated, or (weights_only) a pickle of code
  objects such as an NVlabs/edm network."""
  import pickle
  import torch
  kind = sniff(path)
  if kind in ("empty", "unknown"):
    raise ValueError(f"{path} is not a {what}: {'an empty file' if kind == 'empty' else 'neither a torch archive nor a pickle'}")
  try:
    return torch.load(path, map_location="cpu", weights_only=weights_only)
  except pickle.UnpicklingError as e:
    if weights_only:
      raise ValueError(f"{path} is not a {what}: it pickles code objects, not only tensors (an NVlabs/edm "
                       "network-snapshot .pkl or training-state .pt? convert it with --format=edm)") from e
    raise ValueError(f"{path} is not a {what}: a damaged pickle ({str(e).splitlines()[0][:160]})") from e
  except (RuntimeError, EOFError, ValueError, OSError, ModuleNotFoundError, AttributeError) as e:
    first = (str(e).splitlines() or [""])[0][:160]
    damaged = "a damaged or truncated torch archive" if kind == "zip" else "an unreadable pickle"
    raise ValueError(f"{path} is not a {what}: {damaged} ({type(e).__name__}: {first})") from e


def _numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  import torch
  return {k.removeprefix("module."): v.detach().to(torch.float64).cpu().numpy() if v.is_floating_point()
          else v.cpu().numpy() for k, v in state.items() if torch.is_tensor(v)}


def _diffusers_state_and_config(obj, config_path: str | None) -> tuple[dict, dict]:
  import torch
  config = None
  if isinstance(obj, torch.nn.DataParallel):
    obj = obj.module
  if isinstance(obj, torch.nn.Module):
    config = dict(getattr(obj, "config", {}) or {}) or None
    if config is not None:
      config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
      config["_class_name"] = type(obj).__name__
    obj = obj.state_dict()
  while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
    key = next((k for k in NESTED if k in obj), None)
    if key is None:
      raise ValueError(f"no state dict found (top-level keys: {sorted(obj)[:10]})")
    obj = obj[key]
    if isinstance(obj, torch.nn.Module):
      return _diffusers_state_and_config(obj, config_path)
  state = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
  if any(k.startswith(("ResnetBlock_", "AttnBlock_", "TimeEmbedding.")) for k in state):
    raise ValueError("this is Hasegawa & Yasuda's UNet (ResnetBlock_D11, NIN_q, ...), not a diffusers "
                     "UNet2DModel: convert it with --format=hasegawa --source=THEIR_REPO --config=config/<dataset>.yaml")
  if any(k.startswith(("downblocks.", "time_embedding.timembedding.")) for k in state):
    raise ValueError("this is a pytorch-ddpm state dict (downblocks, time_embedding.timembedding, ...): "
                     "convert it with --format=pytorch-ddpm")
  if config_path:
    with open(config_path) as f:
      config = json.load(f)
  if config is None:
    raise ValueError("a bare state dict needs --config=config.json (its UNet2DModel config)")
  return {k: v.detach().float().cpu().numpy() for k, v in state.items()}, config


def _found(obj: Any) -> str:
  return f"top-level keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"


def _pytorch_ddpm(args) -> tuple[dict, dict]:
  ckpt = load_checkpoint(args.checkpoint, EXPECTED["pytorch-ddpm"], weights_only=True)
  key = {"ema": "ema_model", "net": "net_model"}[args.weights]
  if not isinstance(ckpt, dict) or key not in ckpt:
    raise ValueError(f"{args.checkpoint} is not a pytorch-ddpm ckpt.pt: no {key!r} (it holds net_model and "
                     f"ema_model; found {_found(ckpt)})")
  flags = {**read_ddpm_flagfile(args.flagfile), "num_groups": int(args.num_groups)}
  config = ddpm_config(flags)
  state, table_err = map_state(_numpy(ckpt[key]), ddpm_spec(flags), "pytorch-ddpm")
  config.update({"_source_weights": key, "_time_table_max_abs_error": table_err})
  return state, config


def hasegawa_module_state(module) -> dict[str, np.ndarray]:
  """Their UNet's tensors by name: the state dict, plus every NIN's W and b whether or not
  they are registered parameters."""
  import torch
  if isinstance(module, torch.nn.DataParallel):
    module = module.module
  if type(module).__name__ != "UNet" or not hasattr(module, "ResnetBlock_D11"):
    raise ValueError(f"not Hasegawa & Yasuda's UNet (got {type(module).__module__}.{type(module).__name__})")
  for name, m in module.named_modules():
    if isinstance(m, torch.nn.GroupNorm) and m.eps != 1e-6:
      raise ValueError(f"{name}: GroupNorm eps {m.eps}, memvol's folder for this format has 1e-6")
  tensors = dict(module.state_dict())
  for name, m in module.named_modules():
    if type(m).__name__ == "NIN":
      tensors[f"{name}.W"], tensors[f"{name}.b"] = m.W, m.b
  return _numpy(tensors)


def import_hasegawa_unet(source: str):
  """Their src.models.unet module from the repository at `source`, registered under that
  name (the one their pickles refer to) without running src/models/__init__.py, which
  imports their sampler and torchvision."""
  import importlib.util
  import types
  path = os.path.join(source, "src", "models", "unet.py")
  if not os.path.exists(path):
    raise ValueError(f"--source={source!r} must be their repository (with src/models/unet.py), "
                     "needed to unpickle the model")
  if "src.models.unet" in sys.modules:
    return sys.modules["src.models.unet"]
  for name, sub in (("src", "src"), ("src.models", os.path.join("src", "models"))):
    if name not in sys.modules:
      package = types.ModuleType(name)
      package.__path__ = [os.path.join(source, sub)]
      sys.modules[name] = package
  spec = importlib.util.spec_from_file_location("src.models.unet", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["src.models.unet"] = module
  spec.loader.exec_module(module)
  return module


def _hasegawa(args) -> tuple[dict, dict]:
  import torch
  if not args.config:
    raise ValueError("--format=hasegawa needs --config=THEIR_REPO/config/<dataset>.yaml")
  import_hasegawa_unet(os.path.abspath(args.source or ""))
  cfg = read_hasegawa_yaml(args.config)
  config = hasegawa_config(cfg)
  module = load_checkpoint(args.checkpoint, EXPECTED["hasegawa"], weights_only=False)
  if not isinstance(module, torch.nn.Module):
    raise ValueError(f"{args.checkpoint} is not a Hasegawa & Yasuda model file (a pickled UNet module); found {_found(module)}")
  state, _ = map_state(hasegawa_module_state(module), hasegawa_spec(cfg), "Hasegawa & Yasuda")
  return state, config


def load_edm(path: str, edm_repo: str | None) -> Any:
  """The object in an NVlabs/edm network-snapshot-*.pkl (a plain pickle) or training-state
  -*.pt (torch.save), unpickled with the checkout `edm_repo` on sys.path (its torch_utils
  and dnnlib; the pickled networks carry their source and run it)."""
  import pickle
  if not edm_repo or not os.path.isdir(os.path.join(edm_repo, "torch_utils")):
    raise ValueError(f"--format=edm needs --edm_repo=PATH, a checkout of NVlabs/edm (its torch_utils and dnnlib "
                     f"unpickle the network); got {edm_repo!r}")
  sys.path.insert(0, os.path.abspath(edm_repo))
  what = EXPECTED["edm"]
  kind = sniff(path)
  if kind != "pickle":
    return load_checkpoint(path, what, weights_only=False)
  import torch  # noqa: F401  (the pickle refers to torch's classes)
  try:
    with open(path, "rb") as f:
      return pickle.load(f)
  except (pickle.UnpicklingError, EOFError, ValueError, ModuleNotFoundError, AttributeError, RuntimeError) as e:
    first = (str(e).splitlines() or [""])[0][:160]
    raise ValueError(f"{path} is not a {what}: an unreadable or truncated pickle ({type(e).__name__}: {first})") from e


def _edm(args) -> tuple[dict, dict]:
  import torch
  obj = load_edm(args.checkpoint, args.edm_repo)
  if isinstance(obj, dict) and ({"ema_model", "net_model"} & set(obj)):
    raise ValueError(f"{args.checkpoint} is not an NVlabs/edm checkpoint: it holds ema_model / net_model, a "
                     "pytorch-ddpm ckpt.pt: convert it with --format=pytorch-ddpm")
  if not isinstance(obj, dict) or args.weights not in obj:
    raise ValueError(f"{args.checkpoint} is not an NVlabs/edm checkpoint with {args.weights!r} weights (a "
                     "network-snapshot-*.pkl holds 'ema', a training-state-*.pt 'net': choose with --weights); "
                     f"found {_found(obj)}")
  net = obj[args.weights]
  if not isinstance(net, torch.nn.Module) or not hasattr(net, "init_kwargs") or not hasattr(net, "model"):
    raise ValueError(f"{args.checkpoint}: {args.weights!r} is {type(net).__name__}, not an NVlabs/edm "
                     "preconditioned network (VPPrecond, VEPrecond, EDMPrecond)")
  config = edm_config(type(net).__name__, net.init_kwargs, type(net.model).__name__, net.model.init_kwargs)
  state, dropped = edm_state(_numpy(net.state_dict()), config)
  config.update({"_source_weights": args.weights, "_source_class": type(net).__name__})
  if dropped:
    config["_dropped_unused"] = dropped
  return state, config


def convert(args) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state, config) of the folder for the parsed command line. A file that is empty or
  neither a torch archive nor a pickle is refused before torch is imported."""
  kind = sniff(args.checkpoint)
  if kind in ("empty", "unknown"):
    what = "an empty file" if kind == "empty" else "neither a torch archive nor a pickle"
    raise ValueError(f"{args.checkpoint} is not a {EXPECTED[args.format]}: {what}")
  if args.format == "pytorch-ddpm":
    state, config = _pytorch_ddpm(args)
  elif args.format == "hasegawa":
    state, config = _hasegawa(args)
  elif args.format == "edm":
    state, config = _edm(args)
  else:
    state, config = _diffusers_state_and_config(
        load_checkpoint(args.checkpoint, EXPECTED["diffusers"], weights_only=False), args.config)
  config.update({"_source_format": args.format, "_source_checkpoint": os.path.basename(args.checkpoint)})
  return state, config


def write_folder(out: str, state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
  from safetensors.numpy import save_file
  os.makedirs(out, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()},
            os.path.join(out, WEIGHTS_FILE), metadata={"format": "pt"})
  with open(os.path.join(out, CONFIG_FILE), "w") as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint")
  p.add_argument("out")
  p.add_argument("--format", choices=FORMATS, default="diffusers")
  p.add_argument("--config", default=None,
                 help="diffusers: UNet2DModel config.json (for a bare state dict); hasegawa: their dataset yaml")
  p.add_argument("--weights", choices=("ema", "net"), default="ema",
                 help="pytorch-ddpm: ema_model or net_model; edm: a snapshot's ema or a training state's net")
  p.add_argument("--flagfile", default=None, help="pytorch-ddpm: its absl flagfile (default: its CIFAR-10 settings)")
  p.add_argument("--num-groups", type=int, default=32,
                 help="pytorch-ddpm: GroupNorm groups (its model.py hard-codes 32)")
  p.add_argument("--source", default=None, help="hasegawa: their repository, to unpickle the model")
  p.add_argument("--edm_repo", "--edm-repo", default=None, help="edm: a checkout of NVlabs/edm, to unpickle the network")
  return p


def main(argv: list[str] | None = None) -> None:
  """Convert; a checkpoint that is not one of the named format (or does not fit its
  config) exits with one line naming the file, before anything is written."""
  args = parser().parse_args(argv)
  try:
    from memvol import pretrained
  except ImportError:  # no jax here: write the folder, check it where memvol runs
    pretrained = None
  try:
    state, config = convert(args)
    if pretrained is not None:
      model, shape = pretrained.model_from_config(config)
      pretrained.params_from_state_dict(state, model, shape)  # refuses weights that do not fit
  except (ValueError, FileNotFoundError) as e:
    msg = " ".join(str(e).split())
    sys.exit(f"error: {msg if args.checkpoint in msg else f'{args.checkpoint}: {msg}'}")
  write_folder(args.out, state, config)
  sde = config.get("_source_sde", {})
  if sde and not (math.isclose(sde.get("beta_min", 0.1), 0.1) and math.isclose(sde.get("beta_max", 20.0), 20.0)):
    print(f"note: the model was trained on the VP-SDE beta {sde.get('beta_min')} .. {sde.get('beta_max')}; "
          f"score it with --config.sde.beta_min={sde.get('beta_min')} --config.sde.beta_max={sde.get('beta_max')}")
  n = sum(int(np.prod(v.shape)) for v in state.values())
  if pretrained is not None:
    pretrained.load_model(args.out)
    print(f"{args.out}: {n:,} params ({args.format}), loads in memvol")
  else:
    print(f"{args.out}: {n:,} params ({args.format}) written; memvol (jax) not importable here, so not "
          f"checked: python -c \"from memvol import pretrained; pretrained.load_model('{args.out}')\"")


if __name__ == "__main__":
  main()
