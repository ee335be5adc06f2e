"""Peer scores on the same checkpoint: the cheap membership / memorisation scores a researcher
tries first, so that log volume growth is compared with something.

Every peer is a pure function of the single-image `eps_fn(x, t)`, a batch x0 [B, *shape], the
SDE and a PRNG key; it returns a score per image, sign-normalised so that HIGHER = more likely
a member / memorised, and the network passes it cost per image (`nfe`: forward evaluations
plus JVPs, each counted as one pass). Image i's randomness is fold_in(fold_in(key, id_i), j)
(noise draw / probe j), so a score does not depend on batch size, order or device count.

Time: memvol uses continuous VP time t in [eps, T] (the network sees 999 t) with
eps-prediction; the originals use DDPM indices n = 0..999 with linear betas 1e-4..0.02, where
n = 0 is the first noisy level. memvol reads index n as t = n / 1000 (t = sde.eps for n = 0),
so the network sees ~n, as theirs does; the marginal of index n is that of t = (n + 1) / 1000,
0.1% of the range away. Timesteps are fixed in the config with the originals' values.

- `loss` (Matsumoto et al. 2023; Carlini et al. 2023): minus the denoising loss at a fixed t,
  mean over pixels of (eps(a x0 + sigma z, t) - z)^2, averaged over `num_noise` draws z.
  Cost: num_noise.
- `secmi` (Duan et al. 2023, SecMI_stat; jinhaoduan/SecMI `get_intermediate_results`):
  deterministic DDIM from x0 (taken as x at t = eps, their step 0) over the grid
  0, k, ..., t_sec - k, then one DDIM step up to t_sec and one back down to t_sec - k; the
  score is minus the squared L2 error between the two x(t_sec - k). As in their code (not their
  text), the compared state is at t_sec - k; with t_sec = 100, k = 10 that is step 90.
  Each DDIM step x(s) -> x(u): a(u) (x - sigma(s) e) / a(s) + sigma(u) e, e = eps(x, s).
  Cost: t_sec / k + 1.
- `pia`, `pian` (Kong et al. 2024, kong13661/PIA `components.PIA` / `PIAN`): eps_0 = eps(x0, t=0)
  (memvol: t = sde.eps, its smallest trained time), x_t = a(t) x0 + sigma(t) eps_0, score =
  minus sum |eps(x_t, t) - eps_0|^p with p = 4. PIAN first rescales eps_0 to mean absolute
  value sqrt(2 / pi) (a standard normal's). Cost: 2.
- `sima` (Rao et al. 2025, mx-ethan-rao/SimA `components.SimA`): the network at t on the clean
  image, no noise added: minus sum |eps(x0, t)|^4. Their script scans steps 0..200 and
  reports the best; memvol fixes one step ahead (never chosen on the evaluated images). Cost: 1.
- `flipd` (Kamkari et al. 2024, layer6ai-labs/dgm_geometry `FlipdEstimator`): the local intrinsic
  dimension LID = D + sigma^2 (tr grad s + |s|^2) at x = a(t0) x0 (no noise). With s = -eps / sigma
  this is D - sigma tr(d eps / dx) + |eps|^2. tr from `memvol.trace`: exact (D JVPs) when
  D <= `exact_max_dim`, else Hutchinson with `num_probes` probes. Low LID = memorised, so the
  score is -LID. Cost: 1 + D (exact) or 1 + num_probes.

`logp`, the ODE log-likelihood, is a sixth peer but needs no code here: it is prior_logp + L
of any full-trace volume estimator (scores.csv E_logp).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from memvol import sde as sde_lib
from memvol import trace

Array = jax.Array
PEERS = ("loss", "secmi", "pia", "pian", "sima", "flipd")
TRACES = ("auto", "exact", "hutchinson")
DDPM_STEPS = 1000  # the originals' T: index n <-> t = n / DDPM_STEPS


@dataclasses.dataclass(frozen=True)
class PeerOptions:
  """Everything that defines a peer score except the network and the images (hashable: a
  static argument of the compiled batch function).

  name: one of PEERS. t: the peer's time in (0, T] (loss t, secmi t_sec, pia/pian t, sima t,
  flipd t0). num_noise: loss draws. interval: secmi DDIM step k (t / k must be an integer).
  p: exponent of the pia / pian / sima error sum. trace, exact_max_dim, num_probes, probe:
  flipd's trace (auto: exact when D <= exact_max_dim). chunk_size: vectors vmapped together
  per image (None: all). precision: jax.default_matmul_precision for the whole computation
  (None: the platform default).
  """

  sde: sde_lib.SDE = sde_lib.VPSDE()
  name: str = "loss"
  t: float = 0.1
  num_noise: int = 4
  interval: float = 0.01
  p: float = 4.0
  trace: str = "auto"
  exact_max_dim: int = 1024
  num_probes: int = 16
  probe: str = "rademacher"
  chunk_size: int | None = 64
  precision: str | None = None

  def __post_init__(self):
    setf = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    if not isinstance(self.sde, sde_lib.SDE):
      raise ValueError(f"sde must be a memvol.sde.SDE; got {type(self.sde).__name__}")
    if self.name not in PEERS:
      raise ValueError(f"unknown peer {self.name!r}; expected one of {PEERS} (or 'logp', "
                       "which comes from a full-trace volume estimator)")
    T = float(self.sde.T)
    for k in ("t", "interval", "p"):
      v = float(getattr(self, k))
      if not math.isfinite(v) or v <= 0:
        raise ValueError(f"peer {self.name}: {k} must be a finite number > 0; got {getattr(self, k)!r}")
      setf(k, v)
    if self.t > T:
      raise ValueError(f"peer {self.name}: t = {self.t} lies outside (0, T] = (0, {T}]")
    if self.name == "secmi":
      m = self.t / self.interval
      if abs(m - round(m)) > 1e-6 * max(1.0, m) or round(m) < 1:
        raise ValueError(f"peer secmi: t_sec = {self.t} must be a whole number (>= 1) of DDIM steps "
                         f"k = {self.interval}")
    for k, low in (("num_noise", 1), ("num_probes", 1), ("exact_max_dim", 1)):
      v = getattr(self, k)
      if int(v) != v or v < low:
        raise ValueError(f"peer {self.name}: {k} must be an integer >= {low}; got {v!r}")
      setf(k, int(v))
    if self.trace not in TRACES:
      raise ValueError(f"peer flipd: trace must be one of {TRACES}; got {self.trace!r}")
    if self.probe not in trace.PROBES:
      raise ValueError(f"peer flipd: probe must be one of {trace.PROBES}; got {self.probe!r}")
    if self.chunk_size is not None:
      if int(self.chunk_size) != self.chunk_size or self.chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an integer >= 1; got {self.chunk_size!r}")
      setf("chunk_size", int(self.chunk_size))
    setf("precision", None if self.precision in (None, "") else str(self.precision))

  @property
  def secmi_steps(self) -> int:
    """t_sec / k: the DDIM steps from t = 0 to t_sec."""
    return int(round(self.t / self.interval))

  def exact_trace(self, dim: int) -> bool:
    return self.trace == "exact" or (self.trace == "auto" and dim <= self.exact_max_dim)

  def nfe(self, dim: int) -> int:
    """Network passes per image (forward evaluations + JVPs) for images of D = dim."""
    return {"loss": self.num_noise, "secmi": self.secmi_steps + 1, "pia": 2, "pian": 2, "sima": 1,
            "flipd": 1 + (dim if self.exact_trace(dim) else self.num_probes)}[self.name]

  @classmethod
  def from_config(cls, config: Mapping[str, Any], name: str, *, sde: sde_lib.SDE | None = None
                  ) -> "PeerOptions":
    """Options of peer `name` from a whole config (its `sde` and `score.peer` sections)."""
    sde = sde_lib.from_config(config["sde"]) if sde is None else sde
    pc = config["score"]["peer"]
    # The `score.peer` keys of each field; a field without its key keeps the default above.
    keys = {"num_noise": "loss_num_noise", "interval": "secmi_interval", "p": "p", "trace": "flipd_trace",
            "exact_max_dim": "flipd_exact_max_dim", "num_probes": "flipd_num_probes", "precision": "precision",
            "t": {"loss": "loss_t", "secmi": "secmi_t", "pia": "pia_t", "pian": "pia_t", "sima": "sima_t",
                  "flipd": "flipd_t"}.get(name)}
    kw = {f: pc[k] for f, k in keys.items() if k is not None and k in pc}
    return cls(sde=sde, name=name, chunk_size=config["score"]["chunk_size"] or None, **kw)


def ddpm_time(n: int, sde: sde_lib.SDE) -> float:
  """memvol's t for the originals' DDPM index n: n / 1000 of T, at least sde.eps."""
  return max(n / DDPM_STEPS * float(sde.T), float(sde.eps))


# --- one image ---------------------------------------------------------------------


def _loss_one(eps_fn, x: Array, key: Array, o: PeerOptions) -> Array:
  t = jnp.asarray(o.t, x.dtype)
  a, s = o.sde.mean_coeff(t), o.sde.std(t)
  z = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype))(
      jnp.arange(o.num_noise))
  err = trace.chunked_vmap(lambda zz: jnp.mean((eps_fn(a * x + s * zz, t) - zz) ** 2), z, o.chunk_size)
  return -jnp.mean(err)


def ddim_step(eps_fn, sde: sde_lib.SDE, x: Array, s: Array, u: Array) -> Array:
  """One deterministic DDIM step of ONE image from time s to time u (either direction)."""
  e = eps_fn(x, s)
  return sde.mean_coeff(u) * (x - sde.std(s) * e) / sde.mean_coeff(s) + sde.std(u) * e


def _secmi_one(eps_fn, x: Array, key: Array, o: PeerOptions) -> Array:
  del key
  m = o.secmi_steps
  grid = jnp.asarray([ddpm_time(0, o.sde)] + [j * o.interval for j in range(1, m)], x.dtype)

  def step(y, st):
    return ddim_step(eps_fn, o.sde, y, st[0], st[1]), None

  x_sec, _ = jax.lax.scan(step, x, (grid[:-1], grid[1:]))  # DDIM inversion to t_sec - k
  t_last, t_up = grid[-1], jnp.asarray(o.t, x.dtype)
  back = ddim_step(eps_fn, o.sde, ddim_step(eps_fn, o.sde, x_sec, t_last, t_up), t_up, t_last)
  return -jnp.sum((back - x_sec) ** 2)


def _pia_one(eps_fn, x: Array, key: Array, o: PeerOptions) -> Array:
  del key
  e0 = eps_fn(x, jnp.asarray(o.sde.eps, x.dtype))
  if o.name == "pian":
    e0 = e0 / jnp.mean(jnp.abs(e0)) * math.sqrt(2.0 / math.pi)
  t = jnp.asarray(o.t, x.dtype)
  back = eps_fn(o.sde.mean_coeff(t) * x + o.sde.std(t) * e0, t)
  return -jnp.sum(jnp.abs(back - e0) ** o.p)


def _sima_one(eps_fn, x: Array, key: Array, o: PeerOptions) -> Array:
  del key
  return -jnp.sum(jnp.abs(eps_fn(x, jnp.asarray(o.t, x.dtype))) ** o.p)


def flipd_lid(eps_fn, x: Array, key: Array, o: PeerOptions) -> Array:
  """FLIPD's LID of ONE image x [*shape] at t0 = o.t (key: Hutchinson probes)."""
  t = jnp.asarray(o.t, x.dtype)
  e, jvp = jax.linearize(lambda y: eps_fn(y, t), o.sde.mean_coeff(t) * x)
  d = x.size
  if o.exact_trace(d):
    tr = trace.exact_trace(jvp, x.shape, x.dtype, o.chunk_size)
  else:
    probes = trace.sample_probes(key, o.num_probes, x.shape, x.dtype, o.probe)
    tr = jnp.mean(trace.hutchinson(jvp, probes, o.chunk_size))
  return d - o.sde.std(t) * tr + jnp.sum(e**2)


