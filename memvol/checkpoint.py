"""Training checkpoints: orbax `CheckpointManager` at workdir/checkpoints.

A checkpoint at step N holds four items:

  params, ema_params, opt_state   array pytrees (orbax StandardSave; restored onto the
                                  shardings of an abstract target)
  meta                            JSON: step, seed, examples_seen (what fixes the data
                                  order), the training stream's size and fingerprint,
                                  image_shape and the data/model/sde config it was made with

orbax writes each step to a temporary folder and renames it when complete, so a run killed
at any moment leaves only whole checkpoints behind; older ones are deleted (max_to_keep)
only after their successor is committed. A checkpoint damaged later (a truncated copy, a
disk error) is found when it is read back: `latest_step` is the newest checkpoint whose
meta and arrays all read back (as numpy, on any device count), and a damaged newer one is
moved aside to `{step}.corrupt` with a warning, so training resumes from the previous
one, never silently from scratch. Only errors that prove damage demote a checkpoint
(missing or unreadable metadata, arrays whose shapes / dtypes disagree between params,
ema_params and the optimizer state, tensorstore's DATA_LOSS-kind errors); any other read
error (an I/O hiccup) is retried READ_ATTEMPTS times and then raised naming the folder,
leaving the checkpoint in place. Restoring into a config whose data/model/sde sections
differ from the recorded ones is refused, naming the fields.
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import re
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from memvol import io
from memvol import workdir as wdir
from memvol.workdir import IDENTITY_SECTIONS  # data, model, sde: what a checkpoint belongs to

ARRAY_ITEMS = ("params", "ema_params", "opt_state")
ITEMS = ARRAY_ITEMS + ("meta",)


class _DropOrbaxInfo(std_logging.Filter):
  """orbax logs several INFO lines per array and step, also from its asynchronous save
  threads: keep only its warnings and errors (a filter, not a verbosity switched around
  each call, which those threads would outlive)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


logging.get_absl_logger().addFilter(_DropOrbaxInfo())


def open_manager(workdir: str, max_to_keep: int | None = None, keep_period: int | None = None,
                 async_save: bool = False) -> ocp.CheckpointManager:
  """A writing manager at workdir/checkpoints keeping the last `max_to_keep` checkpoints
  (None = all) plus every step divisible by `keep_period` (None = none). Temporary folders
  of a save that was killed are removed. Saves are synchronous by default (a save costs
  well under 1% of the steps between two saves at the configs' ckpt_every, and nothing is
  left in flight, or logging from threads, when training goes on or stops)."""
  if max_to_keep is not None and max_to_keep < 1:
    raise ValueError(f"train.keep_checkpoints must be >= 1, got {max_to_keep}")
  if keep_period is not None and keep_period < 1:
    raise ValueError(f"train.keep_every must be >= 1 (or 0 for none), got {keep_period}")
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, keep_period=keep_period, cleanup_tmp_directories=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(wdir.checkpoints(workdir), options=options, item_names=ITEMS)


def _reader(workdir: str) -> ocp.CheckpointManager | None:
  path = wdir.checkpoints(workdir)
  if not os.path.isdir(path):
    return None
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False),
                               item_names=ITEMS)


_DAMAGE: dict[tuple, str | None] = {}  # (step folder, its files' sizes and mtimes) -> damage
READ_ATTEMPTS = 3    # reads of a checkpoint before an error that does not prove damage is raised
RETRY_WAIT_S = 0.5   # wait before the second attempt, doubled before each further one
# tensorstore / absl status codes that say the bytes themselves are bad or absent
_DAMAGE_CODES = re.compile(r"\b(DATA_LOSS|NOT_FOUND|INVALID_ARGUMENT|FAILED_PRECONDITION|OUT_OF_RANGE)\b")


class _Damaged(Exception):
  """A checkpoint that read back but is not whole (no metadata, mismatched arrays)."""


def _proves_damage(e: BaseException) -> bool:
  if isinstance(e, (_Damaged, FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError)):
    return True
  if isinstance(e, OSError):  # EIO, EAGAIN, ESTALE, ...: the disk or the file system, not the bytes
    return False
  return isinstance(e, ValueError) and _DAMAGE_CODES.search(str(e)) is not None


