"""NVlabs/edm's `SongUNet` (DDPM++ and NCSN++, Karras et al. 2022) in Flax, and its
preconditioning as a memvol eps-network.

    net = SongUNet(img_resolution=32, in_channels=3, ...)     # F(x [B, H, W, C], c_noise [B])
    model = Preconditioned(net, precond="edm")                # model.apply(p, x, noise) -> eps
    D = model.apply(p, x, sigma, method=Preconditioned.denoise)   # EDM's D(x; sigma)

The layer names follow NVlabs' state dict one to one: the Flax module `enc_32x32_block0`
is `enc.32x32_block0`, its `conv0` / `affine` / `norm0` / `qkv` / `proj` / `skip` are the
same, `kernel` is `weight` (OIHW -> HWIO, linear weights transposed), GroupNorm `scale` is
`weight`, and NCSN++'s random Fourier frequencies are the param `map_noise/freqs` (a
buffer in torch). Resample filters are not params: they follow from `resample_filter`
(the converter checks every stored filter against it).

SongUNet, as NVlabs builds it: a mapping network (time embedding -> Dense -> silu ->
Dense -> silu), an encoder of UNetBlocks per resolution (the first a 3x3 conv, each later
one a `down` block, NCSN++'s "residual" encoder adds a fused conv+downsample of the
previous level's output, averaged with 1/sqrt(2)), a decoder that takes one skip per block
(`in0` with attention and `in1` at the lowest resolution, an `up` block at the others,
num_blocks + 1 blocks per level, attention after the last one at attn_resolutions), and
at full resolution `aux_norm` -> silu -> `aux_conv`. Every UNetBlock is GroupNorm (groups
min(32, C / 4), eps 1e-6), silu, conv (with its resampling), + Dense(emb), GroupNorm,
silu, conv, + skip (a 1x1 conv with the same resampling when the shape changes), times
skip_scale sqrt(1/2); then single-head attention whose qkv 1x1 conv interleaves q, k, v per
channel (output channel 3 c + j), residual, times skip_scale again. Dropout is inference's
(none); class labels and augmentation labels are not supported (refused at conversion).
sail-sg/DiffMemorize's SongUNet adds `skip_connections`, one 0 / 1 per encoder skip: a 0
sends zeros of the same shape to the decoder instead.

Preconditioning (NVlabs' VPPrecond, VEPrecond, EDMPrecond), as eps = (x - D(x; sigma)) / sigma:

  vp:  memvol's VP x_t = a x0 + sigma z is EDM's x / sqrt(1 + sigma_edm^2) with sigma_edm =
       sigma / a, and D = x - sigma_edm F(x / sqrt(1 + sigma_edm^2), 999 t): so eps = F(x_t,
       999 t), the network's own output at memvol's time input. EDM's schedule sigma_edm(t) =
       sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) is memvol's VPSDE(beta_min, beta_max =
       beta_min + beta_d) exactly (19.9 + 0.1 = 20).
  ve:  D = x + sigma F(x, log(sigma / 2)):              eps = -F(x, log(sigma / 2)).
  edm: D = c_skip x + c_out F(c_in x, log(sigma) / 4):  eps = sigma x / (sigma^2 + sd^2)
       - sd / sqrt(sigma^2 + sd^2) F  (sd = sigma_data), free of the x - D cancellation at
       small sigma.
  ve and edm take x = x0 + sigma z, memvol's VESDE (a = 1); the model's input is sigma
  itself (`noise_input` "sigma"), the vp one 999 t ("t").
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memvol.models.unet import timestep_embedding

Array = jax.Array

PRECONDS = ("vp", "ve", "edm")
VP_TIME_SCALE = 999.0  # EDM's VPPrecond: c_noise = (M - 1) t with M = 1000, memvol's time input 999 t


def resample_kernel(taps: Sequence[float]) -> np.ndarray:
  """NVlabs' 2D resample filter [k, k] of 1D taps: outer(f, f) / sum(f)^2 (float64)."""
  f = np.asarray(taps, np.float64)
  return np.outer(f, f) / f.sum() ** 2