def _flipd_one(eps_fn, x: Array, key: Array, o: PeerOptions) -> Array:
  return -flipd_lid(eps_fn, x, key, o)


_ONE = {"loss": _loss_one, "secmi": _secmi_one, "pia": _pia_one, "pian": _pia_one, "sima": _sima_one,
        "flipd": _flipd_one}


# --- batches -----------------------------------------------------------------------


def _precision(precision: str | None):
  return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


def batch_scores(eps_fn, x0: Array, image_ids: Array, key: Array, opts: PeerOptions) -> dict[str, Array]:
  """{'score': [B], 'nfe': [B] int32} of the peer opts.name for x0 [B, *shape] with ids [B].
  Pure and traceable (wrap in jit / shard_map); image i uses fold_in(key, ids[i])."""
  nfe = opts.nfe(math.prod(x0.shape[1:]))
  with _precision(opts.precision):
    score = jax.vmap(lambda x, i: _ONE[opts.name](eps_fn, x, jax.random.fold_in(key, i), opts))(x0, image_ids)
  return {"score": score, "nfe": jnp.full(score.shape, nfe, jnp.int32)}


_batch_scores_jit = eqx.filter_jit(batch_scores)


def run(eps_fn, x0, opts: PeerOptions, *, key: Array | None = None, image_ids=None
        ) -> tuple[np.ndarray, np.ndarray]:
  """(score [B], nfe [B]) as numpy arrays for the peer `opts.name` (compiled once per batch
  shape; eps_fn's arrays are traced inputs). key None: PRNGKey(0); image_ids: 0..B-1."""
  if not isinstance(opts, PeerOptions):
    raise ValueError(f"opts must be a PeerOptions; got {type(opts).__name__}")
  x = np.asarray(x0)
  if x.ndim < 2 or x.shape[0] < 1 or x.size == 0:
    raise ValueError(f"x0 must be a batch [B >= 1, *image_shape]; got shape {x.shape}")
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"x0 must be floating point (images in [-1, 1]); got dtype {x.dtype}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"x0 has {int(np.sum(~np.isfinite(x)))} NaN or inf pixel values")
  ids = np.arange(x.shape[0]) if image_ids is None else np.asarray(image_ids)
  if ids.shape != (x.shape[0],) or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"image_ids must be {x.shape[0]} integers (one per image); got shape {ids.shape}")
  key = jax.random.PRNGKey(0) if key is None else key
  out = jax.device_get(_batch_scores_jit(eps_fn, jnp.asarray(x0), jnp.asarray(ids, jnp.int32), key, opts))
  return np.asarray(out["score"]), np.asarray(out["nfe"])


def _peer(name: str):
  def fn(eps_fn, x0, sde: sde_lib.SDE, key: Array | None = None, *, image_ids=None,
         precision: str | None = None, **settings) -> tuple[np.ndarray, np.ndarray]:
    return run(eps_fn, x0, PeerOptions(sde=sde, name=name, precision=precision, **settings),
               key=key, image_ids=image_ids)

  fn.__name__ = name
  fn.__doc__ = (f"The `{name}` peer score (module docstring) of every image of x0 [B, *shape]: "
                "(score [B], higher = member / memorised; network passes [B]). settings: the "
                "PeerOptions fields that apply (t, num_noise, interval, p, trace, ...).")
  return fn


loss = _peer("loss")
secmi = _peer("secmi")
pia = _peer("pia")
pian = _peer("pian")
sima = _peer("sima")
flipd = _peer("flipd")
