"""Matmul / convolution precision as a setting of a compiled function, not of the chip.

GPUs run float32 matrix multiplies and convolutions at TF32 by default and TPUs at
bfloat16 passes; XLA's CPU backend always computes them in float32. A setting:

  "highest"  full float32 (what the CPU computes; the reference)
  "high"     TF32 on GPUs, 3 bfloat16 passes on TPUs
  "default"  the backend's fastest: TF32 on GPUs, 1 bfloat16 pass on TPUs

`precision(name)` is a context manager entered INSIDE the function being traced, so every
dot_general and convolution traced within carries the setting explicitly in the lowered
program (the process-wide `jax_default_matmul_precision` flag and the chip's default no
longer matter). Use it around the body of a per-batch function:

    def batch_fn(..., precision="highest"):
      with numerics.precision(precision):
        ...
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax

PRECISIONS = ("highest", "high", "default")


def check_precision(name: str, where: str = "precision") -> str:
  """`name` lower-cased, or a ValueError naming `where` unless it is one of PRECISIONS."""
  value = str(name).lower()
  if value not in PRECISIONS:
    raise ValueError(f"{where} must be one of {PRECISIONS}; got {name!r}")
  return value


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
  """Within the block, matmuls and convolutions being traced run at precision `name`."""
  with jax.default_matmul_precision(check_precision(name)):
    yield
