"""Closed-form eps-networks: the ground truth of the volume engine's tests.

Two data distributions whose noised marginals, and therefore the exact noise-prediction
eps(x, t) = -sigma(t) * score(x, t), are known in closed form:

- `GaussianEps`: data N(mu, Sigma) with Sigma = U diag(s2) U^T (any covariance). Every
  marginal is N(a mu, a^2 Sigma + sigma^2 I); the probability-flow map is linear and
  keeps each standardised eigen-coordinate fixed, so

      x_t1 - a(t1) mu = U diag(sqrt(v_i(t1) / v_i(t0))) U^T (x_t0 - a(t0) mu),
      L(t0 -> t1)     = sum_i 0.5 log(v_i(t1) / v_i(t0)),  v_i(t) = a(t)^2 s2_i + sigma(t)^2.

- `MemoriserEps`: the empirical optimal denoiser of a finite training set, optionally
  smoothed: data (1/n) sum_j N(y_j, w^2 I). With w = 0 it is the exact minimiser of the
  denoising loss on the training set, i.e. a model that has memorised it perfectly. Near
  a training image (well separated from the others) it is the Gaussian case with
  Sigma = w^2 I, so each direction stretches by sqrt(v(t1) / v(t0)),
  v = a^2 w^2 + sigma^2: log(sigma(1) / sigma(eps)) ~ 4.56 nats per direction for VP.

Both are equinox Modules (pytree callables with the eps_fn signature: ONE image x of any
shape and a scalar SDE time t), so their arrays are traced inputs under `filter_jit`.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from memvol import sde as sde_lib

Array = jax.Array


class GaussianEps(eqx.Module):
  """eps(x, t) of data N(mu, U diag(s2) U^T) under `sde`.

  mu: [*shape] mean; U: [D, D] orthogonal eigenvectors (columns); s2: [D] eigenvalues
  (variances, >= 0) of the data covariance. D = prod(shape).
  """

  mu: Array
  U: Array
  s2: Array
  sde: sde_lib.SDE = eqx.field(static=True)

  def variances(self, t: Array) -> Array:
    """v_i(t) = a(t)^2 s2_i + sigma(t)^2 [D]: the marginal variance per eigen-direction."""
    return self.sde.mean_coeff(t) ** 2 * self.s2 + self.sde.std(t) ** 2

  def __call__(self, x: Array, t: Array) -> Array:
    a, sig = self.sde.mean_coeff(t), self.sde.std(t)
    y = self.U.T @ (x - a * self.mu).reshape(-1)
    return (sig * (self.U @ (y / self.variances(t)))).reshape(x.shape)

  def flow(self, x: Array, t0: Array, t1: Array) -> Array:
    """The exact probability-flow map of ONE image x [*shape] from t0 to t1."""
    a0, a1 = self.sde.mean_coeff(t0), self.sde.mean_coeff(t1)
    y = self.U.T @ (x - a0 * self.mu).reshape(-1)
    y = y * jnp.sqrt(self.variances(t1) / self.variances(t0))
    return a1 * self.mu + (self.U @ y).reshape(x.shape)

  def log_volume(self, t0: Array, t1: Array) -> Array:
    """L = log|det d x_t1 / d x_t0| (the same for every x), in nats."""
    return 0.5 * jnp.sum(jnp.log(self.variances(t1) / self.variances(t0)))

  def direction_log_stretch(self, t0: Array, t1: Array) -> Array:
    """0.5 log(v_i(t1) / v_i(t0)) [D]: the log stretch of each eigen-direction."""
    return 0.5 * jnp.log(self.variances(t1) / self.variances(t0))

  def drift_jacobian_rate(self, t: Array) -> Array:
    """[D] eigenvalues of d v / d x (v the PF drift): f_lin + g^2 / (2 v_i)."""
    return self.sde.f_lin(t) + self.sde.g2(t) / (2.0 * self.variances(t))


def gaussian_eps(mu, cov, sde: sde_lib.SDE) -> GaussianEps:
  """GaussianEps from a mean [*shape] and a full covariance [D, D] (symmetric PSD)."""
  mu = jnp.asarray(mu)
  cov = np.asarray(cov, dtype=np.float64)
  d = mu.size
  if cov.shape != (d, d):
    raise ValueError(f"cov must have shape ({d}, {d}) for a mean of shape {mu.shape}; got {cov.shape}")
  if not np.allclose(cov, cov.T):
    raise ValueError("cov must be symmetric")
  s2, u = np.linalg.eigh(cov)
  if s2.min() < -1e-10 * max(1.0, s2.max()):
    raise ValueError(f"cov must be positive semi-definite; smallest eigenvalue {s2.min():.3g}")
  s2 = np.clip(s2, 0.0, None)
  return GaussianEps(mu=mu, U=jnp.asarray(u, mu.dtype), s2=jnp.asarray(s2, mu.dtype), sde=sde)


def random_gaussian_eps(key: Array, shape: tuple[int, ...], sde: sde_lib.SDE,
                        std_range: tuple[float, float] = (0.05, 1.0),
                        isotropic: bool = False, dtype=None) -> GaussianEps:
  """A non-isotropic Gaussian with random mean in [-0.5, 0.5], a random rotation U and
  per-direction stds log-uniform in `std_range` (all equal to std_range[0] when
  `isotropic`)."""
  dtype = jnp.result_type(float) if dtype is None else dtype
  d = math.prod(shape)
  k_mu, k_u, k_s = jax.random.split(key, 3)
  mu = jax.random.uniform(k_mu, shape, dtype, -0.5, 0.5)
  u, _ = jnp.linalg.qr(jax.random.normal(k_u, (d, d), dtype))
  lo, hi = std_range
  if isotropic:
    s = jnp.full((d,), lo, dtype)
  else:
    s = jnp.exp(jax.random.uniform(k_s, (d,), dtype, math.log(lo), math.log(hi)))
  return GaussianEps(mu=mu, U=u, s2=s**2, sde=sde)


class MemoriserEps(eqx.Module):
  """eps(x, t) of the smoothed empirical distribution (1/n) sum_j N(y_j, w^2 I).

  data: [n, *shape] training images y_j; width: scalar w >= 0 (0 = the exact empirical
  optimal denoiser: the perfect memoriser).
  """

  data: Array
  width: Array
  sde: sde_lib.SDE = eqx.field(static=True)

  def variance(self, t: Array) -> Array:
    """v(t) = a^2 w^2 + sigma^2: the variance of each mixture component at time t."""
    return self.sde.mean_coeff(t) ** 2 * self.width**2 + self.sde.std(t) ** 2

  def responsibilities(self, x: Array, t: Array) -> Array:
    """[n] posterior weights of the training images given x_t = x."""
    a = self.sde.mean_coeff(t)
    d = x[None] - a * self.data
    sq = jnp.sum(d.reshape(d.shape[0], -1) ** 2, axis=1)
    return jax.nn.softmax(-sq / (2.0 * self.variance(t)))

  def __call__(self, x: Array, t: Array) -> Array:
    a, sig = self.sde.mean_coeff(t), self.sde.std(t)
    r = self.responsibilities(x, t)
    mean = jnp.tensordot(r, self.data, axes=1)  # E[y | x_t = x] (w = 0: the denoiser)
    return (sig / self.variance(t)) * (x - a * mean)

  def log_stretch(self, t0: Array, t1: Array) -> Array:
    """0.5 log(v(t1) / v(t0)): the log stretch of every direction at a training image
    far from the others; log(sigma(t1) / sigma(t0)) when w = 0."""
    return 0.5 * jnp.log(self.variance(t1) / self.variance(t0))


def memoriser_eps(data, sde: sde_lib.SDE, width: float = 0.0) -> MemoriserEps:
  """MemoriserEps over training images `data` [n, *shape]."""
  data = jnp.asarray(data)
  if data.ndim < 2 or data.shape[0] < 1:
    raise ValueError(f"data must be [n, *image_shape] with n >= 1; got shape {data.shape}")
  if width < 0:
    raise ValueError(f"width must be >= 0; got {width}")
  return MemoriserEps(data=data, width=jnp.asarray(width, data.dtype), sde=sde)
