"""Write a memvol UNet as a diffusers UNet2DModel folder (config.json +
diffusion_pytorch_model.safetensors), loadable by diffusers and by memvol
(`--config.model.pretrained=OUT`, memvol.pretrained.load_eps_fn).

  # a trained workdir's (EMA) network, built from the config its checkpoint records:
  python scripts/export_safetensors.py --workdir=runs/mnist OUT
  # a random-init network of the DDPM CIFAR-10 architecture (35,746,307 params, 143 MB), for
  # the end-to-end demo of experiments/configs/pretrained.py, and 32x32 RGB images to score:
  python scripts/export_safetensors.py --random-ddpm-cifar10 OUT --demo-images OUT/images.npz

The random network has no zero-initialised layers, so its eps is not identically zero. The demo images are 32x32
crops of scikit-image's bundled colour photographs (no download).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memvol import checkpoint, io, loading, models  # noqa: E402
from memvol.interop import diffusers, folders, networks  # noqa: E402


def _recorded_config(workdir: str, step: int | None) -> ml_collections.ConfigDict:
  """The data / model / sde config the workdir's checkpoint was trained with."""
  return ml_collections.ConfigDict(checkpoint.restore_meta(workdir, step)["config"])


def random_ddpm_cifar10(path: str, seed: int = 0) -> dict:
  """Write a random network of google/ddpm-cifar10-32's architecture to `path`: kernels
  N(0, 1 / fan_in), GroupNorm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2) (numpy, no compile)."""
  model, shape = networks.model_from_config(diffusers.DDPM_CIFAR10_CONFIG)
  shapes = jax.eval_shape(lambda k: models.init_params(model, k, shape), jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    kind, z = path[-1].key, rng.standard_normal(leaf.shape).astype(np.float32)
    if kind == "kernel":
      return z / np.sqrt(np.prod(leaf.shape[:-1]))
    return 1.0 + 0.1 * z if kind == "scale" else 0.1 * z

  params = jax.tree_util.tree_map_with_path(draw, shapes)
  folders.write(path, diffusers.DDPM_CIFAR10_CONFIG, networks.state_dict_from_params(params, model))
  return {"params": models.count_params(params), "sha256": folders.weights_sha256(path)}


def demo_images(path: str, n: int = 64, side: int = 32, seed: int = 0) -> None:
  """n random side x side crops (uint8 RGB) of scikit-image's colour photographs, as an npz."""
  from skimage import data, transform
  photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    img = photos[i % len(photos)]
    s = int(rng.integers(side, min(img.shape[:2]) // 2))
    y, x = rng.integers(0, img.shape[0] - s), rng.integers(0, img.shape[1] - s)
    crop = transform.resize(img[y:y + s, x:x + s], (side, side), anti_aliasing=True)
    out.append(np.round(255 * crop).astype(np.uint8))
  io.save_npz(path, images=np.stack(out), labels=np.arange(n, dtype=np.int64) % len(photos))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("out", help="folder to write (config.json + diffusion_pytorch_model.safetensors)")
  p.add_argument("--workdir", help="workdir whose checkpoint is exported")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--raw", action="store_true", help="export the raw params instead of the EMA params")
  p.add_argument("--random-ddpm-cifar10", action="store_true", dest="random",
                 help="write a random-init DDPM CIFAR-10 network instead")
  p.add_argument("--demo-images", default="", help="also write 32x32 RGB demo images to this .npz")
  args = p.parse_args()
  if args.random:
    info = random_ddpm_cifar10(args.out)
    print(f"{args.out}: random DDPM CIFAR-10 network, {info['params']:,} params, sha256 {info['sha256']}")
  else:
    if not args.workdir:
      p.error("give --workdir (or --random-ddpm-cifar10)")
    config = _recorded_config(args.workdir, args.step)
    model, params, shape = loading.load_model(config, args.workdir, use_ema=not args.raw, step=args.step)
    cfg = networks.export(model, jax.device_get(params), shape, args.out)
    print(f"{args.out}: {models.count_params(params):,} params, blocks {cfg['down_block_types']}, "
          f"sha256 {folders.weights_sha256(args.out)}")
  if args.demo_images:
    demo_images(args.demo_images)
    print(f"{args.demo_images}: 64 demo images 32x32x3")


if __name__ == "__main__":
  main()
