"""Log volume growth of the probability-flow ODE, per image: one API, four estimators.

For an image x0 at t0 (= sde.eps) the PF ODE dx/dt = v(x, t) carries it to x_T at t1 (= T).
Its log volume growth is

    L(x0) = log|det d x_T / d x0| = integral_t0^t1 div v(x_t, t) dt
          = D (log a(t1) - log a(t0))  +  integral eps_coeff(t) tr(d eps/dx)(x_t, t) dt,

the first term in closed form (`sde.integrated_linear_div`), the second integrated as an
extra ODE state beside x. Estimators (`estimator=`):

- `exact`: tr(d eps/dx) from D JVPs on basis vectors, `chunk_size` at a time.
- `hutchinson`: n probes v_k (Rademacher or Gaussian), fixed for the whole solve, each with
  its own integrated L_k = integral eps_coeff v_k^T (d eps/dx) v_k dt; L is their mean and
  the standard error across probes comes free. `variance_reduction="hutch++"` replaces
  each probe's term by Hutch++ on d eps/dx - alpha I (`trace.hutchpp`: n sketch vectors
  fixed for the solve, 3n JVPs per evaluation; the stderr is then the spread of the
  deflated remainder given the sketch).
- `subspace`: K tangent vectors pushed by the linearised drift, re-orthonormalised by QR
  after every accepted step; L = sum of log|diag R| (the sum of the K largest finite-time
  Lyapunov stretches; = the full L when K = D). The linear drift part f_lin I stretches
  every vector alike and is added in closed form, K (log a(t1) - log a(t0)).
- `paper`: the scheme of Hasegawa & Yasuda's public code, step for step: K neighbours at
  `radius` around x0, explicit Euler of the full drift on linspace(t0, t1, N) with
  dt = (t1 - t0) / (N - 1) (= their 1/1000 for eps = 1e-3, N = 1000), per step the sum over
  the K edges of log(|edge after| / |edge before|), then the edges are sorted by
  decreasing length, Gram-Schmidt-orthonormalised and rescaled to `radius`. The last
  step starts at t1, so its x_T is at t1 + dt, as in their code. Includes the linear part.
  Choices where the reference is silent or unseeded: the initial offsets are N(0, I) noise
  from fold_in(fold_in(key, image_id), 0) (theirs: an unseeded torch.randn per image),
  scaled by radius, sorted and orthonormalised like every later frame; Gram-Schmidt is done
  as a Householder QR with diag R > 0 (the same frame in exact arithmetic, stabler in
  float32); the edge growth uses the measured |edge before| (= radius up to rounding), as
  theirs does. Their evaluation also scores each image's horizontal flip: that is the
  caller's choice of x0, not this function's.

The profile: `save_ts` (from config `score.profile_times`, default 16 times uniform in log sigma
from t0 to t1, `profile_times`) gives the cumulative L(t0 -> t_k) at each time from the SAME
solve (diffrax SaveAt(ts) with dense output; subspace and paper interpolate their per-step
sums), so the windowed values and the excess over the bound L_max(t_k) cost nothing extra.

`control_variate=True` (exact, hutchinson) integrates tr J - |v|^2 / sigma instead of tr J
and adds the closed form of what it took out: with tr(I / sigma) = D / sigma the linear drift
and that identity part together integrate to L_max(t) = D log(sigma(t) / sigma(t0))
(`sde.log_volume_bound`), so

    L(t0 -> t) = L_max(t) + integral_t0^t eps_coeff(s) (v^T J v - |v|^2 / sigma(s)) ds.

Unbiased (E|v|^2 = D); the same as plain Hutchinson for Rademacher probes in exact arithmetic,
but the integrand left to the solver is the network's deviation from a perfect memoriser,
which is ~ 1 / sigma^2 smaller near t0 than tr J: fixed-step solves lose far less to it, and
the profile's excess over the bound is the integral itself.

Presets (`PRESETS`, an estimator named `hutchinson@<preset>`; `parse_estimator`) are named
settings of the same hutchinson solve: `rank*` are cheap ranking statistics whose values are
NOT volumes (a few fixed steps overshoot L by up to 2x); `vol108` is a volume at 108 passes
per image (Richardson of Heun 18 and 9 steps, `richardson`). scripts/bench_cheap_l.py
measures them against the adaptive reference (BUILD.md).

Each image is its own ODE with its own steps and error control (jax.vmap over images,
never one ODE over the batch); one network forward pass per right-hand side evaluation
(`jax.linearize` at x, then the linear map vmapped over probes / basis / frame vectors).
Randomness per image from fold_in(key, image_id), then fold_in(., probe index), so a
score never depends on batch size, order or device count. A batch shape compiles once
(`equinox.filter_jit`, eps_fn's arrays are traced inputs).

Costs, per image: `nfe` counts network forward evaluations (right-hand-side evaluations
of the ODE; for `paper` each of the K + 1 points of a step counts as one), `num_jvps`
the JVPs through the linearised network riding on them (exact: D per evaluation,
hutchinson: n, hutch++: 3n, subspace: K, paper: 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from memvol import numerics, trace
from memvol import sde as sde_lib

Array = jax.Array

ESTIMATORS = ("exact", "hutchinson", "subspace", "paper")
SOLVERS = {"euler": diffrax.Euler, "heun": diffrax.Heun, "bosh3": diffrax.Bosh3,
           "tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
# (stages, first-same-as-last) of each solver: the network evaluations per step.
_STAGES = {"euler": (1, False), "heun": (2, False), "bosh3": (4, True), "tsit5": (7, True),
           "dopri5": (7, True)}
# Global order p of each solver: a fixed-step error ~ h^p, what `richardson` cancels.
_ORDER = {"euler": 1, "heun": 2, "bosh3": 3, "tsit5": 5, "dopri5": 5}
VARIANCE_REDUCTIONS = ("hutch++",)
PROBES = trace.PROBES
EXACT_DEFAULT_CHUNK = 64  # basis vectors per JVP chunk of `exact` when chunk_size is None
# Evaluations spent choosing the first adaptive step: diffrax's PIDController.init makes 2
# on a bare ODETerm (the subspace loop), none inside diffeqsolve, whose wrapped term makes
# it fall back to dt0 = 0.01 (both counted against a callback counter in the tests).
_STEP_SELECT_EVALS = {"diffeqsolve": 0, "controller": 2}
# Fixed-step time grids: blend = half uniform in t, half in log sigma; log_sigma = uniform in log sigma.
TIME_GRIDS = {"blend": 0.5, "log_sigma": 1.0}
PROFILE_TIMES_DEFAULT = 16
# Named settings of the hutchinson solve (estimator "hutchinson@<name>"); passes per image =
# network forward evaluations + JVPs. rank*: ranking statistics, not volumes.
PRESETS: dict[str, dict[str, Any]] = {
    "rank8": dict(solver="euler", adaptive=False, num_steps=4, num_probes=1, time_grid="blend",
                  control_variate=False),    # 4 evaluations x (1 + 1 probe) = 8 passes
    "rank32": dict(solver="heun", adaptive=False, num_steps=8, num_probes=1, time_grid="blend",
                   control_variate=False),   # 16 x 2 = 32 passes
    # an accurate volume: Richardson of heun 18 and 9 steps, 1 probe; (36 + 18) x 2 = 108 passes
    "vol108": dict(solver="heun", adaptive=False, num_steps=18, num_probes=1, time_grid="blend",
                   control_variate=False, richardson=True),
}


# Fields that no config key sets: the SDE comes from the `sde` section, the estimator is named
# by the caller, save_ts comes from `profile_times`.
_NOT_CONFIG = ("sde", "estimator", "save_ts")


@dataclasses.dataclass(frozen=True)
class VolumeOptions:
  """Everything that defines a volume computation except the network and the images.

  Frozen and hashable: it is a static argument of the compiled batch function.
  sde: the forward SDE. estimator: exact | hutchinson | subspace | paper.
  solver: euler | heun | bosh3 | tsit5 | dopri5 (exact, hutchinson, subspace).
  adaptive: PID step control with rtol/atol (else `num_steps` fixed steps on
    `time_grid`). t0, t1: integration range (None: sde.eps, sde.T).
  num_probes, probe, variance_reduction (None | "hutch++"): hutchinson.
  K: frame size (subspace, paper); radius, paper_steps: paper.
  chunk_size: vectors vmapped together per image (basis / probes / frame / paper points);
    None = all at once, except `exact`, which then uses 64.
  time_grid: blend | log_sigma, the fixed-step grid (`time_grid`).
  control_variate: exact / hutchinson integrate tr J - D / sigma and add L_max in closed
    form (module docstring).
  richardson: (exact, hutchinson, fixed steps, even num_steps) also solve on num_steps / 2
    steps of the same grid with the same probes and return L_n + (L_n - L_n/2) / (2^p - 1),
    p the solver's order: the h^p term of the error cancels; costs both solves.
  save_ts: times at which the cumulative L(t) (the profile) is also returned. max_steps:
    solver budget.
  precision: highest | high | default, the matmul / convolution precision the compiled
    solve runs at (numerics.py; "highest" = float32, what a CPU computes).
  """

  sde: sde_lib.SDE = sde_lib.VPSDE()
  estimator: str = "hutchinson"
  solver: str = "tsit5"
  adaptive: bool = True
  rtol: float = 1e-5
  atol: float = 1e-5
  num_steps: int = 100
  t0: float | None = None
  t1: float | None = None
  num_probes: int = 1
  probe: str = "rademacher"
  variance_reduction: str | None = None
  K: int = 100
  radius: float = 0.05
  paper_steps: int = 1000
  chunk_size: int | None = None
  save_ts: tuple[float, ...] | None = None
  max_steps: int = 4096
  precision: str = "highest"
  time_grid: str = "blend"
  control_variate: bool = False
  richardson: bool = False

  def __post_init__(self):
    setf = functools.partial(object.__setattr__, self)
    setf("precision", numerics.check_precision(self.precision))
    if not isinstance(self.sde, sde_lib.SDE):
      raise ValueError(f"sde must be a memvol.sde.SDE; got {type(self.sde).__name__}")
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"unknown estimator {self.estimator!r}; expected one of {ESTIMATORS}")
    if self.solver not in SOLVERS:
      raise ValueError(f"unknown solver {self.solver!r}; expected one of {sorted(SOLVERS)}")
    if self.probe not in PROBES:
      raise ValueError(f"unknown probe {self.probe!r}; expected one of {PROBES}")
    vr = self.variance_reduction
    vr = None if vr is None or str(vr).lower() in ("", "none") else str(vr).lower()
    if vr is not None and vr not in VARIANCE_REDUCTIONS:
      raise ValueError(f"unknown variance_reduction {self.variance_reduction!r}; expected None "
                       f"or one of {VARIANCE_REDUCTIONS}")
    setf("variance_reduction", vr)
    setf("adaptive", bool(self.adaptive))
    setf("control_variate", bool(self.control_variate))
    setf("richardson", bool(self.richardson))
    if self.time_grid not in TIME_GRIDS:
      raise ValueError(f"unknown time_grid {self.time_grid!r}; expected one of {sorted(TIME_GRIDS)}")
    if self.adaptive and self.estimator != "paper" and not _STAGES[self.solver][0] > 1:
      raise ValueError(f"solver {self.solver!r} has no error estimate, so it cannot take "
                       "adaptive steps: pass adaptive=False or another solver")
    for name in ("rtol", "atol", "radius"):
      value = float(getattr(self, name))
      if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {getattr(self, name)!r}")
      setf(name, value)
    for name, low in (("num_steps", 1), ("num_probes", 1), ("K", 1), ("paper_steps", 2),
                      ("max_steps", 1)):
      value = getattr(self, name)
      if int(value) != value or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
      setf(name, int(value))
    if self.chunk_size is not None:
      if int(self.chunk_size) != self.chunk_size or self.chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an integer >= 1; got {self.chunk_size!r}")
      setf("chunk_size", int(self.chunk_size))
    if self.richardson and (self.adaptive or self.estimator not in ("exact", "hutchinson")
                            or self.num_steps % 2):
      raise ValueError("richardson needs adaptive=False, an even num_steps and estimator exact or "
                       f"hutchinson; got adaptive={self.adaptive}, num_steps={self.num_steps}, "
                       f"estimator={self.estimator!r}")
    for name in ("t0", "t1"):
      if getattr(self, name) is not None:
        setf(name, float(getattr(self, name)))
    t0, t1 = self.t_start, self.t_end
    if not (math.isfinite(t0) and math.isfinite(t1)) or t0 >= t1:
      raise ValueError(f"need t0 < t1 (finite); got t0={t0}, t1={t1}")
    if t0 < 0 or not float(self.sde.std(t0)) > 0:
      raise ValueError(f"t0={t0} must be >= 0 with sigma(t0) > 0 (the drift divides by sigma)")
    if self.save_ts is not None:
      ts = tuple(float(s) for s in np.atleast_1d(np.asarray(self.save_ts, dtype=np.float64)))
      if not ts:
        ts = None
      elif any(b < a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"save_ts must be non-decreasing; got {ts}")
      elif ts[0] < t0 or ts[-1] > t1:
        raise ValueError(f"save_ts must lie in [t0, t1] = [{t0}, {t1}]; got {ts[0]} .. {ts[-1]}")
      setf("save_ts", ts)

  @property
  def t_start(self) -> float:
    return float(self.sde.eps if self.t0 is None else self.t0)

  @property
  def t_end(self) -> float:
    return float(self.sde.T if self.t1 is None else self.t1)

  @property
  def stochastic(self) -> bool:
    """Whether the result depends on the key (and has a probe standard error)."""
    return self.estimator != "exact"

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any], estimator: str, *, sde: sde_lib.SDE | None = None,
                  **overrides) -> "VolumeOptions":
    """Options from the `score` config section (experiments/configs/base.py) or from a whole
    config (then its `sde` section gives the SDE). `sde` overrides; else VP-SDE. `estimator`
    may name a preset, "hutchinson@<name>" (PRESETS: its settings replace the config's).
    `profile_times`: an int n > 0 gives save_ts = profile_times(sde, t0, t1, n), a sequence
    gives the times themselves, 0 or () none."""
    estimator, preset = parse_estimator(estimator)
    if "score" in cfg:
      if sde is None and "sde" in cfg:
        sde = sde_lib.from_config(cfg["sde"])
      cfg = cfg["score"]
    sde = sde_lib.VPSDE() if sde is None else sde
    # The config keys that are fields; a field the config leaves out keeps its default above
    # (base.py sets every one, e.g. rtol = atol = 1e-4 where the class default is 1e-5).
    kw = {f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name not in _NOT_CONFIG and f.name in cfg}
    kw.update(sde=sde, estimator=estimator)
    kw.update(PRESETS[preset] if preset else {})
    kw.update(overrides)
    if "save_ts" not in overrides:
      t0 = float(sde.eps if kw.get("t0") is None else kw["t0"])
      t1 = float(sde.T if kw.get("t1") is None else kw["t1"])
      kw["save_ts"] = resolve_profile_times(cfg["profile_times"] if "profile_times" in cfg else PROFILE_TIMES_DEFAULT,
                                            sde, t0, t1)
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class VolumeResult:
  """Per-image results (numpy, on the host); B images.

  log_volume [B]: L in nats (for subspace/paper: the K-direction version);
  log_volume_stderr [B]: standard error of L over the probes: 0 for `exact` (deterministic);
    NaN = not estimated, for hutchinson with a single probe and for `subspace` and `paper`
    (their L depends on the key through the random initial frame, but one frame per image
    leaves no spread to estimate the error from; score several keys to measure it); prior_logp [B]: log N(x_T; prior); logp [B]: prior_logp + L, the
    ODE log-likelihood (NaN for subspace/paper, whose L is not a full log-determinant);
  nfe, num_jvps, num_steps, num_rejected, status [B] ints (status: diffrax RESULTS code,
    0 = success; 1 = max_steps reached); x_T [B, *shape];
  L_t [B, S]: the profile, cumulative L(t0 -> save_ts[s]) in nats from the same solve (the
    K-direction version for subspace/paper; None when not requested); L_t[:, s] - L_max(save_ts[s])
    (`sde.log_volume_bound`) is the excess over the bound.
  """

  log_volume: np.ndarray
  log_volume_stderr: np.ndarray
  prior_logp: np.ndarray
  logp: np.ndarray
  nfe: np.ndarray
  num_jvps: np.ndarray
  num_steps: np.ndarray
  num_rejected: np.ndarray
  status: np.ndarray
  x_T: np.ndarray
  L_t: np.ndarray | None = None
  save_ts: np.ndarray | None = None


# --- time grids and error norms ------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _time_grid_cached(sde: sde_lib.SDE, t0: float, t1: float, n: int, weight: float = 0.5) -> np.ndarray:
  with jax.ensure_compile_time_eval():
    log_std = lambda t: np.log(np.asarray(sde.std(jnp.asarray(t)), np.float64))  # noqa: E731
    l0, l1 = float(log_std(t0)), float(log_std(t1))
    span = l1 - l0

    def s(t):
      u = (t - t0) / (t1 - t0)
      return (1 - weight) * u + weight * (log_std(t) - l0) / span if abs(span) > 1e-12 else u

    target = np.linspace(0.0, 1.0, n + 1)
    lo, hi = np.full(n + 1, t0), np.full(n + 1, t1)
    for _ in range(60):  # bisection: s is increasing
      mid = 0.5 * (lo + hi)
      below = s(mid) < target
      lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
  grid = 0.5 * (lo + hi)
  grid[0], grid[-1] = t0, t1
  return grid


def time_grid(sde: sde_lib.SDE, t0: float, t1: float, n: int, kind: str = "blend") -> np.ndarray:
  """n + 1 times from t0 to t1 for fixed-step solves [n + 1], float64, uniform in
  s(t) = (1 - w) (t - t0)/(t1 - t0) + w (log sigma(t) - log sigma(t0))/(log sigma(t1) - log sigma(t0)),
  w = TIME_GRIDS[kind]: `blend` (w = 1/2) makes steps short where sigma is small (near t = eps
  the drift's Jacobian grows like 1 / sigma^2) with no step over 2 (t1 - t0) / n; `log_sigma`
  (w = 1) makes every step raise the bound L_max by the same D log(sigma(t1)/sigma(t0)) / n, the
  variable in which a memoriser's integrand is constant. Both are uniform in t for VE."""
  if n < 1 or not t0 < t1:
    raise ValueError(f"time_grid needs n >= 1 and t0 < t1; got n={n}, t0={t0}, t1={t1}")
  if kind not in TIME_GRIDS:
    raise ValueError(f"unknown time_grid {kind!r}; expected one of {sorted(TIME_GRIDS)}")
  return _time_grid_cached(sde, float(t0), float(t1), int(n), TIME_GRIDS[kind]).copy()


def profile_times(sde: sde_lib.SDE, t0: float, t1: float, n: int = PROFILE_TIMES_DEFAULT) -> tuple[float, ...]:
  """n times t_1 < ... < t_n = t1, geometric in sigma: log sigma(t_k) = log sigma(t0) + (k / n)
  (log sigma(t1) - log sigma(t0)), k = 1..n (t0 itself, where L = 0, left out). Each window
  (t_{k-1}, t_k] has the same bound D log(sigma(t1) / sigma(t0)) / n."""
  return tuple(float(t) for t in time_grid(sde, t0, t1, n, "log_sigma")[1:])


def resolve_profile_times(value, sde: sde_lib.SDE, t0: float, t1: float) -> tuple[float, ...] | None:
  """config.score.profile_times as save_ts: an int n > 0 -> profile_times(sde, t0, t1, n);
  a sequence -> those times; 0, None or () -> None. ValueError naming the value otherwise."""
  if value is None or isinstance(value, str) and value.strip() in ("", "0"):
    return None
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    if value < 0:
      raise ValueError(f"score.profile_times must be an int >= 0 or a sequence of times; got {value!r}")
    return profile_times(sde, t0, t1, int(value)) if value > 0 else None
  try:
    ts = tuple(float(v) for v in value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"score.profile_times must be an int >= 0 or a sequence of times; got {value!r}") from e
  return ts or None


def parse_estimator(name: str) -> tuple[str, str | None]:
  """("hutchinson", "rank8") from "hutchinson@rank8"; (name, None) without a preset.
  ValueError naming an unknown estimator or preset."""
  base, _, preset = str(name).partition("@")
  if base not in ESTIMATORS:
    raise ValueError(f"unknown estimator {base!r}; expected one of {ESTIMATORS}")
  if not preset:
    return base, None
  if base != "hutchinson" or preset not in PRESETS:
    raise ValueError(f"unknown preset {name!r}: presets are hutchinson@<name> with <name> one of "
                     f"{sorted(PRESETS)}")
  return base, preset


def _rms(x: Array) -> Array:
  return jnp.sqrt(jnp.mean(jnp.square(x)))


def _trace_norm(err) -> Array:
  """Error norm of the (x, l [n]) state: the worse of RMS over pixels and max over the
  integrated log-det components (the default RMS over everything dilutes l by 1/sqrt(D))."""
  x_err, l_err = err
  return jnp.maximum(_rms(x_err), jnp.max(jnp.abs(l_err)))


def _frame_norm(err) -> Array:
  """Error norm of the (x, frame [K, *shape]) state: the worse of RMS over pixels and the
  RMS over frame vectors of each vector's 2-norm (its error moves log|R_ii| by as much)."""
  x_err, v_err = err
  per_vector = jnp.sum(jnp.square(v_err).reshape(v_err.shape[0], -1), axis=1)
  return jnp.maximum(_rms(x_err), jnp.sqrt(jnp.mean(per_vector)))


def _controller(opts: VolumeOptions, t0: Array, t1: Array, norm, dtype, num_steps: int | None = None):
  """PID control (adaptive) or StepTo on the fixed grid of num_steps (default opts.num_steps)."""
  if opts.adaptive:
    return diffrax.PIDController(rtol=opts.rtol, atol=opts.atol, norm=norm)
  n = opts.num_steps if num_steps is None else num_steps
  grid = jnp.asarray(time_grid(opts.sde, opts.t_start, opts.t_end, n, opts.time_grid), dtype)
  return diffrax.StepTo(ts=grid.at[0].set(t0).at[-1].set(t1))


def _nfe(opts: VolumeOptions, attempted: Array, reevaluate_first_stage: bool, loop: str) -> Array:
  """Network evaluations of a solve with `attempted` steps (accepted + rejected)."""
  stages, fsal = _STAGES[opts.solver]
  init = _STEP_SELECT_EVALS[loop] if opts.adaptive else 0
  if fsal and not reevaluate_first_stage:
    return init + jnp.where(attempted > 0, 1 + (stages - 1) * attempted, 0)
  return init + stages * attempted


def _status(result) -> Array:
  return jnp.asarray(result._value, jnp.int32)  # the int code of a diffrax RESULTS item


# --- per-image estimators ---------------------------------------------------------------

def _trace_solve(eps_fn, x0: Array, k_img: Array, opts: VolumeOptions) -> dict[str, Array]:
  """exact / hutchinson for ONE image x0 [*shape]: a diffrax solve of (x, l [n])."""
  shape, dtype, d = x0.shape, x0.dtype, x0.size
  t0, t1 = jnp.asarray(opts.t_start, dtype), jnp.asarray(opts.t_end, dtype)
  sde, chunk = opts.sde, opts.chunk_size
  exact = opts.estimator == "exact"
  hutchpp = not exact and opts.variance_reduction == "hutch++"
  n = 1 if exact else opts.num_probes
  probes = None if exact else trace.sample_probes(k_img, n, shape, dtype, opts.probe)
  sketch = trace.sample_probes(k_img, n, shape, dtype, opts.probe, offset=n) if hutchpp else None
  cv = opts.control_variate
  # what the control variate takes out per trace term, times sigma: v_k^T v_k (D for exact / hutch++)
  identity = (jnp.full((1,), d, dtype) if exact or hutchpp
              else jnp.sum(jnp.square(probes).reshape(n, -1), axis=1)) if cv else None

  def vf(t, y, args):
    del args
    x, _ = y
    t = jnp.asarray(t, dtype)
    eps, jvp = jax.linearize(lambda z: eps_fn(z, t), x)
    if exact:
      q = trace.exact_trace(jvp, shape, dtype, EXACT_DEFAULT_CHUNK if chunk is None else chunk)[None]
    elif hutchpp:
      q = trace.hutchpp(jvp, sketch, probes, chunk)
    else:
      q = trace.hutchinson(jvp, probes, chunk)
    if cv:
      q = q - identity / sde.std(t)
    return (sde.pf_drift_from_eps(x, t, eps).astype(dtype), (sde.eps_coeff(t) * q).astype(dtype))

  save_ts = () if opts.save_ts is None else opts.save_ts
  ts = jnp.concatenate([jnp.asarray(save_ts, dtype), t1[None]])

  def solve(num_steps: int | None = None):
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf), SOLVERS[opts.solver](), t0, t1, None, (x0, jnp.zeros((n,), dtype)),
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=_controller(opts, t0, t1, _trace_norm, dtype, num_steps),
        max_steps=opts.max_steps, throw=False)
    return sol, _nfe(opts, sol.stats["num_steps"], reevaluate_first_stage=False, loop="diffeqsolve")

  sol, nfe = solve()
  xs, ls = sol.ys
  num_accepted, num_rejected, status = (sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"],
                                        _status(sol.result))
  if opts.richardson:  # the same probes on half the steps; the combination cancels the h^p term
    coarse, nfe_c = solve(opts.num_steps // 2)
    ls = ls + (ls - coarse.ys[1]) / (2.0 ** _ORDER[opts.solver] - 1.0)
    nfe = nfe + nfe_c
    num_accepted = num_accepted + coarse.stats["num_accepted_steps"]
    num_rejected = num_rejected + coarse.stats["num_rejected_steps"]
    status = jnp.maximum(status, _status(coarse.result))
  l = ls[-1]
  closed = sde.log_volume_bound if cv else sde.integrated_linear_div
  log_volume = closed(t0, t1, d) + jnp.mean(l)
  if exact:
    stderr = jnp.zeros((), dtype)
  elif n > 1:
    stderr = jnp.std(l, ddof=1) / math.sqrt(n)
  else:
    stderr = jnp.full((), jnp.nan, dtype)
  jvps_per_eval = d if exact else (3 * n if hutchpp else n)
  out = dict(log_volume=log_volume, log_volume_stderr=stderr, x_T=xs[-1], nfe=nfe,
             num_jvps=nfe * jvps_per_eval, num_steps=num_accepted, num_rejected=num_rejected,
             status=status, full=True)
  if opts.save_ts is not None:
    s = jnp.asarray(save_ts, dtype)
    out["L_t"] = closed(t0, s, d) + jnp.mean(ls[:-1], axis=1)
  return out


def _subspace_solve(eps_fn, x0: Array, k_img: Array, opts: VolumeOptions) -> dict[str, Array]:
  """subspace for ONE image: (x, frame [K, *shape]) stepped by a diffrax solver with its
  step-size controller; QR after every accepted step, summing log|diag R|."""
  shape, dtype = x0.shape, x0.dtype
  t0, t1 = jnp.asarray(opts.t_start, dtype), jnp.asarray(opts.t_end, dtype)
  sde, K, chunk, max_steps = opts.sde, opts.K, opts.chunk_size, opts.max_steps
  frame0, _ = trace.orthonormalise(jax.random.normal(jax.random.fold_in(k_img, 0), (K,) + shape, dtype))

  def vf(t, y, args):
    del args
    x, frame = y
    t = jnp.asarray(t, dtype)
    eps, jvp = jax.linearize(lambda z: eps_fn(z, t), x)
    pushed = trace.chunked_vmap(jvp, frame, chunk)
    return (sde.pf_drift_from_eps(x, t, eps).astype(dtype), (sde.eps_coeff(t) * pushed).astype(dtype))

  term = diffrax.ODETerm(vf)
  solver = SOLVERS[opts.solver]()
  controller = _controller(opts, t0, t1, _frame_norm, dtype)
  error_order = solver.error_order(term)
  y0 = (x0, frame0)
  clip_floor = t1 - 100 * jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(t1), 1)
  tnext, cstate = controller.init(term, t0, t1, y0, None, None, solver.func, error_order)
  tnext = jnp.where(tnext > clip_floor, t1, tnext).astype(dtype)
  cstate = jax.tree.map(jnp.asarray, cstate)
  sstate = solver.init(term, t0, tnext, y0, None)
  record = opts.save_ts is not None
  buf = (jnp.full((max_steps + 1,), t0, dtype), jnp.zeros((max_steps + 1,), dtype)) if record else None
  carry0 = (t0, tnext, y0, jnp.zeros((), dtype), sstate, cstate, jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32), buf)

  def cond(c):
    t, _, _, _, _, _, acc, rej, _ = c
    return (t < t1) & (acc + rej < max_steps)

  def body(c):
    t, tn, y, logr, sstate, cstate, acc, rej, buf = c
    y1, y_err, _, sstate1, _ = solver.step(term, t, tn, y, None, sstate, made_jump=True)
    keep, t_new, tn_new, _, cstate1, _ = controller.adapt_step_size(
        t, tn, y, y1, None, y_err, error_order, cstate)
    keep = jnp.asarray(keep)
    cstate1 = jax.tree.map(jnp.asarray, cstate1)
    frame1, log_diag = trace.orthonormalise(y1[1])
    tn_new = jnp.where(tn_new > clip_floor, jnp.where(keep, t1, t_new + 0.5 * (t1 - t_new)), tn_new)
    sel = lambda a, b: jax.tree.map(lambda u, v: jnp.where(keep, u, v), a, b)  # noqa: E731
    y_new = sel((y1[0], frame1), y)
    logr_new = jnp.where(keep, logr + jnp.sum(log_diag), logr)
    sstate_new = sel(sstate1, sstate)
    acc_new = acc + keep.astype(jnp.int32)
    if buf is not None:
      buf = (buf[0].at[acc_new].set(jnp.where(keep, t_new, buf[0][acc_new])),
             buf[1].at[acc_new].set(jnp.where(keep, logr_new, buf[1][acc_new])))
    return (jnp.asarray(t_new, dtype), jnp.asarray(tn_new, dtype), y_new, logr_new, sstate_new,
            cstate1, acc_new, rej + (~keep).astype(jnp.int32), buf)

  t, _, (x_T, _), logr, _, _, acc, rej, buf = jax.lax.while_loop(cond, body, carry0)
  log_volume = K * (sde.log_mean_coeff(t1) - sde.log_mean_coeff(t0)) + logr
  nfe = _nfe(opts, acc + rej, reevaluate_first_stage=True, loop="controller")
  status = jnp.where(t < t1, diffrax.RESULTS.max_steps_reached._value, 0).astype(jnp.int32)
  # Not estimated: L depends on the key through the initial frame, and one frame per image
  # gives no spread to estimate its error from (NaN, never a false 0).
  out = dict(log_volume=log_volume, log_volume_stderr=jnp.full((), jnp.nan, dtype), x_T=x_T, nfe=nfe,
             num_jvps=nfe * K, num_steps=acc, num_rejected=rej, status=status, full=False)
  if record:
    idx = jnp.arange(max_steps + 1)
    bt = jnp.where(idx <= acc, buf[0], t)
    bl = jnp.where(idx <= acc, buf[1], logr)
    s = jnp.asarray(opts.save_ts, dtype)
    out["L_t"] = K * (sde.log_mean_coeff(s) - sde.log_mean_coeff(t0)) + jnp.interp(s, bt, bl)
  return out


