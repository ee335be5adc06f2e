"""The benchmark stage: strata, the reference pool, seeds' workdirs, paired tests, T2, resume."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from experiments.configs import mnist_bench
from memvol import bench, data, io, report, stats
from memvol import workdir as wdir

STRATA = ((1, 12), (2, 4), (4, 2), (8, 1))


def dcfg(**kw):
  c = mnist_bench.get_config().data
  c.unlock()
  c.update(dict(name="digits", resolution=8, dup_strata=STRATA, num_train=19, num_heldout=10, num_duplicated=0))
  c.update(kw)
  return c


def test_strata_give_the_stream_counts_exactly():
  split = data.make_split(dcfg())
  assert len(split.train) == 19
  for d, n in STRATA:
    assert int(np.sum(split.dup_counts == d)) == n
  _, ids = split.training_stream()
  assert len(ids) == sum(d * n for d, n in STRATA)
  counts = dict(zip(*np.unique(ids, return_counts=True)))
  assert all(counts[int(i)] == int(c) for i, c in zip(split.train.ids, split.dup_counts))


def test_strata_and_planted_duplicates_together_are_refused():
  with pytest.raises(ValueError, match="data.num_duplicated"):
    data.make_split(dcfg(num_duplicated=2))
  with pytest.raises(ValueError, match="data.num_train"):
    data.make_split(dcfg(num_train=7))
  with pytest.raises(ValueError, match="data.role"):
    data.make_split(dcfg(role="other"))


def test_reference_pool_is_disjoint_and_leaves_the_target_split_unchanged():
  target = data.make_split(dcfg())
  ref = data.make_split(dcfg(role="reference"))
  # the reference model trains on its pool only; every target image is held out for it
  assert np.intersect1d(ref.train.ids, target.train.ids).size == 0
  assert np.intersect1d(ref.train.ids, target.heldout.ids).size == 0
  np.testing.assert_array_equal(ref.heldout.ids, np.sort(np.concatenate([target.train.ids, target.heldout.ids])))
  assert len(ref.train) == len(target.train)
  np.testing.assert_array_equal(np.sort(ref.dup_counts), np.sort(target.dup_counts))  # the same strata
  # the target split does not depend on whether a reference pool is drawn, and the default
  # spelling (no strata) is untouched
  again = data.make_split(dcfg(role="target"))
  np.testing.assert_array_equal(again.train.ids, target.train.ids)
  np.testing.assert_array_equal(again.dup_counts, target.dup_counts)
  legacy = dcfg(dup_strata=(), num_train=20, num_duplicated=3, duplicate_factor=4)
  a, b = data.make_split(legacy), data.make_split(dcfg(dup_strata=(), num_train=20, num_duplicated=3,
                                                        duplicate_factor=4, role="reference"))
  assert np.intersect1d(a.train.ids, b.train.ids).size == 0 and int(np.sum(b.dup_counts == 4)) == 3


def test_seeds_never_share_a_sub_workdir(tmp_path):
  c = mnist_bench.get_config()
  dirs = [wdir.bench_seed(str(tmp_path), s, r) for s in c.bench.seeds for r in ("target", "reference")]
  dirs.append(wdir.bench_length(str(tmp_path)))
  assert len(set(dirs)) == len(dirs)
  cfgs = [bench.sub_config(c, s, 100, r) for s in c.bench.seeds for r in ("target", "reference")]
  assert [x.seed for x in cfgs] == [s for s in c.bench.seeds for _ in range(2)]
  assert {x.data.role for x in cfgs} == {"target", "reference"}
  # seed 0 at the longest grid step reuses the length run's model; no other seed does
  length = {"seed": 0, "chosen_steps": max(c.bench.length_grid)}
  targets = [bench.target_dir(c, str(tmp_path), s, length) for s in c.bench.seeds]
  assert targets[0] == wdir.bench_length(str(tmp_path)) and len(set(targets)) == len(targets)
  assert bench.target_dir(c, str(tmp_path), 0, length | {"chosen_steps": min(c.bench.length_grid)}) == \
      wdir.bench_seed(str(tmp_path), 0, "target")


def test_wilson_interval_hand_computed():
  # k = 5 of n = 10 at 95 %: z = 1.959964, centre 0.5, half z sqrt(0.025 + z^2/400) / (1 + z^2/10)
  lo, hi = stats.wilson_interval(5, 10)
  z = 1.959963984540054
  half = z * math.sqrt(0.25 / 10 + z * z / 400) / (1 + z * z / 10)
  assert lo == pytest.approx(0.5 - half, abs=1e-12) and hi == pytest.approx(0.5 + half, abs=1e-12)
  assert lo == pytest.approx(0.2366, abs=1e-4)
  lo0, hi0 = stats.wilson_interval(0, 20)
  assert lo0 == 0.0 and hi0 == pytest.approx(z * z / 20 / (1 + z * z / 20), abs=1e-12)


def test_delong_paired_hand_computed():
  # positives / negatives under a and b; placements worked out by hand:
  # a: pos (3, 4), neg (1, 2): V10 = (1, 1), V01 = (1, 1) -> AUC 1
  # b: pos (1.5, 4), neg (1, 2): V10 = (.5, 1), V01 = (1, .5) -> AUC .75
  # diff .25; S10: var(V10a - V10b) = var(.5, 0) = .125; S01: var(0, .5) = .125
  # var = .125 / 2 + .125 / 2 = .125, z = .25 / sqrt(.125) = .70711
  r = stats.delong_paired([3, 4], [1, 2], [1.5, 4], [1, 2])
  assert r["auc_a"] == 1.0 and r["auc_b"] == 0.75
  assert r["z"] == pytest.approx(0.25 / math.sqrt(0.125), abs=1e-12)
  assert r["p"] == pytest.approx(2 * (1 - 0.7602499389), abs=1e-8)
  same = stats.delong_paired([3, 4], [1, 2], [3, 4], [1, 2])
  assert math.isnan(same["z"])  # identical rankings: no variance, no test
  # the mean of the finite z (NaN left out); Holm on (0.01, 0.04, 0.03) = (0.03, 0.06, 0.06)
  assert stats.mean_z([1.0, 2.0, math.nan]) == pytest.approx((1.5, 2 * sps.norm.sf(1.5)))
  assert all(math.isnan(v) for v in stats.mean_z([math.nan]))
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])


def test_delong_agrees_with_a_simulation_of_its_null():
  rng = np.random.default_rng(0)
  zs = []
  for _ in range(300):  # two exchangeable scores of the same images: z ~ N(0, 1) under the null
    base = rng.normal(size=60)
    lab = np.arange(60) < 30
    a, b = base + rng.normal(size=60) + lab, base + rng.normal(size=60) + lab
    zs.append(stats.delong_paired(a[lab], a[~lab], b[lab], b[~lab])["z"])
  assert abs(np.mean(zs)) < 0.2 and 0.8 < np.std(zs) < 1.2


def test_t2_on_a_synthetic_table_with_a_known_answer():
  # 6 singletons (3 copied), 2 at d = 4, 4 held out; the score ranks the copied singletons
  # above the others except one swap: AUROC = 8 / 9 among singletons
  d = np.array([1, 1, 1, 1, 1, 1, 4, 4, 0, 0, 0, 0])
  c = np.array([2, 1, 3, 0, 0, 0, 5, 9, 0, 0, 0, 0])
  is_train = d > 0
  s = np.array([5.0, 2.0, 6.0, 3.0, 1.0, 0.0, 7.0, 8.0, -1.0, -2.0, -3.0, 9.0])
  m = bench.task_metrics(s, is_train, d, c, num_samples=10, num_bootstrap=50)
  assert (m["T2_pos"], m["T2_neg"]) == (3, 3)
  assert m["T2_auroc"] == pytest.approx(8 / 9)
  assert m["T1_auroc"] == pytest.approx(stats.auroc(s[is_train], s[~is_train]))
  assert m["T4"]["4"]["copy_rate"] == pytest.approx(0.7) and m["T4"]["0"]["copy_rate"] == 0.0
  assert m["T4"]["1"]["mean_score"] == pytest.approx(17 / 6)
  assert m["T3_by_d"]["4"] is not None
  nope = bench.task_metrics(s, is_train, d, np.zeros_like(c), num_samples=10, num_bootstrap=50)
  assert nope["T2_pos"] == 0 and math.isnan(nope["T2_auroc"]) and hasattr(nope["T2_auroc"], "reason")


def test_choose_length_rule():
  assert bench.choose_length({1500: 0.2, 3000: 0.5}, (0.15, 0.6)) == (1500, True)
  assert bench.choose_length({1500: 0.05, 3000: 0.3}, (0.15, 0.6)) == (3000, True)
  assert bench.choose_length({1500: 0.0, 3000: 0.1}, (0.15, 0.6)) == (3000, False)
  assert bench.choose_length({1500: 0.7, 3000: 0.9}, (0.15, 0.6)) == (1500, False)


def test_pareto_front_by_hand():
  # passes / mean: a (1, 0.6), b (8, 0.9), c (8, 0.7: b is as cheap and better), d (100, 0.95),
  # e (200, 0.8: d is cheaper and better), cal_peer_f (2, 0.6: a is cheaper and as good)
  pts = {"a": (1, 0.6), "b": (8, 0.9), "c": (8, 0.7), "d": (100, 0.95), "e": (200, 0.8), "cal_peer_f": (2, 0.6)}
  agg = {n: {"passes_per_image": {"mean": float(x)}, **{t: {"mean": y} for t in bench.TASKS}}
         for n, (x, y) in pts.items()}
  agg["g"] = {"passes_per_image": {"mean": 0.5}, **{t: {"mean": math.nan} for t in bench.TASKS}}  # no value: off
  fronts = bench.pareto_fronts(list(agg), agg)
  assert fronts["T2_auroc"]["front"] == ["a", "b", "d"]
  agg["a"]["T2_auroc"]["mean"] = 0.5
  agg["peer_h"] = {"passes_per_image": {"mean": 1.0}, **{t: {"mean": 0.99} for t in bench.TASKS}}
  fronts = bench.pareto_fronts(list(agg), agg)
  assert fronts["T2_auroc"] == {"front": ["peer_h"], "volume_on_front": []}
  assert bench.is_volume("cal_hutchinson@rank8_L_capped") and not bench.is_volume("cal_peer_loss")


def _fake_record(seed, rng):
  d = np.array([1] * 10 + [2] * 4 + [0] * 6)
  c = np.where(d == 2, 3, (rng.random(20) < 0.5).astype(int)) * (d > 0)
  c[:2] = (1, 0)  # both groups of T2 are never empty
  s = {"a": c + rng.normal(size=20) * 0.5, "b": rng.normal(size=20), "cal_a": c + rng.normal(size=20),
       "cal_b": rng.normal(size=20)}
  tab = {"ids": np.arange(20), "is_train": d > 0, "d": d, "c": c, "num_samples": 16, "scores": s,
         "costs": {"a": (5.0, 0.01), "b": (1.0, 0.001), "cal_a": (10.0, 0.02), "cal_b": (2.0, 0.002)}}
  cfg = mnist_bench.get_config("quick")
  return bench.seed_record(cfg, seed, tab, 1.0)


def test_a_killed_bench_resumes_at_the_unfinished_seed_only(tmp_path, monkeypatch):
  cfg = mnist_bench.get_config("quick")
  cfg.unlock()
  cfg.bench.seeds = (0, 1, 2)
  wd = str(tmp_path)
  rng = np.random.default_rng(0)
  io.save_json(os.path.join(wdir.bench_dir(wd), "length.json"),
               {"seed": 0, "grid": [{"steps": 100, "singletons_copied_share": 0.3, "singletons_copied": 3,
                                     "singletons": 10, "images_copied": 7, "copies": 20, "wall_s": 1.0}],
                "band": [0.15, 0.6], "chosen_steps": 100, "in_band": True, "rule": "test"})
  bench.save_record(os.path.join(wdir.bench_seed(wd, 0), "record.json"), _fake_record(0, rng))  # seed 0 finished
  calls = []

  def measure(config, workdir, seed, length, log):
    calls.append(seed)
    return _fake_record(seed, rng)

  monkeypatch.setattr(bench, "measure_seed", measure)
  monkeypatch.setattr(bench, "run_length", lambda config, workdir, seed, log: io.load_json(
      os.path.join(wdir.bench_dir(wd), "length.json")))
  summary = bench.run(cfg, wd, log=lambda s: None)
  assert calls == [1, 2]
  assert summary["seeds_done"] == [0, 1, 2]
  assert os.path.exists(os.path.join(wdir.bench_dir(wd), "report.md"))
  for f in ("frontier.png", "dose_response.png"):
    assert os.path.getsize(os.path.join(wdir.bench_dir(wd), f)) > 0
  lb = summary["leaderboard"]
  assert lb["num_comparisons"] <= 3 * 3  # the leader against 3 others, 3 tasks
  assert set(lb["tasks"]) == set(bench.TASKS)
  # a rerun measures nothing
  calls.clear()
  bench.run(cfg, wd, log=lambda s: None)
  assert calls == []
  here = os.path.dirname(os.path.abspath(__file__))
  r = subprocess.run([sys.executable, os.path.join(here, "..", "scripts", "check_bench.py"), wd],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def test_spearman_paired_bootstrap_z():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 5, 60).astype(float)
  good, bad = y + rng.normal(size=60) * 0.5, rng.normal(size=60)
  diff, z = bench.spearman_boot_z(good, bad, y, 300)
  assert diff == pytest.approx(stats.spearman(good, y)[0] - stats.spearman(bad, y)[0])
  assert z > 3  # a score that tracks y beats noise clearly
  diff0, z0 = bench.spearman_boot_z(good, good, y, 50)
  assert diff0 == 0.0 and math.isnan(z0)  # the same score twice: no variance, no test


def test_bench_refuses_a_config_without_strata():
  c = mnist_bench.get_config("quick")
  c.unlock()
  c.data.dup_strata = ()
  with pytest.raises(ValueError, match="data.dup_strata"):
    bench.check_config(c)
  c.data.dup_strata, c.data.num_train = ((2, 4), (4, 2)), 0
  with pytest.raises(ValueError, match="singletons"):
    bench.check_config(c)


def test_benchmark_tables_count_the_seeds_behind_each_mean():
  rng = np.random.default_rng(1)
  recs = [_fake_record(k, rng) for k in (0, 1, 2)]
  recs[1]["metrics"]["b"]["T1_auroc"] = float("nan")
  length = {"chosen_steps": 100, "grid": [], "rule": "test"}
  s = bench.summarise(mnist_bench.get_config("quick"), recs, length, 3)
  md = bench.render_markdown(s, [])
  b = np.array([recs[k]["metrics"]["b"]["T1_auroc"] for k in (0, 2)])
  assert s["aggregates"]["b"]["T1_auroc"]["n"] == 2
  assert f"| `b` | {report.fmt(float(b.mean()), 3)} ± {report.fmt(float(b.std(ddof=1)), 2)} (2) |" in md
  assert "| 5 ± 0 (3) |" in md  # a's passes per image, the same on every seed
