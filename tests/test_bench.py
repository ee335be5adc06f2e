"""The counterfactual benchmark: balanced halves, shards and claims, the pilot's rules, LiRA,
propensity, the primary test's statistics, records and resume."""

import math
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats as sps

from experiments.configs import digits_bench
from memvol import bench, io, stats
from memvol import workdir as wdir
from memvol.bench import analysis, model, outputs, plan

HERE = os.path.dirname(os.path.abspath(__file__))


def test_halves_put_every_image_in_exactly_half_of_the_models_class_balanced():
  labels = np.repeat(np.arange(10), 13)[:128]  # 128 images, classes of 13 (the last of 11)
  mask = plan.balanced_halves(labels, 16, seed=3)
  assert mask.shape == (16, 128)
  np.testing.assert_array_equal(mask.sum(0), 8)       # every image IN for M/2 models
  np.testing.assert_array_equal(mask.sum(1), 64)      # every model trains on N/2
  np.testing.assert_array_equal(mask[0::2], ~mask[1::2])  # complementary pairs
  for m in range(16):  # classes take turns: each class split as evenly as the half allows
    per = np.bincount(labels[mask[m]], minlength=10)
    assert per.max() - np.floor(np.bincount(labels) / 2).min() <= 2, per
  assert len({mask[m].tobytes() for m in range(16)}) == 16  # pairs draw their own halves
  np.testing.assert_array_equal(mask, plan.balanced_halves(labels, 16, seed=3))
  with pytest.raises(ValueError, match="even number"):
    plan.balanced_halves(labels, 3, seed=0)


def test_shards_partition_the_models():
  for n in (1, 2, 3, 5):
    parts = [plan.shard_models(11, f"{k}/{n}") for k in range(n)]
    assert sorted(sum(parts, [])) == list(range(11))
  assert plan.shard_models(4, "") == [0, 1, 2, 3]
  for bad in ("2/2", "1", "a/b", "-1/2"):
    with pytest.raises(ValueError, match="bench.shard"):
      plan.parse_shard(bad)


def _claimer(folder: str, out: str, barrier) -> None:
  barrier.wait()
  ran = plan.claim_and_run(folder, lambda: os.path.exists(os.path.join(folder, "done")),
                           lambda: (time.sleep(1.0), open(os.path.join(folder, "done"), "w").close(),
                                    open(os.path.join(out, f"ran{os.getpid()}"), "w").close()), lambda s: None)
  open(os.path.join(out, f"claim{os.getpid()}_{int(ran)}"), "w").close()


def test_two_processes_never_run_the_same_unit(tmp_path):
  folder, out = str(tmp_path / "m0000"), str(tmp_path)
  ctx = mp.get_context("spawn")
  barrier = ctx.Barrier(2)
  procs = [ctx.Process(target=_claimer, args=(folder, out, barrier)) for _ in range(2)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(60)
  names = os.listdir(out)
  assert len([f for f in names if f.startswith("ran")]) == 1  # one process trained it
  assert len([f for f in names if f.startswith("claim")]) == 2
  # the unit is done now: nobody runs it again, and a dead holder's claim is taken over
  assert plan.claim_and_run(folder, lambda: True, lambda: pytest.fail("ran twice"), lambda s: None)


def test_choose_regime_and_sample_sizing_rules():
  shares = {(64, 2500): 0.3, (64, 5000): 0.7, (128, 5000): 0.1, (128, 10000): 0.25, (128, 20000): 0.5}
  assert plan.choose_regime(shares, (0.2, 0.6)) == (128, 10000, True)  # largest N, then fewest steps
  assert plan.choose_regime({(64, 1): 0.0, (128, 1): 0.1, (128, 2): 0.9}, (0.2, 0.6)) == (128, 1, False)
  # copied images with 1, 1, 2, 4 copies of 100 samples: r_med = 1.5 / 100, 5 / r_med = 334 -> 384 in batches of 128
  n, r = plan.size_samples(np.array([0, 1, 1, 2, 4, 0]), 100, 128, 5.0, 4096)
  assert r == pytest.approx(0.015) and n == 384
  assert plan.size_samples(np.array([0, 1, 1, 2, 4]), 100, 128, 5.0, 256)[0] == 256  # the cap
  assert plan.size_samples(np.zeros(4), 100, 128, 5.0, 256)[0] == 100  # nothing copied: as given


def test_paired_t_and_benjamini_hochberg_by_hand():
  t = stats.paired_t([0.1, 0.3, 0.2, math.nan])
  # mean 0.2, sd 0.1, se 0.1 / sqrt(3), t = 2 sqrt(3) on 2 dof
  assert t["n"] == 3 and t["mean"] == pytest.approx(0.2) and t["sd"] == pytest.approx(0.1)
  assert t["t"] == pytest.approx(2 * math.sqrt(3))
  assert t["p"] == pytest.approx(2 * sps.t.sf(2 * math.sqrt(3), 2))
  half = sps.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
  assert (t["ci_lo"], t["ci_hi"]) == pytest.approx((0.2 - half, 0.2 + half))
  assert math.isnan(stats.paired_t([0.1, 0.1])["p"])  # no spread: no test
  # BH of (0.01, 0.04, 0.03, nan): sorted 0.01, 0.03, 0.04 -> 0.03, 0.04, 0.04
  np.testing.assert_allclose(stats.benjamini_hochberg([0.01, 0.04, 0.03, math.nan]), [0.03, 0.04, 0.04, math.nan])
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])  # Holm: 3p, max(2p, .), ...
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    stats.benjamini_hochberg([0.5, 1.5])


