"""The compile-once check shared by the batched engines (volume.run, peers.run): a network
that counts how often it is traced, run on new parameters and images of a seen shape."""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def assert_one_compilation_per_batch_shape(run: Callable[[Any, np.ndarray], float],
                                           images: Callable[[int, int], np.ndarray]) -> None:
  """run(net, x) -> one float of the result; images(n, seed) -> a batch of n images.

  A second call with new parameters and images of the same shape must not trace the
  network again (and must give another value); a new batch shape traces it once more."""
  traces = []

  class CountingEps(eqx.Module):
    scale: jax.Array

    def __call__(self, x, t):
      traces.append(1)  # runs only while tracing
      return self.scale * x * t

  def go(scale: float, n: int, seed: int) -> float:
    return run(CountingEps(jnp.asarray(scale)), images(n, seed))

  first = go(0.5, 2, 1)
  n = len(traces)
  assert n >= 1
  second = go(0.7, 2, 2)
  assert len(traces) == n and second != first
  go(0.5, 3, 1)
  m = len(traces)
  assert m > n
  go(0.9, 3, 3)
  assert len(traces) == m
