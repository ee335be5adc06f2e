"""Resumable batched work: results committed batch by batch as part files, then merged.

A stage that processes n items in batches of `batch_size` plans the batches
[0, b), [b, 2b), ... (the plan depends on n and b only, never on the device or process
count). Each finished batch is written atomically to `folder/{start:06d}_{end:06d}.npz`
together with the settings that produced it (a JSON string). A rerun skips batches whose
part file is present and valid, recomputes corrupt ones (saying so), and refuses parts
made with other settings or another batch plan. Each process of a multi-host run takes a
contiguous share of the batches (parallel.process_slice); process 0 merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Callable, Mapping

import equinox as eqx
import jax
import numpy as np
from tqdm.auto import tqdm

from memvol import io, parallel, preempt

SETTINGS_KEY = "_settings"
_PART_RE = re.compile(r"^(\d{6,})_(\d{6,})\.npz$")


def batch_ranges(n: int, batch_size: int) -> list[tuple[int, int]]:
  """[(start, end), ...] covering range(n) in order, every batch `batch_size` long but
  the last."""
  if n < 1:
    raise ValueError(f"nothing to do: {n} items")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def part_path(folder: str, start: int, end: int) -> str:
  return os.path.join(folder, f"{start:06d}_{end:06d}.npz")


def digest(*arrays: Any) -> str:
  """sha256 (hex, 16 chars) of arrays' dtypes, shapes and bytes, in order."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:16]


def tree_digest(tree: Any) -> str:
  """Digest of a pytree's array leaves (e.g. an eps_fn's parameters)."""
  return digest(*jax.tree.leaves(eqx.filter(tree, eqx.is_array)))


def canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
  """Settings as plain JSON values (tuples -> lists), so that a saved copy compares equal."""
  return json.loads(json.dumps(settings, sort_keys=True, default=io._json_default))


