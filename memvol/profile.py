"""L through time: windows of the profile, its excess over the bound, a bound-respecting score.

The profile of an image is its cumulative log volume growth L(t_k) = L(t0 -> t_k) at times
t_1 < ... < t_S (volume.VolumeOptions.save_ts, config score.profile_times; by default
geometric in sigma, so each window has the same bound). With L_max(t) = dim log(sigma(t) /
sigma(t0)) (`memvol.sde.log_volume_bound`; dim = D for full traces, K for a K-frame):

  window k       dL_k = L(t_k) - L(t_{k-1})   (t_0 = t0, L(t0) = 0), k = 1..S, and, when
                 t_S < t1, a last window (t_S, t1] with dL = L - L(t_S)
  excess         E(t_k) = L(t_k) - L_max(t_k): <= 0 for every true score, so E > 0 is the
                 network's error, not volume
  first above    the first t_k with E(t_k) > 0 (NaN: never above)
  capped L       L_cap = sum_k min(dL_k, dLmax_k), dLmax_k = L_max(t_k) - L_max(t_{k-1})

Why the capped score respects the bound. A true score's drift has div v <= dim d log sigma/dt
at every t (sde.py), so over any window dL_k <= dLmax_k: a window above its bound is certainly
wrong by at least dL_k - dLmax_k, and min(dL_k, dLmax_k) is the closest value to the
measurement that a true score could produce in that window. Hence (i) L_cap <= L_max(t1) for
every network; (ii) L_cap = L whenever no window exceeds its bound, in particular for every
true score, so nothing a correct model measures is changed; (iii) L_cap = L - sum_k (dL_k -
dLmax_k)^+, i.e. L minus the error it can prove window by window (a network that overshoots
early and undershoots late is not allowed to cancel the two, as the plain sum does). Windows
are the profile's: finer windows remove more provable error (capping is sub-additive in the
partition), so L_cap depends on score.profile_times, which the settings record.

All functions are numpy, on the host, over [N, S] profiles.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from memvol import sde as sde_lib


def window_edges(ts: np.ndarray, t0: float, t1: float) -> np.ndarray:
  """[W + 1] window boundaries t0, t_1, ..., t_S (and t1 when t_S < t1)."""
  ts = np.asarray(ts, np.float64)
  edges = np.concatenate([[t0], ts])
  if ts.size == 0 or ts[-1] < t1:
    edges = np.concatenate([edges, [t1]])
  return edges


def windows(L_t: np.ndarray, L: np.ndarray, ts: np.ndarray, t1: float) -> np.ndarray:
  """[N, W] window increments dL_k of profiles L_t [N, S] at ts [S] with full L [N]."""
  L_t = np.asarray(L_t, np.float64).reshape(len(L), -1)
  cum = np.concatenate([np.zeros((len(L), 1)), L_t], axis=1)
  if ts.size == 0 or ts[-1] < t1:
    cum = np.concatenate([cum, np.asarray(L, np.float64)[:, None]], axis=1)
  return np.diff(cum, axis=1)


def excess(L_t: np.ndarray, bound_t: np.ndarray) -> np.ndarray:
  """[N, S] L(t_k) - L_max(t_k)."""
  return np.asarray(L_t, np.float64) - np.asarray(bound_t, np.float64)[None, :]


def first_above(exc: np.ndarray, ts: np.ndarray) -> np.ndarray:
  """[N] the first profile time with excess > 0, NaN when none (or the row is not finite)."""
  exc = np.asarray(exc, np.float64)
  if exc.shape[1] == 0:
    return np.full(exc.shape[0], math.nan)
  above = exc > 0
  first = np.where(above.any(axis=1), np.argmax(above, axis=1), -1)
  out = np.where(first >= 0, np.asarray(ts, np.float64)[np.maximum(first, 0)], math.nan)
  return np.where(np.isfinite(exc).all(axis=1), out, math.nan)


def capped(dL: np.ndarray, dL_max: np.ndarray) -> np.ndarray:
  """[N] L_cap = sum_k min(dL_k, dLmax_k) (module docstring)."""
  return np.sum(np.minimum(np.asarray(dL, np.float64), np.asarray(dL_max, np.float64)[None, :]), axis=1)


def column_time(t: float) -> str:
  """A profile time as it appears in column names: 4 significant digits."""
  return f"{float(t):.4g}"


def bound_dim(estimator: str, dim: int, K: int) -> int:
  """The dimension the bound counts: D for a full trace, the frame size K for subspace / paper."""
  return min(int(K), int(dim)) if estimator in ("subspace", "paper") else int(dim)


def bound(sde: sde_lib.SDE, t0: float, ts: np.ndarray, dim: int) -> np.ndarray:
  """[len(ts)] L_max(t) = dim log(sigma(t) / sigma(t0)), float64."""
  ts = np.asarray(ts, np.float64)
  log_std = lambda t: np.log(np.asarray(sde.std(np.asarray(t, np.float64)), np.float64))  # noqa: E731
  return dim * (log_std(ts) - log_std(t0)) if ts.size else np.zeros(0)


def summarise(sde: sde_lib.SDE, t0: float, t1: float, ts: np.ndarray, L_t: np.ndarray, L: np.ndarray,
              dim: int) -> dict[str, Any]:
  """Everything the profile says per image, from profiles L_t [N, S] at ts [S] and L [N]:
  ts, bound_t [S], excess [N, S], t_above [N], edges [W + 1], windows [N, W], window_bound [W],
  L_capped [N]."""
  ts = np.asarray(ts, np.float64)
  L = np.asarray(L, np.float64)
  L_t = np.asarray(L_t, np.float64).reshape(L.size, ts.size)
  bt = bound(sde, t0, ts, dim)
  exc = excess(L_t, bt)
  edges = window_edges(ts, t0, t1)
  wb = np.diff(bound(sde, t0, edges, dim))
  dL = windows(L_t, L, ts, t1)
  return {"ts": ts, "bound_t": bt, "excess": exc, "t_above": first_above(exc, ts), "edges": edges,
          "windows": dL, "window_bound": wb, "L_capped": capped(dL, wb)}


def column_names(prefix: str, ts: np.ndarray) -> dict[str, list[str]]:
  """scores.csv column names of the profile: {'L': [prefix_L@t ..], 'excess': [prefix_excess@t ..],
  't_above': [prefix_t_above], 'L_capped': [prefix_L_capped]}; ValueError if two times print alike."""
  names = [column_time(t) for t in ts]
  if len(set(names)) != len(names):
    raise ValueError(f"profile times {list(ts)} are too close to name one column each (4 digits)")
  return {"L": [f"{prefix}_L@{n}" for n in names], "excess": [f"{prefix}_excess@{n}" for n in names],
          "t_above": [f"{prefix}_t_above"], "L_capped": [f"{prefix}_L_capped"]}
