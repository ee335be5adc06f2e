"""Make the diffusers fixtures of tests/test_pretrained.py (needs torch + diffusers, which
memvol does not depend on; run it in a separate venv):

  python3.11 -m venv /tmp/venv-torch
  /tmp/venv-torch/bin/pip install torch diffusers safetensors numpy
  /tmp/venv-torch/bin/python scripts/make_pretrained_fixture.py tests/fixtures

Writes two random UNet2DModel folders (config.json, diffusion_pytorch_model.safetensors,
reference.npz with x [B, H, W, C] in [-1, 1], t [B] in (0, 1] and the network's output eps
[B, H, W, C] at timestep 999 t, computed in float64):

  ddpm_unet     DDPM's conventions (downsample_padding 0, sin before cos, freq_shift 1, one
                attention head, norm_eps 1e-6): 2 levels (24, 48 channels), attention at the
                second, 16x16x3.
  variant_unet  diffusers' defaults (downsample_padding 1, cos before sin, freq_shift 0,
                heads of 8 channels, norm_eps 1e-5), 8x12x1 images, attention at the first
                level, weights saved under the older attention names (query, key, value,
                proj_attn) that early diffusers checkpoints use.

Every weight is perturbed away from its initial value (GroupNorm scales off 1, biases off
0), so a weight mapped to the wrong place changes the output.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

CONFIGS = {
    "ddpm_unet": dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(24, 48), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=None, norm_eps=1e-6, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1),
    "variant_unet": dict(
        sample_size=(8, 12), in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), norm_num_groups=4, attention_head_dim=8),
}
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _legacy(key: str) -> str:
  for new, old in LEGACY.items():
    if ".attentions." in key and f".{new}." in key:
      return key.replace(f".{new}.", f".{old}.")
  return key


def make(name: str, out: str, seed: int) -> None:
  torch.manual_seed(seed)
  model = UNet2DModel(**CONFIGS[name]).double().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * max(float(p.std()) if p.numel() > 1 else 0.0, 0.05) * torch.randn_like(p))
      p.copy_(p.float().double())  # the float32 weights that are saved
  h, w = (model.config.sample_size,) * 2 if np.ndim(model.config.sample_size) == 0 else model.config.sample_size
  c = model.config.in_channels
  gen = torch.Generator().manual_seed(seed + 1)
  x = 2 * torch.rand(4, c, h, w, generator=gen, dtype=torch.float64) - 1
  t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
  with torch.no_grad():
    eps = model(x, 999.0 * t).sample
  folder = os.path.join(out, name)
  os.makedirs(folder, exist_ok=True)
  state = {k: v.float().contiguous() for k, v in model.state_dict().items()}
  if name == "variant_unet":
    state = {_legacy(k): v for k, v in state.items()}
  save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
  config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
  config["_class_name"] = "UNet2DModel"
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  np.savez(os.path.join(folder, "reference.npz"), x=x.permute(0, 2, 3, 1).numpy(), t=t.numpy(),
           eps=eps.permute(0, 2, 3, 1).numpy(),
           num_params=np.int64(sum(p.numel() for p in model.parameters())))
  print(f"{folder}: {sum(p.numel() for p in model.parameters())} params, |eps| max {float(eps.abs().max()):.3g}")


def main(out: str) -> None:
  for i, name in enumerate(CONFIGS):
    make(name, out, seed=10 * i)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("tests", "fixtures"))
