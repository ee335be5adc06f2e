"""Pictures: image grids (PNG). Report figures live in report.py and use these helpers."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
  """Tile images [N, H, W, C] in [-1, 1] into one uint8 array [rows*(H+pad)+pad, ..., C'].

  C' is 1 (grey) or 3. Values outside [-1, 1] are clipped.
  """
  images = np.asarray(images, dtype=np.float32)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"image_grid needs images [N>0, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  ncol = ncol or int(math.ceil(math.sqrt(n)))
  nrow = int(math.ceil(n / ncol))
  u8 = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = u8[i]
  return grid


def save_image_grid(images: np.ndarray, path: str, ncol: int | None = None, scale: int = 1) -> None:
  """Write a PNG grid of images [N, H, W, C] in [-1, 1] to `path` (atomically), each pixel
  enlarged `scale` times (nearest neighbour)."""
  from memvol import io as io_lib

  grid = image_grid(images, ncol)
  if scale > 1:
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  with io_lib.atomic_open(path, "wb") as f:
    img.save(f, format="PNG")
  os.chmod(path, 0o644)
