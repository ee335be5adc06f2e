"""memvol.trace: trace estimators and frame orthonormalisation on explicit matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memvol import trace

SHAPE = (3, 4)  # D = 12
D = 12


def _matvec(a):
  a = jnp.asarray(a)
  return lambda v: (a @ v.reshape(-1)).reshape(v.shape)


@pytest.mark.parametrize("chunk", [1, 5, 12, 64, None])
def test_exact_trace_any_chunking(x64, chunk):
  a = np.random.default_rng(0).normal(size=(D, D))
  got = trace.exact_trace(_matvec(a), SHAPE, jnp.float64, chunk)
  assert float(got) == pytest.approx(np.trace(a), rel=1e-12)


def test_probes_rademacher_gaussian_and_independent_of_count():
  key = jax.random.PRNGKey(0)
  r = trace.sample_probes(key, 8, SHAPE, jnp.float32, "rademacher")
  assert r.shape == (8,) + SHAPE and set(np.unique(r)) == {-1.0, 1.0}
  np.testing.assert_array_equal(trace.sample_probes(key, 3, SHAPE, jnp.float32)[:3], r[:3])
  np.testing.assert_array_equal(trace.sample_probes(key, 2, SHAPE, jnp.float32, offset=3), r[3:5])
  g = trace.sample_probes(key, 4000, SHAPE, jnp.float32, "gaussian")
  cov = np.cov(np.asarray(g).reshape(4000, -1).T)
  np.testing.assert_allclose(cov, np.eye(D), atol=0.1)
  with pytest.raises(ValueError, match="unknown probe 'sobol'"):
    trace.sample_probes(key, 2, SHAPE, jnp.float32, "sobol")


def test_hutchinson_exact_on_diagonal_with_rademacher(x64):
  a = np.diag(np.random.default_rng(1).normal(size=D))
  probes = trace.sample_probes(jax.random.PRNGKey(1), 5, SHAPE, jnp.float64)
  q = trace.hutchinson(_matvec(a), probes, chunk_size=2)
  np.testing.assert_allclose(q, np.trace(a), rtol=1e-12)  # every single probe is exact


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_with_the_textbook_variance(x64, kind):
  rng = np.random.default_rng(2)
  a = rng.normal(size=(D, D))
  n = 20000
  probes = trace.sample_probes(jax.random.PRNGKey(2), n, SHAPE, jnp.float64, kind)
  q = np.asarray(trace.hutchinson(_matvec(a), probes))
  sym = 0.5 * (a + a.T)
  var = 2 * (np.sum(sym**2) - (np.sum(np.diag(sym) ** 2) if kind == "rademacher" else 0.0))
  assert abs(q.mean() - np.trace(a)) < 4 * np.sqrt(var / n)
  assert q.var() == pytest.approx(var, rel=0.05)


def _hutchpp_draws(a, k, num, kind, reps=400):
  key = jax.random.PRNGKey(3)

  def one(i):
    sub = jax.random.fold_in(key, i)
    s, g = (trace.sample_probes(sub, c, SHAPE, jnp.float64, kind, offset=o) for c, o in ((k, 0), (num, k)))
    return trace.hutchpp(_matvec(a), s, g), trace.hutchinson(_matvec(a), g)

  return (np.asarray(v).reshape(-1) for v in jax.jit(jax.vmap(one))(jnp.arange(reps)))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchpp_unbiased_exact_at_full_sketch_and_lower_variance(x64, kind):
  rng = np.random.default_rng(3)
  a = rng.normal(size=(D, D))
  full = trace.hutchpp(_matvec(a), trace.sample_probes(jax.random.PRNGKey(0), D + 2, SHAPE, jnp.float64, kind),
                       trace.sample_probes(jax.random.PRNGKey(1), 3, SHAPE, jnp.float64, kind))
  np.testing.assert_allclose(full, np.trace(a), rtol=1e-10)  # sketch spans everything
  u, _ = np.linalg.qr(rng.normal(size=(D, D)))
  cases = {
      # decaying spectrum: deflation removes most of the variance
      "decaying": (u * 2.0 ** -np.arange(D)) @ u.T + 0.05 * rng.normal(size=(D, D)),
      # identity minus a low-rank projector, like d eps/dx of a denoiser near its data:
      # the shift removes the identity, the sketch catches the projector
      "identity_minus_projector": 5.0 * (np.eye(D) - u[:, :3] @ u[:, :3].T) + 0.05 * rng.normal(size=(D, D)),
  }
  for name, m in cases.items():
    pp, plain = _hutchpp_draws(m, 4, 2, kind)
    assert abs(pp.mean() - np.trace(m)) < 4 * pp.std() / np.sqrt(pp.size), name
    assert pp.var() < 0.3 * plain.var(), (name, pp.var(), plain.var())


def test_chunked_vmap_matches_vmap():
  xs = jnp.arange(10.0).reshape(5, 2)
  f = lambda x: jnp.sum(x**2)  # noqa: E731
  for chunk in (None, 1, 2, 5, 9):
    np.testing.assert_allclose(trace.chunked_vmap(f, xs, chunk), jax.vmap(f)(xs))


def test_orthonormalise_is_qr_with_positive_diagonal(x64):
  frame = jax.random.normal(jax.random.PRNGKey(4), (4,) + SHAPE)
  q, log_r = trace.orthonormalise(frame)
  qm, fm = np.asarray(q).reshape(4, -1), np.asarray(frame).reshape(4, -1)
  np.testing.assert_allclose(qm @ qm.T, np.eye(4), atol=1e-12)
  r = qm @ fm.T  # rows of the frame = R^T Q: R = Q F^T is upper triangular, diag > 0
  np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-12)
  assert np.all(np.diag(r) > 0)
  np.testing.assert_allclose(np.log(np.diag(r)), log_r, rtol=1e-12)
  # Sum of log|R_ii| = log of the K-volume spanned by the frame.
  np.testing.assert_allclose(np.sum(log_r), 0.5 * np.linalg.slogdet(fm @ fm.T)[1], rtol=1e-12)


def _reference_gram_schmidt(diffs):
  """The paper's procedure literally: sort by decreasing norm, then modified Gram-Schmidt."""
  flat = [np.asarray(v, np.float64).reshape(-1) for v in diffs]
  flat = sorted(flat, key=np.linalg.norm, reverse=True)
  basis = []
  for vec in flat:
    for b in basis:
      vec = vec - np.dot(vec, b) * b / np.linalg.norm(b) ** 2
    basis.append(vec / np.linalg.norm(vec))
  return np.stack(basis)


def test_sorted_gram_schmidt_matches_the_papers_procedure(x64):
  diffs = jax.random.normal(jax.random.PRNGKey(5), (6,) + SHAPE) * jnp.arange(1.0, 7.0)[:, None, None]
  diffs = diffs[jnp.array([3, 0, 5, 1, 4, 2])]
  got = np.asarray(trace.sorted_gram_schmidt(diffs)).reshape(6, -1)
  np.testing.assert_allclose(got, _reference_gram_schmidt(diffs), atol=1e-10)