def test_spearman_paired_bootstrap():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 5, 60).astype(float)
  good, bad = y + rng.normal(size=60) * 0.5, rng.normal(size=60)
  r = stats.spearman_diff_boot(good, bad, y, 300)
  assert r["diff"] == pytest.approx(stats.spearman(good, y)[0] - stats.spearman(bad, y)[0])
  assert r["z"] > 3 and r["p"] < 0.01  # a score that tracks y beats noise clearly
  same = stats.spearman_diff_boot(good, good, y, 50)
  assert same["diff"] == 0.0 and math.isnan(same["z"]) and math.isnan(same["p"])  # no variance, no test


def test_crossed_bootstrap_by_hand():
  # a kernel that is the same constant for every pair: every resample gives that constant
  k = np.full((2, 3), 0.25)
  r = stats.crossed_bootstrap_auroc_diff([(np.array([0, 1]), np.array([2, 3, 4]), k)] * 3, 5, 200, seed=1)
  assert r["estimate"] == 0.25 and r["ci_lo"] == r["ci_hi"] == pytest.approx(0.25)
  # models with constant kernels d_m: only the model resampling varies, and the interval is that of
  # the mean of d over models (sd / sqrt(M))
  rng = np.random.default_rng(0)
  d = rng.normal(0.1, 0.2, 40)
  units = [(np.array([0]), np.array([1]), np.full((1, 1), v)) for v in d]
  r = stats.crossed_bootstrap_auroc_diff(units, 2, 4000, seed=2)
  assert r["estimate"] == pytest.approx(d.mean())
  assert r["sd"] == pytest.approx(d.std() / math.sqrt(40), rel=0.1)
  # ... and the one-way bootstraps split it: all of it from the models, none from the images
  assert stats.crossed_bootstrap_auroc_diff(units, 2, 4000, seed=2, images=False)["sd"] == pytest.approx(r["sd"], rel=0.1)
  assert stats.crossed_bootstrap_auroc_diff(units, 2, 500, seed=2, models=False)["sd"] == pytest.approx(0.0, abs=1e-12)
  # weighted AUROC under image weights: one model, positives 0, 1 and negative 2; with
  # a kernel (1, 0) the resamples are the share of positive weight on image 0
  r = stats.crossed_bootstrap_auroc_diff([(np.array([0, 1]), np.array([2]), np.array([[1.0], [0.0]]))], 3, 3000, seed=3)
  assert r["estimate"] == 0.5 and 0.0 <= r["ci_lo"] < 0.5 < r["ci_hi"] <= 1.0


