"""The fault table of BUILD.md, row by row where no other test file covers it: kill -9 and
SIGTERM in real processes (sample, score, detect/report, train), a corrupt or partial
latest checkpoint, a full disk and an unwritable workdir. Subprocess tests run
`python -m experiments.main` on the tiny chain (tests/tiny_chain.py)."""

from __future__ import annotations

import glob
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_chain
from experiments.configs.base import get_base_config
from memvol import checkpoint as ckpt_lib
from memvol import io, pipeline, train
from memvol import workdir as wdir

QUIET = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("trained") / "wd")
  pipeline.run(tiny_chain.config(), wd, "train", log=QUIET)
  return wd


def _copy(src: str, dst) -> str:
  shutil.copytree(src, str(dst))
  return str(dst)


def _wait_for(pattern: str, proc: subprocess.Popen, timeout: float = 120) -> list[str]:
  deadline = time.time() + timeout
  while not glob.glob(pattern):
    assert proc.poll() is None, f"exited early: {proc.communicate()[0]}"
    assert time.time() < deadline, f"nothing matched {pattern}"
    time.sleep(0.02)
  return glob.glob(pattern)


def _arrays(path: str) -> dict[str, np.ndarray]:
  return {k: v for k, v in io.load_npz(path).items()}


# --- kill -9 and SIGTERM in sample and score ------------------------------------------