def _depthwise(x: Array, f: Array, stride: int, pad: int, dilate: int = 1) -> Array:
  """The filter f [k, k] applied to every channel of x [B, H, W, C] alone."""
  c = x.shape[-1]
  kernel = jnp.tile(f[:, :, None, None], (1, 1, 1, c)).astype(x.dtype)
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2, lhs_dilation=(dilate, dilate),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)


def _conv(x: Array, w: Array, pad: int) -> Array:
  return jax.lax.conv_general_dilated(x, w.astype(x.dtype), (1, 1), [(pad, pad)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Conv2d(nn.Module):
  """NVlabs' Conv2d: x [B, H, W, Cin] -> [B, H', W', out_ch]. `up`: torch's
  conv_transpose2d by 4 f with stride 2 (side x2); `down`: f with stride 2 (side / 2);
  then the kernel x kernel conv (kernel 0: resampling only). `fused` (down only): the conv
  first, padded by both halves, then the filter unpadded (NCSN++'s aux_residual)."""

  out_ch: int
  kernel: int
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  fused: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.fused and self.up:
      raise ValueError("fused up-sampling is not used by SongUNet and not ported")
    f = jnp.asarray(resample_kernel(self.resample_filter), x.dtype)
    f_pad = (f.shape[0] - 1) // 2
    k = self.kernel
    w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, x.shape[-1], self.out_ch)) if k else None
    w_pad = k // 2
    if self.fused and self.down and w is not None:
      x = _depthwise(_conv(x, w, w_pad + f_pad), f, 2, 0)
    else:
      if self.up:  # conv_transpose2d(stride 2, padding p) = dilate by 2, pad k - 1 - p, flipped filter
        x = _depthwise(x, 4 * f[::-1, ::-1], 1, f.shape[0] - 1 - f_pad, dilate=2)
      if self.down:
        x = _depthwise(x, f, 2, f_pad)
      if w is not None:
        x = _conv(x, w, w_pad)
    if k:
      x = x + self.param("bias", nn.initializers.zeros_init(), (self.out_ch,)).astype(x.dtype)
    return x


def group_norm(channels: int, eps: float, name: str) -> nn.GroupNorm:
  """NVlabs' GroupNorm: min(32, C // 4) groups, two-pass variance."""
  return nn.GroupNorm(num_groups=min(32, channels // 4), epsilon=eps, use_fast_variance=False, name=name)


class UNetBlock(nn.Module):
  """One SongUNet block (module docstring): x [B, H, W, Cin], emb [B, E] -> [B, H', W', out_ch]."""

  out_ch: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: int = 1
  skip_scale: float = math.sqrt(0.5)
  eps: float = 1e-6
  resample_filter: Sequence[float] = (1, 1)

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    cin, out = x.shape[-1], self.out_ch
    resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
    h = Conv2d(out, 3, **resample, name="conv0")(nn.silu(group_norm(cin, self.eps, "norm0")(x)))
    h = h + nn.Dense(out, name="affine")(emb).astype(h.dtype)[:, None, None, :]
    h = Conv2d(out, 3, name="conv1")(nn.silu(group_norm(out, self.eps, "norm1")(h)))
    skip = Conv2d(out, 1, **resample, name="skip")(x) if (out != cin or self.up or self.down) else x
    h = (h + skip) * self.skip_scale
    if self.attention:
      b, hh, ww, c = h.shape
      d = c // self.num_heads
      qkv = Conv2d(3 * c, 1, name="qkv")(group_norm(c, self.eps, "norm2")(h))
      qkv = qkv.reshape(b, hh * ww, self.num_heads, d, 3)  # channel = head (3 d) + 3 i + j
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k / math.sqrt(d)), axis=-1)
      a = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, hh, ww, c)
      h = (Conv2d(c, 1, name="proj")(a) + h) * self.skip_scale
    return h