def _simulated_models(rng, num_models, n, effect=0.0):
  """IN [M, N], c [M, N], scores a and b: b = noise, a = noise + effect x copied."""
  IN = plan.balanced_halves(np.arange(n) % 4, num_models, int(rng.integers(1 << 30)))
  copied = IN & (rng.random((num_models, n)) < 0.4)
  c = copied * rng.integers(1, 4, (num_models, n))
  return IN, c, rng.normal(size=(num_models, n)) + effect * copied, rng.normal(size=(num_models, n))


def test_primary_test_rejects_at_its_alpha_under_a_simulated_null():
  rng = np.random.default_rng(0)
  rejections, covered = [], []
  for _ in range(400):
    IN, c, a, b = _simulated_models(rng, 32, 40)
    d = analysis.per_model(a, IN, c)["T2_auroc"] - analysis.per_model(b, IN, c)["T2_auroc"]
    rejections.append(stats.paired_t(d)["p"] < 0.05)
  rate = np.mean(rejections)
  assert 0.02 < rate < 0.085, rate  # about alpha = 0.05 (400 draws: sd 0.011)
  for _ in range(60):  # the crossed bootstrap's 95 % interval covers the null's 0 about 95 % of the time
    IN, c, a, b = _simulated_models(rng, 16, 40)
    r = stats.crossed_bootstrap_auroc_diff(analysis.primary_units(a, b, IN, c), 40, 300, seed=int(rng.integers(99)))
    covered.append(r["ci_lo"] <= 0 <= r["ci_hi"])
  assert np.mean(covered) > 0.8


def test_lira_calibration_by_hand():
  # one image, 6 models: IN for models 0-2 (scores 10, 12, 14), OUT for 3-5 (1, 2, 3)
  s = np.array([[10.0], [12.0], [14.0], [1.0], [2.0], [3.0]])
  IN = np.array([[True]] * 3 + [[False]] * 3)
  r = analysis.lira(s, IN)
  # model 0 (IN): OUT models 3-5, mean 2, sd 1 -> (10 - 2) / 1; IN others 12, 14: mean 13, sd sqrt(2)
  assert r["lira_off"][0, 0] == pytest.approx(8.0)
  on0 = (-0.5 * ((10 - 13) / math.sqrt(2)) ** 2 - math.log(math.sqrt(2))) - (-0.5 * 64 - 0.0)
  assert r["lira_on"][0, 0] == pytest.approx(on0)
  # model 3 (OUT) is left out of its own OUT set: others 2, 3 -> mean 2.5, sd sqrt(0.5)
  assert r["lira_off"][3, 0] == pytest.approx((1 - 2.5) / math.sqrt(0.5))
  # too few models left: NaN, not a number from nothing
  assert np.isnan(analysis.lira(s[:4], IN[:4])["lira_off"][3, 0])


def test_propensity_on_a_synthetic_table():
  IN = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1]], bool)
  c = np.array([[4, 0, 2], [1, 2, 0], [2, 0, 0], [0, 4, 6]], float)
  p = analysis.propensity(IN, c, num_samples=10)
  # image 0: IN models 0, 2 -> (0.4 + 0.2) / 2 = 0.3; OUT models 1, 3 -> (0.1 + 0) / 2
  np.testing.assert_allclose(p["in_rate"], [0.3, 0.3, 0.4])
  np.testing.assert_allclose(p["out_rate"], [0.05, 0.0, 0.0])
  np.testing.assert_allclose(p["p"], [0.25, 0.3, 0.4])


def _sample_level(rng, c_m, num_samples):
  """Per-sample nearest pool images and distances consistent with copy counts c_m [N]: each
  copy at d1 = 0.1 (d2 = 1), the other samples at d1 = 1 (d2 = 1.2)."""
  n = len(c_m)
  nn1 = np.concatenate([np.repeat(np.arange(n), c_m), rng.integers(0, n, num_samples - int(c_m.sum()))])
  d1 = np.where(np.arange(num_samples) < c_m.sum(), 0.1, 1.0)
  closest = np.array([d1[nn1 == i].min() if (nn1 == i).any() else 2.0 + rng.random() for i in range(n)])
  return {"nn_index": np.stack([nn1, (nn1 + 1) % n], 1).tolist(), "nn_dist": np.stack([d1, d1 + 0.9], 1).tolist(),
          "closest_dist": closest.tolist()}