STAGES = {  # stage: (config changes giving 6 batches, part files, merged output, its array keys)
    "sample": (dict(sample__num_samples=48, sample__sde_steps=300), "samples/parts/sde/*.npz",
               "samples/samples_sde.npz"),
    # no peers: the kills land in the volume estimator's batches, and each of the five processes
    # would otherwise compile and run seven peer scores after them (most of the test's time)
    "score": (dict(score__batch_size=4, score__num_steps=60, score__peers=()), "scores/parts/exact/*.npz",
              "scores/scores.csv"),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_kill_and_sigterm_mid_stage_resume_to_the_same_result(trained, tmp_path, stage):
  """SIGTERM: the batch in progress is committed, the process says how to resume and exits
  143. kill -9: the batch in progress is lost, committed ones are kept. Either way the
  resumed run ends with the same bytes as an uninterrupted one (all in 1-device processes)."""
  changes, parts, merged = STAGES[stage]
  ref = _copy(trained, tmp_path / "ref")
  r = tiny_chain.run_main(ref, f"--mode={stage}", timeout=300, **changes)
  assert r.returncode == 0, r.stdout + r.stderr
  for sig in (signal.SIGTERM, signal.SIGKILL):
    wd = _copy(trained, tmp_path / sig.name)
    proc = tiny_chain.popen(wd, f"--mode={stage}", **changes)
    _wait_for(os.path.join(wd, parts), proc)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    done = glob.glob(os.path.join(wd, parts))
    assert 1 <= len(done) < 6 and not glob.glob(os.path.join(wd, "**", "*.tmp"), recursive=True)
    assert not os.path.exists(os.path.join(wd, merged))
    if sig == signal.SIGTERM:
      assert proc.returncode == 143, out
      assert f"{stage} " in out and " preempted at item " in out and "progress is saved. Resume with: " \
          "python -m experiments.main --workdir=" in out
    else:
      assert proc.returncode == -signal.SIGKILL
      assert os.path.exists(wdir.lock(wd))  # left behind: the next run takes it over
    r = tiny_chain.run_main(wd, f"--mode={stage}", timeout=300, **changes)
    assert r.returncode == 0, r.stdout + r.stderr
    assert open(os.path.join(wd, merged), "rb").read() == open(os.path.join(ref, merged), "rb").read()


# --- SIGTERM and kill -9 around detect and report -----------------------------------

_SIGTERM_AT_DETECT = """
import os, signal, sys
import tiny_chain
from memvol import pipeline, preempt
def log(m):
  print(m, flush=True)
  if m.endswith("stage detect: start"):
    os.kill(os.getpid(), signal.SIGTERM)  # a real signal, arriving while detect runs
try:
  pipeline.run(tiny_chain.config(), sys.argv[1], "all", log=log)
except preempt.Preempted as e:
  print("PREEMPTED", e, flush=True)
"""


@pytest.mark.slow
def test_sigterm_in_detect_finishes_it_and_stops_before_report(trained, tmp_path):
  """detect and report take seconds and write atomically: a SIGTERM lets the running one
  finish and the chain stops before the next stage, saying how to resume."""
  wd = _copy(trained, tmp_path / "wd")
  c = tiny_chain.config()
  pipeline.run(c, wd, "sample", log=QUIET)
  pipeline.run(c, wd, "score", log=QUIET)
  r = subprocess.run([sys.executable, "-c", _SIGTERM_AT_DETECT, wd], cwd=tiny_chain.ROOT, env=tiny_chain.env(),
                     capture_output=True, text=True, timeout=300)
  assert "PREEMPTED the chain preempted at the start of stage report" in r.stdout, r.stdout + r.stderr
  assert "stage detect: done" in r.stdout
  assert pipeline.is_complete(c, wd, "detect") and not pipeline.is_complete(c, wd, "report")
  assert not os.path.exists(wdir.lock(wd))
  said = []
  pipeline.run(c, wd, "all", log=said.append)
  assert [s for s in said if ": to run:" in s] == [
      "[memvol] stage report: to run: no settings record " + os.path.join(wd, "report", "settings.json")
      + " (never run, or stopped before it finished)"]


@pytest.mark.slow
def test_kill_9_during_detect_and_report_is_never_taken_as_complete(trained, tmp_path):
  """kill -9 at several moments of detect + report: afterwards each stage is either
  complete with valid outputs or rerun; the next run finishes the chain."""
  base = _copy(trained, tmp_path / "base")
  c = tiny_chain.config()
  pipeline.run(c, base, "sample", log=QUIET)
  pipeline.run(c, base, "score", log=QUIET)
  interrupted, first = 0, None
  for k, delay in enumerate((0.0, 1.0, 2.5)):
    wd = _copy(base, tmp_path / f"k{k}")
    proc = tiny_chain.popen(wd, "--mode=all")
    for line in proc.stdout:
      if "stage detect: start" in line:
        break
    time.sleep(delay)
    proc.kill()
    proc.communicate()
    interrupted += not pipeline.is_complete(c, wd, "report")
    left_lock = os.path.exists(wdir.lock(wd))  # the kill landed before the chain ended
    for stage in ("detect", "report"):
      if pipeline.is_complete(c, wd, stage):
        folder = os.path.join(wd, stage)
        assert all(os.path.getsize(os.path.join(folder, f)) > 0 for f in os.listdir(folder))
    r = tiny_chain.run_main(wd, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert ("taking over the lock" in r.stdout + r.stderr) == left_lock, r.stdout + r.stderr
    assert pipeline.is_complete(c, wd, "report")
    rows = io.load_csv(os.path.join(wd, "detect", "detect.csv"))
    first = rows if first is None else first
    assert rows == first
  assert interrupted >= 1  # the kill did land inside the stages


# --- training: kill -9 and corrupt checkpoints ---------------------------------------


def _ckpt_arrays(wd: str, step: int) -> list[np.ndarray]:
  out = []
  with ocp.PyTreeCheckpointer() as c:
    for item in ckpt_lib.ARRAY_ITEMS:
      path = os.path.join(wdir.checkpoints(wd), str(step), item)
      tree = c.metadata(path).item_metadata.tree
      args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      out += jax.tree.leaves(c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args)))
  return out


@pytest.mark.slow
def test_kill_9_in_train_resumes_bitwise(tmp_path):
  ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
  changes = dict(train__num_steps=60, train__ckpt_every=10)
  r = tiny_chain.run_main(ref, "--mode=train", timeout=300, **changes)
  assert r.returncode == 0, r.stdout + r.stderr
  proc = tiny_chain.popen(wd, "--mode=train", **changes)
  _wait_for(os.path.join(wd, "checkpoints", "20"), proc)
  proc.kill()
  proc.communicate()
  assert ckpt_lib.latest_step(wd) < 60
  r = tiny_chain.run_main(wd, "--mode=train", timeout=300, **changes)
  assert r.returncode == 0, r.stdout + r.stderr
  for a, b in zip(_ckpt_arrays(ref, 60), _ckpt_arrays(wd, 60), strict=True):
    np.testing.assert_array_equal(a, b)


