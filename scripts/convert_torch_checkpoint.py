"""Convert a torch checkpoint of a diffusers UNet2DModel into a folder memvol loads
(config.json + diffusion_pytorch_model.safetensors). Needs torch (and, for pickled
modules, diffusers), which memvol itself does not depend on: run it in a separate venv.

  python3.11 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch diffusers safetensors numpy
  /tmp/venv-torch/bin/python scripts/convert_torch_checkpoint.py CKPT OUT [--config=config.json]

CKPT is one of:
  - a whole pickled UNet2DModel (torch.save(model)): its state dict and config are used;
  - a state dict of a UNet2DModel (.pt / .pth / .ckpt / .bin), also nested under
    "state_dict", "ema", "ema_model" or "model", with or without DataParallel's "module."
    prefix; --config gives its UNet2DModel config.json (required here).
When memvol's own dependencies (jax, flax) are importable too, the weights are checked
against the config with memvol's mapping (memvol.pretrained) and the folder is loaded back;
otherwise check it where memvol is installed:
  python -c "from memvol import pretrained; pretrained.load_model('OUT')"

torch.load unpickles CKPT, which can run code: convert only checkpoints you trust. memvol
never unpickles weights itself.

Not supported: the paper's own UNet (masa-longriver/Quantifying_the_Ease_of_Reproduction,
keys ResnetBlock_D11..., NIN_q...) is not a UNet2DModel: its residual blocks add
Dense(temb) without the swish, its time embedding has 2 x 128 channels and its up path has
one attention block per level; it is refused with that message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG_FILE, WEIGHTS_FILE = "config.json", "diffusion_pytorch_model.safetensors"  # = memvol.pretrained's
NESTED = ("state_dict", "ema", "ema_model", "model")


def _state_and_config(obj, config_path: str | None) -> tuple[dict, dict]:
  config = None
  if isinstance(obj, torch.nn.DataParallel):
    obj = obj.module
  if isinstance(obj, torch.nn.Module):
    config = dict(getattr(obj, "config", {}) or {}) or None
    if config is not None:
      config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
      config["_class_name"] = type(obj).__name__
    obj = obj.state_dict()
  while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
    key = next((k for k in NESTED if k in obj), None)
    if key is None:
      raise ValueError(f"no state dict found (top-level keys: {sorted(obj)[:10]})")
    obj = obj[key]
    if isinstance(obj, torch.nn.Module):
      return _state_and_config(obj, config_path)
  state = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
  if any(k.startswith(("ResnetBlock_", "AttnBlock_", "TimeEmbedding.")) for k in state):
    raise ValueError("this is the paper's own UNet (ResnetBlock_D11, NIN_q, ...), not a diffusers "
                     "UNet2DModel: its residual blocks add Dense(temb) without the swish, its time "
                     "embedding is 2 x 128 wide and its up path has one attention per level; memvol "
                     "cannot load it yet")
  if config_path:
    with open(config_path) as f:
      config = json.load(f)
  if config is None:
    raise ValueError("a bare state dict needs --config=config.json (its UNet2DModel config)")
  return {k: v.detach().float().cpu().numpy() for k, v in state.items()}, config


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint")
  p.add_argument("out")
  p.add_argument("--config", default=None, help="UNet2DModel config.json (needed for a bare state dict)")
  args = p.parse_args()
  obj = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
  state, config = _state_and_config(obj, args.config)
  try:
    from memvol import pretrained
  except ImportError:  # no jax here: write the folder, check it where memvol runs
    pretrained = None
  if pretrained is not None:
    model, shape = pretrained.unet_from_config(config)
    pretrained.params_from_state_dict(state, model, shape)  # refuses weights that do not fit
  from safetensors.numpy import save_file
  os.makedirs(args.out, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, os.path.join(args.out, WEIGHTS_FILE),
            metadata={"format": "pt"})
  with open(os.path.join(args.out, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  n = sum(int(np.prod(v.shape)) for v in state.values())
  if pretrained is not None:
    pretrained.load_model(args.out)
    print(f"{args.out}: {n:,} params, image shape {shape}, loads in memvol")
  else:
    print(f"{args.out}: {n:,} params written; memvol (jax) not importable here, so not checked: "
          f"python -c \"from memvol import pretrained; pretrained.load_model('{args.out}')\"")

if __name__ == "__main__":
  main()