def _records(rng, num_models=8, n=24, effect=2.0, sample_level=True):
  IN, c, a, b = _simulated_models(rng, num_models, n, effect)
  names = [analysis.RANK32, analysis.BASELINE]
  return [{"model": m, "seed": m, "fingerprint": "f", "num_samples": 50, "in_mask": IN[m].astype(int).tolist(),
           "c": c[m].astype(int).tolist(), "score_order": names,
           "scores": {names[0]: a[m].tolist(), names[1]: b[m].tolist()},
           "costs": {names[0]: {"passes_per_image": 32.0, "seconds_per_image": 0.01},
                     names[1]: {"passes_per_image": 4.0, "seconds_per_image": 0.001}},
           "seconds": {"train": 10.0, "sample": 2.0, "score": 5.0, "detect": 0.1, "total": 17.5},
           "compile_seconds": 3.0} | (_sample_level(rng, c[m], 50) if sample_level else {}) for m in range(num_models)]


CHOICE = {"pilots": [{"pool_size": 24, "num_samples": 50, "train_seconds": 1.0,
                      "grid": [{"steps": 100, "share_copied": 0.4, "copied": 5, "copies": 9, "seconds": 1.0}]}],
          "band": [0.2, 0.6], "pool_size": 24, "train_steps": 100, "in_band": True, "rule": "test rule",
          "num_samples": 50, "r_med": 0.02, "sizing": "test sizing"}


def test_summary_of_records_finds_a_planted_effect_and_writes_its_report(tmp_path):
  recs = _records(np.random.default_rng(1), num_models=16)
  pool = {"nn1_pixel": np.random.default_rng(5).random(24), "png_bytes": np.arange(24.0)}
  s = analysis.summarise(recs, CHOICE, 16, 500, pool)
  fam = s["primary"]
  assert [t["id"] for t in fam["tests"]] == ["P1", "P2", "P3"] and fam["alpha"] == 0.01
  p1 = fam["tests"][0]
  assert p1["n"] == 16 and p1["estimate"] > 0.3 and p1["p"] < 0.01 and p1["ci"][0] > 0 and p1["verdict"] == "positive"
  np.testing.assert_allclose([t["p_holm"] for t in fam["tests"]], stats.holm([t["p"] for t in fam["tests"]]))
  assert set(p1["other_labels"]) == {"absolute", "closest"} and p1["keeps_sign"]["absolute"] is True
  assert set(s["scores"]) == {f"{k}{n}" for n in (analysis.RANK32, analysis.BASELINE) for k in ("", "lira_off_", "lira_on_")}
  assert s["ranking_T2"][0].endswith(analysis.RANK32) and s["complete"]
  assert s["label_names"] == ["ratio", "absolute", "closest"] and set(s["predictors"]) == set(s["label_names"])
  assert s["predictors"]["ratio"]["rows"]["nn1_pixel"]["n"] == 24
  assert {t["task"] for t in s["secondary"]} >= {"predictor_spearman", "typicality_spearman", "T3_spearman"}
  assert all(t["q"] >= t["p"] * (1 - 1e-12) for t in s["secondary"] if math.isfinite(t["p"]))
  assert s["compile_share"]["mean"] == pytest.approx(3.0 / 17.5)
  null = analysis.summarise(_records(np.random.default_rng(2), num_models=8, effect=0.0), CHOICE, 12, 300)
  assert null["primary"]["tests"][0]["verdict"].startswith("inconclusive") and not null["complete"]
  old = analysis.summarise(_records(np.random.default_rng(2), num_models=8, sample_level=False), CHOICE, 8, 100)
  assert old["label_names"] == ["ratio"] and old["primary"]["tests"][0]["other_labels"] == {}
  cfg = digits_bench.get_config("quick")
  cfg.unlock()
  cfg.bench.num_models = 16
  clean = bench.write_outputs(cfg, str(tmp_path), recs, CHOICE, log=lambda m: None)
  md = open(os.path.join(wdir.bench_dir(str(tmp_path)), "report.md")).read()
  assert md.index("co-primary tests (fixed before any run)") < md.index("**positive**")
  assert clean["primary"]["tests"][0]["verdict"] == "positive"
  assert all(os.path.exists(os.path.join(wdir.bench_dir(str(tmp_path)), f)) for f in outputs.FIGURES)


