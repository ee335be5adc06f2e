"""DDPM / score_sde style UNet predicting eps_theta(x, t_net) (Ho et al. 2020).

Layout for ch_mult of length L (level i works at side ~ H / 2^i, with ch * ch_mult[i]
channels):

    conv_in -> per level: num_res_blocks_down x [ResBlock (+ attention)] (+ Downsample)
            -> middle: ResBlock, attention, ResBlock
            -> per level, reversed: num_res_blocks_up x [concat skip, ResBlock (+ attention)]
               (+ Upsample) -> GroupNorm, swish, conv_out (zero-initialised)

Each resolution leaves num_res_blocks_down + 1 skips (conv_in or the downsample output,
then every ResBlock); up blocks take them last-in first-out, so DDPM's num_res_blocks_up
= num_res_blocks_down + 1 uses each exactly once; extra up blocks take none. Odd sides
(14 -> 7 -> 4) work: Downsample is a stride-2 SAME conv (ceil(H / 2)) and Upsample
repeats each pixel twice and crops to the matching skip's side.

The defaults are memvol's own network. The fields after `num_groups` cover diffusers'
`UNet2DModel` (memvol.pretrained maps its weights here): GroupNorm epsilon, attention
heads of `attn_head_dim` channels, the downsample's padding and the time embedding's
`flip_sin_to_cos` / `freq_shift`; and the two DDPM UNets that membership-inference and
reproduction papers train (scripts/convert_torch_checkpoint.py): pytorch-ddpm's
(`interleave_sin_cos`: sin and cos of each frequency side by side; its lookup table over
integer steps n is this sinusoid at t_net = n, and the sinusoid defines it in between) and
Hasegawa & Yasuda's (`temb_dim` 2 ch, `resnet_temb_act` False: Dense(temb) without the
swish, `up_attn` "last": one attention per up level, after its last block). Their
defaults leave memvol's parameters and outputs as they were.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def timestep_embedding(t_net: Array, dim: int, max_period: float = 10000.0,
                       flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                       interleave: bool = False) -> Array:
  """Sinusoidal embedding [B, dim] of network times t_net [B] (999 t), DDPM's form:
  sin(t w_k) then cos(t w_k) (cos first when flip_sin_to_cos),
  w_k = max_period^(-k / (dim/2 - freq_shift)), k = 0 .. dim/2 - 1; `interleave` puts
  the pair of each k side by side (sin w_0, cos w_0, sin w_1, ...) instead of the halves
  one after the other. Computed in t_net's dtype (float32 at least)."""
  if dim < 4 or dim % 2:
    raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
  half = dim // 2
  if half - freq_shift <= 0:
    raise ValueError(f"time embedding freq_shift={freq_shift} must be < dim / 2 = {half}")
  dtype = jnp.result_type(t_net.dtype, jnp.float32)
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=dtype) / (half - freq_shift))
  args = t_net.astype(dtype)[:, None] * freqs[None, :]
  parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  if interleave:
    return jnp.stack(parts, axis=-1).reshape(args.shape[0], dim)
  return jnp.concatenate(parts, axis=-1)


def _zeros_init():
  return nn.initializers.zeros_init()


class ResBlock(nn.Module):
  """GroupNorm, swish, conv, + Dense(swish(temb)) (Dense(temb) without `temb_act`),
  GroupNorm, swish, dropout, conv (zero init); a 1x1 conv shortcut when the channel count
  changes."""

  out_ch: int
  num_groups: int
  dropout: float
  eps: float = 1e-6
  temb_act: bool = True

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool) -> Array:
    h = nn.swish(nn.GroupNorm(num_groups=self.num_groups, epsilon=self.eps, name="norm1")(x))
    h = nn.Conv(self.out_ch, (3, 3), name="conv1")(h)
    temb = nn.swish(temb) if self.temb_act else temb
    h = h + nn.Dense(self.out_ch, name="temb_proj")(temb)[:, None, None, :]
    h = nn.swish(nn.GroupNorm(num_groups=self.num_groups, epsilon=self.eps, name="norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=_zeros_init(), name="conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), name="shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Self-attention over the H W positions, residual, zero-initialised output; heads of
  `head_dim` channels (0: one head over all channels)."""

  num_groups: int
  eps: float = 1e-6
  head_dim: int = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    d = self.head_dim or c
    if c % d:
      raise ValueError(f"attention head dim {d} does not divide the channel count {c}")
    h = nn.GroupNorm(num_groups=self.num_groups, epsilon=self.eps, name="norm")(x).reshape(b, hh * ww, c)
    q, k, v = (nn.Dense(c, name=n)(h).reshape(b, hh * ww, c // d, d) for n in ("q", "k", "v"))
    w = jax.nn.softmax(jnp.einsum("bind,bjnd->bnij", q, k) / math.sqrt(d), axis=-1)
    h = jnp.einsum("bnij,bjnd->bind", w, v).reshape(b, hh * ww, c)
    h = nn.Dense(c, kernel_init=_zeros_init(), name="proj_out")(h)
    return x + h.reshape(b, hh, ww, c)


class Downsample(nn.Module):
  """3x3 conv with stride 2. padding -1: SAME, side H -> ceil(H / 2); p >= 0: diffusers'
  `downsample_padding`, p zeros on every side, except that 0 pads one row and column at
  the bottom and right (= SAME for even sides)."""

  ch: int
  padding: int = -1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.padding
    pad = "SAME" if p < 0 else ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
    return nn.Conv(self.ch, (3, 3), strides=(2, 2), padding=pad, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, cropped to side `size` (h, w), then a 3x3 conv."""

  ch: int

  @nn.compact
  def __call__(self, x: Array, size: tuple[int, int]) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)[:, :size[0], :size[1], :]
    return nn.Conv(self.ch, (3, 3), name="conv")(x)


