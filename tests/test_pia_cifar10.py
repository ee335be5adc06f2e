"""experiments/configs/pia_cifar10.py end to end (`:quick`): a converted random pytorch-ddpm
network (the committed fixture) scores the members and non-members of a published-style
split of a synthetic CIFAR-10 stand-in (CIFAR-10's python-pickle format, 32x32 pooled to
8x8), with every stage of the chain and every peer."""

from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np
import pytest

from memvol import data, pipeline

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "pytorch_ddpm_unet")


def standin(tmp_path, n=40):
  """(cifar-10-batches-py folder, split npz): n random 32x32 RGB images in data_batch_1 and
  data_batch_2, and 16 + 16 disjoint indices as mia_train_idxs / mia_eval_idxs."""
  rng = np.random.default_rng(0)
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  for b, part in enumerate(np.array_split(np.arange(n), 2), 1):
    batch = {b"data": rng.integers(0, 256, (len(part), 3072), dtype=np.uint8),
             b"labels": [int(i) % 10 for i in part]}
    with open(folder / f"data_batch_{b}", "wb") as f:
      pickle.dump(batch, f)
  perm = rng.permutation(n)
  split = tmp_path / "CIFAR10_train_ratio0.5.npz"
  np.savez(split, mia_train_idxs=perm[:16], mia_eval_idxs=perm[16:32], ratio=0.5)
  return str(folder), str(split)


def test_pia_config_documents_its_command():
  from experiments.configs import pia_cifar10
  for needed in ("python -m experiments.main", "--config=experiments/configs/pia_cifar10.py",
                 "--format=pytorch-ddpm", "member_split_path", "Expected runtime", "Expected result",
                 "H200", "CPU"):
    assert needed in pia_cifar10.__doc__, needed
  c = pia_cifar10.get_config()
  assert c.data.name == "cifar10" and c.score.peer.secmi_t == 0.1 and c.score.peer.pia_t == 0.2
  with pytest.raises(ValueError, match="unknown config argument"):
    pia_cifar10.get_config("huge")


@pytest.mark.slow
def test_pia_cifar10_quick_end_to_end(tmp_path):
  from experiments.configs import pia_cifar10
  c = pia_cifar10.get_config("quick")
  c.model.pretrained = FIXTURE
  c.data.path, c.data.member_split_path = standin(tmp_path)
  workdir = str(tmp_path / "run")
  pipeline.run(c, workdir, log=lambda s: None)
  for stage in pipeline.STAGES[1:]:
    assert pipeline.is_complete(c, workdir, stage), stage
  members, nonmembers = data.read_member_split(c.data.member_split_path, 40)
  split = data.load_split(c, workdir)
  assert set(split.train.ids) <= set(members) and set(split.heldout.ids) <= set(nonmembers)
  with open(os.path.join(workdir, "scores", "scores.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 16
  assert sorted(int(r["id"]) for r in rows) == sorted(split.train.ids.tolist() + split.heldout.ids.tolist())
  for column in ("hutchinson_log_volume", "peer_secmi", "peer_pia", "peer_pian", "peer_loss", "peer_logp"):
    assert np.all(np.isfinite([float(r[column]) for r in rows])), column
  assert json.load(open(os.path.join(workdir, "report", "summary.json")))