def _paper_solve(eps_fn, x0: Array, k_img: Array, opts: VolumeOptions) -> dict[str, Array]:
  """paper for ONE image: Euler steps of the center and its K neighbours, one vmapped
  batch of K + 1 points per step, lax.scan over the steps."""
  shape, dtype = x0.shape, x0.dtype
  sde, K, N, radius, chunk = opts.sde, opts.K, opts.paper_steps, opts.radius, opts.chunk_size
  t0, t1 = opts.t_start, opts.t_end
  ts = jnp.linspace(t0, t1, N, dtype=dtype)
  dt = jnp.asarray((t1 - t0) / (N - 1), dtype)
  noise = jax.random.normal(jax.random.fold_in(k_img, 0), (K,) + shape, dtype)
  edges0 = radius * trace.sorted_gram_schmidt(radius * noise)
  norms = lambda e: jnp.linalg.norm(e.reshape(K, -1), axis=1)  # noqa: E731

  def step(carry, t):
    center, edges = carry
    points = jnp.concatenate([center[None], center[None] + edges])
    eps = trace.chunked_vmap(lambda p: eps_fn(p, t), points, chunk)
    moved = (points + dt * sde.pf_drift_from_eps(points, t, eps)).astype(dtype)
    diffs = moved[1:] - moved[0]
    growth = jnp.sum(jnp.log(norms(diffs)) - jnp.log(norms(edges)))
    return (moved[0], radius * trace.sorted_gram_schmidt(diffs)), growth

  (x_T, _), growth = jax.lax.scan(step, (x0, edges0), ts)
  out = dict(log_volume=jnp.sum(growth), log_volume_stderr=jnp.full((), jnp.nan, dtype), x_T=x_T,
             nfe=jnp.asarray(N * (K + 1), jnp.int32), num_jvps=jnp.zeros((), jnp.int32),
             num_steps=jnp.asarray(N, jnp.int32), num_rejected=jnp.zeros((), jnp.int32),
             status=jnp.zeros((), jnp.int32), full=False)
  if opts.save_ts is not None:
    ends = jnp.concatenate([ts[:1], ts + dt])
    cum = jnp.concatenate([jnp.zeros((1,), dtype), jnp.cumsum(growth)])
    out["L_t"] = jnp.interp(jnp.asarray(opts.save_ts, dtype), ends, cum)
  return out


