"""The screen (memorisation risk before training) and score.reference (LiRA calibration of a
job's scores against the screen's reference models): formulas by hand, refusals, end to end."""

import math
import os
import shutil

import numpy as np
import pytest

from experiments.configs import mnist_screen
from experiments.configs.base import get_base_config
from memvol import calibrate, data, io, pipeline, scoring, screen
from memvol import workdir as wdir
from memvol.bench import analysis
from memvol.screen import reference
from memvol.screen import risk as risk_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_group_stats_and_lira_forms_by_hand():
  # one image, 6 models: IN for models 0-2 (scores 10, 12, 14), OUT for 3-5 (1, 2, 3)
  s = np.array([[10.0], [12.0], [14.0], [1.0], [2.0], [3.0]])
  IN = np.array([[True]] * 3 + [[False]] * 3)
  mo, so, n = calibrate.group_stats(s, ~IN)
  assert (mo[0], so[0], n[0]) == (2.0, 1.0, 3)
  mi, si, _ = calibrate.group_stats(s, IN)
  assert calibrate.offline(np.array([5.0]), mo, so)[0] == pytest.approx(3.0)
  on = (-0.5 * ((5 - 12) / 2) ** 2 - math.log(2)) - (-0.5 * 9 - 0.0)
  assert calibrate.online(np.array([5.0]), mi, si, mo, so)[0] == pytest.approx(on)
  # a new model scored against all six equals the bench's leave-one-out form of a 7th model
  s7, IN7 = np.vstack([s, [[5.0]]]), np.vstack([IN, [[False]]])
  assert analysis.lira(s7, IN7)["lira_off"][6, 0] == pytest.approx(3.0)
  # fewer than 2 finite references: NaN, not a number from nothing
  s[4:, 0] = np.nan
  assert np.isnan(calibrate.group_stats(s, ~IN)[0][0])


def _records(IN: np.ndarray, s: np.ndarray) -> list[dict]:
  return [{"model": m, "in_mask": IN[m].astype(int).tolist(), "score_order": ["peer_loss"],
           "scores": {"peer_loss": s[m]}, "seconds": {"train": 1.0, "score": 1.0, "total": 2.0}, "compile_seconds": 0.1}
          for m in range(len(IN))]


def test_risk_is_the_signed_out_mean_and_refuses_too_few_out_models():
  IN = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1]], bool)
  s = np.array([[9.0, 1.0, 9.0, 3.0], [2.0, 9.0, 4.0, 9.0], [11.0, 11.0, 5.0, 2.0], [1.0, 3.0, 11.0, 11.0]])
  ref = risk_lib.reference_stats(_records(IN, s))
  np.testing.assert_allclose(ref["peer_loss_out_mean"], [1.5, 2.0, 4.5, 2.5])
  np.testing.assert_allclose(ref["peer_loss_in_mean"], [10.0] * 4)
  risk = risk_lib.signed(ref["peer_loss_out_mean"], "lower")
  assert risk_lib.ranks(risk).tolist() == [1, 2, 4, 3]  # the lowest OUT mean is the riskiest
  ids = np.array([10, 11, 12, 13])
  risk_lib.check_out_models(ref, ids, "peer_loss", "here")
  one = risk_lib.reference_stats(_records(IN[:2], s[:2]))  # 2 models: 1 OUT model per image
  with pytest.raises(ValueError, match=r"here: 4 image\(s\) have fewer than 2 OUT reference models"):
    risk_lib.check_out_models(one, ids, "peer_loss", "here")


def test_risk_file_refuses_nan_and_missing_images(tmp_path):
  pool = {"ids": np.array([3, 5, 7]), "labels": np.array([0, 1, 0]), "split": np.array(["train", "train", "heldout"])}
  rows, cols = risk_lib.rows(pool, np.array([0.5, -1.0, 2.0]), {"x_out_mean": np.array([1.0, 2.0, 3.0])},
                             {"png_bytes": np.array([70, 80, 90])})
  path = str(tmp_path / "risk.csv")
  io.save_csv(path, rows, cols)
  back = risk_lib.read(path, np.array([7, 3]))
  np.testing.assert_allclose(back["risk"], [2.0, 0.5])
  assert back["rank"].tolist() == [1, 2]
  with pytest.raises(ValueError, match=r"risk.csv has no row for 1 image\(s\) \(ids \[4\]\)"):
    risk_lib.read(path, np.array([3, 4]))
  rows[1]["risk"] = "nan"
  io.save_csv(path, rows, cols)
  with pytest.raises(ValueError, match=r"risk of 1 image\(s\) is NaN or missing \(ids \[5\]\)"):
    risk_lib.read(path)


