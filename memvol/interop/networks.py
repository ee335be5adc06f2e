"""A folder as a memvol network and back (JAX / Flax; the other modules of the package are
numpy only).

    model, params, image_shape = load_model(folder)      # the Flax network, float32 params
    eps_fn, image_shape = load_eps_fn(folder, sde)       # eps_fn(x [H, W, C] in [-1, 1], t)
    export(model, params, image_shape, out_folder)       # a memvol UNet as a diffusers folder

A UNet2DModel folder loads as memvol's UNet (interop.diffusers), a SongUNet folder as a
Preconditioned SongUNet (interop.edm), whose check_sde refuses an SDE its x_t is not.

Time. diffusers' DDPM (linear betas 1e-4 .. 0.02 over N = 1000 steps) discretises the VP-SDE
with beta_min 0.1, beta_max 20 (sde.VPSDE): beta_i = beta(i / 999) / N. The network was
trained on the integer timestep i and memvol feeds it 999 t (sde.time_input, the paper's
and score_sde's convention), so t = i / 999 is the time map of the network input. The
noise levels match best one step later: alphas_cumprod[i] = prod_{j <= i} (1 - beta_j)
against a(t)^2 = exp(-int_0^t beta) at t = (i + 1) / N is off by a relative 1e-5 at i = 0
(0.99990 vs 0.99989) and 7.0% at i = 999 (4.036e-5 vs 4.319e-5: log(1 - beta) = -beta -
beta^2 / 2, and the beta^2 / 2 terms add up to 0.068 in log), beyond 1% from i = 566 on;
at t = i / 999 the gap is 1e-4 at i = 0 (a(0)^2 = 1, sigma 0 vs DDPM's 0.01) and the same
7.0% at i = 999. So memvol evaluates the network at most one DDPM step (999 t vs 1000 t - 1)
from the step whose noise level equals sigma(t), and the marginals differ by a few percent
in a^2 near t = 1, where sigma(t) = 1 - 2e-5 either way. tests/test_pretrained.py pins
these numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from memvol import models
from memvol import sde as sde_lib
from memvol.interop import diffusers, edm, folders, mapping
from memvol.models import song_unet
from memvol.models.song_unet import Preconditioned, SongUNet
from memvol.models.unet import UNet


def model_from_config(config: Mapping[str, Any]) -> tuple[UNet | Preconditioned, tuple[int, int, int]]:
  """(model, image_shape (H, W, C)) of a folder's config.json: a Preconditioned SongUNet
  for `_class_name` SongUNet, else memvol's UNet of a UNet2DModel config. ValueError naming
  the first field memvol cannot express."""
  if config.get("_class_name") == edm.CLASS:
    net, precond, shape = edm.song_unet_kwargs(config)
    return Preconditioned(SongUNet(**net), **precond), shape
  kwargs, shape = diffusers.unet_kwargs(config)
  return UNet(**kwargs), shape


def config_from_unet(model: Any, image_shape: tuple[int, ...]) -> dict[str, Any]:
  """The UNet2DModel config.json of a memvol UNet for images (H, W, C). ValueError when
  diffusers cannot express it (an MLP, extra up blocks, odd sides, ...)."""
  if not isinstance(model, UNet):
    raise ValueError(f"only memvol UNets export to diffusers, got {type(model).__name__}")
  return diffusers.config_of_unet(model, image_shape)


def _key_fn(model: UNet | Preconditioned) -> Callable[[tuple[str, ...]], str]:
  """A param's path -> its key in the folder (diffusers names for memvol's UNet, NVlabs' for
  a Preconditioned SongUNet)."""
  if isinstance(model, Preconditioned):
    return song_unet.torch_key
  levels = len(model.ch_mult)
  return lambda names: diffusers.torch_key(names, levels)


def params_from_state_dict(state: Mapping[str, np.ndarray], model: UNet | Preconditioned,
                           image_shape: tuple[int, int, int]) -> Any:
  """memvol params (float32) of a folder's state dict (torch layouts) for `model`.
  ValueError listing missing, unexpected or misshapen weights."""
  state = diffusers.normalise_keys(state) if isinstance(model, UNet) else dict(state)
  shapes = jax.eval_shape(lambda k: models.init_params(model, k, image_shape), jax.random.PRNGKey(0))
  key_fn = _key_fn(model)
  used, problems = set(), []

  def take(path, leaf):
    key = key_fn(tuple(getattr(p, "key", p) for p in path))
    if key not in state:
      problems.append(f"missing {key}")
      return np.zeros(leaf.shape, np.float32)
    used.add(key)
    w = mapping.to_flax(np.asarray(state[key], np.float32))
    if w.shape != leaf.shape:
      problems.append(f"{key}: shape {mapping.to_torch(w).shape}, expected {mapping.to_torch(np.zeros(leaf.shape)).shape}")
      return np.zeros(leaf.shape, np.float32)
    return w

  params = jax.tree_util.tree_map_with_path(take, shapes)
  problems += [f"unexpected {k}" for k in sorted(set(state) - used)]
  if problems:
    raise ValueError(f"the weights do not fit the config's {type(model).__name__} ({len(problems)} problem(s)): "
                     + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else ""))
  return params


def state_dict_from_params(params: Any, model: UNet | Preconditioned) -> dict[str, np.ndarray]:
  """The folder's state dict (float32 numpy, torch layouts) of memvol UNet or SongUNet params."""
  key_fn = _key_fn(model)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {key_fn(tuple(getattr(p, "key", p) for p in path)):
          np.ascontiguousarray(mapping.to_torch(np.asarray(leaf, np.float32))) for path, leaf in flat}


