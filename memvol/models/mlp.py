"""A small MLP noise predictor for tiny images (8x8 digits, synthetic data)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from memvol.models.unet import timestep_embedding

Array = jax.Array


class MLP(nn.Module):
  """eps_theta(x [B, H, W, C], t_net [B]) -> [B, H, W, C]: the flattened image and an MLP
  embedding of t_net, through `num_layers` swish layers of width `hidden`."""

  hidden: int = 256
  num_layers: int = 3
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, t_net: Array, train: bool = False) -> Array:
    if x.ndim != 4:
      raise ValueError(f"MLP expects x [B, H, W, C], got shape {x.shape}")
    b = x.shape[0]
    temb = timestep_embedding(jnp.broadcast_to(t_net, (b,)), 64)
    temb = nn.Dense(self.hidden)(nn.swish(nn.Dense(self.hidden)(temb)))
    h = nn.Dense(self.hidden)(x.reshape(b, -1)) + temb
    for _ in range(self.num_layers - 1):
      h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
      h = nn.Dense(self.hidden)(h) + nn.Dense(self.hidden)(temb)
    out = nn.Dense(x[0].size, kernel_init=nn.initializers.zeros)(nn.swish(h))
    return out.reshape(x.shape)
