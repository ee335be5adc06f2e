"""experiments/configs/edm_cifar10.py end to end (`:quick`): the committed random DDPM++
under VPPrecond (converted from NVlabs' own pickle) samples with EDM's Heun sampler and
scores a synthetic stand-in for CIFAR-10 (its python-pickle format, pooled to 16x16) with
every estimator and every peer, then detects and reports."""

from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np
import pytest

from memvol import pipeline, sampling
from memvol import sde as sde_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "edm_ddpmpp")


def standin(tmp_path, n=24):
  """A cifar-10-batches-py folder of n random 32x32 RGB images (data_batch_1)."""
  rng = np.random.default_rng(0)
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": [i % 10 for i in range(n)]}
  with open(folder / "data_batch_1", "wb") as f:
    pickle.dump(batch, f)
  return str(folder)


def test_edm_config_documents_its_command():
  from experiments.configs import edm_cifar10
  for needed in ("python -m experiments.main", "--config=experiments/configs/edm_cifar10.py", "--format=edm",
                 "--edm_repo", "runs code", "Expected runtime", "Expected result", "GPU", "CPU", "DiffMemorize"):
    assert needed in edm_cifar10.__doc__, needed
  c = edm_cifar10.get_config()
  assert c.sample.methods == ("heun",) and c.detect.sample_method == "heun" and c.sample.heun_steps == 18
  vp = sde_lib.from_config(c.sde)
  assert vp == sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, eps=1e-5)
  # EDM's generate.py for a VP network: sigma_min = max(0.002, its sigma(1e-5) = 0.001)
  np.testing.assert_allclose(float(vp.noise_ratio(1e-5)), np.sqrt(np.expm1(0.5 * 19.9e-10 + 1e-6)), rtol=1e-5)
  np.testing.assert_allclose(sampling.heun_sigmas(vp, 18)[[0, -2]], [80.0, 0.002], rtol=1e-6)
  ve = sde_lib.from_config(edm_cifar10.get_config("ve").sde)
  assert isinstance(ve, sde_lib.VESDE) and (ve.sigma_min, ve.sigma_max) == (0.002, 80.0)
  np.testing.assert_allclose(sampling.heun_sigmas(ve, 18)[[0, -2]], [80.0, 0.002])
  with pytest.raises(ValueError, match="unknown config argument"):
    edm_cifar10.get_config("huge")


@pytest.mark.slow
def test_edm_cifar10_quick_end_to_end(tmp_path):
  from experiments.configs import edm_cifar10
  c = edm_cifar10.get_config("quick")
  c.model.pretrained = FIXTURE
  c.data.path = standin(tmp_path)
  workdir = str(tmp_path / "run")
  pipeline.run(c, workdir, log=lambda s: None)
  for stage in pipeline.STAGES[1:]:
    assert pipeline.is_complete(c, workdir, stage), stage
  samples = np.load(os.path.join(workdir, "samples", "samples_heun.npz"))
  assert samples["images"].shape == (4, 16, 16, 3) and np.all(samples["nfe"] == 7)
  with open(os.path.join(workdir, "scores", "scores.csv")) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 8
  for column in ("hutchinson_log_volume", "exact_log_volume", "subspace_log_volume", "paper_log_volume",
                 "peer_secmi", "peer_pia", "peer_pian", "peer_loss", "peer_logp", "peer_flipd", "peer_sima"):
    assert np.all(np.isfinite([float(r[column]) for r in rows])), column
  assert json.load(open(os.path.join(workdir, "report", "summary.json")))