def test_screen_refuses_a_plan_it_cannot_run():
  c = mnist_screen.get_config("quick")
  c.unlock()
  for field, value, match in (("num_models", 2, ">= 2 OUT reference models"), ("num_models", 5, "even number"),
                              ("risk_score", "peer_nothing", "not a score of this config"),
                              ("risk_direction", "up", "screen.risk_direction"),
                              ("data_predictor", "colour", "screen.data_predictor"), ("risk", "vibes", "screen.risk"),
                              ("shard", "3/2", r"screen\.shard=.3/2.")):
    old = c.screen[field]
    c.screen[field] = value
    with pytest.raises(ValueError, match=match):
      screen.check_config(c)
    c.screen[field] = old
  screen.check_config(c)


def tiny_config():
  """A digits job small enough for a test: 32 images, an MLP, 4 reference models of 150 steps."""
  c = get_base_config()
  c.data.update(dict(name="digits", resolution=8, num_train=16, num_heldout=16, num_duplicated=0))
  c.model.update(dict(name="mlp", hidden=64, num_layers=2))
  c.train.update(dict(num_steps=150, batch_size=16, warmup_steps=10, lr=1e-3, log_every=50, ckpt_every=150,
                      sample_every=0))
  c.sample.update(dict(num_samples=32, sde_steps=50, batch_size=32))
  c.score.update(dict(estimators=("hutchinson@rank8",), peers=("loss",), batch_size=32, agreement_subset=0))
  c.detect.carlini_n = 4
  c.report.update(dict(num_bootstrap=50, top_k=2))
  c.screen.update(dict(num_models=4, features=False, num_shown=4))
  return c


def test_screen_then_a_calibrated_job_end_to_end(tmp_path, capsys):
  c = tiny_config()
  ref_dir, job = str(tmp_path / "screen"), str(tmp_path / "job")
  pipeline.run(c, ref_dir, mode="screen", log=lambda s: None)
  out = capsys.readouterr().out
  done = [x for x in out.splitlines() if "screen: reference model" in x and "done in" in x]
  assert len(done) == 4, out  # a progress line per reference model
  folder = wdir.screen_dir(ref_dir)
  for f in ("risk.csv", "contact.png", "histogram.png", "report.md", "summary.json"):
    assert os.path.exists(os.path.join(folder, f)), f
  table = risk_lib.read(wdir.risk_csv(ref_dir))
  assert len(table["id"]) == 32 and np.isfinite(table["risk"]).all()
  np.testing.assert_allclose(table["risk"], -table["peer_loss_out_mean"])
  assert (table["peer_loss_out_n"] == 2).all() and (table["peer_loss_in_n"] == 2).all()
  md = open(os.path.join(folder, "report.md")).read()
  assert "d1 / d2 < 1/3" in md and "**Cost:**" in md and "nn1_pixel" in md

  c.unlock()
  c.score.reference = ref_dir
  pipeline.run(c, job, log=lambda s: None)
  sc = scoring.read_scores(wdir.scores_csv(job), ("hutchinson@rank8",), ("loss",))
  for col in ("lira_off_peer_loss", "lira_on_peer_loss", "lira_off_hutchinson@rank8_log_volume",
              "lira_on_hutchinson@rank8_log_volume"):
    assert col in sc and np.isfinite(sc[col]).all(), col
  table_ = scoring.image_table(data.load_split(c, job))  # scores.csv's rows, in order
  ref = reference.load(ref_dir, c, table_.ids, table_.images, ["peer_loss"])
  z = (sc["peer_loss"] - ref["stats"]["peer_loss_out_mean"]) / ref["stats"]["peer_loss_out_sd"]
  np.testing.assert_allclose(sc["lira_off_peer_loss"], z, rtol=1e-5)
  rep = open(os.path.join(job, "report", "report.md")).read()
  assert "`lira_off_loss`" in rep and "`lira_on_hutchinson@rank8`" in rep

  # refused by name: other data, another image shape, a score the screen lacks
  d = tiny_config()
  d.data.classes = (0, 1)
  with pytest.raises(ValueError, match=r"screened other data: data.classes"):
    reference.load(ref_dir, d, table_.ids, table_.images, ["peer_loss"])
  with pytest.raises(ValueError, match=r"screened images of shape \[8, 8, 1\], this job's are \[4, 4, 1\]"):
    reference.load(ref_dir, c, table_.ids, table_.images[:, ::2, ::2], ["peer_loss"])
  with pytest.raises(ValueError, match=r"no reference scores for \['peer_pia'\]"):
    reference.load(ref_dir, c, table_.ids, table_.images, ["peer_pia"])
  # a risk file with a NaN: the score stage refuses before writing anything
  rows = io.load_csv(wdir.risk_csv(ref_dir))
  rows[0]["risk"] = ""
  io.save_csv(wdir.risk_csv(ref_dir), rows, list(rows[0]))
  shutil.rmtree(wdir.scores_dir(job))
  with pytest.raises(ValueError, match="NaN or missing"):
    pipeline.run(c, job, mode="score", log=lambda s: None)
  assert not os.path.exists(wdir.scores_dir(job))


