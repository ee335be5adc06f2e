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


# --- matplotlib figures (report and detect) ----------------------------------------


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, path: str, dpi: int = 120) -> None:
  """Write a matplotlib figure to `path` as PNG (atomically) and close it."""
  from memvol import io as io_lib

  plt = pyplot()
  with io_lib.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  os.chmod(path, 0o644)


def show_image(ax, image: np.ndarray) -> None:
  """One image [H, W, C] in [-1, 1] on `ax`, grey for C = 1, without ticks."""
  image = np.clip(np.asarray(image, np.float32), -1.0, 1.0)
  if image.ndim == 3 and image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
  else:
    ax.imshow((image + 1.0) / 2.0, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  for s in ax.spines.values():
    s.set_color("0.75")
    s.set_linewidth(0.5)


def save_pairs_figure(blocks: list[dict], path: str, title: str = "", ncol: int = 8) -> None:
  """Image pairs (one above the other) in captioned blocks, as one PNG.

  Each block is a dict with `title`, `top` [n, H, W, C], `bottom` [n, H, W, C] (images in
  [-1, 1]), `captions` (n strings, shown under each pair) and `row_labels` (two strings,
  shown left of the first pair of each row). Blocks with n = 0 show their title only.
  `title` (may span lines) heads the figure.
  """
  plt = pyplot()
  sizes = [len(b["top"]) for b in blocks]
  ncol = max(1, min(ncol, max(sizes)))
  rows = [max(1, -(-n // ncol)) for n in sizes]
  cell, caption, head = 1.0, 0.42, 0.35                 # inches: image side, caption row, block title
  heights = [r * (2 * cell + caption) + head for r in rows]
  title_h = 0.3 * len(title.splitlines()) if title else 0.0
  fig = plt.figure(figsize=(max(cell * ncol + 0.6, 4.5), sum(heights) + title_h))
  subs = fig.subfigures(len(blocks) + 1, 1, height_ratios=[title_h or 1e-6] + heights, squeeze=False)[:, 0]
  if title:
    subs[0].text(0.01, 0.5, title, fontsize=8.5, ha="left", va="center")
  subs = subs[1:]
  width = fig.get_figwidth()
  for sub, block, n, r, h in zip(subs, blocks, sizes, rows, heights):
    sub.suptitle(block["title"], fontsize=9, x=0.01, ha="left")
    gs = sub.add_gridspec(3 * r, ncol, height_ratios=[cell, cell, caption] * r, hspace=0.04, wspace=0.06,
                          left=0.6 / width, right=min(0.99, (0.6 + cell * ncol) / width),
                          top=1.0 - head / h, bottom=0.0)
    if n == 0:
      ax = sub.add_subplot(gs[0, 0])
      ax.set_axis_off()
      ax.text(0.0, 0.5, "(none)", transform=ax.transAxes, fontsize=9)
    for i in range(n):
      q, c = divmod(i, ncol)
      top, bot = sub.add_subplot(gs[3 * q, c]), sub.add_subplot(gs[3 * q + 1, c])
      show_image(top, block["top"][i])
      show_image(bot, block["bottom"][i])
      bot.set_xlabel(block["captions"][i], fontsize=6.5, labelpad=2)
      if c == 0:
        top.set_ylabel(block["row_labels"][0], fontsize=7.5)
        bot.set_ylabel(block["row_labels"][1], fontsize=7.5)
  save_figure(fig, path)