_SOLVE = {"exact": _trace_solve, "hutchinson": _trace_solve, "subspace": _subspace_solve,
          "paper": _paper_solve}


def batch_log_volume(eps_fn, x0: Array, image_ids: Array, key: Array,
                     opts: VolumeOptions) -> dict[str, Array]:
  """The volume of every image of x0 [B, *shape], image_ids [B] ints: a dict of [B] arrays
  (the fields of VolumeResult, but L_t only when opts.save_ts). Pure and traceable: no
  validation and no host work, so it can be wrapped in jit / shard_map. Its matmuls and
  convolutions are traced at opts.precision."""

  def one(x, image_id):
    out = _SOLVE[opts.estimator](eps_fn, x, jax.random.fold_in(key, image_id), opts)
    full = out.pop("full")
    out["prior_logp"] = opts.sde.prior_logp(out["x_T"])
    out["logp"] = out["prior_logp"] + out["log_volume"] if full else jnp.full_like(out["log_volume"], jnp.nan)
    out["nfe"] = jnp.asarray(out["nfe"], jnp.int32)
    out["num_jvps"] = jnp.asarray(out["num_jvps"], jnp.int32)
    return out

  with numerics.precision(opts.precision):
    return jax.vmap(one)(x0, image_ids)


_batch_log_volume_jit = eqx.filter_jit(batch_log_volume)


