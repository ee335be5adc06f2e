"""Devices and meshes: the `data` axis that training, sampling and scoring shard over.

Scale-out model
---------------
* One process, many devices: `shard_map_batch(fn, mesh)` splits a batch over the `data`
  axis with `jax.shard_map`; each device runs `fn` (a per-device vmap) on its slice and
  nothing is communicated inside `fn`, so an adaptive solve on one device never waits on
  another device's step count. The batch is padded to a multiple of the device count and
  the padding dropped from the result, so every item is computed exactly once.
* Many hosts: every process initialises jax.distributed (`--distributed` in
  experiments/main.py; from a script `initialize_distributed()`, or MEMVOL_DISTRIBUTED=1
  with `initialize_distributed(None)`), builds a mesh over its OWN devices
  (`local_mesh()`), and takes its share of the work with `process_slice(n)`. Processes
  exchange nothing but files and barriers: each writes its own result parts to the shared
  workdir and process 0 merges them. On SLURM, Open MPI and Cloud TPU jax.distributed
  finds the coordinator by itself; elsewhere run on every host i of N

      python -m experiments.main --distributed --coordinator_address=host0:1234 \
        --num_processes=N --process_id=i --mode=score --config=... --workdir=W

  (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), with W on a
  file system that every host sees.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"
DISTRIBUTED_ENV = "MEMVOL_DISTRIBUTED"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device")
  return Mesh(np.asarray(devices), (DATA,))


def local_mesh() -> Mesh:
  """A `data` mesh over this process's own devices (what sampling and scoring use)."""
  return data_mesh(jax.local_devices())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


# --- data-parallel map -------------------------------------------------------------


def padded_size(n: int, num_devices: int, minimum: int = 0) -> int:
  """Smallest multiple of `num_devices` that is >= max(n, minimum, 2 num_devices).

  At least two items per device: XLA compiles a vmapped axis of size one differently
  (it is squeezed away), which changes results in the last bit, and an adaptive solve
  can amplify that; with >= 2 per device the per-item results do not depend on the batch.
  """
  m = max(n, minimum, 2 * num_devices)
  return -(-m // num_devices) * num_devices


def pad_batch(x: Any, size: int) -> Any:
  """Pad the leading axis of array `x` to `size` by repeating its last row (valid input,
  so padded rows cannot fail input checks; their results are dropped)."""
  x = jnp.asarray(x)
  n = x.shape[0]
  if n == size:
    return x
  if n > size:
    raise ValueError(f"cannot pad a batch of {n} down to {size}")
  return jnp.concatenate([x, jnp.repeat(x[-1:], size - n, axis=0)], axis=0)


def shard_map_batch(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  """Data-parallel map of `fn(replicated, *batched) -> pytree of [b, ...] arrays`.

  `fn` sees one device's slice: the batched arrays [b_local, ...] and the whole
  `replicated` pytree (split with `eqx.partition(.., eqx.is_array)`: array leaves are
  traced and copied to every device, anything else - callables, options - is static and
  must be hashable). `fn` must not use collectives; every output leaf must have the
  local batch as its leading axis.

  Returns `mapped(replicated, *batched, pad_to=0)`: pads the batch (leading axes must
  agree, b >= 1) to a multiple of the device count that is >= `pad_to` and holds at least
  two items per device (`padded_size`; pass a fixed
  `pad_to` so a short last batch reuses the compiled program), runs `fn` under
  `jax.shard_map` on the `data` axis, and returns the outputs cut back to [b, ...].
  Compiled once per (fn, mesh, static part, shapes): calls with the same `fn` and `mesh`
  share one cache.
  """
  return _shard_map_batch(fn, mesh)


@functools.lru_cache(maxsize=64)
def _shard_map_batch(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
  if DATA not in mesh.axis_names:
    raise ValueError(f"shard_map_batch needs a mesh with a {DATA!r} axis, got {mesh.axis_names}")
  num_devices = mesh.shape[DATA]

  @eqx.filter_jit
  def run(arrays: Any, static: Any, *batched: jax.Array) -> Any:
    def body(arrays: Any, *local: jax.Array) -> Any:
      return fn(eqx.combine(arrays, static), *local)

    specs = (P(),) + (P(DATA),) * len(batched)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(DATA), check_vma=False)(
        arrays, *batched)

  def mapped(replicated_tree: Any, *batched: Any, pad_to: int = 0) -> Any:
    if not batched:
      raise ValueError("shard_map_batch needs at least one batched array")
    sizes = {int(np.shape(b)[0]) if np.ndim(b) else -1 for b in batched}
    if len(sizes) != 1 or min(sizes) < 1:
      raise ValueError(f"batched arrays need one common leading size >= 1, got sizes "
                       f"{[np.shape(b) for b in batched]}")
    (n,) = sizes
    size = padded_size(n, num_devices, pad_to)
    padded = [pad_batch(b, size) for b in batched]
    arrays, static = eqx.partition(replicated_tree, eqx.is_array)
    out = run(arrays, static, *padded)
    return jax.tree.map(lambda o: o[:n], out)

  return mapped


# --- several processes -------------------------------------------------------------


def initialize_distributed(enabled: bool | None = None, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Call `jax.distributed.initialize(coordinator_address, num_processes, process_id)`
  (None: found from the cluster environment) when `enabled`, or, when `enabled` is None,
  when the environment variable MEMVOL_DISTRIBUTED is 1/true. A second call is a no-op.
  Returns whether jax.distributed is initialised."""
  if enabled is None:
    enabled = os.environ.get(DISTRIBUTED_ENV, "").strip().lower() in ("1", "true", "yes")
  if enabled and not jax.distributed.is_initialized():
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return jax.distributed.is_initialized()


def process_slice(n: int, process_index: int | None = None, process_count: int | None = None) -> slice:
  """This process's contiguous share of range(n): process p of P gets
  [p n // P, (p + 1) n // P) (shares differ in size by at most one; all P cover range(n)
  exactly once)."""
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if n < 0 or count < 1 or not 0 <= p < count:
    raise ValueError(f"process_slice: bad arguments n={n}, process {p} of {count}")
  return slice(p * n // count, (p + 1) * n // count)


def is_main_process() -> bool:
  """Whether this is process 0 (the one that merges and writes shared files)."""
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """Barrier across processes (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