class FourierEmbedding(nn.Module):
  """NCSN++'s embedding [B, 2 n]: (sin, cos) of 2 pi freqs t (NVlabs computes (cos, sin)
  and swaps the halves in SongUNet.forward); freqs [n] is a stored param (random buffer)."""

  num_channels: int

  @nn.compact
  def __call__(self, t: Array) -> Array:
    freqs = self.param("freqs", nn.initializers.normal(16.0), (self.num_channels // 2,))
    a = t[:, None] * (2 * np.pi * freqs.astype(t.dtype))[None, :]
    return jnp.concatenate([jnp.sin(a), jnp.cos(a)], axis=-1)


class SongUNet(nn.Module):
  """F(x [B, H, W, C], c_noise [B]) -> [B, H, W, C], NVlabs' SongUNet without labels.
  Fields are NVlabs' constructor arguments (their defaults); encoder "standard" (DDPM++)
  or "residual" (NCSN++), decoder "standard"."""

  img_resolution: int
  in_channels: int
  out_channels: int
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Sequence[float] = (1, 1)
  skip_connections: Sequence[int] = ()  # sail-sg/DiffMemorize: 0 zeroes that encoder skip (empty: all on)

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array) -> Array:
    if self.encoder_type not in ("standard", "residual") or self.decoder_type != "standard":
      raise ValueError(f"SongUNet encoder_type={self.encoder_type!r} / decoder_type={self.decoder_type!r}: "
                       "ported are encoder 'standard' (DDPM++) and 'residual' (NCSN++), decoder 'standard'")
    noise_ch, emb_ch = self.model_channels * self.channel_mult_noise, self.model_channels * self.channel_mult_emb
    t = jnp.broadcast_to(jnp.asarray(noise_labels, jnp.result_type(x.dtype, jnp.float32)), (x.shape[0],))
    if self.embedding_type == "positional":  # (cos, sin) with w_k = 10000^(-k / (n/2 - 1)), swapped: sin first
      emb = timestep_embedding(t, noise_ch, freq_shift=1.0)
    elif self.embedding_type == "fourier":
      emb = FourierEmbedding(noise_ch, name="map_noise")(t)
    else:
      raise ValueError(f"SongUNet embedding_type={self.embedding_type!r}: expected 'positional' or 'fourier'")
    emb = nn.silu(nn.Dense(emb_ch, name="map_layer0")(emb))
    emb = nn.silu(nn.Dense(emb_ch, name="map_layer1")(emb))
    block = lambda out, name, **kw: UNetBlock(out, resample_filter=tuple(self.resample_filter), name=name, **kw)
    attn = {int(r) for r in self.attn_resolutions}

    skips, aux = [], x
    keep = lambda: not self.skip_connections or bool(self.skip_connections[len(skips)])
    skip = lambda x: skips.append(x if keep() else jnp.zeros_like(x))  # DiffMemorize: a zero skip
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        x = Conv2d(self.model_channels, 3, name=f"enc_{res}x{res}_conv")(x)
      else:
        x = block(x.shape[-1], f"enc_{res}x{res}_down", down=True)(x, emb)
        if self.encoder_type == "residual":
          r = Conv2d(x.shape[-1], 3, down=True, resample_filter=tuple(self.resample_filter), fused=True,
                     name=f"enc_{res}x{res}_aux_residual")(aux)
          x = aux = (x + r) / np.sqrt(2)
      skip(x)  # NVlabs replace the down block's skip by the residual sum: the same, pushed after it
      for idx in range(self.num_blocks):
        x = block(self.model_channels * mult, f"enc_{res}x{res}_block{idx}", attention=res in attn)(x, emb)
        skip(x)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      if level == len(self.channel_mult) - 1:
        x = block(x.shape[-1], f"dec_{res}x{res}_in0", attention=True)(x, emb)
        x = block(x.shape[-1], f"dec_{res}x{res}_in1")(x, emb)
      else:
        x = block(x.shape[-1], f"dec_{res}x{res}_up", up=True)(x, emb)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = block(self.model_channels * mult, f"dec_{res}x{res}_block{idx}",
                  attention=idx == self.num_blocks and res in attn)(x, emb)
    res = self.img_resolution
    x = nn.silu(group_norm(x.shape[-1], 1e-6, f"dec_{res}x{res}_aux_norm")(x))
    return Conv2d(self.out_channels, 3, name=f"dec_{res}x{res}_aux_conv")(x)


def vp_sigma_inv(sigma: Array, beta_min: float, beta_d: float) -> Array:
  """EDM's VPPrecond.sigma_inv: the t with sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) = sigma."""
  return (jnp.sqrt(beta_min**2 + 2 * beta_d * jnp.log1p(sigma**2)) - beta_min) / beta_d


class Preconditioned(nn.Module):
  """eps of a preconditioned SongUNet (module docstring): x [B, H, W, C], noise [B] (999 t
  for "vp", sigma for "ve" / "edm": `noise_input`) -> eps [B, H, W, C]; `denoise` is
  NVlabs' D(x; sigma) for all three."""

  net: SongUNet
  precond: str = "edm"
  sigma_data: float = 0.5
  beta_min: float = 0.1   # vp only: EDM's schedule (beta_max = beta_min + beta_d)
  beta_d: float = 19.9

  @property
  def noise_input(self) -> str:
    return "t" if self.precond == "vp" else "sigma"

  def __call__(self, x: Array, noise: Array, train: bool = False) -> Array:
    if x.ndim != 4:
      raise ValueError(f"Preconditioned takes x [B, H, W, C], got shape {x.shape}")
    noise = jnp.broadcast_to(jnp.asarray(noise, jnp.result_type(x.dtype, jnp.float32)), (x.shape[0],))
    if self.precond == "vp":
      return self.net(x, noise)
    if self.precond == "ve":
      return -self.net(x, jnp.log(0.5 * noise))
    if self.precond != "edm":
      raise ValueError(f"unknown precond {self.precond!r}; expected one of {PRECONDS}")
    s = noise[:, None, None, None]
    s2 = s**2 + self.sigma_data**2
    return s * x / s2 - self.sigma_data * jax.lax.rsqrt(s2) * self.net(x * jax.lax.rsqrt(s2), jnp.log(noise) / 4)

  def denoise(self, x: Array, sigma: Array) -> Array:
    """NVlabs' D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) as they write it (not x -
    sigma eps, which cancels at large sigma): x [B, H, W, C] = x0 + sigma z, sigma [B]."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.result_type(x.dtype, jnp.float32)), (x.shape[0],))
    s = sigma[:, None, None, None]
    if self.precond == "vp":
      t = vp_sigma_inv(sigma, self.beta_min, self.beta_d)
      return x - s * self.net(x * jax.lax.rsqrt(1 + s**2), VP_TIME_SCALE * t)
    if self.precond == "ve":
      return x + s * self.net(x, jnp.log(0.5 * sigma))
    if self.precond != "edm":
      raise ValueError(f"unknown precond {self.precond!r}; expected one of {PRECONDS}")
    s2 = s**2 + self.sigma_data**2
    f = self.net(x * jax.lax.rsqrt(s2), jnp.log(sigma) / 4)
    return self.sigma_data**2 / s2 * x + s * self.sigma_data * jax.lax.rsqrt(s2) * f


def torch_key(path: Sequence[str]) -> str:
  """NVlabs' state-dict key (without the preconditioner's `model.` prefix) of the param at
  `path` of a Preconditioned's params, e.g. (net, enc_32x32_block0, conv0, kernel) ->
  enc.32x32_block0.conv0.weight; (net, map_noise, freqs) -> map_noise.freqs."""
  names = list(path[1:] if path and path[0] == "net" else path)
  if not names or names[-1] not in ("kernel", "scale", "bias", "freqs"):
    raise ValueError(f"no NVlabs name for SongUNet param {'/'.join(path)}")
  if names[0].startswith(("enc_", "dec_")):
    names[0] = names[0].replace("_", ".", 1)
  names[-1] = {"kernel": "weight", "scale": "weight"}.get(names[-1], names[-1])
  return ".".join(names)