def validate_inputs(x0, opts: VolumeOptions) -> None:
  """ValueError naming the problem when x0 [B, *shape] cannot be scored under opts."""
  if not isinstance(opts, VolumeOptions):
    raise ValueError(f"opts must be a VolumeOptions; got {type(opts).__name__}")
  shape = tuple(getattr(x0, "shape", np.shape(x0)))
  if len(shape) < 2:
    raise ValueError(f"x0 must be a batch [B, *image_shape] of rank >= 2; got shape {shape}")
  if shape[0] < 1 or math.prod(shape[1:]) < 1:
    raise ValueError(f"x0 must hold at least one non-empty image; got shape {shape}")
  if not jnp.issubdtype(getattr(x0, "dtype", np.asarray(x0).dtype), jnp.floating):
    raise ValueError(f"x0 must be floating point (images in [-1, 1]); got dtype {x0.dtype}")
  if not np.all(np.isfinite(np.asarray(x0))):
    bad = int(np.sum(~np.isfinite(np.asarray(x0))))
    raise ValueError(f"x0 has {bad} NaN or inf pixel values")
  d = math.prod(shape[1:])
  if opts.estimator in ("subspace", "paper") and opts.K > d:
    raise ValueError(f"K={opts.K} exceeds the image dimension D={d} for estimator {opts.estimator!r}")