def _signature(step_dir: str) -> tuple:
  return (step_dir,) + tuple(sorted(
      (os.path.relpath(os.path.join(r, f), step_dir), st.st_size, st.st_mtime_ns)
      for r, _, fs in os.walk(step_dir) for f in fs for st in [os.stat(os.path.join(r, f))]))


def _read_back(step_dir: str) -> None:
  """Read every array of every array item (as numpy, so any device count works) and the meta
  JSON; _Damaged when they are not a whole checkpoint."""
  specs = {}
  with ocp.PyTreeCheckpointer() as c:
    for item in ARRAY_ITEMS:
      md = c.metadata(os.path.join(step_dir, item)).item_metadata
      if md is None:
        raise _Damaged(f"{item}: no array metadata")
      args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), md.tree)
      tree = c.restore(os.path.join(step_dir, item), args=ocp.args.PyTreeRestore(restore_args=args))
      specs[item] = [(tuple(np.shape(a)), np.asarray(a).dtype) for a in jax.tree.leaves(tree)]
  params = specs["params"]
  if specs["ema_params"] != params:
    raise _Damaged(f"ema_params {specs['ema_params']} do not match params {params} (shape / dtype)")
  for spec in specs["opt_state"]:  # Adam's moments repeat the parameters' shapes and dtypes
    if len(spec[0]) and spec not in params:
      raise _Damaged(f"opt_state holds an array {spec} that matches no parameter (shape / dtype)")
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
    meta = c.restore(os.path.join(step_dir, "meta"), args=ocp.args.JsonRestore())
  if not isinstance(meta, dict) or "step" not in meta:
    raise _Damaged(f"meta holds {type(meta).__name__} without 'step'")


def damage(step_dir: str) -> str | None:
  """None when the checkpoint folder `step_dir` reads back whole; otherwise what proves it
  damaged. A read error that proves nothing is retried (READ_ATTEMPTS) and then raised as
  OSError naming the folder. Cached within the process while no file in the folder changes."""
  key = _signature(step_dir)
  if key in _DAMAGE:
    return _DAMAGE[key]
  old = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns about per-item metadata it never wrote
  try:
    for attempt in range(READ_ATTEMPTS):
      try:
        _read_back(step_dir)
        _DAMAGE[key] = None
        return None
      except Exception as e:  # noqa: BLE001  (orbax / tensorstore raise many kinds)
        if _proves_damage(e):
          _DAMAGE[key] = f"{type(e).__name__}: {str(e)[:300]}"
          return _DAMAGE[key]
        error = e
        logging.warning("reading checkpoint %s failed (%s: %s); attempt %d of %d", step_dir,
                        type(e).__name__, str(e)[:200], attempt + 1, READ_ATTEMPTS)
        if attempt + 1 < READ_ATTEMPTS:
          time.sleep(RETRY_WAIT_S * 2 ** attempt)
  finally:
    logging.set_verbosity(old)
  raise OSError(f"reading checkpoint {step_dir} failed in {READ_ATTEMPTS} attempts "
                f"({type(error).__name__}: {str(error)[:300]}); the error does not prove the checkpoint "
                "damaged, so it is left in place: check the disk or file system and rerun (move the "
                "folder aside by hand if it is damaged)") from error


def _newest_readable(mngr: ocp.CheckpointManager, workdir: str) -> int | None:
  """The newest step that reads back whole; damaged newer ones are moved aside (by process
  0) with a warning. FileNotFoundError-free: None when there is no checkpoint at all;
  ValueError when there are checkpoints but none reads back (never a silent fresh start)."""
  steps = sorted(mngr.all_steps(), reverse=True)
  bad = []
  for step in steps:
    step_dir = os.path.join(wdir.checkpoints(workdir), str(step))
    why = damage(step_dir)
    if why is None:
      return int(step)
    bad.append(step_dir)
    aside = next(f"{step_dir}.corrupt{'' if k == 0 else f'.{k}'}" for k in range(1 << 20)
                 if not os.path.exists(f"{step_dir}.corrupt{'' if k == 0 else f'.{k}'}"))
    logging.warning("checkpoint %s is corrupt or partial (%s); falling back to the previous one%s",
                    step_dir, why, "" if jax.process_index() else f"; moved aside to {aside}")
    if jax.process_index() == 0:
      with contextlib.suppress(FileNotFoundError):
        os.rename(step_dir, aside)
    mngr.reload()
  if bad:
    raise ValueError(f"no checkpoint in {wdir.checkpoints(workdir)} reads back: {', '.join(bad)} are corrupt "
                     "(moved aside to *.corrupt). Restore them from a backup, or delete them to train from scratch.")
  return None