def test_data_only_screen_needs_no_models_and_is_no_reference(tmp_path):
  c = tiny_config()
  c.screen.risk = "data"
  pipeline.run(c, str(tmp_path), mode="screen", log=lambda s: None)
  out = io.load_json(reference.summary_path(str(tmp_path)))
  assert out["risk_kind"] == "data" and not os.path.exists(wdir.screen_model(str(tmp_path), 0))
  table = risk_lib.read(wdir.risk_csv(str(tmp_path)))
  np.testing.assert_allclose(table["risk"], table["nn1_pixel"])
  with pytest.raises(ValueError, match="data-only screen"):
    reference.load(str(tmp_path), c, table["id"], np.zeros((32, 8, 8, 1)), [])
  c.data.classes = (0, 1)  # the same workdir screened with other data: refused naming the field
  with pytest.raises(ValueError, match=r"data\.classes"):
    pipeline.run(c, str(tmp_path), mode="screen", log=lambda s: None)


@pytest.mark.slow
def test_screen_and_calibration_on_a_converted_checkpoints_data(tmp_path):
  """A converted checkpoint (the ddpm_unet fixture) scored with score.reference: the screen of
  its data trains memvol networks on the halves (never the checkpoint)."""
  from experiments.configs import pretrained as pretrained_config
  c = pretrained_config.get_config("quick")
  rng = np.random.default_rng(0)
  path = str(tmp_path / "images.npz")
  np.savez(path, images=rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8))
  c.data.update(dict(path=path, resolution=0))
  c.model.pretrained = os.path.join(FIXTURES, "ddpm_unet")
  c.model.update(dict(name="mlp", hidden=32, num_layers=2))  # the reference models' network
  c.train.update(dict(num_steps=20, batch_size=4, warmup_steps=2, log_every=10, ckpt_every=20, sample_every=0))
  c.score.peers = ("loss",)
  c.screen.update(dict(num_models=4, features=False, num_shown=2))
  ref_dir = str(tmp_path / "screen")
  pipeline.run(c, ref_dir, mode="screen", log=lambda s: None)
  assert len(risk_lib.read(wdir.risk_csv(ref_dir))["id"]) == 8
  c.score.reference = ref_dir
  job = str(tmp_path / "job")
  pipeline.run(c, job, log=lambda s: None)
  sc = scoring.read_scores(wdir.scores_csv(job), tuple(c.score.estimators), ("loss",))
  assert np.isfinite(sc["lira_off_peer_loss"]).all() and np.isfinite(sc["lira_on_hutchinson_log_volume"]).all()
