"""A small time-conditioned MLP eps_theta for tiny images (8x8 digits: D = 64)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from memvol.models.unet import timestep_embedding

Array = jax.Array


class MLP(nn.Module):
  """eps_theta: x [B, H, W, C], t_net [B] (999 t) -> [B, H, W, C].

  h = Dense(x) + Dense(temb); then num_layers x [h + Dense(dropout(swish(LayerNorm h))) +
  Dense(temb)]; out = Dense(swish(h)) (zero-initialised), temb = MLP(sinusoidal(t_net))."""

  hidden: int = 256
  num_layers: int = 3
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: Array, t_net: Array, train: bool = False) -> Array:
    if x.ndim != 4:
      raise ValueError(f"MLP takes x [B, H, W, C], got shape {x.shape}")
    b = x.shape[0]
    t_net = jnp.broadcast_to(jnp.asarray(t_net), (b,))
    temb = timestep_embedding(t_net, max(4, 2 * (self.hidden // 4)))
    temb = nn.swish(nn.Dense(self.hidden, name="temb_dense0")(temb))
    temb = nn.swish(nn.Dense(self.hidden, name="temb_dense1")(temb))
    h = nn.Dense(self.hidden, name="in")(x.reshape(b, -1)) + nn.Dense(self.hidden, name="temb_in")(temb)
    for k in range(self.num_layers):
      u = nn.swish(nn.LayerNorm(name=f"norm{k}")(h))
      u = nn.Dropout(self.dropout, deterministic=not train)(u)
      h = h + nn.Dense(self.hidden, name=f"dense{k}")(u) + nn.Dense(self.hidden, name=f"temb{k}")(temb)
    out = nn.Dense(x[0].size, kernel_init=nn.initializers.zeros_init(), name="out")(nn.swish(h))
    return out.reshape(x.shape)
