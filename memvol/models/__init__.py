"""Score networks eps_theta(x, t_net) (flax.linen), their registry and the single-image
`eps_fn(x, t)` the volume engine and the samplers take.

    model = get_model(model_cfg, image_shape)           # model_cfg.name: unet | mlp
    params = init_params(model, key, image_shape)       # float32
    y = model.apply({"params": params}, x, t_net, train=False, rngs={"dropout": k})
    #   x [B, H, W, C], t_net [B] = 999 t (sde.time_input) -> [B, H, W, C]
    eps_fn = make_eps_fn(model, params, sde)            # eps_fn(x [H, W, C], t) -> [H, W, C]
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from memvol import sde as sde_lib
from memvol.models.mlp import MLP
from memvol.models.unet import UNet

Array = jax.Array

# Every model config has these fields (the `model` section of experiments/configs/base.py).
_FIELDS = ("name", "ch", "ch_mult", "num_res_blocks_down", "num_res_blocks_up",
           "attn_resolutions", "dropout", "num_groups", "hidden", "num_layers", "pretrained")


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
  shape = tuple(int(s) for s in image_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {tuple(image_shape)}")
  return shape


def _get(cfg: Any, field: str) -> Any:
  if field not in cfg:
    raise ValueError(f"model config has no field {field!r} (needed by model {cfg.get('name')!r})")
  return cfg[field]


def _unet(cfg: Any, image_shape: tuple[int, int, int]) -> nn.Module:
  ch, groups = int(_get(cfg, "ch")), int(_get(cfg, "num_groups"))
  ch_mult = tuple(int(m) for m in _get(cfg, "ch_mult"))
  if not ch_mult or min(ch_mult) < 1:
    raise ValueError(f"model.ch_mult must be a non-empty tuple of positive ints, got {ch_mult}")
  for c in (ch,) + tuple(ch * m for m in ch_mult):
    if c % groups:
      raise ValueError(f"model.num_groups={groups} does not divide the channel count {c} "
                       f"(model.ch={ch}, model.ch_mult={ch_mult})")
  down, up = int(_get(cfg, "num_res_blocks_down")), int(_get(cfg, "num_res_blocks_up"))
  if down < 1 or up < down + 1:
    raise ValueError(f"need model.num_res_blocks_down >= 1 and num_res_blocks_up >= "
                     f"num_res_blocks_down + 1 (each up block takes one skip), got {down}, {up}")
  dropout = float(_get(cfg, "dropout"))
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
  return UNet(ch=ch, ch_mult=ch_mult, num_res_blocks_down=down, num_res_blocks_up=up,
              attn_resolutions=tuple(int(r) for r in _get(cfg, "attn_resolutions")),
              dropout=dropout, num_groups=groups)


def _mlp(cfg: Any, image_shape: tuple[int, int, int]) -> nn.Module:
  hidden, layers = int(_get(cfg, "hidden")), int(_get(cfg, "num_layers"))
  if hidden < 4 or layers < 0:
    raise ValueError(f"need model.hidden >= 4 and model.num_layers >= 0, got {hidden}, {layers}")
  dropout = float(_get(cfg, "dropout"))
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
  return MLP(hidden=hidden, num_layers=layers, dropout=dropout)


MODELS: dict[str, Callable[[Any, tuple[int, int, int]], nn.Module]] = {"unet": _unet, "mlp": _mlp}


def get_model(model_cfg: Any, image_shape: Sequence[int]) -> nn.Module:
  """The flax module named by model_cfg.name, for images of `image_shape` (H, W, C)."""
  name = model_cfg.get("name") if hasattr(model_cfg, "get") else None
  if model_cfg.get("pretrained") if hasattr(model_cfg, "get") else False:
    raise ValueError(f"model.pretrained={model_cfg.pretrained!r} is set: that network is built from "
                     "its folder's config.json (memvol.loading / memvol.pretrained), not trained here")
  if name not in MODELS:
    raise ValueError(f"unknown model.name {name!r}; expected one of {sorted(MODELS)}")
  return MODELS[name](model_cfg, _check_image_shape(image_shape))


def _fast_init_key(key: Array) -> Array:
  """An "rbg" key derived from `key` (raw uint32[2] or typed): XLA compiles its random bits
  several times faster than one unrolled threefry per parameter (20 s -> 6 s for a small
  UNet on 2 loaded cores). Deterministic for a given key and backend."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  if key.shape == (4,):
    return jax.random.wrap_key_data(key.astype(jnp.uint32), impl="rbg")
  if key.shape != (2,):
    raise ValueError(f"init_params takes one PRNG key, got key data of shape {key.shape}")
  return jax.random.wrap_key_data(jax.random.split(key.astype(jnp.uint32), 2).reshape(4), impl="rbg")


