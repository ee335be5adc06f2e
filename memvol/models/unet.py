"""DDPM / score_sde-style UNet for noise prediction (Ho et al. 2020; Song et al. 2021).

eps_theta(x [B, H, W, C], t_net [B]) -> [B, H, W, C], with t_net = 999 t. Odd sizes work:
downsampling is a stride-2 'SAME' convolution (14 -> 7 -> 4) and each upsampling resizes
to the exact size of the skip connection it meets.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding of t [B] (any scale, e.g. 999 t) -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _groups(channels: int, num_groups: int) -> int:
  """The largest group count <= num_groups that divides channels."""
  g = min(num_groups, channels)
  while channels % g:
    g -= 1
  return g


def _zero_init_scale(scale: float = 1e-10):
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


class ResnetBlock(nn.Module):
  """GroupNorm-swish-conv, time embedding added, GroupNorm-swish-dropout-conv, skip."""

  out_ch: int
  num_groups: int
  dropout: float

  @nn.compact
  def __call__(self, x: Array, temb: Array, train: bool) -> Array:
    h = nn.swish(nn.GroupNorm(_groups(x.shape[-1], self.num_groups))(x))
    h = nn.Conv(self.out_ch, (3, 3))(h)
    h = h + nn.Dense(self.out_ch)(nn.swish(temb))[:, None, None, :]
    h = nn.swish(nn.GroupNorm(_groups(self.out_ch, self.num_groups))(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_ch, (3, 3), kernel_init=_zero_init_scale())(h)
    if x.shape[-1] != self.out_ch:
      x = nn.Conv(self.out_ch, (1, 1))(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions, residual."""

  num_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    y = nn.GroupNorm(_groups(c, self.num_groups))(x)
    q, k, v = (nn.Dense(c)(y).reshape(b, h * w, c) for _ in range(3))
    a = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) / math.sqrt(c), axis=-1)
    y = jnp.einsum("bij,bjc->bic", a, v).reshape(b, h, w, c)
    return x + nn.Dense(c, kernel_init=_zero_init_scale())(y)


class UNet(nn.Module):
  """Noise-prediction UNet.

  Attributes:
    ch: base channels; level i has ch * ch_mult[i].
    ch_mult: channel multiplier per resolution level (len = number of levels).
    num_res_blocks_down / num_res_blocks_up: residual blocks per level on each path. The up
      path concatenates one skip per block while the level has skips left (DDPM uses
      up = down + 1, which consumes them all).
    attn_resolutions: side lengths (H) at which an attention block follows each res block;
      the middle always has one.
    dropout, num_groups: as in DDPM (GroupNorm groups are reduced to divide the channels).
  """

  ch: int = 32
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks_down: int = 1
  num_res_blocks_up: int = 2
  attn_resolutions: Sequence[int] = (7,)
  dropout: float = 0.0
  num_groups: int = 8

  @nn.compact
  def __call__(self, x: Array, t_net: Array, train: bool = False) -> Array:
    if x.ndim != 4:
      raise ValueError(f"UNet expects x [B, H, W, C], got shape {x.shape}")
    out_ch = x.shape[-1]
    gn = self.num_groups
    temb = timestep_embedding(jnp.broadcast_to(t_net, x.shape[:1]), self.ch)
    temb = nn.Dense(4 * self.ch)(temb)
    temb = nn.Dense(4 * self.ch)(nn.swish(temb))

    h = nn.Conv(self.ch, (3, 3))(x)
    skips: list[list[Array]] = []
    level_skips = [h]
    for i, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks_down):
        h = ResnetBlock(self.ch * mult, gn, self.dropout)(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(gn)(h)
        level_skips.append(h)
      skips.append(level_skips)
      if i != len(self.ch_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
        level_skips = [h]

    h = ResnetBlock(h.shape[-1], gn, self.dropout)(h, temb, train)
    h = AttnBlock(gn)(h)
    h = ResnetBlock(h.shape[-1], gn, self.dropout)(h, temb, train)

    for i in reversed(range(len(self.ch_mult))):
      level_skips = skips[i]
      for _ in range(self.num_res_blocks_up):
        if level_skips:
          h = jnp.concatenate([h, level_skips.pop()], axis=-1)
        h = ResnetBlock(self.ch * self.ch_mult[i], gn, self.dropout)(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = AttnBlock(gn)(h)
      if i != 0:
        target = skips[i - 1][-1].shape
        h = jax.image.resize(h, (h.shape[0], target[1], target[2], h.shape[-1]), "nearest")
        h = nn.Conv(h.shape[-1], (3, 3))(h)

    h = nn.swish(nn.GroupNorm(_groups(h.shape[-1], gn))(h))
    return nn.Conv(out_ch, (3, 3), kernel_init=_zero_init_scale())(h)
