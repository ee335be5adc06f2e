"""One job per workdir (memvol.lock): refused naming the holder, stale locks taken over
with a warning, released on exceptions, the heartbeat; and two real training processes on
one workdir: the second is refused at the start, a third takes over after a kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import tiny_chain
from memvol import lock, pipeline
from memvol import workdir as wdir


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()  # reaped: the pid no longer exists
  return p.pid


def _write(wd, **rec):
  path = wdir.lock(wd)
  os.makedirs(wd, exist_ok=True)
  with open(path, "w") as f:
    json.dump({"start_time": "2026-01-01 00:00:00 UTC", "command": "x", **rec}, f)
  return path


def test_second_holder_is_refused_naming_the_first(tmp_path):
  wd = str(tmp_path)
  with lock.WorkdirLock(wd, command="python -m experiments.main --mode=train") as held:
    rec = json.load(open(wdir.lock(wd)))
    assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec == held.record
    with pytest.raises(lock.LockHeld, match=rf"in use by pid {os.getpid()} on host .* since "
                       r"\d{4}-\d\d-\d\d .*--mode=train"):
      lock.WorkdirLock(wd).acquire()
  assert not os.path.exists(wdir.lock(wd))
  lock.WorkdirLock(wd).acquire().release()  # free again


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
  wd, said = str(tmp_path), []
  pid = _dead_pid()
  _write(wd, host=socket.gethostname(), pid=pid)
  with lock.WorkdirLock(wd, log=said.append):
    assert json.load(open(wdir.lock(wd)))["pid"] == os.getpid()
  assert len(said) == 1 and f"pid {pid}" in said[0] and "no longer exists" in said[0]


def test_lock_of_a_lost_host_is_taken_over_only_after_the_timeout(tmp_path):
  wd, said = str(tmp_path), []
  path = _write(wd, host="some-other-host", pid=1)
  with pytest.raises(lock.LockHeld, match="pid 1 on host some-other-host"):
    lock.WorkdirLock(wd, stale_after_s=60, log=said.append).acquire()
  old = time.time() - 61
  os.utime(path, (old, old))
  with lock.WorkdirLock(wd, stale_after_s=60, log=said.append):
    pass
  assert len(said) == 1 and "heartbeat is 61 s old" in said[0]


def test_heartbeat_refreshes_the_mtime(tmp_path):
  wd = str(tmp_path)
  with lock.WorkdirLock(wd, heartbeat_s=0.05, stale_after_s=1.0):
    path = wdir.lock(wd)
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.3)
    assert time.time() - os.stat(path).st_mtime < 1.0


def test_pipeline_holds_the_lock_and_releases_it_on_errors(tmp_path):
  wd = str(tmp_path)
  c = tiny_chain.config()
  with lock.WorkdirLock(wd, command="the first job"):
    with pytest.raises(lock.LockHeld, match="the first job"):
      pipeline.run(c, wd, "detect", log=lambda m: None)
  with pytest.raises(FileNotFoundError, match="generate samples first"):
    pipeline.run(c, wd, "detect", log=lambda m: None)  # fails inside the stage
  assert not os.path.exists(wdir.lock(wd))


@pytest.mark.slow
def test_two_training_processes_on_one_workdir(tmp_path):
  """Before the lock, the second crashed with orbax's StepAlreadyExistsError after both had
  written checkpoints; now it is refused at once, naming the holder. After a kill -9 of the
  first, the next run takes its lock over with a warning and finishes training."""
  wd = str(tmp_path / "wd")
  first = tiny_chain.popen(wd, "--mode=train", train__num_steps=100_000, train__ckpt_every=50)
  try:
    deadline = time.time() + 90
    while not os.path.exists(os.path.join(wd, "checkpoints", "50")):  # training for real
      assert first.poll() is None and time.time() < deadline, first.communicate()[0]
      time.sleep(0.2)
    t0 = time.time()
    second = tiny_chain.run_main(wd, "--mode=train", train__num_steps=100_000, train__ckpt_every=50)
    assert second.returncode == 75, second.stdout + second.stderr
    assert f"in use by pid {first.pid} on host {socket.gethostname()} since" in second.stderr
    assert "StepAlreadyExists" not in second.stdout + second.stderr and time.time() - t0 < 60
    assert first.poll() is None  # the first goes on
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  third = tiny_chain.run_main(wd, "--mode=train", timeout=180)
  assert third.returncode == 0, third.stdout + third.stderr
  assert f"taking over the lock of workdir {wd} held by pid {first.pid}" in third.stdout + third.stderr
  assert not os.path.exists(wdir.lock(wd))