def init_params(model: nn.Module, key: Array, image_shape: Sequence[int]) -> Any:
  """Fresh float32 params of `model` for images (H, W, C), deterministic in `key`.
  Traceable (works inside jit)."""
  h, w, c = _check_image_shape(image_shape)
  x = jnp.zeros((1, h, w, c), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  return model.init({"params": _fast_init_key(jnp.asarray(key))}, x, t, train=False)["params"]


def count_params(params: Any) -> int:
  """Number of scalars in a params pytree."""
  return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))


@flax.struct.dataclass
class EpsFn:
  """eps_theta for ONE image: eps_fn(x [H, W, C], t scalar SDE time in [eps, T]) ->
  [H, W, C], in x's dtype. The model sees `sde.time_input(t)` (999 t), or sigma(t) when
  it declares `noise_input == "sigma"` (EDM's VE / EDM preconditioning, song_unet.py).
  A pytree whose only leaves are `params`, so jit / vmap / jvp / linearize trace the
  params instead of baking them in as constants."""

  params: Any
  model: nn.Module = flax.struct.field(pytree_node=False)
  sde: sde_lib.SDE = flax.struct.field(pytree_node=False)

  def __call__(self, x: Array, t: Array) -> Array:
    t = jnp.asarray(t)
    if t.ndim != 0:
      raise ValueError(f"eps_fn takes a scalar t (vmap over images), got t of shape {t.shape}")
    noise = self.sde.std(t) if getattr(self.model, "noise_input", "t") == "sigma" else self.sde.time_input(t)
    t_net = noise.astype(jnp.result_type(x.dtype, t.dtype))
    y = self.model.apply({"params": self.params}, x[None], t_net[None], train=False)
    return y[0].astype(x.dtype)


def make_eps_fn(model: nn.Module, params: Any, sde: sde_lib.SDE) -> EpsFn:
  """The single-image eps_fn of (model, params) under `sde`'s time convention (999 t)."""
  return EpsFn(params=params, model=model, sde=sde)


def _config(**kw: Any) -> ml_collections.ConfigDict:
  base = dict(name="unet", ch=24, ch_mult=(1, 2), num_res_blocks_down=1, num_res_blocks_up=2,
              attn_resolutions=(), dropout=0.0, num_groups=8, hidden=256, num_layers=3, pretrained="")
  base.update(kw)
  assert set(base) == set(_FIELDS)
  return ml_collections.ConfigDict(base)


NAMED_CONFIGS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
    # DDPM CIFAR-10 (35.7M params): 128 ch at 32x32, 256 at 16/8/4, attention at 16 + middle.
    "paper_cifar10": lambda: _config(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks_down=2,
                                     num_res_blocks_up=3, attn_resolutions=(16,), dropout=0.1,
                                     num_groups=32),
    # 28x28 / 14x14 grey on 2 CPU cores: 0.367M params, attention only in the middle.
    "small_unet": lambda: _config(),
    # 8x8 sklearn digits.
    "digits_mlp": lambda: _config(name="mlp", hidden=256, num_layers=3),
}


def named_config(name: str) -> ml_collections.ConfigDict:
  """A full `model` config section by name: paper_cifar10 | small_unet | digits_mlp."""
  if name not in NAMED_CONFIGS:
    raise ValueError(f"unknown named model config {name!r}; expected one of {sorted(NAMED_CONFIGS)}")
  return NAMED_CONFIGS[name]()