def load_model(path: str) -> tuple[UNet | Preconditioned, Any, tuple[int, int, int]]:
  """(model, float32 params, image_shape) of a UNet2DModel or SongUNet folder."""
  model, image_shape = model_from_config(folders.read_config(path))
  params = params_from_state_dict(folders.read_weights(path), model, image_shape)
  return model, jax.device_put(params), image_shape


def check_sde(path: str, sde: sde_lib.SDE) -> None:
  """Refuse (ValueError naming the config fields) an SDE whose x_t is not the one an EDM
  folder's network takes: a VP network needs VPSDE with its beta_min / beta_max, a VE or
  EDM-preconditioned one VESDE (any sigma range). Other folders: no check."""
  config = folders.read_config(path)
  if config.get("_class_name") != edm.CLASS:
    return
  want = edm.sde(config)
  name = {sde_lib.VPSDE: "vp", sde_lib.SubVPSDE: "subvp", sde_lib.VESDE: "ve"}.get(type(sde))
  ok = name == want["name"] and (name != "vp" or (np.isclose(sde.beta_min, want["beta_min"])
                                                   and np.isclose(sde.beta_max, want["beta_max"])))
  if not ok:
    fields = " ".join(f"--config.sde.{k}={v}" for k, v in want.items())
    raise ValueError(f"{path} holds an EDM network with {config.get('precond')!r} preconditioning, which takes the "
                     f"SDE {want}; the config's SDE is {type(sde).__name__} {dataclasses.asdict(sde)}: set {fields}")


def default_sde(path: str) -> sde_lib.SDE:
  """The SDE a folder's network was trained on: EDM folders' edm.sde, the converter's
  `_source_sde` (VP betas of pytorch-ddpm / Hasegawa & Yasuda), else the VP-SDE beta 0.1
  .. 20 that DDPM's linear betas discretise."""
  config = folders.read_config(path)
  if config.get("_class_name") == edm.CLASS:
    fields = edm.sde(config)
  else:
    fields = {"name": "vp", "beta_min": 0.1, "beta_max": 20.0}
    fields.update({k: v for k, v in config.get("_source_sde", {}).items() if k in ("beta_min", "beta_max")})
  return sde_lib.get_sde(**fields)


def load_eps_fn(path: str, sde: sde_lib.SDE | None = None) -> tuple[models.EpsFn, tuple[int, int, int]]:
  """(eps_fn(x [H, W, C] in [-1, 1], t) -> [H, W, C], image_shape) of a folder, under
  `sde` (default: default_sde, the one it was trained on; a DDPM network sees 999 t, an
  EDM VE / EDM one sigma(t)). ValueError for an SDE an EDM network cannot take."""
  model, params, image_shape = load_model(path)
  sde = default_sde(path) if sde is None else sde
  check_sde(path, sde)
  return models.make_eps_fn(model, params, sde), image_shape


def export(model: UNet, params: Any, image_shape: tuple[int, ...], path: str) -> dict[str, Any]:
  """Write a memvol UNet as a diffusers UNet2DModel folder at `path`; returns its config.
  The export loads back (load_model) to the same network."""
  config = config_from_unet(model, image_shape)
  folders.write(path, config, state_dict_from_params(params, model))
  return config
