"""The score stage on tiny 4x4x1 images with closed-form eps networks: wiring against the
closed form, 1 vs 4 devices, batch sizes, kill-and-resume, corrupt parts, settings."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from experiments.configs.base import get_base_config
from memvol import analytic, io, parallel, peers, scoring
from memvol import sde as sde_lib
from memvol import workdir as wdir

SHAPE = (4, 4, 1)
SDE = sde_lib.VPSDE()
RNG = np.random.default_rng(0)
TRAIN = RNG.uniform(-1, 1, (6, *SHAPE)).astype(np.float32)
HELDOUT = RNG.uniform(-1, 1, (4, *SHAPE)).astype(np.float32)
TABLE = scoring.ImageTable(
    images=np.concatenate([TRAIN, HELDOUT]), ids=np.array([5, 1, 7, 3, 9, 2, 100, 101, 102, 103]),
    split=np.array(["train"] * 6 + ["heldout"] * 4), labels=np.arange(10) % 3,
    dup_counts=np.array([1, 1, 4, 1, 1, 2, 0, 0, 0, 0]))
N = len(TABLE.ids)


def config(**score):
  c = get_base_config()
  c.score.update(dict(estimators=("exact", "hutchinson"), batch_size=4, rtol=1e-3, atol=1e-3,
                      num_probes=2, profile_times=(1e-3, 0.01, 0.1, 0.5, 1.0), peers=(), agreement_subset=0))
  c.score.update(score)
  return c


@pytest.fixture
def model(monkeypatch):
  """A smoothed perfect memoriser of the 6 training images; `devices` picks the mesh."""
  state = {"eps": analytic.memoriser_eps(TRAIN, SDE, width=0.2), "devices": 4}
  monkeypatch.setattr(scoring, "_load", lambda config, workdir: (state["eps"], TABLE))
  monkeypatch.setattr(scoring.parallel, "local_mesh",
                      lambda: parallel.data_mesh(jax.devices()[:state["devices"]]))
  return state


def quiet(msg):
  del msg


def read(workdir):
  with open(os.path.join(workdir, "scores", "scores.csv"), "rb") as f:
    return f.read()


def test_scores_csv_and_curves(tmp_path, model):
  d = str(tmp_path)
  scoring.run(config(), d, log=quiet)
  rows = io.load_csv(os.path.join(d, "scores", "scores.csv"))
  ts = (1e-3, 0.01, 0.1, 0.5, 1.0)
  cols = ["id", "split", "label", "dup_count"] + [
      c for e in ("exact", "hutchinson")
      for c in [f"{e}_{c}" for c in ("log_volume", "stderr", "prior_logp", "logp", "nfe", "jvps", "status")]
      + [f"{e}_L@{t:.4g}" for t in ts] + [f"{e}_excess@{t:.4g}" for t in ts] + [f"{e}_t_above", f"{e}_L_capped"]]
  assert list(rows[0]) == cols
  assert [int(r["id"]) for r in rows] == TABLE.ids.tolist()  # train then held-out, split ids
  assert [r["split"] for r in rows] == TABLE.split.tolist()
  assert [int(r["dup_count"]) for r in rows] == TABLE.dup_counts.tolist()
  lv = np.array([float(r["exact_log_volume"]) for r in rows])
  hv = np.array([float(r["hutchinson_log_volume"]) for r in rows])
  assert all(r["exact_status"] == "0" and float(r["exact_stderr"]) == 0 for r in rows)
  assert all(float(r["hutchinson_stderr"]) > 0 for r in rows)
  np.testing.assert_allclose([float(r["exact_logp"]) for r in rows],
                             lv + np.array([float(r["exact_prior_logp"]) for r in rows]), rtol=1e-5)
  # a memoriser of the training images: trained images grow more volume than held-out ones
  assert lv[:6].min() > lv[6:].max()
  assert np.all(np.abs(hv - lv) < 6 * np.array([float(r["hutchinson_stderr"]) for r in rows]) + 1.0)
  curves = io.load_npz(os.path.join(d, "scores", "profile_exact.npz"))
  np.testing.assert_array_equal(curves["ids"], TABLE.ids)
  assert curves["L_t"].shape == (N, 5) and curves["ts"].shape == (5,)
  np.testing.assert_allclose(curves["ts"][[0, -1]], [SDE.eps, SDE.T])
  np.testing.assert_allclose(curves["L_t"][:, -1], lv, rtol=1e-5)  # L(T) is the score
  np.testing.assert_allclose(curves["L_t"][:, 0], 0.0, atol=1e-5)
  # the bound's columns: excess = L(t) - D log(sigma(t)/sigma(eps)), capped score <= L and <= L_max(T)
  d_img = int(np.prod(SHAPE))
  bound = np.array([d_img * float(np.log(SDE.std(t) / SDE.std(SDE.eps))) for t in ts])
  np.testing.assert_allclose(curves["bound_t"], bound, rtol=1e-5)
  exc = np.array([[float(r[f"exact_excess@{t:.4g}"]) for t in ts] for r in rows])
  L_cols = np.array([[float(r[f"exact_L@{t:.4g}"]) for t in ts] for r in rows])
  np.testing.assert_allclose(exc, L_cols - bound, rtol=1e-4, atol=1e-3)
  capped = np.array([float(r["exact_L_capped"]) for r in rows])
  assert np.all(capped <= lv + 1e-4) and np.all(capped <= bound[-1] + 1e-3)
  above = np.array([float(r["exact_t_above"]) for r in rows])
  first = [ts[int(np.argmax(e > 0))] if (e > 0).any() else np.nan for e in exc]
  np.testing.assert_array_equal(np.isnan(above), np.isnan(first))
  np.testing.assert_allclose(above[~np.isnan(above)], np.array(first)[~np.isnan(above)])
  assert scoring.is_complete(config(), d)
  assert not scoring.is_complete(config(rtol=1e-4), d)


def test_exact_matches_the_gaussian_closed_form(tmp_path, model):
  g = analytic.random_gaussian_eps(jax.random.PRNGKey(1), SHAPE, SDE, std_range=(0.1, 0.8))
  model["eps"] = g
  scoring.run(config(estimators=("exact",), rtol=1e-5, atol=1e-5, profile_times=0), str(tmp_path), log=quiet)
  rows = io.load_csv(os.path.join(str(tmp_path), "scores", "scores.csv"))
  np.testing.assert_allclose([float(r["exact_log_volume"]) for r in rows],
                             float(g.log_volume(SDE.eps, SDE.T)), rtol=2e-4)
  assert io.load_npz(os.path.join(str(tmp_path), "scores", "profile_exact.npz"))["L_t"].shape == (N, 0)


def _values(workdir):
  rows = io.load_csv(os.path.join(workdir, "scores", "scores.csv"))
  return {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k != "split"}


def test_same_scores_for_any_device_count_and_batch_size(tmp_path, model):
  results = {}
  for devices, bs in [(4, 4), (1, 4), (4, 3), (2, 10)]:
    model["devices"] = devices
    d = str(tmp_path / f"d{devices}_b{bs}")
    scoring.run(config(estimators=("hutchinson",), batch_size=bs), d, log=quiet)
    results[(devices, bs)] = (read(d), _values(d))
  ref = results[(4, 4)][0]
  for k, (raw, _) in results.items():
    assert raw == ref, k  # byte-identical CSV


class Killed(Exception):
  """Stands for the process being killed mid-run."""


def test_killed_run_resumes_to_the_same_file(tmp_path, model, monkeypatch):
  ref = str(tmp_path / "ref")
  scoring.run(config(), ref, log=quiet)
  d = str(tmp_path / "w")
  real, calls, kill = scoring.score_images, [], [4]

  def flaky(eps_fn, images, ids, *args, **kw):
    calls.append(tuple(ids))
    if len(calls) == kill[0]:  # exact done (3 batches), killed in the first hutchinson batch
      kill[0] = 0
      raise Killed
    return real(eps_fn, images, ids, *args, **kw)

  monkeypatch.setattr(scoring, "score_images", flaky)
  with pytest.raises(Killed):
    scoring.run(config(), d, log=quiet)
  assert not os.path.exists(os.path.join(d, "scores", "scores.csv"))
  assert not scoring.is_complete(config(), d)
  calls.clear()
  scoring.run(config(), d, log=quiet)
  assert len(calls) == 3  # only hutchinson's 3 batches
  assert read(d) == read(ref)
  for e in ("exact", "hutchinson"):
    a, b = (io.load_npz(os.path.join(w, "scores", f"profile_{e}.npz")) for w in (ref, d))
    assert all(np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a)
  calls.clear()
  scoring.run(config(), d, log=quiet)  # complete: nothing recomputed
  assert calls == []


def test_corrupt_part_is_recomputed(tmp_path, model):
  d = str(tmp_path)
  scoring.run(config(estimators=("exact",)), d, log=quiet)
  before = read(d)
  os.remove(os.path.join(d, "scores", "scores.csv"))
  part = os.path.join(wdir.score_parts(d, "exact"), "000004_000008.npz")
  with open(part, "r+b") as f:
    f.truncate(100)
  messages = []
  scoring.run(config(estimators=("exact",)), d, log=messages.append)
  assert any("000004_000008.npz is corrupt" in m and "recomputing" in m for m in messages)
  assert read(d) == before


def test_settings_are_never_mixed(tmp_path, model):
  d = str(tmp_path)
  scoring.run(config(estimators=("exact",)), d, log=quiet)
  before = read(d)
  with pytest.raises(ValueError, match=r"rtol.*delete .*scores"):
    scoring.run(config(estimators=("exact",), rtol=1e-4), d, log=quiet)
  model["eps"] = analytic.memoriser_eps(TRAIN, SDE, width=0.25)  # another checkpoint
  with pytest.raises(ValueError, match="params"):
    scoring.run(config(estimators=("exact",)), d, log=quiet)
  assert read(d) == before  # nothing overwritten
  model["eps"] = analytic.memoriser_eps(TRAIN, SDE, width=0.2)
  os.remove(os.path.join(d, "scores", "manifest.json"))
  with pytest.raises(ValueError, match="batch size"):
    scoring.run(config(estimators=("exact",), batch_size=5), d, log=quiet)


def test_adding_an_estimator_keeps_the_other(tmp_path, model, monkeypatch):
  d = str(tmp_path)
  scoring.run(config(estimators=("exact",)), d, log=quiet)
  exact_before = _values(d)["exact_log_volume"]
  real, calls = scoring.score_images, []
  monkeypatch.setattr(scoring, "score_images", lambda *a, **k: calls.append(a[4].estimator) or real(*a, **k))
  scoring.run(config(estimators=("exact", "hutchinson")), d, log=quiet)
  assert set(calls) == {"hutchinson"}
  np.testing.assert_array_equal(_values(d)["exact_log_volume"], exact_before)


def test_bad_input(tmp_path, model):
  for kw, msg in [(dict(estimators=()), "empty"), (dict(estimators=("magic",)), "magic"),
                  (dict(estimators=("exact", "exact")), "once"), (dict(batch_size=0), "batch_size")]:
    with pytest.raises(ValueError, match=msg):
      scoring.run(config(**kw), str(tmp_path), log=quiet)
  model["eps"] = analytic.memoriser_eps(np.zeros((2, 5, 5, 1), np.float32), SDE, 0.2)  # 5x5 model
  with pytest.raises(ValueError, match="shape"):
    scoring.run(config(), str(tmp_path), log=quiet)
  bad = TABLE._replace(images=np.where(np.arange(N)[:, None, None, None] == 3, np.nan, TABLE.images))
  model["eps"] = analytic.memoriser_eps(TRAIN, SDE, 0.2)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(scoring, "_load", lambda c, w: (model["eps"], bad))
    with pytest.raises(ValueError, match="NaN"):
      scoring.run(config(), str(tmp_path), log=quiet)
  assert not os.path.exists(os.path.join(str(tmp_path), "scores", "scores.csv"))


PEER_CONFIG = dict(estimators=("hutchinson",), peers=scoring.PEER_NAMES, agreement_subset=3,
                   agreement_estimators=("exact", "subspace", "paper"), agreement_paper_steps=20)


def test_peers_and_agreement(tmp_path, model, monkeypatch):
  d = str(tmp_path / "a")
  c = config(**PEER_CONFIG)
  real_score, pads = scoring.score_images, []
  monkeypatch.setattr(scoring, "score_images",
                      lambda *a, **k: pads.append((len(a[2]), k["pad_to"])) or real_score(*a, **k))
  scoring.run(c, d, log=quiet)
  assert (3, 3) in pads  # the 3-image agreement subset is not padded to the batch of 4
  rows = io.load_csv(os.path.join(d, "scores", "scores.csv"))
  cols = list(rows[0])
  assert cols[-2 * len(scoring.PEER_NAMES):] == [f"peer_{p}{s}" for p in scoring.PEER_NAMES for s in ("", "_nfe")]
  vals = _values(d)
  for name in peers.PEERS:  # the CSV holds what peers.run gives for the split's ids
    want, nfe = peers.run(model["eps"], TABLE.images, peers.PeerOptions.from_config(c, name),
                          key=scoring.peer_key(c), image_ids=TABLE.ids)
    np.testing.assert_allclose(vals[f"peer_{name}"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(vals[f"peer_{name}_nfe"], nfe)
  np.testing.assert_array_equal(vals["peer_logp"], vals["hutchinson_logp"])
  np.testing.assert_array_equal(vals["peer_logp_nfe"], vals["hutchinson_nfe"] + vals["hutchinson_jvps"])
  # the memoriser: every peer ranks its training images above the held-out ones
  for name in scoring.PEER_NAMES:
    assert vals[f"peer_{name}"][:6].min() > vals[f"peer_{name}"][6:].max(), name
  agree = io.load_csv(wdir.agreement_csv(d))
  assert [int(r["id"]) for r in agree] == TABLE.ids[:3].tolist()
  np.testing.assert_array_equal([float(r["primary_log_volume"]) for r in agree], vals["hutchinson_log_volume"][:3])
  ex = np.array([float(r["exact_log_volume"]) for r in agree])
  sub = np.array([float(r["subspace_log_volume"]) for r in agree])  # K capped at D = 16: the full L
  np.testing.assert_allclose(sub, ex, rtol=0.02)
  assert all(int(r["paper_nfe"]) == 17 * 20 for r in agree)  # (K + 1) points x steps
  manifest = io.load_json(os.path.join(d, "scores", "manifest.json"))
  assert set(manifest["peer_settings"]) == set(peers.PEERS)
  assert set(manifest["agreement_settings"]) == {"exact", "subspace", "paper"}
  assert manifest["agreement_settings"]["subspace"]["options"]["K"] == 16
  assert all(v["seconds_per_image"] > 0 for v in manifest["seconds_per_image"].values())
  assert scoring.is_complete(c, d)
  # one device gives the same scores (up to float32 rounding of another vector width: SecMI's
  # error is a difference of near-equal states); adding a peer computes that peer only
  model["devices"] = 1
  d1 = str(tmp_path / "b")
  no_agree = {**PEER_CONFIG, "agreement_subset": 0}
  scoring.run(config(**{**no_agree, "peers": scoring.PEER_NAMES[1:]}), d1, log=quiet)
  real, calls = scoring.peer_images, []
  monkeypatch.setattr(scoring, "peer_images", lambda *a, **k: calls.append(a[4].name) or real(*a, **k))
  assert not scoring.is_complete(config(**no_agree), d1)
  scoring.run(config(**no_agree), d1, log=quiet)
  assert set(calls) == {"loss"} and scoring.is_complete(config(**no_agree), d1)
  v1 = _values(d1)
  for name in scoring.PEER_NAMES:
    np.testing.assert_allclose(v1[f"peer_{name}"], vals[f"peer_{name}"], rtol=1e-4, atol=1e-9)
  # a changed peer setting: not complete, and never mixed with the old parts
  c2 = config(**PEER_CONFIG)
  c2.score.peer.loss_t = 0.2
  assert not scoring.is_complete(c2, d)
  with pytest.raises(ValueError, match=r"options.t: 0.1 -> 0.2"):
    scoring.run(c2, d, log=quiet)


def test_bad_peer_settings(tmp_path, model):
  for kw, msg in [(dict(peers=("lira",)), "lira"), (dict(peers=("loss", "loss")), "once"),
                  (dict(estimators=("subspace",), peers=("logp",)), "full-trace"),
                  (dict(agreement_subset=-1), "agreement_subset"),
                  (dict(agreement_subset=2, agreement_estimators=("magic",)), "agreement_estimators")]:
    with pytest.raises(ValueError, match=msg):
      scoring.run(config(**kw), str(tmp_path), log=quiet)
  c = config(peers=("sima",))
  c.score.peer.sima_t = 0.0
  with pytest.raises(ValueError, match="t must be"):
    scoring.run(c, str(tmp_path), log=quiet)
  assert not os.path.exists(os.path.join(str(tmp_path), "scores", "scores.csv"))


def test_image_table_from_a_split():
  class S:
    pass
  split, tr, ho = S(), S(), S()
  tr.images, tr.ids, tr.labels = TRAIN, np.arange(6), np.zeros(6)
  ho.images, ho.ids, ho.labels = HELDOUT, np.arange(6, 10), np.ones(4)
  split.train, split.heldout, split.dup_counts = tr, ho, np.array([1, 2, 1, 1, 1, 1])
  t = scoring.image_table(split)
  assert t.images.shape == (10, *SHAPE) and t.split.tolist() == ["train"] * 6 + ["heldout"] * 4
  np.testing.assert_array_equal(t.dup_counts, [1, 2, 1, 1, 1, 1, 0, 0, 0, 0])
  tr.ids = np.arange(6) + 2**31
  with pytest.raises(ValueError, match="ids"):
    scoring.image_table(split)


def test_two_processes_share_the_work_and_process_0_merges(tmp_path, model, monkeypatch):
  ref = str(tmp_path / "ref")
  scoring.run(config(), ref, log=quiet)
  d = str(tmp_path / "w")
  real_slice, calls = parallel.process_slice, []
  real = scoring.score_images
  monkeypatch.setattr(scoring, "score_images", lambda *a, **k: calls.append(tuple(a[2])) or real(*a, **k))
  for p in (1, 0):  # process 1 finishes first; process 0 then scores its share and merges
    monkeypatch.setattr(parallel, "process_slice", lambda n, p=p: real_slice(n, p, 2))
    monkeypatch.setattr(parallel, "is_main_process", lambda p=p: p == 0)
    calls.clear()
    scoring.run(config(), d, log=quiet)
    # 3 batches per estimator: process 0 gets batch 0, process 1 batches 1 and 2
    assert [c[0] for c in calls] == ([5, 5] if p == 0 else [9, 102, 9, 102])
    assert os.path.exists(os.path.join(d, "scores", "scores.csv")) == (p == 0)
  assert read(d) == read(ref)


@pytest.mark.slow
def test_real_workdir_train_sample_score(tmp_path):
  """The stages on a real (tiny) trained MLP and the digits split, nothing monkeypatched."""
  from experiments.configs import digits
  from memvol import data, pipeline, sampling

  c = digits.get_config("quick")
  c.train.num_steps = 40
  c.sample.update(dict(methods=("sde", "ode"), num_samples=6, batch_size=4, sde_steps=30))
  c.score.update(dict(estimators=("exact", "hutchinson"), batch_size=12, profile_times=3))
  d = str(tmp_path)
  for stage in ("train", "sample", "score"):
    pipeline.run(c, d, stage, log=quiet)
  assert sampling.is_complete(c, d) and scoring.is_complete(c, d)
  split = data.load_split(c, d)
  rows = io.load_csv(os.path.join(d, "scores", "scores.csv"))
  assert [int(r["id"]) for r in rows] == split.train.ids.tolist() + split.heldout.ids.tolist()
  assert [int(r["dup_count"]) for r in rows] == split.dup_counts.tolist() + [0] * len(split.heldout.ids)
  assert all(r["exact_status"] == "0" and np.isfinite(float(r["exact_log_volume"])) for r in rows)
  s = io.load_npz(os.path.join(d, "samples", "samples_ode.npz"))
  assert s["images"].shape == (6, *split.train.images.shape[1:])


def test_a_preset_is_an_estimator_of_the_same_solve(tmp_path, model):
  """hutchinson@rank8 (4 Euler steps, 1 probe) and @vol108 (Richardson of Heun 18 / 9) score
  through the same stage: their own columns and part folders, 8 and 108 network passes per
  image, and an unknown preset fails before scoring."""
  d = str(tmp_path)
  scoring.run(config(estimators=("hutchinson@rank8", "hutchinson@vol108")), d, log=quiet)
  rows = io.load_csv(os.path.join(d, "scores", "scores.csv"))
  for name, passes in (("hutchinson@rank8", 8), ("hutchinson@vol108", 108)):
    assert all(int(r[f"{name}_nfe"]) + int(r[f"{name}_jvps"]) == passes for r in rows)
    assert np.isfinite([float(r[f"{name}_L_capped"]) for r in rows]).all()
    assert os.path.isdir(os.path.join(d, "scores", "parts", name))
  with pytest.raises(ValueError, match="preset"):
    scoring.run(config(estimators=("hutchinson@fast",)), str(tmp_path / "x"), log=quiet)