_CHECKED_EPS_FNS: dict = {}  # signature of (eps_fn, image shape, dtype) -> True, once checked


def _eps_fn_signature(eps_fn, shape, dtype):
  """A hashable key for eps_fn's structure and array shapes (not values), or None."""
  leaves, treedef = jax.tree.flatten(eps_fn)
  try:
    key = (treedef, tuple((l.shape, l.dtype) if eqx.is_array(l) else l for l in leaves), shape, dtype)
    hash(key)
  except TypeError:
    return None
  return key


def _check_eps_fn(eps_fn, shape: tuple[int, ...], dtype) -> None:
  """ValueError unless eps_fn maps one image [*shape] to [*shape]. Traces eps_fn abstractly
  once per structure (a UNet trace costs ~1 s, too much to repeat on every batch)."""
  sig = _eps_fn_signature(eps_fn, shape, dtype)
  if sig is not None and sig in _CHECKED_EPS_FNS:
    return
  try:
    out_spec = eqx.filter_eval_shape(eps_fn, jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((), dtype))
  except Exception as e:  # the network's own shape error, re-raised naming the input
    raise ValueError(f"eps_fn fails on one image of shape {shape} ({type(e).__name__}: {e})") from e
  if getattr(out_spec, "shape", None) != shape:
    raise ValueError(f"eps_fn maps one image of shape {shape} to "
                     f"{getattr(out_spec, 'shape', out_spec)}; it must return the image's shape")
  if sig is not None:
    if len(_CHECKED_EPS_FNS) > 256:
      _CHECKED_EPS_FNS.clear()
    _CHECKED_EPS_FNS[sig] = True