def test_copy_labels_by_hand():
  IN = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], bool)
  # OUT closest distances: 3.0 (m0 i1), 0.5 (m1 i0), 2.0 (m2 i1), 4.0 (m3 i0); 0.1 % of 4: the smallest
  closest = np.array([[0.2, 3.0], [0.5, 0.1], [0.3, 2.0], [4.0, 0.2]])
  assert analysis.absolute_tau(closest, IN) == 0.5
  sample = {"nn_index": np.array([[[0, 1], [0, 1], [1, 0]]] * 4), "nn_dist": np.array([[[0.2, 1.0], [0.6, 1.0], [0.4, 2.0]]] * 4),
            "closest": closest}
  c = np.array([[1, 0], [0, 1], [0, 0], [0, 1]], float)
  lab = analysis.labels(IN, c, 3, sample)
  np.testing.assert_array_equal(lab["absolute"]["c"], [[1, 1]] * 4)  # d1 < 0.5: the samples at 0.2 and 0.4
  np.testing.assert_allclose(lab["absolute"]["p"], [0.0, 0.0])
  # closest: image 0 OUT (m1, m3) mean 2.25, IN (m0, m2) mean 0.25 -> 2.0; image 1: 2.5 - 0.15
  np.testing.assert_allclose(lab["closest"]["p"], [2.0, 2.35])
  np.testing.assert_allclose(lab["ratio"]["p"], analysis.propensity(IN, c, 3)["p"])
  assert set(analysis.labels(IN, c, 3, None)) == {"ratio"}


def test_the_pilot_judges_the_band_at_the_final_sample_count(tmp_path):
  cfg = digits_bench.get_config("quick")
  cfg.unlock()
  cfg.bench.pilot_pool_sizes, cfg.bench.pilot_steps, cfg.bench.max_samples = (8,), (10, 20), 400
  cfg.sample.num_samples, cfg.sample.batch_size = 100, 100
  # step 10: one IN image copied once in the first 100 samples (sized to 400), three more after
  # them: 1/4 at 100 samples, 4/4 at 400; step 20: 2 of 4 at 100 and at 400
  late = [-1] * 100 + [1, 2, 3] + [-1] * 297
  grid = [{"steps": 10, "share_copied": 0.25, "copied": 1, "copies": 1, "counts": [1, 0, 0, 0], "seconds": 1.0,
           "copied_nn1": [0] + late[1:]},
          {"steps": 20, "share_copied": 0.5, "copied": 2, "copies": 10, "counts": [5, 5, 0, 0], "seconds": 1.0,
           "copied_nn1": [0] * 5 + [1] * 5 + [-1] * 390}]
  io.save_json(plan.pilot_done_path(str(tmp_path), 8), {"pool_size": 8, "num_samples": 100, "train_seconds": 1.0,
                                                        "grid": grid})
  ch = plan.choose(cfg, str(tmp_path))
  rows = ch["pilots"][0]["grid"]
  assert [r["samples_final"] for r in rows] == [400, 100] and [r["share_final"] for r in rows] == [1.0, 0.5]
  assert (ch["train_steps"], ch["num_samples"], ch["in_band"]) == (20, 100, True)  # step 10 leaves the band at 400
  assert "sample count the sizing gives" in ch["rule"] and "copied_nn1" not in rows[0]