def _corrupt(step_dir: str, item: str = "params") -> None:
  files = [f for f in glob.glob(os.path.join(step_dir, item, "**", "*"), recursive=True)
           if os.path.isfile(f) and os.sep + "d" + os.sep in f]
  assert files
  for f in files:  # truncated, as by a copy cut short
    with open(f, "r+b") as fh:
      fh.truncate(os.path.getsize(f) // 2)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  c = tiny_chain.config()
  ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
  c.train.num_steps = 30
  ref_state = train.run(c, ref)
  c.train.num_steps = 20
  train.run(c, wd)
  _corrupt(os.path.join(wdir.checkpoints(wd), "20"))
  with caplog.at_level("WARNING"):
    assert ckpt_lib.latest_step(wd) == 10
  assert "checkpoints/20 is corrupt or partial" in caplog.text and "falling back to the previous one" in caplog.text
  assert sorted(os.listdir(wdir.checkpoints(wd))) == ["10", "20.corrupt"]
  c.train.num_steps = 30
  state = train.run(c, wd)  # resumes from 10, not from scratch, and saves 20 anew
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # every checkpoint damaged: an error, never a silent fresh start
  for step in (20, 30):
    _corrupt(os.path.join(wdir.checkpoints(wd), str(step)), "opt_state")
  with pytest.raises(ValueError, match=r"no checkpoint in .* reads back: .*/30, .*/20 are corrupt"):
    ckpt_lib.latest_step(wd)
  assert sorted(os.listdir(wdir.checkpoints(wd))) == ["20.corrupt", "20.corrupt.1", "30.corrupt"]


def _small_checkpoints(wd: str, steps=(1, 2), rows: int = 4) -> str:
  """Checkpoints of a two-array tree at `steps` (no training); the checkpoints folder."""
  m = ckpt_lib.open_manager(wd)
  p = {"w": np.ones((rows, 3), np.float32), "b": np.zeros(3, np.float32)}
  for step in steps:
    ckpt_lib.save(m, step, p, p, {"mu": p}, {"step": step})
  m.close()
  return wdir.checkpoints(wd)


def _failing_restore(error: Exception, times: int):
  calls = {"n": 0}
  real = ocp.PyTreeCheckpointer.restore

  def restore(self, directory, *args, **kwargs):
    if f"{os.sep}2{os.sep}" in str(directory):  # only the newest checkpoint, step 2
      calls["n"] += 1
      if calls["n"] <= times:
        raise error
    return real(self, directory, *args, **kwargs)
  return restore, calls


@pytest.mark.parametrize("kind", ["missing metadata", "unreadable meta", "shape mismatch", "orbax data loss"])
def test_only_proven_corruption_demotes_a_checkpoint(tmp_path, monkeypatch, kind):
  ck = _small_checkpoints(str(tmp_path / "wd"))
  newest = os.path.join(ck, "2")
  if kind == "missing metadata":
    os.remove(os.path.join(newest, "params", "_METADATA"))
  elif kind == "unreadable meta":
    with open(os.path.join(newest, "meta", "metadata"), "w") as f:
      f.write("{truncated")
  elif kind == "shape mismatch":  # params of another model: ema_params and opt_state no longer match
    other = _small_checkpoints(str(tmp_path / "other"), steps=(2,), rows=5)
    shutil.rmtree(os.path.join(newest, "params"))
    shutil.copytree(os.path.join(other, "2", "params"), os.path.join(newest, "params"))
  else:  # what tensorstore raises for a damaged chunk
    restore, _ = _failing_restore(ValueError("DATA_LOSS: Error reading chunk: checksum mismatch"), 1 << 30)
    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", restore)
  assert ckpt_lib.latest_step(str(tmp_path / "wd")) == 1
  assert sorted(os.listdir(ck)) == ["1", "2.corrupt"]


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"),
                                   ValueError("UNAVAILABLE: Error reading local file: Resource temporarily unavailable")])
