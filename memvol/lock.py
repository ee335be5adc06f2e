"""One job per workdir: a lock file, workdir/.memvol.lock, held while a stage runs.

The lock is created with O_CREAT | O_EXCL (atomic on local and NFSv3+ file systems) and holds
JSON {host, pid, start_time, start_unix, command}. While held, a daemon thread refreshes
its mtime every `heartbeat_s` seconds. Another process that finds the lock is refused at
once, with a message naming the holder, unless the lock is stale:

  - same host and the holder's pid no longer exists (killed with -9, crashed), or
  - its heartbeat (mtime) is older than `stale_after_s` (a lost host; a holder on another
    host cannot be asked whether its pid lives);

a stale lock is taken over with a warning. On several hosts process 0 holds it for all
(`hold`), and every process learns whether it got it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

from memvol import workdir as wdir

HEARTBEAT_S = 5.0       # seconds between mtime refreshes by the holder
STALE_AFTER_S = 120.0   # a lock not refreshed for this long belongs to a lost host


class LockHeld(RuntimeError):
  """The workdir is in use by another live process."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def read_holder(path: str) -> dict[str, Any] | None:
  """The lock's record; None when it is gone; {} when it is unreadable (being written)."""
  try:
    with open(path) as f:
      text = f.read()
  except FileNotFoundError:
    return None
  try:
    rec = json.loads(text)
    return rec if isinstance(rec, dict) else {}
  except json.JSONDecodeError:
    return {}


def describe(rec: dict[str, Any]) -> str:
  """'pid 123 on host h since 2026-01-01 08:00:00 UTC (command ...)'."""
  if not rec:
    return "an unknown process (the lock file is empty or unreadable)"
  cmd = f" ({rec['command']})" if rec.get("command") else ""
  return f"pid {rec.get('pid')} on host {rec.get('host')} since {rec.get('start_time')}{cmd}"


def stale_reason(rec: dict[str, Any], age_s: float, stale_after_s: float = STALE_AFTER_S,
                 host: str | None = None) -> str | None:
  """Why a lock with record `rec`, last refreshed `age_s` seconds ago, is stale; None if
  its holder may still be running."""
  host = socket.gethostname() if host is None else host
  if rec and rec.get("host") == host and isinstance(rec.get("pid"), int) and not _pid_alive(rec["pid"]):
    return f"its process (pid {rec['pid']} on this host) no longer exists"
  if age_s > stale_after_s:
    return (f"its heartbeat is {age_s:.0f} s old (> {stale_after_s:.0f} s): the holder's host "
            "is gone or hung")
  return None


class WorkdirLock:
  """The lock of one workdir. `acquire()` or LockHeld; `release()` removes it (only if it
  is still ours). Also a context manager."""

  def __init__(self, workdir: str, command: str | None = None, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S, log: Callable[[str], None] | None = None):
    if not 0 < heartbeat_s < stale_after_s:
      raise ValueError(f"need 0 < heartbeat_s < stale_after_s, got {heartbeat_s}, {stale_after_s}")
    self.workdir, self.path = workdir, wdir.lock(workdir)
    self.command = " ".join(sys.argv) if command is None else command
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.log = log if log is not None else (lambda m: print(m, file=sys.stderr, flush=True))
    self.record: dict[str, Any] | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _create(self, rec: dict[str, Any]) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    except OSError as e:
      raise OSError(e.errno, f"cannot create the workdir lock {self.path}: {e.strerror} "
                    "(is the workdir writable, is the disk full?)") from e
    try:
      os.write(fd, json.dumps(rec, sort_keys=True).encode())
      os.fsync(fd)
    except OSError as e:
      os.close(fd)
      os.remove(self.path)
      raise OSError(e.errno, f"cannot write the workdir lock {self.path}: {e.strerror}") from e
    os.close(fd)
    return True

  def _take_over(self, seen: str) -> None:
    """Move the stale lock whose content was `seen` aside; put it back if another process
    replaced it in between (then our O_EXCL create fails and that process wins)."""
    aside = f"{self.path}.stale.{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    with open(aside) as f:
      if f.read() != seen:
        os.rename(aside, self.path)
        return
    os.remove(aside)

  def acquire(self) -> "WorkdirLock":
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
    except OSError as e:
      raise OSError(e.errno, f"cannot create the workdir {self.workdir}: {e.strerror}") from e
    now = time.time()
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "start_unix": now,
           "start_time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
           "command": self.command}
    for _ in range(5):
      if self._create(rec):
        self.record = rec
        self._thread = threading.Thread(target=self._beat, name="memvol-lock-heartbeat", daemon=True)
        self._thread.start()
        return self
      try:
        with open(self.path) as f:
          seen = f.read()
        age = time.time() - os.stat(self.path).st_mtime
      except FileNotFoundError:
        continue  # released meanwhile: try again
      holder = read_holder(self.path) or {}
      reason = stale_reason(holder, age, self.stale_after_s)
      if reason is None:
        raise LockHeld(
            f"workdir {self.workdir} is in use by {describe(holder)} (lock {self.path}). One job "
            "per workdir: wait for it to finish or stop it, or use another --workdir.")
      self.log(f"[memvol] WARNING: taking over the lock of workdir {self.workdir} held by "
               f"{describe(holder)}: {reason}")
      self._take_over(seen)
    raise LockHeld(f"could not take the lock {self.path}: other processes keep taking it")

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self.record is not None and read_holder(self.path) == self.record:
      os.remove(self.path)
    self.record = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold(workdir: str, log: Callable[[str], None] | None = None, **kwargs) -> Iterator[None]:
  """Hold the workdir lock for the block: process 0 takes it, every process raises
  LockHeld when it could not. kwargs go to WorkdirLock."""
  import jax  # noqa: PLC0415  (the lock itself needs no JAX)

  lock, err = None, None
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir, log=log, **kwargs)
    try:
      lock.acquire()
    except LockHeld as e:
      lock, err = None, e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
    if not ok and err is None:
      raise LockHeld(f"process 0 could not lock workdir {workdir}; see its log")
  if err is not None:
    raise err
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
