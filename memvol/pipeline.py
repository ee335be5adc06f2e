"""The experiment chain: train -> sample -> score -> detect -> report, over one workdir.

Each stage is a module implementing `Stage` (run, stale_reason, is_complete, DONE_MEANS);
this module only orders them, skips what is already done (saying why), checks the workdir belongs to
this config, holds the workdir's lock (one job per workdir) and records each stage's wall
time in `workdir/timings.json`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from typing import Any, Callable, Protocol, runtime_checkable

from absl import logging

from memvol import io, lock, preempt
from memvol import workdir as wdir
from memvol.workdir import IDENTITY_SECTIONS

STAGES = ("train", "sample", "score", "detect", "report")
_MODULES = {"train": "memvol.train", "sample": "memvol.sampling", "score": "memvol.scoring",
            "detect": "memvol.detect", "report": "memvol.report", "mitigate": "memvol.mitigate",
            "bench": "memvol.bench", "screen": "memvol.screen"}
MODES = ("all",) + tuple(_MODULES)  # `mitigate`, `bench` and `screen` (their modules) are not part of `all`


@runtime_checkable
class Stage(Protocol):
  """What every stage module implements (train or pretrained, sampling, scoring, detect,
  report, mitigate)."""

  DONE_MEANS: str  # what its outputs being complete means (the log of a skipped stage)

  def run(self, config: Any, workdir: str) -> Any:
    """Make the stage's outputs in `workdir` (resuming where it can)."""

  def stale_reason(self, config: Any, workdir: str) -> str | None:
    """None when `workdir` holds the stage's outputs for `config`; otherwise why not."""

  def is_complete(self, config: Any, workdir: str) -> bool:
    """stale_reason(config, workdir) is None."""


def _module(stage: str, config=None) -> Stage:
  if stage == "train" and config is not None and config.model.get("pretrained"):
    return importlib.import_module("memvol.pretrained")  # no training: records weights and split
  return importlib.import_module(_MODULES[stage])


def status(config, workdir: str, stage: str) -> tuple[bool, str]:
  """(complete, why): whether `stage` has valid outputs for this config in `workdir`, and a
  phrase saying why (for --mode=all's log). Stages that record their settings next to
  their outputs (detect, report) name what changed."""
  mod = _module(stage, config)
  why = mod.stale_reason(config, workdir)
  return why is None, why or mod.DONE_MEANS


def is_complete(config, workdir: str, stage: str) -> bool:
  """Whether `stage` has valid outputs for this config in `workdir`."""
  return status(config, workdir, stage)[0]


def check_keys(config, reference, where: str = "config") -> None:
  """ValueError for a key of `config` that `reference` (e.g. the base config) lacks, naming
  the key and the known keys of its section; recursive over sections."""
  known = set(reference.keys())
  for k in config.keys():
    if k not in known:
      raise ValueError(f"unknown key {where}.{k} (a typo?); known keys of {where}: "
                       f"{', '.join(sorted(known))}")
    sub, ref = config[k], reference[k]
    if hasattr(sub, "keys") and hasattr(ref, "keys"):
      check_keys(sub, ref, f"{where}.{k}")


def check_workdir(config, workdir: str) -> None:
  """Refuse a workdir made with another data/model/SDE config (ValueError naming the fields)."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise OSError(e.errno, f"cannot create the workdir {workdir}: {e.strerror}") from e
  io.check_config_matches(config, wdir.config_record(workdir), IDENTITY_SECTIONS,
                          f"workdir {workdir}")
  if config.model.get("pretrained"):  # record the weights' SHA-256, or refuse other weights
    from memvol import pretrained
    pretrained.check_weights(str(config.model.pretrained), workdir)


def _record_time(workdir: str, stage: str, seconds: float) -> None:
  path = wdir.timings(workdir)
  timings = io.load_json(path) if os.path.exists(path) else {}
  timings[stage] = round(seconds, 2)
  io.save_json(path, timings)


def run_stage(config, workdir: str, stage: str, log: Callable[[str], None] = logging.info) -> float:
  """Run one stage, recording its wall time; returns the seconds taken."""
  if stage not in _MODULES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {tuple(_MODULES)}")
  log(f"[memvol] stage {stage}: start")
  start = time.perf_counter()
  _module(stage, config).run(config, workdir)
  seconds = time.perf_counter() - start
  _record_time(workdir, stage, seconds)
  log(f"[memvol] stage {stage}: done in {seconds:.1f} s")
  return seconds


def enable_compilation_cache(path: str) -> None:
  """Keep compiled programs in JAX's persistent cache at `path`, so later runs skip compiling
  them. The reset makes it take effect even after this process has compiled something."""
  from jax.experimental.compilation_cache import compilation_cache
  compilation_cache.set_cache_dir(os.path.abspath(path))
  compilation_cache.reset_cache()


def run(config, workdir: str, mode: str = "all", force: bool = False,
        log: Callable[[str], None] = logging.info, reference=None) -> None:
  """Run `mode` (one stage, or 'all' = every stage in order, skipping completed ones unless
  `force`) on `workdir`, holding its lock (memvol.lock) throughout.

  reference: a config whose keys are the known ones (experiments pass their base config);
  any other key in `config` is refused before anything runs. A preemption notice
  (SIGTERM) stops the chain between stages, or inside a stage at its next commit, with
  preempt.Preempted. A stage module with OWN_LOCKS (the benchmark, whose shards share one
  workdir) claims its units of work itself instead.
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
  if reference is not None:
    check_keys(config, reference)
  preempt.clear()  # a notice belongs to the run it arrives in
  own = mode != "all" and getattr(_module(mode, config), "OWN_LOCKS", False)  # bench: claims its units itself
  with contextlib.nullcontext() if own else lock.hold(workdir, log=log), preempt.handling():
    check_workdir(config, workdir)
    if config.get("compilation_cache_dir", ""):
      enable_compilation_cache(config.compilation_cache_dir)
    if mode == "all":
      run_chain(config, workdir, STAGES, force=force, log=log)
    else:
      run_stage(config, workdir, mode, log)


def run_chain(config, workdir: str, stages: tuple[str, ...], force: bool = False,
              log: Callable[[str], None] = logging.info) -> None:
  """Run `stages` in order on `workdir`, skipping completed ones unless `force`; a
  preemption notice stops it between stages. The caller holds the workdir's lock and has
  checked the workdir (check_workdir)."""
  for stage in stages:
    if preempt.requested():
      raise preempt.Preempted("the chain", f"the start of stage {stage}", preempt.resume_hint())
    if force:
      log(f"[memvol] stage {stage}: rerun (--force)")
    else:
      done, why = status(config, workdir, stage)
      if done:
        log(f"[memvol] stage {stage}: skipped, already complete in {workdir} ({why})")
        continue
      log(f"[memvol] stage {stage}: to run: {why}")
    run_stage(config, workdir, stage, log)
