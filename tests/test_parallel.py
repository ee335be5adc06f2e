"""Data-parallel map: 1 vs 4 devices, padding, one compile, no collectives; work split."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memvol import parallel


def mesh(n):
  return parallel.data_mesh(jax.devices()[:n])


class Affine(eqx.Module):
  w: jax.Array
  shift: float = eqx.field(static=True)

  def __call__(self, x):
    return self.w * x + self.shift


TRACES = []


def iterate(rep, x, ids):
  """Per item: a while loop whose trip count depends on the item (like an adaptive solve)."""
  TRACES.append(x.shape)
  f, = rep

  def one(x, i):
    def body(c):
      k, y = c
      return k + 1, f(y)
    k, y = jax.lax.while_loop(lambda c: c[0] < i % 5 + 1, body, (0, x))
    return {"y": y, "steps": k, "id": i}

  return jax.vmap(one)(x, ids)


def reference(w, shift, x, ids):
  out = []
  for xi, i in zip(np.asarray(x), np.asarray(ids)):
    for _ in range(i % 5 + 1):
      xi = w * xi + shift
    out.append(xi)
  return np.stack(out)


def test_one_vs_four_devices_and_padding():
  x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)  # 7: not divisible by 4
  ids = np.arange(10, 17, dtype=np.int32)
  f = Affine(jnp.float32(0.5), 1.0)
  ref = reference(0.5, 1.0, x, ids)
  for n in (1, 2, 4):
    out = parallel.shard_map_batch(iterate, mesh(n))((f,), x, ids)
    assert out["y"].shape == (7, 3)
    np.testing.assert_array_equal(out["id"], ids)  # every item once, in order, padding dropped
    np.testing.assert_array_equal(out["steps"], ids % 5 + 1)
    np.testing.assert_allclose(out["y"], ref, rtol=1e-6)


def test_compiles_once_per_shape_and_params_are_traced():
  mapped = parallel.shard_map_batch(iterate, mesh(4))
  assert mapped is parallel.shard_map_batch(iterate, mesh(4))  # one cache per (fn, mesh)
  x = np.ones((8, 2), np.float32)
  ids = np.arange(8, dtype=np.int32)
  TRACES.clear()
  a = mapped((Affine(jnp.float32(2.0), 0.0),), x, ids, pad_to=8)
  b = mapped((Affine(jnp.float32(3.0), 0.0),), x, ids, pad_to=8)  # new params: no retrace
  c = mapped((Affine(jnp.float32(3.0), 0.0),), x[:5], ids[:5], pad_to=8)  # short last batch
  assert len(TRACES) == 1
  np.testing.assert_allclose(a["y"][:, 0], 2.0 ** (ids % 5 + 1))
  np.testing.assert_allclose(b["y"][:, 0], 3.0 ** (ids % 5 + 1))
  np.testing.assert_array_equal(c["y"], b["y"][:5])
  mapped((Affine(jnp.float32(3.0), 1.0),), x, ids, pad_to=8)  # static field changed: retrace
  assert len(TRACES) == 2


def test_no_collectives_in_the_compiled_program():
  mapped = parallel.shard_map_batch(iterate, mesh(4))
  f = Affine(jnp.float32(0.5), 1.0)
  hlo = jax.jit(lambda x, ids: mapped((f,), x, ids)).lower(
      jnp.ones((8, 3)), jnp.arange(8, dtype=jnp.int32)).compile().as_text()
  assert "while" in hlo
  for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter"):
    assert op not in hlo, op


def test_bad_batches():
  mapped = parallel.shard_map_batch(iterate, mesh(2))
  f = (Affine(jnp.float32(1.0), 0.0),)
  with pytest.raises(ValueError, match="leading size"):
    mapped(f, np.ones((3, 2), np.float32), np.arange(4, dtype=np.int32))
  with pytest.raises(ValueError, match="leading size"):
    mapped(f, np.ones((0, 2), np.float32), np.arange(0, dtype=np.int32))
  with pytest.raises(ValueError, match="at least one"):
    mapped(f)
  with pytest.raises(ValueError, match="data"):
    parallel.shard_map_batch(iterate, jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("x",)))


def test_padded_size_and_pad_batch():
  assert [parallel.padded_size(n, 4) for n in (1, 4, 5, 8, 9)] == [8, 8, 8, 8, 12]
  assert [parallel.padded_size(n, 1) for n in (1, 2, 3)] == [2, 2, 3]
  assert parallel.padded_size(5, 4, minimum=16) == 16
  p = parallel.pad_batch(np.arange(6).reshape(3, 2), 5)
  np.testing.assert_array_equal(p, [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
  with pytest.raises(ValueError, match="cannot pad"):
    parallel.pad_batch(np.zeros((5, 1)), 4)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 64])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_process_slice_covers_everything_once(n, count):
  seen = np.concatenate([np.arange(n)[parallel.process_slice(n, p, count)] for p in range(count)])
  np.testing.assert_array_equal(seen, np.arange(n))
  sizes = [len(range(n)[parallel.process_slice(n, p, count)]) for p in range(count)]
  assert max(sizes) - min(sizes) <= 1


def test_process_slice_defaults_and_errors():
  assert parallel.process_slice(10) == slice(0, 10)  # one process here
  with pytest.raises(ValueError):
    parallel.process_slice(10, 2, 2)


def test_initialize_distributed_off_unless_asked(monkeypatch):
  monkeypatch.delenv(parallel.DISTRIBUTED_ENV, raising=False)
  assert parallel.initialize_distributed(None) is False
  assert parallel.initialize_distributed(False) is False
  parallel.sync_processes("single-process barrier is a no-op")
