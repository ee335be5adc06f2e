"""NVlabs/edm networks (Karras et al.; also what sail-sg/DiffMemorize trains): the SongUNet
folder kind, both ways, numpy and names only.

The converter's side: a preconditioner's class and `init_kwargs`, its inner model's -> the
folder's config (the network's constructor arguments and `precond`), its state dict -> the
folder's weights under NVlabs' names without the `model.` prefix. Buffers are weights:
NCSN++'s Fourier `freqs` are kept, every resample_filter is checked against the config's
filter (memvol computes it), and the augmentation layer map_augment, which sampling never
uses, is dropped. Refused by name: iDDPMPrecond, DhariwalUNet (ADM), class labels, skip
encoders / decoders.

memvol's side: song_unet_kwargs turns the folder's config into a Preconditioned SongUNet
(memvol/models/song_unet.py), whose eps is NVlabs' (x - D(x; sigma)) / sigma under the SDE
its x_t needs (sde: VP with EDM's betas, or VE over sigma 0.002 .. 80).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from memvol.interop import mapping

NAME = "edm"
EXPECTED = "NVlabs/edm network-snapshot .pkl or training-state .pt"
CLASS = "SongUNet"

# SongUNet's constructor defaults (NVlabs/edm training/networks.py), used for fields a
# config.json omits; `precond` and its fields (VPPrecond / VEPrecond / EDMPrecond defaults).
SONG_UNET_DEFAULTS: dict[str, Any] = {
    "img_resolution": None, "in_channels": 3, "out_channels": 3, "label_dim": 0, "augment_dim": 0,
    "model_channels": 128, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4, "num_blocks": 4,
    "attn_resolutions": [16], "dropout": 0.1, "label_dropout": 0.0, "embedding_type": "positional",
    "channel_mult_noise": 1, "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1],
    "skip_connections": [],  # sail-sg/DiffMemorize's SongUNet: 0 / 1 per encoder skip (empty: all on)
}
PRECOND_DEFAULTS: dict[str, Any] = {"precond": "edm", "sigma_data": 0.5, "beta_d": 19.9, "beta_min": 0.1, "M": 1000,
                                    "epsilon_t": 1e-5, "sigma_min": None, "sigma_max": None, "use_fp16": False}
# training-time only (dropout, label dropout, the augmentation labels that sampling never
# passes), or used only by EDM's own sampler (the supported sigma range) / its fp16 switch
_IGNORED = ("dropout", "label_dropout", "augment_dim", "use_fp16", "epsilon_t", "sigma_min", "sigma_max")
# DDPM++ and NCSN++ as NVlabs/edm's train.py builds them for CIFAR-10 (--arch ddpmpp | ncsnpp).
EDM_CIFAR10: dict[str, dict[str, Any]] = {
    arch: {"_class_name": CLASS, "img_resolution": 32, "in_channels": 3, "out_channels": 3, "model_channels": 128,
           "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16], "augment_dim": 9, **kw}
    for arch, kw in (("ddpmpp", {"embedding_type": "positional", "channel_mult_noise": 1, "encoder_type": "standard",
                                 "resample_filter": [1, 1], "precond": "vp"}),
                     ("ncsnpp", {"embedding_type": "fourier", "channel_mult_noise": 2, "encoder_type": "residual",
                                 "resample_filter": [1, 3, 3, 1], "precond": "ve"}))}

PRECONDS = {"VPPrecond": "vp", "VEPrecond": "ve", "EDMPrecond": "edm"}
# The preconditioners' constructor fields the folder records (the rest: img_resolution,
# img_channels, label_dim, model_type go to the network's own fields).
PRECOND_FIELDS = {"vp": ("beta_d", "beta_min", "M", "epsilon_t", "use_fp16"),
                  "ve": ("sigma_min", "sigma_max", "use_fp16"),
                  "edm": ("sigma_min", "sigma_max", "sigma_data", "use_fp16")}
UNUSED = ("map_augment.weight",)  # the augmentation-label layer: sampling never passes labels


# --- the converter's side ----------------------------------------------------------------


def _refuse_source(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"unsupported NVlabs/edm network: {field}={value!r} ({why})")


def _json_value(v: Any) -> Any:
  if isinstance(v, (list, tuple)):
    return [_json_value(x) for x in v]
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v.item() if hasattr(v, "item") else v


def folder_config(precond_class: str, precond_kwargs: Mapping[str, Any], model_class: str,
                  model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """The folder's config of an NVlabs/edm network: the preconditioner's class name and
  constructor kwargs (`init_kwargs` of the pickled object), its inner model's class name and
  kwargs. ValueError naming what memvol cannot express (iDDPMPrecond, DhariwalUNet, class
  labels); infinite sigma limits become null."""
  if precond_class not in PRECONDS:
    why = ("its network also predicts variances and its c_noise indexes a 1000-step sigma grid; not ported"
           if precond_class == "iDDPMPrecond" else f"supported: {sorted(PRECONDS)}")
    raise _refuse_source("preconditioning", precond_class, why)
  if model_class != CLASS:
    why = "ADM is not ported" if model_class == "DhariwalUNet" else "supported: SongUNet (DDPM++, NCSN++)"
    raise _refuse_source("model_type", model_class, why)
  precond = PRECONDS[precond_class]
  if int(model_kwargs.get("label_dim", 0) or 0):
    raise _refuse_source("label_dim", model_kwargs["label_dim"], "class-conditional networks are not supported")
  unknown = sorted(k for k in model_kwargs if k not in SONG_UNET_DEFAULTS)
  if unknown:
    raise _refuse_source(unknown[0], model_kwargs[unknown[0]], "not a SongUNet argument memvol knows")
  config = {"_class_name": CLASS, "precond": precond,
            **{k: _json_value(v) for k, v in model_kwargs.items()},
            **{k: _json_value(precond_kwargs[k]) for k in PRECOND_FIELDS[precond] if k in precond_kwargs}}
  for field, allowed in (("encoder_type", ("standard", "residual")), ("decoder_type", ("standard",)),
                         ("embedding_type", ("positional", "fourier"))):
    if field in config and config[field] not in allowed:
      raise _refuse_source(field, config[field], f"supported: {allowed}")
  if precond == "vp" and int(config.get("M", 1000)) != 1000:
    raise _refuse_source("M", config["M"], "memvol feeds a VP network 999 t, EDM's (M - 1) t with M = 1000")
  return config


def resample_kernel(taps: Any) -> np.ndarray:
  """NVlabs' registered resample filter buffer [1, 1, k, k] of its taps, in float32."""
  f = np.asarray(taps, np.float32)
  return (np.outer(f, f) / np.square(f.sum()))[None, None].astype(np.float32)