class UNet(nn.Module):
  """eps_theta: x [B, H, W, C], t_net [B] (999 t) -> [B, H, W, C]."""

  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks_down: int = 2
  num_res_blocks_up: int = 3
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.1
  num_groups: int = 32
  norm_eps: float = 1e-6          # GroupNorm epsilon
  attn_head_dim: int = 0          # channels per attention head (0: one head)
  downsample_padding: int = -1    # -1: SAME; p >= 0: diffusers' downsample_padding
  flip_sin_to_cos: bool = False   # time embedding: cos before sin
  freq_shift: float = 1.0         # time embedding: w_k = 10000^(-k / (ch/2 - freq_shift))
  interleave_sin_cos: bool = False  # time embedding: (sin w_k, cos w_k) side by side per k
  temb_dim: int = 0               # width of the time MLP (0: 4 ch)
  resnet_temb_act: bool = True    # swish on temb before each ResBlock's Dense
  up_attn: str = "every"          # up path attention: after "every" block, or the "last" of a level

  @nn.compact
  def __call__(self, x: Array, t_net: Array, train: bool = False) -> Array:
    if x.ndim != 4:
      raise ValueError(f"UNet takes x [B, H, W, C], got shape {x.shape}")
    t_net = jnp.broadcast_to(jnp.asarray(t_net), (x.shape[0],))
    if self.up_attn not in ("every", "last"):
      raise ValueError(f"UNet.up_attn must be 'every' or 'last', got {self.up_attn!r}")
    temb = timestep_embedding(t_net, self.ch, flip_sin_to_cos=self.flip_sin_to_cos,
                              freq_shift=self.freq_shift, interleave=self.interleave_sin_cos)
    tdim = self.temb_dim or 4 * self.ch
    temb = nn.Dense(tdim, name="temb_dense0")(temb)
    temb = nn.Dense(tdim, name="temb_dense1")(nn.swish(temb))
    attn = set(int(r) for r in self.attn_resolutions)
    g, p, e = self.num_groups, self.dropout, self.norm_eps
    res = lambda c, name: ResBlock(c, g, p, e, self.resnet_temb_act, name=name)
    att = lambda name: AttnBlock(g, e, self.attn_head_dim, name=name)
    levels = len(self.ch_mult)

    h = nn.Conv(self.ch, (3, 3), name="conv_in")(x)
    skips = [[h]]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks_down):
        h = res(self.ch * mult, f"down{i}_res{j}")(h, temb, train)
        if h.shape[1] in attn:
          h = att(f"down{i}_attn{j}")(h)
        skips[i].append(h)
      if i != levels - 1:
        h = Downsample(h.shape[-1], self.downsample_padding, name=f"down{i}_downsample")(h)
        skips.append([h])

    h = res(h.shape[-1], "mid_res0")(h, temb, train)
    h = att("mid_attn")(h)
    h = res(h.shape[-1], "mid_res1")(h, temb, train)

    for i in reversed(range(levels)):
      level_skips = skips[i]
      for j in range(self.num_res_blocks_up):
        if level_skips:
          h = jnp.concatenate([h, level_skips.pop()], axis=-1)
        h = res(self.ch * self.ch_mult[i], f"up{i}_res{j}")(h, temb, train)
        if h.shape[1] in attn and (self.up_attn == "every" or j == self.num_res_blocks_up - 1):
          h = att(f"up{i}_attn{j}")(h)
      if i != 0:
        size = skips[i - 1][-1].shape[1:3]
        h = Upsample(h.shape[-1], name=f"up{i}_upsample")(h, size)

    h = nn.swish(nn.GroupNorm(num_groups=g, epsilon=e, name="norm_out")(h))
    return nn.Conv(x.shape[-1], (3, 3), kernel_init=_zeros_init(), name="conv_out")(h)