def test_the_pilots_choice_travels_with_the_records(tmp_path, monkeypatch):
  cfg = digits_bench.get_config("quick")
  cfg.unlock()
  cfg.bench.pilot_pool_sizes, cfg.bench.pilot_steps, cfg.bench.copied_band = (24,), (100,), (0.2, 0.6)
  first, later, rdir = (str(tmp_path / d) for d in ("first", "later", "records"))
  os.makedirs(wdir.bench_dir(first))
  io.save_json(os.path.join(wdir.bench_dir(first), "pilot.json"), CHOICE)
  log = []
  assert plan.ensure_pilot(cfg, first, log.append, rdir) == CHOICE
  assert io.load_json(os.path.join(rdir, "pilot.json")) == CHOICE  # written beside the records

  def no_pilot(*_):
    raise AssertionError("a pilot ran although the records hold its choice")

  monkeypatch.setattr(plan, "run_pilot", no_pilot)
  assert plan.ensure_pilot(cfg, later, log.append, rdir) == CHOICE  # another sitting's workdir adopts it
  assert any("adopted" in m for m in log)
  other = dict(CHOICE, train_steps=200)
  io.save_json(os.path.join(wdir.bench_dir(first), "pilot.json"), other)
  with pytest.raises(ValueError, match="different pilot choices"):
    plan.ensure_pilot(cfg, first, log.append, rdir)
  cfg.bench.pilot_steps = (100, 200)
  with pytest.raises(ValueError, match="bench.pilot_pool_sizes, pilot_steps, copied_band"):
    plan.ensure_pilot(cfg, str(tmp_path / "third"), log.append, rdir)


def test_records_round_trip_and_refuse_another_plan(tmp_path):
  rec = _records(np.random.default_rng(3), num_models=2)[0]
  rec["scores"][analysis.RANK32][0] = math.nan  # a failed solve
  path = str(tmp_path / "m0000.json")
  model.save_record(path, rec)
  back = model.load_records(str(tmp_path), "f")
  assert len(back) == 1 and math.isnan(back[0]["scores"][analysis.RANK32][0])
  assert "failed" in next(iter(io.load_json(path)["not_estimated"].values()))
  with pytest.raises(ValueError, match="another plan"):
    model.load_records(str(tmp_path), "g")


def test_bench_refuses_a_plan_it_cannot_run():
  c = digits_bench.get_config("quick")
  c.unlock()
  for field, value, match in (("num_models", 3, "complementary pairs"), ("pilot_pool_sizes", (15,), "even pool"),
                              ("shard", "2/2", "bench.shard"), ("copied_band", (0.7, 0.2), "copied_band")):
    old = c.bench[field]
    c.bench[field] = value
    with pytest.raises(ValueError, match=match):
      bench.check_config(c)
    c.bench[field] = old
  c.score.peers = ("pia",)
  with pytest.raises(ValueError, match="co-primary"):
    bench.check_config(c)