def test_other_read_errors_are_retried_then_raised_naming_the_path(tmp_path, monkeypatch, error):
  wd = str(tmp_path / "wd")
  ck = _small_checkpoints(wd)
  monkeypatch.setattr(ckpt_lib, "RETRY_WAIT_S", 0.0)
  restore, calls = _failing_restore(error, 2)  # a hiccup: fails twice, then reads
  monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", restore)
  assert ckpt_lib.latest_step(wd) == 2 and sorted(os.listdir(ck)) == ["1", "2"] and calls["n"] > 2
  restore, calls = _failing_restore(error, 1 << 30)  # persistent: raised, nothing moved
  monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", restore)
  ckpt_lib._DAMAGE.clear()  # forget that it read back whole a moment ago
  with pytest.raises(OSError, match=rf"{os.path.join(ck, '2')}.*{ckpt_lib.READ_ATTEMPTS} attempts"):
    ckpt_lib.latest_step(wd)
  assert sorted(os.listdir(ck)) == ["1", "2"] and calls["n"] == ckpt_lib.READ_ATTEMPTS


# --- a full disk and an unwritable workdir ---------------------------------------------

_DISK_FULL_IN_TRAIN = """
import os, resource, signal, sys
import tiny_chain
from memvol import checkpoint, train
c = tiny_chain.config(train__keep_checkpoints=1)
wd = sys.argv[1]
c.train.num_steps = 10
train.run(c, wd)
c.train.num_steps = 20
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))  # files > 1000 B: EFBIG
try:
  train.run(c, wd)
  print("NO ERROR")
except Exception as e:
  print("ERROR", type(e).__name__, str(e).splitlines()[-1][:400] if str(e) else "", flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
print("LATEST", checkpoint.latest_step(wd), flush=True)
"""


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path):
  """max_to_keep = 1: the save of step 20 fails for lack of space; step 10 is not deleted
  (orbax removes old checkpoints only after the new one is committed) and stays the latest;
  with space again, training resumes from it."""
  wd = str(tmp_path / "wd")
  r = subprocess.run([sys.executable, "-c", _DISK_FULL_IN_TRAIN, wd], cwd=tiny_chain.ROOT,
                     env=tiny_chain.env(), capture_output=True, text=True, timeout=300)
  assert "\nERROR " in "\n" + r.stdout and "LATEST 10" in r.stdout, r.stdout + r.stderr[-3000:]
  assert "File too large" in r.stdout + r.stderr
  c = tiny_chain.config(train__keep_checkpoints=1)
  train.run(c, wd)
  assert ckpt_lib.latest_step(wd) == 20 and os.listdir(wdir.checkpoints(wd)) == ["20"]


def test_disk_full_result_file_names_the_path_and_leaves_the_old_one(tmp_path):
  path = str(tmp_path / "detect" / "detect.csv")
  io.save_csv(path, [{"id": 1}])
  old = open(path).read()
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
  try:
    with pytest.raises(OSError, match=rf"cannot write {path}: File too large \(disk full"):
      io.save_csv(path, [{"id": i} for i in range(1000)])
    with pytest.raises(OSError, match="cannot write .*summary.json"):
      io.save_json(str(tmp_path / "report" / "summary.json"), {"x": list(range(1000))})
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)
  assert open(path).read() == old  # the complete old file, no half of the new one
  assert sorted(os.listdir(tmp_path / "detect")) == ["detect.csv"]  # no temporary file left
  assert os.listdir(tmp_path / "report") == []


def test_unwritable_workdir_is_a_clear_error_naming_the_path(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  wd = str(blocker / "wd")  # cannot be created, even by root
  with pytest.raises(OSError, match=rf"cannot create the workdir {wd}: Not a directory"):
    pipeline.run(tiny_chain.config(), wd, "train", log=QUIET, reference=get_base_config())
  with pytest.raises(OSError, match=rf"cannot write {blocker}/x.json"):
    io.save_json(str(blocker / "x.json"), {})