def latest_step(workdir: str) -> int | None:
  """Step of the newest complete checkpoint in `workdir` that reads back whole, or None
  when there is none (a damaged newer one is moved aside with a warning)."""
  mngr = _reader(workdir)
  if mngr is None:
    return None
  try:
    return _newest_readable(mngr, workdir)
  finally:
    mngr.close()


def save(mngr: ocp.CheckpointManager, step: int, params: Any, ema_params: Any, opt_state: Any,
         meta: Mapping[str, Any]) -> None:
  """Save one checkpoint (returns once it is written, unless the manager is asynchronous:
  then `mngr.wait_until_finished()` before exiting)."""
  mngr.save(int(step), force=True, args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), ema_params=ocp.args.StandardSave(ema_params),
      opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave(dict(meta))))


def config_record(config: Any) -> dict[str, Any]:
  """The identity sections of `config` as plain JSON-able dicts."""
  return {s: io.config_to_dict(config[s]) for s in IDENTITY_SECTIONS}


def check_config(meta: Mapping[str, Any], config: Any, where: str) -> None:
  """ValueError naming every data/model/sde field where `config` differs from the config
  recorded in a checkpoint's `meta`."""
  recorded = meta.get("config", {})
  diff = io.config_diff({s: recorded.get(s, {}) for s in IDENTITY_SECTIONS}, config_record(config))
  if diff:
    raise ValueError(
        f"checkpoint {where} was trained with a different config; differing fields: "
        + "; ".join(diff) + ". Use a new --workdir, or restore the original settings.")


def _require_step(mngr: ocp.CheckpointManager | None, workdir: str, step: int | None) -> int:
  latest = None if mngr is None else _newest_readable(mngr, workdir)
  if latest is None:
    raise FileNotFoundError(
        f"no checkpoint in {wdir.checkpoints(workdir)}; train first "
        f"(python -m experiments.main --mode=train --config=... --workdir={workdir})")
  if step is None:
    return latest
  if step not in mngr.all_steps():
    raise ValueError(f"no checkpoint at step {step} in {wdir.checkpoints(workdir)}; "
                     f"available: {sorted(mngr.all_steps())}")
  return int(step)


def restore(workdir: str, config: Any, targets: Mapping[str, Any], step: int | None = None
            ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Restore the array items named in `targets` (item -> abstract pytree of
  jax.ShapeDtypeStruct with shardings) from the checkpoint at `step` (default: latest),
  after checking its config against `config`. Returns ({item: pytree}, meta)."""
  unknown = set(targets) - set(ARRAY_ITEMS)
  if unknown:
    raise ValueError(f"unknown checkpoint items {sorted(unknown)}; expected some of {ARRAY_ITEMS}")
  mngr = _reader(workdir)
  try:
    step = _require_step(mngr, workdir, step)
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    check_config(meta, config, f"{wdir.checkpoints(workdir)}/{step}")
    if not targets:
      return {}, meta
    args = {k: ocp.args.StandardRestore(v) for k, v in targets.items()}
    restored = mngr.restore(step, args=ocp.args.Composite(**args))
    return {k: restored[k] for k in targets}, meta
  finally:
    if mngr is not None:
      mngr.close()


def restore_meta(workdir: str, step: int | None = None) -> dict[str, Any]:
  """The `meta` item of the checkpoint at `step` (default: latest), unchecked."""
  mngr = _reader(workdir)
  try:
    step = _require_step(mngr, workdir, step)
    return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  finally:
    if mngr is not None:
      mngr.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Shape/dtype structs of `tree`'s array leaves, all placed with `sharding`."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