def log_volume_growth(eps_fn, x0, *, sde: sde_lib.SDE, key: Array | None = None, image_ids=None,
                      **options: Any) -> VolumeResult:
  """Log volume growth L of the PF ODE map from t0 to t1 for every image of x0.

  eps_fn(x, t): ONE image [*shape] and SDE time t -> [*shape] (a plain function, or a
  pytree callable whose arrays are then traced inputs: a plain function is hashed by
  identity, so pass the same object to reuse the compilation). x0: [B, *shape] float
  images. key: PRNG key of probes / frames (None: PRNGKey(0)); image i uses
  fold_in(key, image_ids[i]) (image_ids default 0..B-1). options: fields of VolumeOptions
  (estimator, solver, rtol, ...), its defaults where left out.
  `estimator` may name a preset, "hutchinson@<name>" (PRESETS: its settings replace the
  defaults; options given here replace both).
  Returns a VolumeResult of numpy arrays.
  """
  estimator, preset = parse_estimator(options.pop("estimator", "hutchinson"))
  options = {**(PRESETS[preset] if preset else {}), **options, "estimator": estimator}
  unknown = sorted(set(options) - {f.name for f in dataclasses.fields(VolumeOptions)})
  if unknown:
    raise TypeError(f"log_volume_growth got unknown options {unknown}; the options are the fields of VolumeOptions")
  if options.get("save_ts") is not None:
    options["save_ts"] = tuple(np.atleast_1d(options["save_ts"]).tolist())
  opts = VolumeOptions(sde=sde, **options)
  return run(eps_fn, x0, opts, key=key, image_ids=image_ids)


