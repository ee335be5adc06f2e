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
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def timestep_embedding(t_net: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding [B, dim] of network times t_net [B] (999 t), DDPM's form:
  sin(t w_k) then cos(t w_k), w_k = max_period^(-k / (dim/2 - 1))."""
  if dim < 4 or dim % 2:
    raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
  args = t_net.astype(jnp.result_type(t_net.dtype, jnp.float32))[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def _zeros_init():
  return nn.initializers.zeros_init()


class ResBlock(nn.Module):
  """GroupNorm, swish, conv, + Dense(temb), GroupNorm, swish, dropout, conv (zero init);
  a 1x1 conv shortcut when the channel count changes."""

  out_ch: int
  num_groups: int
  dropout: float

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool) -> Array:
    h = nn.swish(nn.GroupNorm(num_groups=self.num_groups, name="norm1")(x))
    h = nn.Conv(self.out_ch, (3, 3), name="conv1")(h)
    h = h + nn.Dense(self.out_ch, name="temb_proj")(nn.swish(temb))[:, None, None, :]
    h = nn.swish(nn.GroupNorm(num_groups=self.num_groups, name="norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=_zeros_init(), name="conv2")(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1), name="shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H W positions, residual, zero-initialised output."""

  num_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hh, ww, c = x.shape
    h = nn.GroupNorm(num_groups=self.num_groups, name="norm")(x).reshape(b, hh * ww, c)
    q, k, v = (nn.Dense(c, name=n)(h) for n in ("q", "k", "v"))
    w = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) / math.sqrt(c), axis=-1)
    h = jnp.einsum("bij,bjc->bic", w, v)
    h = nn.Dense(c, kernel_init=_zeros_init(), name="proj_out")(h)
    return x + h.reshape(b, hh, ww, c)


class Downsample(nn.Module):
  """3x3 conv with stride 2: side H -> ceil(H / 2)."""

  ch: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.Conv(self.ch, (3, 3), strides=(2, 2), padding="SAME", name="conv")(x)


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

  @nn.compact
  def __call__(self, x: Array, t_net: Array, train: bool = False) -> Array:
    if x.ndim != 4:
      raise ValueError(f"UNet takes x [B, H, W, C], got shape {x.shape}")
    t_net = jnp.broadcast_to(jnp.asarray(t_net), (x.shape[0],))
    temb = timestep_embedding(t_net, self.ch)
    temb = nn.Dense(4 * self.ch, name="temb_dense0")(temb)
    temb = nn.Dense(4 * self.ch, name="temb_dense1")(nn.swish(temb))
    attn = set(int(r) for r in self.attn_resolutions)
    g, p = self.num_groups, self.dropout
    levels = len(self.ch_mult)

    h = nn.Conv(self.ch, (3, 3), name="conv_in")(x)
    skips = [[h]]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks_down):
        h = ResBlock(self.ch * mult, g, p, name=f"down{i}_res{j}")(h, temb, train)
        if h.shape[1] in attn:
          h = AttnBlock(g, name=f"down{i}_attn{j}")(h)
        skips[i].append(h)
      if i != levels - 1:
        h = Downsample(h.shape[-1], name=f"down{i}_downsample")(h)
        skips.append([h])

    h = ResBlock(h.shape[-1], g, p, name="mid_res0")(h, temb, train)
    h = AttnBlock(g, name="mid_attn")(h)
    h = ResBlock(h.shape[-1], g, p, name="mid_res1")(h, temb, train)

    for i in reversed(range(levels)):
      level_skips = skips[i]
      for j in range(self.num_res_blocks_up):
        if level_skips:
          h = jnp.concatenate([h, level_skips.pop()], axis=-1)
        h = ResBlock(self.ch * self.ch_mult[i], g, p, name=f"up{i}_res{j}")(h, temb, train)
        if h.shape[1] in attn:
          h = AttnBlock(g, name=f"up{i}_attn{j}")(h)
      if i != 0:
        size = skips[i - 1][-1].shape[1:3]
        h = Upsample(h.shape[-1], name=f"up{i}_upsample")(h, size)

    h = nn.swish(nn.GroupNorm(num_groups=g, name="norm_out")(h))
    return nn.Conv(x.shape[-1], (3, 3), kernel_init=_zeros_init(), name="conv_out")(h)
