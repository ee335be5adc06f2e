"""The `train` stage of a network trained elsewhere: nothing to train; the folder's weights
are recorded (SHA-256) and verified on every run, with the train / held-out split.

Folders, formats and their loading are memvol.interop's (folder, diffusers, pytorch_ddpm,
hasegawa, edm, networks). The two names a user reaches for stay here:

    eps_fn, image_shape = pretrained.load_eps_fn(folder, sde)   # eps_fn(x [H, W, C] in [-1, 1], t)
    model, params, image_shape = pretrained.load_model(folder)  # the Flax network and its float32 params
"""

from __future__ import annotations

import os
from typing import Any

from memvol import io
from memvol import sde as sde_lib
from memvol import workdir as wdir
from memvol.interop import folders, networks
from memvol.interop.networks import load_eps_fn, load_model  # noqa: F401  (the user-facing names)


def check_weights(path: str, workdir: str) -> str:
  """Record the SHA-256 of the weights at `path` in workdir/pretrained.json the first time;
  afterwards refuse (ValueError) weights whose SHA-256 differs. Returns the hash."""
  digest = folders.weights_sha256(path)
  record = wdir.pretrained_record(workdir)
  if not os.path.exists(record):
    io.save_json(record, {"path": os.path.abspath(path), "sha256": digest, "config": folders.read_config(path)})
    return digest
  old = io.load_json(record)
  if old.get("sha256") != digest:
    raise ValueError(f"{path}/{folders.WEIGHTS_FILE} has SHA-256 {digest[:16]}..., but workdir {workdir} "
                     f"was made with weights {str(old.get('sha256'))[:16]}... ({old.get('path')}); "
                     "use a new --workdir for other weights")
  return digest


def run(config: Any, workdir: str) -> None:
  """The `train` stage of a pretrained config: nothing to train; records the weights'
  SHA-256 and the train / held-out split (data.prepare) that later stages read."""
  from memvol import data
  path = str(config.model.pretrained)
  digest = check_weights(path, workdir)
  _, image_shape = networks.model_from_config(folders.read_config(path))
  networks.check_sde(path, sde_lib.from_config(config.sde))
  split = data.prepare(config, workdir)
  if tuple(split.train.shape) != tuple(image_shape):
    raise ValueError(f"the data's images have shape {split.train.shape} but {path} takes "
                     f"{tuple(image_shape)}; set data.resolution (and data.channels)")
  print(f"[memvol] pretrained {path} (sha256 {digest[:12]}): no training; {data.describe(split)}")


DONE_MEANS = "the weights and the split are recorded"


def stale_reason(config: Any, workdir: str) -> str | None:
  """Always a reason: the pretrained `train` stage only verifies (cheap), so it always runs."""
  return "a pretrained model: its weights and split are verified on every run"


def is_complete(config: Any, workdir: str) -> bool:
  return stale_reason(config, workdir) is None
