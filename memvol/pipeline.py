"""The experiment chain: train -> sample -> score -> detect -> report, over one workdir.

Each stage is a library function `run(config, workdir)` in its own module; this module
only orders them, skips what is already done, checks the workdir belongs to this config
and records each stage's wall time in `workdir/timings.json`.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Callable

from absl import logging

from memvol import io

STAGES = ("train", "sample", "score", "detect", "report")
_MODULES = {"train": "memvol.train", "sample": "memvol.sampling", "score": "memvol.scoring",
            "detect": "memvol.detect", "report": "memvol.report", "mitigate": "memvol.mitigate"}
MODES = ("all",) + tuple(_MODULES)  # `mitigate` (memvol/mitigate.py) is not part of `all`
# Sections that define what a workdir holds; changing any of them needs a new workdir.
IDENTITY_SECTIONS = ("data", "model", "sde")


def _module(stage: str):
  return importlib.import_module(_MODULES[stage])


def _outputs(config, workdir: str, stage: str) -> list[str]:
  """Files whose presence (and freshness) means a cheap stage is done."""
  if stage == "detect":
    return [os.path.join(workdir, "detect", "detect.csv")]
  if stage == "report":
    return [os.path.join(workdir, "report", "report.md"), os.path.join(workdir, "report", "summary.json")]
  return []


def _inputs(config, workdir: str, stage: str) -> list[str]:
  if stage == "detect":
    return [os.path.join(workdir, "samples", f"samples_{config.detect.sample_method}.npz")]
  if stage == "report":
    return [os.path.join(workdir, "scores", "scores.csv"), os.path.join(workdir, "detect", "detect.csv")]
  return []


def is_complete(config, workdir: str, stage: str) -> bool:
  """Whether `stage` has valid outputs for this config in `workdir`."""
  mod = _module(stage)
  if hasattr(mod, "is_complete"):
    return bool(mod.is_complete(config, workdir))
  outs, ins = _outputs(config, workdir, stage), _inputs(config, workdir, stage)
  if not outs or not all(os.path.exists(p) for p in outs):
    return False
  newest_in = max((os.path.getmtime(p) for p in ins if os.path.exists(p)), default=0.0)
  return min(os.path.getmtime(p) for p in outs) >= newest_in


def check_workdir(config, workdir: str) -> None:
  """Refuse a workdir made with another data/model/SDE config (ValueError naming the fields)."""
  os.makedirs(workdir, exist_ok=True)
  io.check_config_matches(config, os.path.join(workdir, "config.json"), IDENTITY_SECTIONS,
                          f"workdir {workdir}")


def _record_time(workdir: str, stage: str, seconds: float) -> None:
  path = os.path.join(workdir, "timings.json")
  timings = io.load_json(path) if os.path.exists(path) else {}
  timings[stage] = round(seconds, 2)
  io.save_json(path, timings)


def run_stage(config, workdir: str, stage: str, log: Callable[[str], None] = logging.info) -> float:
  """Run one stage, recording its wall time; returns the seconds taken."""
  if stage not in _MODULES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {tuple(_MODULES)}")
  log(f"[memvol] stage {stage}: start")
  start = time.perf_counter()
  _module(stage).run(config, workdir)
  seconds = time.perf_counter() - start
  _record_time(workdir, stage, seconds)
  log(f"[memvol] stage {stage}: done in {seconds:.1f} s")
  return seconds


def run(config, workdir: str, mode: str = "all", force: bool = False,
        log: Callable[[str], None] = logging.info) -> None:
  """Run `mode` (one stage, or 'all' = every stage in order, skipping completed ones unless
  `force`) on `workdir`."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
  check_workdir(config, workdir)
  for stage in STAGES if mode == "all" else (mode,):
    if mode == "all" and not force and is_complete(config, workdir, stage):
      log(f"[memvol] stage {stage}: already complete in {workdir}, skipped")
      continue
    run_stage(config, workdir, stage, log)
