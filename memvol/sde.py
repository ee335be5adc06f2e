"""Forward SDEs, their Gaussian marginals and the probability-flow drift.

Every SDE here has a Gaussian perturbation kernel

    x_t = a(t) x0 + sigma(t) z,     z ~ N(0, I),

with `a` the mean coefficient and `sigma` the marginal standard deviation, and a drift
that is linear in x: f(x, t) = f_lin(t) x with f_lin = d log a / dt. The diffusion g(t)
is chosen so that the marginals are exactly N(a x0, sigma^2 I):

    g^2 = d sigma^2/dt - 2 f_lin sigma^2.

A noise-prediction network eps_theta(x, t) gives the score s = -eps_theta / sigma, and
the probability-flow ODE drift

    v(x, t) = f_lin(t) x + g(t)^2 / (2 sigma(t)) eps_theta(x, t),
    div v   = D f_lin(t) + g(t)^2 / (2 sigma(t)) tr(d eps_theta / dx).

The linear part of div v integrates in closed form: D (log a(t1) - log a(t0)).

**The volume bound** (`log_volume_bound`). For ANY data distribution the optimal noise
predictor is eps*(x, t) = (x - a E[x0 | x_t = x]) / sigma, and Tweedie's second identity
d E[x0 | x_t] / dx = a Cov[x0 | x_t] / sigma^2 gives its Jacobian

    d eps* / dx = (I - a^2 C / sigma^2) / sigma,      C = Cov[x0 | x_t = x] >= 0,

so tr(d eps*/dx) <= D / sigma, with equality exactly when C = 0 (the posterior is a point:
a perfect memoriser at a training image). Put into div v and use g^2 = d sigma^2/dt -
2 f_lin sigma^2, i.e. g^2 / (2 sigma^2) = d log sigma/dt - f_lin:

    div v = D f_lin + g^2 / (2 sigma) tr(d eps*/dx) <= D f_lin + D g^2 / (2 sigma^2)
          = D d log sigma / dt,

along every trajectory, hence for every image and every t0 < t

    L(t0 -> t) = integral_t0^t div v dt <= L_max(t) = D log(sigma(t) / sigma(t0)).

The drift's Jacobian f_lin I + g^2/(2 sigma^2) (I - a^2 C / sigma^2) is symmetric with
every eigenvalue <= d log sigma / dt, so the growth of any K-dimensional volume (the
`subspace` / `paper` estimators) obeys the same bound with K in place of D. Only the
marginal identity for g^2 is used, so the bound holds as stated for VP (sigma^2 = 1 - a^2,
4.558 nats per dimension from eps = 1e-3 to T = 1), sub-VP (sigma = 1 - a^2, a larger
ratio) and VE (a = 1, f_lin = 0: L_max = D (t - t0) log(sigma_max / sigma_min), 8.5 nats
per dimension over [0, 1] at the defaults, so it binds far less). It is a property of the
true score: a network's eps_theta may have tr(d eps/dx) > D / sigma, and whatever L it
accumulates above L_max is the network's error, not a volume. Writing tr J = D / sigma +
r gives the split used by the trace estimators' control variate:

    L(t0 -> t) = L_max(t) + integral_t0^t eps_coeff(s) (tr J - D / sigma(s)) ds,

where the integral (the "excess") is <= 0 for every true score.

All functions take scalar or array `t` and broadcast. Networks see time as 999 t
(`time_input`), as the paper's code does (for VE too, so one network family serves all).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
EpsFn = Callable[[Array, Array], Array]  # (x [*shape], t []) -> [*shape]


@dataclasses.dataclass(frozen=True)
class SDE(abc.ABC):
  """Base class. Subclasses define `log_mean_coeff`, `std`, `g2` and `f_lin`."""

  T: float = 1.0
  eps: float = 1e-3

  # --- to be defined by subclasses -------------------------------------------------
  @abc.abstractmethod
  def log_mean_coeff(self, t: Array) -> Array:
    """log a(t)."""

  @abc.abstractmethod
  def std(self, t: Array) -> Array:
    """sigma(t), the marginal standard deviation."""

  @abc.abstractmethod
  def f_lin(self, t: Array) -> Array:
    """Coefficient of the linear drift f(x, t) = f_lin(t) x (= d log a / dt)."""

  @abc.abstractmethod
  def g2(self, t: Array) -> Array:
    """Squared diffusion coefficient g(t)^2."""

  # --- derived -------------------------------------------------------------------
  def mean_coeff(self, t: Array) -> Array:
    """a(t)."""
    return jnp.exp(self.log_mean_coeff(t))

  def marginal_prob(self, x0: Array, t: Array) -> tuple[Array, Array]:
    """Mean a(t) x0 and std sigma(t) of x_t | x0 (t broadcast against x0's leading axis
    only when it is a scalar; pass t already shaped for batches)."""
    return self.mean_coeff(t) * x0, self.std(t)

  def perturb(self, x0: Array, t: Array, z: Array) -> Array:
    """x_t = a(t) x0 + sigma(t) z."""
    return self.mean_coeff(t) * x0 + self.std(t) * z

  def time_input(self, t: Array) -> Array:
    """The time the network sees: 999 t (the paper's convention)."""
    return 999.0 * t

  def prior_sample(self, key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """A sample from the prior N(0, sigma(T)^2 I) (sigma(T) = 1 for VP)."""
    return self.std(self.T) * jax.random.normal(key, shape, dtype)

  def prior_logp(self, z: Array) -> Array:
    """log N(z; 0, sigma(T)^2 I) of ONE sample z (any shape), summed over all its
    entries, in nats."""
    s = self.std(jnp.asarray(self.T, z.dtype))
    d = z.size
    return (-0.5 * d * jnp.log(2 * jnp.pi * s**2) - 0.5 * jnp.sum(z**2) / s**2)

  def eps_coeff(self, t: Array) -> Array:
    """g(t)^2 / (2 sigma(t)): the factor of eps_theta in the PF drift."""
    return self.g2(t) / (2.0 * self.std(t))

  def pf_drift(self, eps_fn: EpsFn, x: Array, t: Array) -> Array:
    """Probability-flow ODE drift v(x, t) for ONE image x."""
    return self.pf_drift_from_eps(x, t, eps_fn(x, t))

  def pf_drift_from_eps(self, x: Array, t: Array, eps: Array) -> Array:
    """v(x, t) given eps_theta(x, t) already evaluated."""
    return self.f_lin(t) * x + self.eps_coeff(t) * eps

  def score_from_eps(self, eps: Array, t: Array) -> Array:
    """s(x, t) = -eps_theta(x, t) / sigma(t)."""
    return -eps / self.std(t)

  def linear_div(self, t: Array, dim: int) -> Array:
    """div of the linear part of the PF drift: D f_lin(t)."""
    return dim * self.f_lin(t)

  def integrated_linear_div(self, t0: Array, t1: Array, dim: int) -> Array:
    """integral_{t0}^{t1} D f_lin(t) dt = D (log a(t1) - log a(t0)), in nats."""
    return dim * (self.log_mean_coeff(t1) - self.log_mean_coeff(t0))

  def log_std(self, t: Array) -> Array:
    """log sigma(t)."""
    return jnp.log(self.std(t))

  def log_volume_bound(self, t0: Array, t1: Array, dim: int) -> Array:
    """L_max = D log(sigma(t1) / sigma(t0)) in nats: the largest log volume growth from t0 to
    t1 any true score can produce (module docstring); = integral of D f_lin + D g^2 / (2
    sigma^2), the divergence of the PF drift with tr(d eps / dx) = D / sigma."""
    return dim * (self.log_std(t1) - self.log_std(t0))

  def noise_ratio(self, t: Array) -> Array:
    """sigma(t) / a(t): EDM's sigma, the noise level of x_t / a(t) = x0 + (sigma / a) z."""
    return self.std(t) / self.mean_coeff(t)

  def time_of_noise_ratio(self, s: Array) -> Array:
    """The t with noise_ratio(t) = s (closed form per SDE)."""
    raise NotImplementedError(f"{type(self).__name__} has no inverse noise ratio")

  def reverse_sde_step(self, eps: Array, x: Array, t: Array, dt: Array, z: Array) -> Array:
    """One Euler-Maruyama step of the reverse SDE from t to t - dt (dt > 0):
    x <- x - [f - g^2 s] dt + g sqrt(dt) z."""
    g2 = self.g2(t)
    drift = self.f_lin(t) * x - g2 * self.score_from_eps(eps, t)
    return x - drift * dt + jnp.sqrt(g2 * dt) * z


@dataclasses.dataclass(frozen=True)
class VPSDE(SDE):
  """Variance-preserving SDE (DDPM), the paper's setting.

  beta(t) = beta_min + t (beta_max - beta_min), log a = -t^2 (bmax - bmin)/4 - t bmin/2,
  sigma = sqrt(1 - a^2) computed as sqrt(-expm1(2 log a)).
  """

  beta_min: float = 0.1
  beta_max: float = 20.0

  def beta(self, t: Array) -> Array:
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def log_mean_coeff(self, t: Array) -> Array:
    return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def std(self, t: Array) -> Array:
    return jnp.sqrt(-jnp.expm1(2.0 * self.log_mean_coeff(t)))

  def f_lin(self, t: Array) -> Array:
    return -0.5 * self.beta(t)

  def g2(self, t: Array) -> Array:
    return self.beta(t)

  def _minus_two_log_a(self, s: Array) -> Array:
    """-2 log a at noise ratio s: 1 / a^2 = 1 + s^2 when sigma^2 = 1 - a^2."""
    return jnp.log1p(s**2)

  def time_of_noise_ratio(self, s: Array) -> Array:
    """Solves t^2 (bmax - bmin) / 2 + t bmin = -2 log a (EDM's VPPrecond.sigma_inv)."""
    d = self.beta_max - self.beta_min
    return (jnp.sqrt(self.beta_min**2 + 2 * d * self._minus_two_log_a(s)) - self.beta_min) / d


@dataclasses.dataclass(frozen=True)
class SubVPSDE(VPSDE):
  """Sub-VP SDE (Song et al. 2021): same mean as VP, sigma = 1 - a^2, g^2 = beta (1 - a^4)."""

  def std(self, t: Array) -> Array:
    return -jnp.expm1(2.0 * self.log_mean_coeff(t))

  def g2(self, t: Array) -> Array:
    return self.beta(t) * -jnp.expm1(4.0 * self.log_mean_coeff(t))

  def _minus_two_log_a(self, s: Array) -> Array:
    """sigma = 1 - a^2 gives a^2 + s a - 1 = 0, a = 2 / (s + sqrt(s^2 + 4))."""
    return 2.0 * jnp.log((s + jnp.sqrt(s**2 + 4.0)) / 2.0)


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
  """Variance-exploding SDE: a = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t,
  g^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min). The prior is
  N(0, sigma_max^2 I); the marginal at t includes the sigma_min floor exactly.
  """

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  eps: float = 1e-5

  def log_mean_coeff(self, t: Array) -> Array:
    return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))

  def std(self, t: Array) -> Array:
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def f_lin(self, t: Array) -> Array:
    return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))

  def g2(self, t: Array) -> Array:
    return 2.0 * self.std(t) ** 2 * math.log(self.sigma_max / self.sigma_min)

  def time_of_noise_ratio(self, s: Array) -> Array:
    """t = log(s / sigma_min) / log(sigma_max / sigma_min): log-sigma time, in which
    EDM's ODE dx / dsigma = (x - D(x; sigma)) / sigma is this SDE's PF ODE."""
    return jnp.log(s / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


_SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}


