"""Preemption: a SIGTERM (what TPU / cloud schedulers send before taking a machine) turned
into a flag that long loops poll between compiled calls, so a stage commits what it has and
exits cleanly instead of dying mid-write.

    with preempt.handling():             # installs the SIGTERM handler (main thread only)
      for step in ...:
        ...
        if preempt.should_stop(step):     # every process gives the same answer
          save(...); raise preempt.Preempted("train", step, how_to_resume)

On several processes `should_stop` asks JAX's preemption sync point (the coordination
service sees the notice on every host and all processes stop at the same step); on one
process it reads the local flag.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
from typing import Iterator

import jax

_FLAG = threading.Event()


class Preempted(RuntimeError):
  """A stage stopped early on a preemption notice, after committing its progress."""

  def __init__(self, stage: str, where: str, resume: str):
    super().__init__(f"{stage} preempted at {where}; progress is saved. Resume with: {resume}")
    self.stage, self.where, self.resume = stage, where, resume


def resume_hint() -> str:
  """How to resume: this process's own command line (committed work is kept)."""
  argv = list(sys.argv)
  if argv and argv[0].endswith(("experiments/main.py", "experiments\\main.py")):
    argv = ["python", "-m", "experiments.main"] + argv[1:]
  return shlex.join(argv)


def request() -> None:
  """Mark this process as preempted (what the signal handler does)."""
  _FLAG.set()


def requested() -> bool:
  """Whether this process has received a preemption notice."""
  return _FLAG.is_set()


def clear() -> None:
  _FLAG.clear()


def should_stop(step: int) -> bool:
  """Whether to stop now, the same answer on every process (step: a counter that every
  process passes in the same order, e.g. the training step)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    try:
      return bool(multihost_utils.reached_preemption_sync_point(int(step))) or requested()
    except RuntimeError:  # no preemption sync manager on this backend: the flag alone
      return requested()
  return requested()


@contextlib.contextmanager
def handling(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
  """Within the block, `signals` set the preemption flag instead of killing the process.
  Outside the main thread (where handlers cannot be installed) this does nothing."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = {s: signal.signal(s, lambda signum, frame: request()) for s in signals}
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)