def save_part(path: str, settings: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
  """Write one batch's arrays and its settings, atomically."""
  if SETTINGS_KEY in arrays:
    raise ValueError(f"array name {SETTINGS_KEY!r} is reserved")
  io.save_npz(path, **{k: np.asarray(v) for k, v in arrays.items()},
              **{SETTINGS_KEY: np.asarray(json.dumps(canonical(settings), sort_keys=True))})


def _mismatch(path: str, saved: Mapping[str, Any], settings: Mapping[str, Any], root: str) -> ValueError:
  diff = io.config_diff(saved, canonical(settings))
  return ValueError(
      f"{path} was computed with other settings ({'; '.join(diff)}); results of different "
      f"settings are never mixed. Use a new --workdir, or delete {root} to recompute.")


class CorruptPartError(ValueError):
  """A part file that cannot be read back."""


def load_part(path: str, settings: Mapping[str, Any], root: str) -> dict[str, np.ndarray]:
  """A part's arrays. CorruptPartError if it cannot be read; ValueError if it was made
  with other settings (naming the differing fields and saying what to do)."""
  try:
    arrays = io.load_npz(path)
    saved_json = str(arrays.pop(SETTINGS_KEY))
    saved = json.loads(saved_json)
  except (ValueError, KeyError) as e:
    raise CorruptPartError(f"{path} is corrupt ({e!r})") from e
  if not io.same_settings(saved, canonical(settings)):
    raise _mismatch(path, saved, settings, root)
  return arrays


def _existing(folder: str) -> dict[tuple[int, int], str]:
  out = {}
  if os.path.isdir(folder):
    for name in sorted(os.listdir(folder)):
      m = _PART_RE.match(name)
      if m:
        out[(int(m.group(1)), int(m.group(2)))] = os.path.join(folder, name)
  return out


def check_plan(folder: str, ranges: list[tuple[int, int]], root: str) -> None:
  """Refuse part files whose range is not a batch of the plan (another batch size)."""
  plan = set(ranges)
  stray = [p for r, p in _existing(folder).items() if r not in plan]
  if stray:
    size = ranges[0][1] - ranges[0][0]
    raise ValueError(
        f"{stray[0]} (and {len(stray) - 1} more) does not match the current batches "
        f"(batch size {size}, {ranges[-1][1]} items): it was written with another batch size "
        f"or item count. Rerun with the original batch size, or delete {root} to recompute.")


def run_batches(folder: str, n: int, batch_size: int, settings: Mapping[str, Any],
                compute: Callable[[int, int], Mapping[str, Any]], *, root: str, desc: str,
                unit: str = "img", postfix: Callable[[Mapping[str, Any]], dict] | None = None,
                log: Callable[[str], None] = print) -> None:
  """Compute this process's batches of range(n) not yet on disk, committing each one.

  `compute(start, end)` returns arrays with leading axis end - start. `root` is the
  folder to name in errors (what the user would delete). Shows a progress bar (items/s,
  ETA, and `postfix(arrays)` of the last batch). Ends with a barrier across processes.
  A preemption notice (preempt.should_stop) is honoured between batches: the batch in
  progress is committed first, then preempt.Preempted is raised.
  """
  ranges = batch_ranges(n, batch_size)
  check_plan(folder, ranges, root)
  existing = _existing(folder)
  mine = ranges[parallel.process_slice(len(ranges))]
  valid = set()
  for r, path in existing.items():  # every part, so no process mixes settings unawares
    try:
      load_part(path, settings, root)
      valid.add(r)
    except CorruptPartError as e:
      if r in mine:
        log(f"[memvol] WARNING: {e}; recomputing items [{r[0]}, {r[1]})")
        os.remove(path)
  todo = [r for r in mine if r not in valid]
  done = sum(e - s for s, e in mine) - sum(e - s for s, e in todo)
  with tqdm(total=sum(e - s for s, e in mine), initial=done, desc=desc, unit=unit,
            dynamic_ncols=True, smoothing=0.3) as bar:
    for i, (s, e) in enumerate(todo):
      if i and preempt.should_stop(i):
        raise preempt.Preempted(desc, f"item {s} of {n} ({i} batches committed in this run)",
                                preempt.resume_hint())
      arrays = {k: np.asarray(v) for k, v in compute(s, e).items()}
      bad = [k for k, v in arrays.items() if v.ndim == 0 or v.shape[0] != e - s]
      if bad:
        raise ValueError(f"compute({s}, {e}) returned arrays {bad} without leading axis {e - s}")
      save_part(part_path(folder, s, e), settings, arrays)
      bar.update(e - s)
      if postfix is not None:
        bar.set_postfix(postfix(arrays), refresh=False)
  parallel.sync_processes(f"memvol-parts-{folder}")


def merge_parts(folder: str, n: int, batch_size: int, settings: Mapping[str, Any], *,
                root: str) -> dict[str, np.ndarray]:
  """Every batch's arrays concatenated in item order (all parts must be present/valid)."""
  ranges = batch_ranges(n, batch_size)
  check_plan(folder, ranges, root)
  existing = _existing(folder)
  missing = [r for r in ranges if r not in existing]
  if missing:
    raise ValueError(f"{len(missing)} batches missing in {folder} (first: images "
                     f"[{missing[0][0]}, {missing[0][1]})); rerun the stage to compute them")
  parts = [load_part(existing[r], settings, root) for r in ranges]
  keys = set(parts[0])
  if any(set(p) != keys for p in parts):
    raise ValueError(f"part files in {folder} hold different arrays; delete {root} and rerun")
  return {k: np.concatenate([p[k] for p in parts], axis=0) for k in sorted(keys)}


def all_present(folder: str, n: int, batch_size: int) -> bool:
  """Whether every batch of the plan has a part file (not checked for validity)."""
  existing = _existing(folder)
  return all(r in existing for r in batch_ranges(n, batch_size))