def get_sde(name: str, **kwargs) -> SDE:
  """SDE by name ('vp', 'subvp', 've'); kwargs are its fields (T, eps, beta_min, ...). A
  kwarg that is not a field of that SDE is a ValueError naming it and the fields."""
  if name not in _SDES:
    raise ValueError(f"unknown sde {name!r}; expected one of {sorted(_SDES)}")
  fields = {f.name for f in dataclasses.fields(_SDES[name])}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"unknown field(s) {unknown} for sde {name!r}; its fields: {sorted(fields)}")
  return _SDES[name](**kwargs)


def from_config(cfg) -> SDE:
  """SDE from a config block with `name` and fields. The block may hold the fields of every
  SDE (the base config has beta_min/beta_max, used by vp and subvp only): those of other
  SDEs are left aside; a key that is a field of no SDE is a ValueError naming it."""
  d = dict(cfg)
  name = d.pop("name")
  if name not in _SDES:
    raise ValueError(f"unknown sde {name!r}; expected one of {sorted(_SDES)}")
  every = {f.name for cls in _SDES.values() for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - every)
  if unknown:
    raise ValueError(f"unknown key(s) {unknown} in the sde config; known: {sorted(every | {'name'})}")
  own = {f.name for f in dataclasses.fields(_SDES[name])}
  return get_sde(name, **{k: v for k, v in d.items() if k in own})
