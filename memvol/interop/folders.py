"""The folder every network from elsewhere arrives as: `config.json` (the network's
constructor arguments, plus `_source_*` records of the converter) and
`diffusion_pytorch_model.safetensors` (float32 weights in torch layouts under the source's
names). Read and written with safetensors' numpy API: no torch, no pickle ever opened.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np

from memvol import io

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
CONVERT_HINT = ("convert it first (needs torch): python scripts/convert_torch_checkpoint.py "
                "CHECKPOINT OUT_FOLDER --config=config.json; memvol never opens pickles")


def check(path: str) -> tuple[str, str]:
  """(config.json, weights) paths of a folder; FileNotFoundError / ValueError (a torch
  pickle, with the command that converts it) otherwise."""
  path = str(path)
  if path.lower().endswith(PICKLE_SUFFIXES):
    raise ValueError(f"{path} is a torch pickle; {CONVERT_HINT}")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"pretrained model folder {path!r} does not exist (expected a diffusers "
                            f"UNet2DModel folder with {CONFIG_FILE} and {WEIGHTS_FILE})")
  cfg, weights = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
  if not os.path.exists(weights):
    pickles = sorted(f for f in os.listdir(path) if f.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
      raise ValueError(f"{path} holds {pickles[0]}, a torch pickle, and no {WEIGHTS_FILE}; {CONVERT_HINT}")
    raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
  if not os.path.exists(cfg):
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE} (UNet2DModel's config)")
  return cfg, weights


def read_config(path: str) -> dict[str, Any]:
  """The folder's config.json as a dict."""
  cfg, _ = check(path)
  try:
    with open(cfg) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg} is not valid JSON ({e})") from e


def read_weights(path: str) -> dict[str, np.ndarray]:
  """The folder's safetensors as numpy arrays; ValueError naming the file when it is not
  a complete safetensors file (truncated, garbage)."""
  from safetensors.numpy import load_file
  _, weights = check(path)
  try:
    return load_file(weights)
  except Exception as e:  # safetensors raises its own SafetensorError, or OSError / ValueError
    raise ValueError(f"{weights} is not a readable safetensors file ({type(e).__name__}: {e}); expected the "
                     "weights written by scripts/convert_torch_checkpoint.py or memvol.interop.networks.export") from e


def write(path: str, config: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> None:
  """Write config.json and the weights (as float32) to `path`, each atomically."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path, prefix=".weights.", suffix=".tmp")
  os.close(fd)
  try:
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, tmp, metadata={"format": "pt"})
    shutil.move(tmp, os.path.join(path, WEIGHTS_FILE))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  io.save_json(os.path.join(path, CONFIG_FILE), dict(config))


def weights_sha256(path: str) -> str:
  """SHA-256 (hex) of the folder's safetensors file."""
  _, weights = check(path)
  return io.file_sha256(weights)
