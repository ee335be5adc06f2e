"""Print memvol's parity with the torch reference outputs of every pretrained fixture
(tests/fixtures/*/reference.npz, made by scripts/make_pretrained_fixture.py): parameters and
the max relative L2 error per image, in float32 and float64 (EDM folders: NVlabs' D(x; sigma)
under each preconditioning).

  python scripts/check_pretrained_parity.py [tests/fixtures]
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memvol import models  # noqa: E402
from memvol.interop import edm, folders, networks  # noqa: E402
from memvol.models import song_unet  # noqa: E402
from memvol.models.song_unet import Preconditioned  # noqa: E402


def max_rel(folder: str, dtype, precond: str | None = None) -> tuple[int, float, str]:
  """(params, max relative L2 error per image, where) of the folder's network against its
  reference in `dtype`; EDM folders: NVlabs' D(x; sigma) under `precond`."""
  ref = np.load(os.path.join(folder, "reference.npz"))
  model, params, _ = networks.load_model(folder)
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
  if precond is not None:
    fn = lambda p, x, s: model.clone(precond=precond).apply({"params": p}, x, s, method=Preconditioned.denoise)
    y = np.asarray(jax.jit(fn)(params, jnp.asarray(ref["x"], dtype), jnp.asarray(ref["sigma"], dtype)))
    want = ref[f"D_{precond}"]
    rel = np.linalg.norm((y - want).reshape(len(y), -1), axis=1) / np.linalg.norm(want.reshape(len(y), -1), axis=1)
    return models.count_params(params), float(rel.max()), f"D(x; sigma), sigma = {ref['sigma'].tolist()}"
  t_net = ref["n"] if "n" in ref.files else 999.0 * ref["t"]  # the network's input
  y = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ref["x"], dtype), jnp.asarray(t_net, dtype)))
  b = len(y)
  rel = np.linalg.norm((y - ref["eps"]).reshape(b, -1), axis=1) / np.linalg.norm(ref["eps"].reshape(b, -1), axis=1)
  at = "n" if "n" in ref.files else "999 t"
  return models.count_params(params), float(rel.max()), f"{at} = {np.round(t_net, 3).tolist()}"


def main(root: str) -> None:
  print(f"{'fixture':<20} {'format':<14} {'params':>9} {'float32':>9} {'float64':>9}  at")
  for name in sorted(os.listdir(root)):
    folder = os.path.join(root, name)
    if not os.path.exists(os.path.join(folder, "reference.npz")):
      continue
    config = folders.read_config(folder)
    fmt = config.get("_source_format", "diffusers")
    rows = [(name, fmt, None)]
    if config.get("_class_name") == edm.CLASS:  # every preconditioning around the same SongUNet
      rows = [(f"{name}/{p}", f"{fmt}{'*' if p == config['precond'] else ''}", p) for p in song_unet.PRECONDS]
    for label, fmt, precond in rows:
      n, r32, at = max_rel(folder, jnp.float32, precond)
      with jax.enable_x64(True):
        _, r64, _ = max_rel(folder, jnp.float64, precond)
      print(f"{label:<20} {fmt:<14} {n:>9,} {r32:>9.2e} {r64:>9.2e}  {at}")
  print("edm rows: D under vp / ve / edm preconditioning of the same weights (* the checkpoint's own)")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.join("tests", "fixtures"))
