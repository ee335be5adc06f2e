"""Loading a trained network: the one loader every stage goes through.

    model, params, image_shape = load_model(config, workdir)     # EMA params by default
    eps_fn = load_eps_fn(config, workdir)                         # eps_fn(x [H, W, C], t) -> [H, W, C]

The weights come from the workdir's orbax checkpoints (checkpoint.py), checked against the
config's data/model/sde sections. Only the requested params item is read: the optimiser state
is never built or restored here, so loading does not depend on the training settings.
With `model.pretrained` set, they come from that folder instead (a diffusers UNet2DModel
or an EDM SongUNet, memvol/interop; use_ema and step do not apply), after checking its
SHA-256 against the workdir's record and that config.sde is the SDE its network takes.
"""

from __future__ import annotations

from typing import Any

import jax

from memvol import checkpoint as ckpt_lib
from memvol import models, parallel, pretrained
from memvol import sde as sde_lib
from memvol import workdir as wdir
from memvol.interop import networks


def _abstract_params(model: Any, image_shape: tuple[int, ...], sharding: Any) -> Any:
  shapes = jax.eval_shape(lambda k: models.init_params(model, k, image_shape), jax.random.PRNGKey(0))
  return ckpt_lib.abstract_like(shapes, sharding)


def _pretrained(config: Any, workdir: str) -> tuple[Any, Any, tuple[int, ...]]:
  path = str(config.model.pretrained)
  pretrained.check_weights(path, workdir)
  networks.check_sde(path, sde_lib.from_config(config.sde))
  model, params, image_shape = networks.load_model(path)
  return model, jax.device_put(params, parallel.replicated(parallel.local_mesh())), image_shape


def load_params(config: Any, workdir: str, use_ema: bool = True, step: int | None = None) -> Any:
  """The (EMA by default) params of the checkpoint at `step` (default: latest), replicated
  over this process's devices. FileNotFoundError saying to train first if there is none;
  ValueError naming the fields if its data/model/sde config differs from `config`."""
  if config.model.get("pretrained"):
    return _pretrained(config, workdir)[1]
  meta = ckpt_lib.restore_meta(workdir, step)
  ckpt_lib.check_config(meta, config, f"{wdir.checkpoints(workdir)}/{meta['step']}")
  image_shape = tuple(meta["image_shape"])
  model = models.get_model(config.model, image_shape)
  item = "ema_params" if use_ema else "params"
  abstract = _abstract_params(model, image_shape, parallel.replicated(parallel.local_mesh()))
  items, _ = ckpt_lib.restore(workdir, config, {item: abstract}, meta["step"])
  return items[item]


def load_model(config: Any, workdir: str, use_ema: bool = True, step: int | None = None
               ) -> tuple[Any, Any, tuple[int, ...]]:
  """(model, params, image_shape) of the checkpoint at `step` (default: latest)."""
  if config.model.get("pretrained"):
    return _pretrained(config, workdir)
  meta = ckpt_lib.restore_meta(workdir, step)
  image_shape = tuple(meta["image_shape"])
  params = load_params(config, workdir, use_ema, meta["step"])
  return models.get_model(config.model, image_shape), params, image_shape


def load_eps_fn(config: Any, workdir: str, use_ema: bool = True, step: int | None = None) -> Any:
  """Single-image eps_fn(x [H, W, C], t) of the latest (or `step`) checkpoint, EMA params
  by default."""
  model, params, _ = load_model(config, workdir, use_ema, step)
  return models.make_eps_fn(model, params, sde_lib.from_config(config.sde))