def to_folder(state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
  """(the folder's state dict, dropped keys) of a preconditioner's state dict (numpy, keys
  `model.<...>`) under its folder config: the `model.` prefix removed; every resample_filter
  buffer checked to equal the config's filter and dropped (memvol computes it); map_augment
  dropped. Shapes are checked when memvol loads the folder. ValueError naming a buffer that
  differs."""
  taps = config.get("resample_filter", [1, 1])
  want = resample_kernel(taps)
  out, dropped = {}, []
  for key, w in state.items():
    if not key.startswith("model."):
      raise mapping.MismatchError(f"the NVlabs/edm checkpoint has {key}, outside the preconditioner's `model`")
    name = key.removeprefix("model.")
    if name.endswith(".resample_filter"):
      if w.shape != want.shape or not np.array_equal(np.asarray(w, np.float32), want):
        raise ValueError(f"{key}: resample filter {np.asarray(w).reshape(-1)[:4].tolist()}... is not the one of "
                         f"resample_filter={taps}; memvol cannot express it")
    elif name in UNUSED:
      dropped.append(name)
    else:
      out[name] = np.ascontiguousarray(np.asarray(w, np.float32))
  return out, dropped


# --- memvol's side -----------------------------------------------------------------------


def _refuse(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"unsupported SongUNet config: {field}={value!r} ({why})")


def song_unet_kwargs(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], tuple[int, int, int]]:
  """(SongUNet kwargs, Preconditioned kwargs, image_shape (H, W, C)) of a folder's config
  (the NVlabs constructor arguments and `precond`). ValueError naming the first field memvol
  cannot express."""
  unknown = sorted(k for k in config if not k.startswith("_") and k not in SONG_UNET_DEFAULTS
                   and k not in PRECOND_DEFAULTS)
  if unknown:
    raise _refuse(unknown[0], config[unknown[0]], "not a SongUNet or preconditioning field memvol knows")
  c = {**SONG_UNET_DEFAULTS, **PRECOND_DEFAULTS, **config}
  preconds = tuple(PRECONDS.values())
  if c["precond"] not in preconds:
    raise _refuse("precond", c["precond"], f"supported: {preconds} (VPPrecond, VEPrecond, EDMPrecond)")
  if c["label_dim"]:
    raise _refuse("label_dim", c["label_dim"], "class-conditional networks are not supported")
  if c["embedding_type"] not in ("positional", "fourier"):
    raise _refuse("embedding_type", c["embedding_type"], "supported: 'positional' (DDPM++), 'fourier' (NCSN++)")
  if c["encoder_type"] not in ("standard", "residual"):
    raise _refuse("encoder_type", c["encoder_type"], "supported: 'standard' (DDPM++), 'residual' (NCSN++)")
  if c["decoder_type"] != "standard":
    raise _refuse("decoder_type", c["decoder_type"], "supported: 'standard' (DDPM++ and NCSN++)")
  if c["precond"] == "vp" and int(c["M"]) != 1000:
    raise _refuse("M", c["M"], "memvol feeds a VP network 999 t, EDM's (M - 1) t with M = 1000")
  size = c["img_resolution"]
  mult = [int(m) for m in c["channel_mult"]]
  if not isinstance(size, int) or size < 1 or size % 2 ** (len(mult) - 1):
    raise _refuse("img_resolution", size, f"must be a positive integer divisible by 2^{len(mult) - 1}")
  if not mult or min(mult) < 1:
    raise _refuse("channel_mult", c["channel_mult"], "must be non-empty positive integers")
  if int(c["in_channels"]) != int(c["out_channels"]):
    raise _refuse("out_channels", c["out_channels"], f"must equal in_channels={c['in_channels']}")
  chans = [int(c["model_channels"]) * m for m in mult]
  if int(c["model_channels"]) < 4 or any(x % min(32, x // 4) for x in chans):
    raise _refuse("model_channels", c["model_channels"], f"GroupNorm's min(32, C / 4) groups must divide {chans}")
  skips = [int(k) for k in c["skip_connections"] or []]
  if skips and (len(skips) != len(mult) * (int(c["num_blocks"]) + 1) or set(skips) - {0, 1}):
    raise _refuse("skip_connections", c["skip_connections"], f"one 0 or 1 per encoder skip, "
                  f"{len(mult) * (int(c['num_blocks']) + 1)} here")
  if len(c["resample_filter"]) < 1 or len(c["resample_filter"]) % 2 or sum(c["resample_filter"]) == 0:
    raise _refuse("resample_filter", c["resample_filter"], "an even number of taps with a nonzero sum (side / 2, x 2)")
  net = dict(img_resolution=size, in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
             model_channels=int(c["model_channels"]), channel_mult=tuple(mult),
             channel_mult_emb=int(c["channel_mult_emb"]), num_blocks=int(c["num_blocks"]),
             attn_resolutions=tuple(int(r) for r in c["attn_resolutions"]), embedding_type=c["embedding_type"],
             channel_mult_noise=int(c["channel_mult_noise"]), encoder_type=c["encoder_type"],
             decoder_type=c["decoder_type"], resample_filter=tuple(float(f) for f in c["resample_filter"]),
             skip_connections=() if all(skips) else tuple(skips))
  precond = dict(precond=c["precond"], sigma_data=float(c["sigma_data"]), beta_min=float(c["beta_min"]),
                 beta_d=float(c["beta_d"]))
  return net, precond, (size, size, int(c["in_channels"]))


def sde(config: Mapping[str, Any]) -> dict[str, Any]:
  """The memvol SDE (sde config fields) a folder's network is scored under: vp: VPSDE with
  beta_max = beta_min + beta_d (20 at EDM's defaults); ve / edm: VESDE over EDM's sampling
  range sigma 0.002 .. 80 (log sigma uniform in t, module song_unet)."""
  c = {**PRECOND_DEFAULTS, **config}
  if c["precond"] == "vp":
    return {"name": "vp", "beta_min": float(c["beta_min"]), "beta_max": float(c["beta_min"]) + float(c["beta_d"])}
  return {"name": "ve", "sigma_min": 0.002, "sigma_max": 80.0}