def _bench(wd: str, *extra: str) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  return subprocess.Popen([sys.executable, "-m", "experiments.main", "--config=experiments/configs/digits_bench.py:quick",
                           f"--workdir={wd}", "--mode=bench", *extra], cwd=os.path.join(HERE, ".."), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_shards_share_a_workdir_and_a_killed_one_resumes(tmp_path):
  """Two real processes on one workdir with the whole plan each (so every model is contested):
  each model is trained once; then a process killed mid-plan leaves its model to the rerun."""
  wd = str(tmp_path / "w")
  procs = [_bench(wd), _bench(wd)]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  trained = [line for log in logs for line in log.splitlines() if "bench: model" in line and "shard)" in line]
  assert sorted(int(line.split("model ")[1].split()[0]) for line in trained) == list(range(8)), trained
  r = subprocess.run([sys.executable, os.path.join(HERE, "..", "scripts", "check_bench.py"), wd],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr
  # kill a shard during its first model of a fresh plan that reuses this pilot, then rerun it
  wd2 = str(tmp_path / "w2")
  os.makedirs(wdir.bench_dir(wd2))
  for f in ("pilot.json",):
    io.save_json(os.path.join(wdir.bench_dir(wd2), f), io.load_json(os.path.join(wdir.bench_dir(wd), f)))
  p = _bench(wd2, "--config.bench.shard=1/2")
  rec1 = os.path.join(wdir.bench_dir(wd2), "records", "m0001.json")
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(wdir.bench_model(wd2, 3), "checkpoints")) and time.time() < deadline:
    time.sleep(0.2)
  p.kill()
  p.communicate()
  assert os.path.exists(rec1) and not os.path.exists(os.path.join(wdir.bench_dir(wd2), "records", "m0003.json"))
  before = os.path.getmtime(rec1)
  out = _bench(wd2, "--config.bench.shard=1/2").communicate(timeout=600)[0]
  assert "model 3 (" in out and "model 1 (" not in out, out
  assert os.path.getmtime(rec1) == before
  records = sorted(os.listdir(os.path.join(wdir.bench_dir(wd2), "records")))
  # the plan's pilot choice and pool file beside them
  assert records == [f"m{m:04d}.json" for m in (1, 3, 5, 7)] + ["pilot.json", "pool.json"]


def test_spearman_bootstrap_and_permutation():
  rng = np.random.default_rng(4)
  x = rng.normal(size=80)
  r = stats.spearman_boot_perm(x, x + rng.normal(size=80), 1000, 2000, seed=1)
  assert r["rho"] == pytest.approx(stats.spearman(x, x + rng.normal(size=80))[0], abs=0.3)
  assert r["ci_lo"] < r["rho"] < r["ci_hi"] and r["p"] == pytest.approx(1 / 2001)  # no permutation reaches it
  null = [stats.spearman_boot_perm(rng.normal(size=30), rng.normal(size=30), 10, 200, seed=k)["p"] < 0.05
          for k in range(200)]
  assert 0.01 < np.mean(null) < 0.1  # about alpha under the null
  assert math.isnan(stats.spearman_boot_perm(np.ones(10), x[:10], 10, 10)["p"])  # a constant: no test


@pytest.mark.parametrize("name", ["digits_bench", "mnist_bench", "cifar10_bench"])
def test_bench_configs_run_and_say_how(name):
  import importlib
  mod = importlib.import_module(f"experiments.configs.{name}")
  for needed in ("python -m experiments.main", f"--config=experiments/configs/{name}.py", "--mode=bench", "Result",
                 ":quick"):
    assert needed in mod.__doc__, needed
  for arg in (None, "quick"):
    c = mod.get_config(arg)
    bench.check_config(c)
    assert c.bench.num_models >= (32 if arg is None else 2)
  with pytest.raises(ValueError, match="unknown config argument"):
    mod.get_config("huge")


@pytest.mark.slow
def test_mnist_bench_quick_runs_and_checks(tmp_path):
  """The MNIST plan's :quick end to end on a CPU, records with sample-level data, check_bench passes."""
  wd = str(tmp_path / "w")
  env = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
  r = subprocess.run([sys.executable, "-m", "experiments.main", "--config=experiments/configs/mnist_bench.py:quick",
                      f"--workdir={wd}", "--mode=bench"], cwd=os.path.join(HERE, ".."), env=env,
                     capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  rec = io.load_json(os.path.join(wdir.bench_dir(wd), "records", "m0000.json"))
  assert len(rec["nn_index"]) == rec["num_samples"] and len(rec["closest_dist"]) == len(rec["c"])
  s = io.load_json(os.path.join(wdir.bench_dir(wd), "summary.json"))
  assert s["label_names"] == ["ratio", "absolute", "closest"] and "nn1_pixel" in s["predictor_values"]
  r = subprocess.run([sys.executable, os.path.join(HERE, "..", "scripts", "check_bench.py"), wd],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def test_pool_file_loads_nulls_as_nan_and_refuses_another_pool(tmp_path):
  from memvol.bench import pool
  assert pool.load(str(tmp_path)) is None
  io.save_json(str(tmp_path / pool.FILE), {"ids": [3, 5], "labels": [0, 1], "classifier": None,
                                           "predictors": {"nn1_pixel": [1.5, 2.0], "nn1_pixel_same_class": [None, 2.0]}})
  got = pool.load(str(tmp_path))
  assert got["nn1_pixel"].tolist() == [1.5, 2.0] and np.isnan(got["nn1_pixel_same_class"][0])
  assert pool.ensure(None, np.array([3, 5]), np.array([0, 1]), str(tmp_path), "")["ids"] == [3, 5]  # kept, not recomputed
  with pytest.raises(ValueError, match="another pool"):
    pool.ensure(None, np.array([3, 6]), np.array([0, 1]), str(tmp_path), "")
