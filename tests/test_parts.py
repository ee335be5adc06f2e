"""Resumable part files: plan, settings record, corrupt parts, mismatches, merge."""

from __future__ import annotations

import os

import numpy as np
import pytest

from memvol import parts

SETTINGS = {"estimator": "exact", "rtol": 1e-4, "shape": (4, 4, 1)}


def compute_fn(log):
  def compute(s, e):
    log.append((s, e))
    return {"value": np.arange(s, e) * 2.0, "row": np.arange(s, e)[:, None] * np.ones((1, 3))}
  return compute


def test_batch_ranges():
  assert parts.batch_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]
  assert parts.batch_ranges(3, 8) == [(0, 3)]
  with pytest.raises(ValueError, match="nothing"):
    parts.batch_ranges(0, 4)
  with pytest.raises(ValueError, match="batch_size"):
    parts.batch_ranges(5, 0)


def test_run_resume_merge(tmp_path):
  folder = str(tmp_path / "parts")
  log = []
  parts.run_batches(folder, 10, 4, SETTINGS, compute_fn(log), root=folder, desc="t", log=print)
  assert log == [(0, 4), (4, 8), (8, 10)]
  assert sorted(os.listdir(folder)) == ["000000_000004.npz", "000004_000008.npz", "000008_000010.npz"]
  merged = parts.merge_parts(folder, 10, 4, SETTINGS, root=folder)
  np.testing.assert_array_equal(merged["value"], np.arange(10) * 2.0)
  assert merged["row"].shape == (10, 3)
  log.clear()
  parts.run_batches(folder, 10, 4, SETTINGS, compute_fn(log), root=folder, desc="t")
  assert log == []  # all done
  os.remove(parts.part_path(folder, 4, 8))
  assert not parts.all_present(folder, 10, 4)
  with pytest.raises(ValueError, match="missing"):
    parts.merge_parts(folder, 10, 4, SETTINGS, root=folder)
  parts.run_batches(folder, 10, 4, SETTINGS, compute_fn(log), root=folder, desc="t")
  assert log == [(4, 8)] and parts.all_present(folder, 10, 4)


def test_corrupt_part_is_reported_and_recomputed(tmp_path):
  folder = str(tmp_path / "parts")
  parts.run_batches(folder, 10, 4, SETTINGS, compute_fn([]), root=folder, desc="t")
  with open(parts.part_path(folder, 4, 8), "wb") as f:
    f.write(b"PK\x03\x04 truncated")
  with pytest.raises(parts.CorruptPartError, match="000004_000008.npz is corrupt"):
    parts.merge_parts(folder, 10, 4, SETTINGS, root=folder)
  log, messages = [], []
  parts.run_batches(folder, 10, 4, SETTINGS, compute_fn(log), root=folder, desc="t", log=messages.append)
  assert log == [(4, 8)]
  assert len(messages) == 1 and "corrupt" in messages[0] and "recomputing" in messages[0]
  parts.merge_parts(folder, 10, 4, SETTINGS, root=folder)


def test_refuses_other_settings_and_other_batch_size(tmp_path):
  folder = str(tmp_path / "parts")
  parts.run_batches(folder, 10, 4, SETTINGS, compute_fn([]), root=folder, desc="t")
  log = []
  with pytest.raises(ValueError, match=r"rtol: 0.0001 -> 0.001.*delete"):
    parts.run_batches(folder, 10, 4, {**SETTINGS, "rtol": 1e-3}, compute_fn(log), root=folder, desc="t")
  with pytest.raises(ValueError, match="another batch size"):
    parts.run_batches(folder, 10, 5, SETTINGS, compute_fn(log), root=folder, desc="t")
  assert log == []  # nothing computed, nothing overwritten
  os.remove(parts.part_path(folder, 0, 4))
  with pytest.raises(ValueError, match="rtol"):  # refused before recomputing the missing one
    parts.run_batches(folder, 10, 4, {**SETTINGS, "rtol": 1e-3}, compute_fn(log), root=folder, desc="t")
  assert log == []


def test_compute_must_return_batched_arrays(tmp_path):
  folder = str(tmp_path / "parts")
  with pytest.raises(ValueError, match="leading axis"):
    parts.run_batches(folder, 4, 4, SETTINGS, lambda s, e: {"x": np.zeros(3)}, root=folder, desc="t")


def test_digests():
  a = np.arange(4, dtype=np.float32)
  assert parts.digest(a) == parts.digest(a.copy())
  assert parts.digest(a) != parts.digest(a.astype(np.float64))
  assert parts.digest(a) != parts.digest(a.reshape(2, 2))
  assert parts.tree_digest({"w": a, "name": "x"}) == parts.tree_digest({"w": a, "name": "y"})
  assert parts.tree_digest({"w": a}) != parts.tree_digest({"w": a + 1})


def test_other_processes_parts_are_checked_too(tmp_path, monkeypatch):
  folder = str(tmp_path / "parts")
  parts.run_batches(folder, 10, 4, SETTINGS, compute_fn([]), root=folder, desc="t")
  os.remove(parts.part_path(folder, 0, 4))  # process 0's share; the rest belongs to process 1
  monkeypatch.setattr(parts.parallel, "process_slice", lambda n: slice(0, 1))
  log = []
  with pytest.raises(ValueError, match="rtol"):
    parts.run_batches(folder, 10, 4, {**SETTINGS, "rtol": 1e-3}, compute_fn(log), root=folder, desc="t")
  parts.run_batches(folder, 10, 4, SETTINGS, compute_fn(log), root=folder, desc="t")
  assert log == [(0, 4)]


def test_a_preemption_notice_commits_the_batch_in_progress_then_stops(tmp_path):
  """SIGTERM during batch 2 (a real signal, inside preempt.handling): batch 2 is committed,
  batch 3 is not started; the rerun computes only batch 3."""
  import signal

  from memvol import preempt

  folder, log = str(tmp_path / "parts"), []
  inner = compute_fn(log)

  def compute(s, e):
    if s == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return inner(s, e)

  preempt.clear()
  try:
    with preempt.handling(), pytest.raises(preempt.Preempted, match=r"t preempted at item 8 of 10 \(2 batches"):
      parts.run_batches(folder, 10, 4, SETTINGS, compute, root=folder, desc="t")
  finally:
    preempt.clear()
  assert log == [(0, 4), (4, 8)]
  assert sorted(os.listdir(folder)) == ["000000_000004.npz", "000004_000008.npz"]
  parts.run_batches(folder, 10, 4, SETTINGS, compute_fn(log), root=folder, desc="t")
  assert log[2:] == [(8, 10)]
