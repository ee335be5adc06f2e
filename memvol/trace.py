"""Traces and frames of a Jacobian seen only through its Jacobian-vector products.

Everything here works on ONE image: `jvp_fn(v) = J v` maps a tangent v [*shape] to
[*shape] (typically the linear function returned by `jax.linearize` of the eps network at
x, so the network's forward pass is done once and each product costs one JVP).

- `exact_trace`: tr J = sum_i e_i^T J e_i over the D basis vectors, chunked.
- `hutchinson`: the per-probe quadratic forms v_k^T J v_k; their mean is unbiased for
  tr J when E[v v^T] = I (Rademacher or Gaussian probes).
- `hutchpp`: Hutch++ (Meyer, Musco, Musco & Woodruff 2021) applied to J - alpha I, with
  alpha = tr J / D estimated from the sketch: tr(Q^T (J - alpha I) Q) exactly for
  Q = orth((J - alpha I) S) plus Hutchinson on the deflated remainder, plus alpha D.
  Unbiased for any square J; the variance comes from the shifted, deflated part only.
- `orthonormalise` / `sorted_gram_schmidt`: the QR step of Lyapunov-type frame methods
  (the `subspace` and `paper` estimators).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
JvpFn = Callable[[Array], Array]

PROBES = ("rademacher", "gaussian")


def chunked_vmap(f: Callable[[Array], Array], xs: Array, chunk_size: int | None) -> Array:
  """vmap f over the leading axis of xs, at most `chunk_size` at a time (None: all)."""
  if chunk_size is None or chunk_size >= xs.shape[0]:
    return jax.vmap(f)(xs)
  return jax.lax.map(f, xs, batch_size=chunk_size)


def sample_probes(key: Array, num: int, shape: tuple[int, ...], dtype, kind: str = "rademacher",
                  offset: int = 0) -> Array:
  """[num, *shape] probes with E[v v^T] = I; probe k comes from fold_in(key, offset + k), so
  a probe does not depend on how many others are drawn."""
  if kind not in PROBES:
    raise ValueError(f"unknown probe {kind!r}; expected one of {PROBES}")

  def one(k):
    sub = jax.random.fold_in(key, k)
    if kind == "rademacher":
      return jax.random.rademacher(sub, shape, dtype)
    return jax.random.normal(sub, shape, dtype)

  return jax.vmap(one)(offset + jnp.arange(num))


def exact_trace(jvp_fn: JvpFn, shape: tuple[int, ...], dtype, chunk_size: int | None = 64) -> Array:
  """tr J by D JVPs on the basis vectors, `chunk_size` of them vmapped at a time. []"""
  d = math.prod(shape)
  chunk = d if chunk_size is None else max(1, min(chunk_size, d))
  num_chunks = -(-d // chunk)
  ids = jnp.arange(num_chunks * chunk).reshape(num_chunks, chunk)

  def one_chunk(idx):  # [chunk] basis indices; those >= d pad the last chunk
    basis = jax.nn.one_hot(idx, d, dtype=dtype).reshape((chunk,) + tuple(shape))
    cols = jax.vmap(jvp_fn)(basis).reshape(chunk, d)
    diag = jnp.take_along_axis(cols, jnp.minimum(idx, d - 1)[:, None], axis=1)[:, 0]
    return jnp.sum(jnp.where(idx < d, diag, 0))

  return jnp.sum(jax.lax.map(one_chunk, ids))


def hutchinson(jvp_fn: JvpFn, probes: Array, chunk_size: int | None = None) -> Array:
  """[n] quadratic forms v_k^T J v_k for probes [n, *shape]."""
  jv = chunked_vmap(jvp_fn, probes, chunk_size)
  return jnp.sum((probes * jv).reshape(probes.shape[0], -1), axis=1)


def hutchpp(jvp_fn: JvpFn, sketch: Array, probes: Array, chunk_size: int | None = None) -> Array:
  """[n] terms of Hutch++ with an identity shift; their mean is unbiased for tr J.

  sketch S: [k, *shape]; probes g: [n, *shape]. From the sketch: alpha = S.(J S) / (k D)
  (a Hutchinson estimate of tr J / D) and Q = orth((J - alpha I) S) [D, m], m = min(k, D).
  Term k: alpha D + tr(Q^T (J - alpha I) Q) + g_k'^T (J - alpha I) g_k', g_k' = (I - Q Q^T) g_k.
  Given S it is unbiased for any square J (tr((I - QQ^T) B Q Q^T) = 0), and its spread is the
  Hutchinson noise of the shifted, deflated remainder: the shift makes an identity-heavy J
  (eps networks: d eps/dx ~ (I - projector) / sigma near the data) cost nothing and lets Q
  catch the low-rank deviation from it; plain Hutch++ would deflate the flat identity part
  and, with Rademacher probes, add variance. k >= D is exact. Costs 2k + n JVPs.
  """
  k, n = sketch.shape[0], probes.shape[0]
  shape = probes.shape[1:]
  d = math.prod(shape)
  s = sketch.reshape(k, -1)
  y = chunked_vmap(jvp_fn, sketch, chunk_size).reshape(k, -1)
  alpha = jnp.sum(s * y) / (k * d)
  q, _ = jnp.linalg.qr((y - alpha * s).T)  # [D, m]
  m = q.shape[1]
  jq = chunked_vmap(jvp_fn, q.T.reshape((m,) + shape), chunk_size).reshape(m, -1)
  low = jnp.sum(q.T * jq) - alpha * m
  g = probes.reshape(n, -1)
  g = g - (g @ q) @ q.T
  jg = chunked_vmap(jvp_fn, g.reshape((n,) + shape), chunk_size).reshape(n, -1)
  return alpha * d + low + jnp.sum(g * jg, axis=1) - alpha * jnp.sum(g * g, axis=1)


def orthonormalise(frame: Array) -> tuple[Array, Array]:
  """QR of a frame [K, *shape] (rows are the K vectors): the orthonormal frame Q with the
  same nested spans and orientation (diag R > 0) [K, *shape], and log|diag R| [K]."""
  k = frame.shape[0]
  q, r = jnp.linalg.qr(frame.reshape(k, -1).T)
  diag = jnp.diagonal(r)
  sign = jnp.where(diag < 0, -1.0, 1.0).astype(q.dtype)
  return (q * sign).T.reshape(frame.shape), jnp.log(jnp.abs(diag))


def sorted_gram_schmidt(diffs: Array) -> Array:
  """Unit frame [K, *shape] from difference vectors [K, *shape], the paper's way: sort the
  vectors by decreasing length, then Gram-Schmidt in that order. Done as a Householder QR
  with diag R made positive, which is the same frame in exact arithmetic and stabler."""
  k = diffs.shape[0]
  flat = diffs.reshape(k, -1)
  order = jnp.argsort(-jnp.linalg.norm(flat, axis=1), stable=True)
  q, _ = orthonormalise(flat[order])
  return q.reshape(diffs.shape)