def run(eps_fn, x0, opts: VolumeOptions, *, key: Array | None = None, image_ids=None) -> VolumeResult:
  """`log_volume_growth` with the options already in a VolumeOptions."""
  validate_inputs(x0, opts)
  x0 = jnp.asarray(x0)
  b = x0.shape[0]
  if image_ids is None:
    image_ids = np.arange(b)
  image_ids = np.asarray(image_ids)
  if image_ids.shape != (b,) or not np.issubdtype(image_ids.dtype, np.integer):
    raise ValueError(f"image_ids must be {b} integers (one per image); got shape "
                     f"{image_ids.shape}, dtype {image_ids.dtype}")
  _check_eps_fn(eps_fn, x0.shape[1:], x0.dtype)
  key = jax.random.PRNGKey(0) if key is None else key
  out = jax.device_get(_batch_log_volume_jit(eps_fn, x0, jnp.asarray(image_ids, jnp.int32), key, opts))
  return VolumeResult(
      log_volume=out["log_volume"], log_volume_stderr=out["log_volume_stderr"],
      prior_logp=out["prior_logp"], logp=out["logp"], nfe=out["nfe"], num_jvps=out["num_jvps"],
      num_steps=out["num_steps"], num_rejected=out["num_rejected"], status=out["status"],
      x_T=out["x_T"], L_t=out.get("L_t"),
      save_ts=None if opts.save_ts is None else np.asarray(opts.save_ts))
