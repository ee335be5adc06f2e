"""The mitigation stage: selection, the data modifications of an arm (drop / augment /
replace), separate workdirs per arm, arm-by-arm resume, statistics and the outputs."""

from __future__ import annotations

import copy
import math
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.configs import mnist_mitigate
from experiments.configs.base import get_base_config
from memvol import data, detect, io, mitigate, train


def _stream(data_cfg):
  """The split as training sees it: the arm's edits of the training stream applied."""
  return train.edit_stream(data.make_split(data_cfg), data_cfg)


# --- selection -----------------------------------------------------------------------


def test_num_selected_is_ceil_q_n():
  assert [mitigate.num_selected(q, 48) for q in (0.05, 0.1, 0.25, 1.0)] == [3, 5, 12, 48]
  assert mitigate.num_selected(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004 is not rounded up


def test_score_selection_top_k_ties_by_id_nan_last():
  ids = np.array([10, 3, 7, 5, 1, 8])
  scores = np.array([5.0, 9.0, 9.0, np.nan, 1.0, 5.0])
  assert mitigate.select_ids("score", ids, 2, scores=scores).tolist() == [3, 7]
  # 9, 9, then the tie at 5 between ids 10 and 8 goes to the smaller id
  assert mitigate.select_ids("score", ids, 3, scores=scores).tolist() == [3, 7, 8]
  assert mitigate.select_ids("score", ids, 5, scores=scores).tolist() == [1, 3, 7, 8, 10]
  assert 5 in mitigate.select_ids("score", ids, 6, scores=scores)  # NaN only when nothing else is left
  perm = np.random.default_rng(0).permutation(len(ids))  # order of the inputs does not matter
  assert mitigate.select_ids("score", ids[perm], 3, scores=scores[perm]).tolist() == [3, 7, 8]


def test_random_selection_seeded_exact_k_and_copied_none():
  ids = np.arange(100, 148)
  a = mitigate.select_ids("random", ids, 5, seed=1)
  assert len(a) == len(np.unique(a)) == 5 and np.all(np.isin(a, ids))
  assert np.array_equal(a, mitigate.select_ids("random", ids[::-1], 5, seed=1))
  assert not np.array_equal(a, mitigate.select_ids("random", ids, 5, seed=2))
  assert mitigate.select_ids("copied", ids, 5, copied_ids=np.array([120, 101])).tolist() == [101, 120]
  assert mitigate.select_ids("none", ids, 5).size == 0
  with pytest.raises(ValueError, match="k=0"):
    mitigate.select_ids("random", ids, 0)
  with pytest.raises(ValueError, match="unknown selection"):
    mitigate.select_ids("best", ids, 2)


def _scores_workdir(wd, values, statuses):
  rows = [{"id": i, "split": "train", "label": 0, "dup_count": 1, "hutchinson_log_volume": v,
           "hutchinson_status": st} for i, (v, st) in enumerate(zip(values, statuses))]
  rows.append({"id": 99, "split": "heldout", "label": 0, "dup_count": 0, "hutchinson_log_volume": "inf",
               "hutchinson_status": "1"})
  io.save_csv(os.path.join(wd, "scores", "scores.csv"), rows)


def test_nonfinite_selection_scores_are_refused_or_ranked_last_and_reported(tmp_path):
  """A solve that hit max_steps (L = inf, status 1) or failed with a finite L (status 2) is
  never silently ranked last: `refuse` names the images and the setting, `last` reports them."""
  wd = str(tmp_path)
  c = get_base_config()
  c.score.estimators = ("hutchinson",)
  _scores_workdir(wd, ["5", "inf", "9", "7000", "nan", "8"], ["0", "1", "0", "2", "0", "0"])
  ids = np.arange(6)
  s = mitigate.baseline_scores(c, wd, ids)
  assert s[[0, 2, 5]].tolist() == [5.0, 9.0, 8.0] and not np.isfinite(s[[1, 3, 4]]).any()
  reg = types.SimpleNamespace(config=c, train_ids=ids, scores=s, copied=np.zeros(0, np.int64), name="r")
  arm = mitigate.Arm("r", "score", "drop", 0.5, 1)
  assert c.mitigate.on_nonfinite == "refuse"
  with pytest.raises(ValueError, match=r"3 of 6 .*hutchinson_log_volume.*\[1, 3, 4\].*score.max_steps"):
    mitigate.selection(reg, arm)
  assert mitigate.selection(reg, mitigate.Arm("r", "random", "drop", 0.5, 1))["ids"].size == 3  # not ranked
  c.mitigate.on_nonfinite = "last"
  sel = mitigate.selection(reg, arm)
  assert sel["ids"].tolist() == [0, 2, 5] and sel["nonfinite_score_ids"] == [1, 3, 4]
  c.mitigate.on_nonfinite = "drop"
  with pytest.raises(ValueError, match="on_nonfinite"):
    mitigate.selection(reg, arm)
  base = {"workdir": wd, "num_samples": 8, "sde_steps": 4, "copies": 0, "copied_images": 0, "num_train": 6,
          "score_column": "hutchinson_log_volume", "nonfinite_score_ids": [1, 3, 4]}
  md = mitigate.render_markdown(mitigate.summarise([_rec("none", "none", "none", 1, 3)], {"r": base}), [])
  assert "3 training images have a non-finite selection score (ids 1, 3, 4)" in md


def test_loss_calibrated_and_risk_selections_rank_their_own_values(tmp_path):
  """`loss` ranks peer_loss, `calibrated` the score column's lira_off_ form (NaN where the raw
  solve failed), `risk` a screen's risk.csv; each refuses a config that cannot give its value."""
  from memvol.screen import risk as screen_risk
  wd, ref = str(tmp_path / "base"), str(tmp_path / "screen")
  rows = [{"id": i, "split": "train", "label": 0, "dup_count": 1, "hutchinson_log_volume": 10 - i,
           "hutchinson_status": "1" if i == 2 else "0", "peer_loss": i, "lira_off_hutchinson_log_volume": [3, 9, 8, 1][i]}
          for i in range(4)]
  io.save_csv(os.path.join(wd, "scores", "scores.csv"), rows)
  pool = {"ids": np.arange(4), "labels": np.zeros(4, int), "split": np.array(["train"] * 4)}
  table, cols = screen_risk.rows(pool, np.array([0.1, 0.2, 0.9, 0.5]), {}, {})
  io.save_csv(os.path.join(ref, "screen", "risk.csv"), table, cols)
  c = get_base_config()
  c.score.estimators, c.score.peers = ("hutchinson",), ("loss",)
  c.score.reference, c.mitigate.risk_reference, c.mitigate.on_nonfinite = ref, ref, "last"
  ids = np.arange(4)
  reg = types.SimpleNamespace(config=c, train_ids=ids, scores=mitigate.baseline_scores(c, wd, ids),
                              copied=np.zeros(0, np.int64), name="r", dir=wd)
  pick = lambda sel: mitigate.selection(reg, mitigate.Arm("r", sel, "drop", 0.5, 1))["ids"].tolist()  # noqa: E731
  assert pick("score") == [0, 1] and pick("loss") == [2, 3] and pick("risk") == [2, 3]
  assert pick("calibrated") == [0, 1]  # 9 at id 1, then 8 at id 2 is a failed solve: ranked last
  mitigate.check_selections(c, {"loss", "calibrated", "risk"})
  c.score.peers, c.score.reference, c.mitigate.risk_reference = (), "", ""
  for sel, match in (("loss", "score.peers"), ("calibrated", "score.reference"), ("risk", "mitigate.risk_reference")):
    with pytest.raises(ValueError, match=match):
      mitigate.check_selections(c, {sel})
  recs = ([_rec("risk-drop-q0.1", "risk", "drop", s, n) for s, n in zip((1, 2, 3), (2, 3, 4))]
          + [_rec("random-drop-q0.1", "random", "drop", s, n) for s, n in zip((1, 2, 3), (19, 21, 26))])
  out = mitigate.summarise(recs, {"r": {}})
  assert ("risk-drop-q0.1", "random-drop-q0.1") in [(t["a"], t["b"]) for t in out["tests"]]


def test_the_primary_comparison_is_welch_over_models_with_a_bootstrap_interval():
  from scipy import stats as sps
  a, b = [2, 3, 4, 3, 2, 4, 3, 3], [19, 21, 26, 20, 22, 25, 18, 23]
  recs = ([_rec("risk-drop-q0.1", "risk", "drop", s, n) for s, n in zip(range(8), a)]
          + [_rec("random-drop-q0.1", "random", "drop", s, n) for s, n in zip(range(8), b)]
          + [_rec("none", "none", "none", s, n) for s, n in zip(range(8), b)])
  out = mitigate.summarise(recs, {"r": {}})
  pr = out["primary"]["r"]
  ca, cb = np.array(a) // 2, np.array(b) // 2  # _rec's copied_images
  assert pr["diff"] == pytest.approx(ca.mean() - cb.mean())
  assert pr["welch_p"] == pytest.approx(sps.ttest_ind(ca, cb, equal_var=False).pvalue)
  assert pr["ci"][0] < pr["diff"] < pr["ci"][1] < 0 and pr["verdict"] == "risk x drop copies fewer images than random x drop"
  md = mitigate.render_markdown(out | {"baselines": {"r": {"workdir": "w", "num_samples": 8, "sde_steps": 4, "copies": 0,
                                                           "copied_images": 0, "num_train": 6, "score_column": "c"}}}, [])
  assert md.index("Primary comparison (fixed before any run)") < md.index("Verdict: risk x drop copies fewer")
  secondary = [t for t in out["tests"] if (t["a"], t["b"]) != ("risk-drop-q0.1", "random-drop-q0.1")]
  assert all(t["copied_images"]["welch_q_bh"] >= t["copied_images"]["welch_p"] for t in secondary)
  null = mitigate.summarise(recs[:8] + [_rec("random-drop-q0.1", "random", "drop", s, n) for s, n in zip(range(8), a)],
                            {"r": {}})["primary"]["r"]
  assert null["verdict"].startswith("inconclusive")
  assert "primary" not in mitigate.summarise(recs[8:], {"r": {}})  # no risk arm: nothing fixed to test


# --- data modifications --------------------------------------------------------------


def _digits_cfg():
  c = get_base_config()
  c.data.name, c.data.resolution = "digits", 8
  c.data.num_train, c.data.num_heldout, c.data.num_duplicated, c.data.duplicate_factor = 20, 8, 3, 4
  return c


def test_drop_removes_exactly_the_selected_ids_from_the_stream():
  c = _digits_cfg()
  base = data.make_split(c.data)
  dup_id = int(base.train.ids[np.argmax(base.dup_counts)])
  drop = [dup_id, int(base.train.ids[0]), int(base.train.ids[5])]
  arm = mitigate.arm_config(c, mitigate.Arm("r", "score", "drop", 0.1, 1), np.array(drop))
  split = _stream(arm.data)
  _, ids = split.training_stream()
  _, base_ids = base.training_stream()
  assert not np.isin(drop, ids).any()
  assert np.array_equal(ids, base_ids[~np.isin(base_ids, drop)])   # everything else, same multiplicity
  assert np.array_equal(split.train.ids, base.train.ids)          # still searched by detect
  assert np.array_equal(split.dup_counts, base.dup_counts)
  c.data.drop_ids = (99999,)
  with pytest.raises(ValueError, match="not training images"):
    _stream(c.data)


def test_drop_epochs_holds_the_epochs_of_the_kept_images():
  c = _digits_cfg()
  base = data.make_split(c.data)
  dup_id = int(base.train.ids[np.argmax(base.dup_counts)])
  drop = np.array([dup_id, int(base.train.ids[0])])
  with pytest.raises(ValueError, match="split"):
    mitigate.arm_config(c, mitigate.Arm("r", "score", "drop_epochs", 0.1, 1), drop)
  arm = mitigate.arm_config(c, mitigate.Arm("r", "score", "drop_epochs", 0.1, 1), drop, split=base)
  kept = len(_stream(arm.data).training_stream()[1])
  full = len(base.training_stream()[1])
  assert kept < full and arm.data.drop_ids == tuple(int(i) for i in drop)
  assert arm.train.num_steps == round(c.train.num_steps * kept / full)   # epochs = steps x batch / stream
  plain = mitigate.arm_config(c, mitigate.Arm("r", "score", "drop", 0.1, 1), drop, split=base)
  assert plain.train.num_steps == c.train.num_steps and plain.data.drop_ids == arm.data.drop_ids


def test_planted_regime_drop_epochs_of_the_score_top_5():
  """The README's planted figures: the score's top 5 = the 4 duplicates (x8) + 1 singleton,
  so the 76-item stream keeps 43 items and drop_epochs trains 1500 x 43 / 76 = 849 steps;
  no 5 distinct images leave 44 (76 - 8a - (5 - a) = 44 has no integer a)."""
  c = mnist_mitigate.get_config()
  split = data.make_split(c.data)
  ids, counts = np.asarray(split.train.ids), split.dup_counts
  assert len(ids) == 48 and counts.sum() == 76 and (counts == 8).sum() == 4
  top5 = np.r_[ids[counts == 8], ids[counts == 1][:1]]
  arm = mitigate.arm_config(c, mitigate.Arm("planted", "score", "drop_epochs", 0.1, 1), top5, split=split)
  assert len(_stream(arm.data).training_stream()[1]) == 43 and arm.train.num_steps == 849
  assert 44 not in {76 - 8 * a - (5 - a) for a in range(5)}


def test_augment_mask_follows_the_stream_and_only_moves_masked_images():
  c = _digits_cfg()
  base = data.make_split(c.data)
  sel = base.train.ids[[1, 2]]
  split = _stream(mitigate.arm_config(c, mitigate.Arm("r", "score", "augment", 0.1, 1), sel).data)
  mask = split.stream_augment()
  _, ids = split.training_stream()
  assert mask.shape == ids.shape and np.array_equal(mask, np.isin(ids, sel))
  x = jnp.asarray(split.training_stream()[0][:8])
  m = jnp.asarray(np.arange(8) % 2 == 0)
  out = np.asarray(train.augment_batch(jax.random.PRNGKey(0), x, m, 2, 0.0))
  assert np.array_equal(out[1::2], np.asarray(x)[1::2])
  assert not np.array_equal(out[0::2], np.asarray(x)[0::2]) and np.abs(out).max() <= 1.0
  # without noise a shifted image is a crop of the edge-padded original
  pad = np.pad(np.asarray(x)[0], ((2, 2), (2, 2), (0, 0)), mode="edge")
  assert any(np.array_equal(out[0], pad[i:i + 8, j:j + 8]) for i in range(5) for j in range(5))
  assert _stream(c.data).stream_augment() is None


def test_replace_changes_the_stream_only_and_checks_the_sha(tmp_path):
  c = _digits_cfg()
  base = data.make_split(c.data)
  ids = base.train.ids[[0, 3]]
  new = np.clip(base.train.images[[0, 3]] + 0.05, -1, 1).astype(np.float32)
  path = str(tmp_path / "p.npz")
  io.save_npz(path, ids=ids, images=new)
  arm = mitigate.Arm("r", "score", "perturb", 0.1, 1)
  split = _stream(mitigate.arm_config(c, arm, ids, (path, io.file_sha256(path))).data)
  images, sids = split.training_stream()
  assert np.array_equal(images[sids == ids[0]][0], new[0])
  assert np.array_equal(split.train.images, base.train.images)
  others = ~np.isin(sids, ids)
  assert np.array_equal(images[others], base.training_stream()[0][others])
  with pytest.raises(ValueError, match="sha256"):
    _stream(mitigate.arm_config(c, arm, ids, (path, "0" * 64)).data)


# --- arms and workdirs ---------------------------------------------------------------


@pytest.mark.parametrize("arg", [None, "core", "quick"])
def test_arms_never_share_a_workdir(arg):
  c = mnist_mitigate.get_config(arg)
  arms = mitigate.parse_arms(c.mitigate)
  dirs = [mitigate.arm_dir("/w", a) for a in arms]
  assert len(set(dirs)) == len(dirs) and "/w/mitigate/planted/baseline" not in dirs
  assert len(arms) == len(c.mitigate.arms) * len(c.mitigate.seeds)
  q = "0.25" if arg == "quick" else "0.1"  # the core arms come first
  assert arms[0].regime == "planted" and [a.group for a in arms[:3 * len(c.mitigate.seeds):len(c.mitigate.seeds)]] \
      == ["none", f"score-drop-q{q}", f"random-drop-q{q}"]
  assert mitigate.baseline_dir(c, "/w", "planted") == "/w"
  assert mitigate.baseline_dir(c, "/w", "natural") == "/w/mitigate/natural/baseline"
  nat = mitigate.regime_config(c, "natural")
  assert nat.data.num_duplicated == 0 and c.data.num_duplicated > 0


def test_config_shards_split_the_plan_by_regime():
  full = mnist_mitigate.get_config().mitigate.arms
  shards = [mnist_mitigate.get_config(r).mitigate.arms for r in ("planted", "natural")]
  assert sorted(shards[0] + shards[1]) == sorted(full)
  assert {a.split(":")[0] for a in shards[1]} == {"natural"}
  assert mnist_mitigate.get_config("core,natural").mitigate.arms == \
      ("natural:none", "natural:score:drop:0.1", "natural:random:drop:0.1")
  assert {a.split(":")[0] for a in mnist_mitigate.get_config("quick,planted").mitigate.arms} == {"planted"}
  with pytest.raises(ValueError, match="unknown config argument"):
    mnist_mitigate.get_config("plantd")


def test_arm_configs_carry_the_modification_in_data():
  c = mnist_mitigate.get_config("quick")
  ids = np.array([3, 5])
  cfgs = {m: mitigate.arm_config(c, mitigate.Arm("planted", "score", m, 0.1, 2), ids, ("/p.npz", "ab"))
          for m in ("drop", "augment", "perturb")}
  assert cfgs["drop"].data.drop_ids == (3, 5) and cfgs["drop"].data.augment_ids == ()  # no other edit
  assert cfgs["augment"].data.augment_ids == (3, 5)
  assert cfgs["perturb"].data.replace_path == "/p.npz"
  assert all(cf.seed == 2 for cf in cfgs.values())
  none = mitigate.arm_config(c, mitigate.Arm("planted", "none", "", 0.0, 2), np.zeros(0))
  assert io.config_to_dict(none.data) == io.config_to_dict(c.data)


def test_regime_overrides():
  c = mnist_mitigate.get_config()
  c.unlock()
  c.mitigate.overrides = ("natural:data.num_train=32", "natural:train.lr=1e-3", "x:data.classes=[1, 7]")
  nat = mitigate.regime_config(c, "natural")
  assert (nat.data.num_train, nat.train.lr, nat.data.classes) == (32, 1e-3, ())
  assert mitigate.regime_config(c, "x").data.classes == (1, 7)
  assert io.config_to_dict(mitigate.regime_config(c, "planted")) == io.config_to_dict(c)
  for bad, msg in (("natural:data.nonsense=1", "not a config field"), ("natural data=1", "expected"),
                   ("natural:data.name=mnist", "literal")):
    c.mitigate.overrides = (bad,)
    with pytest.raises(ValueError, match=msg):
      mitigate.regime_config(c, "natural")


def test_parse_arms_errors():
  mt = ml_collections.ConfigDict({"regimes": ("a",), "seeds": (1,), "arms": ("a:score:drop:0.1",)})
  assert mitigate.parse_arms(mt)[0] == mitigate.Arm("a", "score", "drop", 0.1, 1)
  for bad, msg in ((("b:none",), "not in mitigate.regimes"), (("a:score:shred:0.1",), "modification"),
                   (("a:score:drop",), "expected"), (("a:score:drop:2",), "q must be"),
                   (("a:none", "a:none"), "twice")):
    mt.arms = bad
    with pytest.raises(ValueError, match=msg):
      mitigate.parse_arms(mt)


# --- statistics ----------------------------------------------------------------------


def _rec(group, sel, mod, seed, copies, fd=1.0):
  return {"regime": "r", "group": group, "selection": sel, "modification": mod, "q": 0.1, "seed": seed,
          "num_selected": 3, "copies": copies, "copied_images": copies // 2, "fd": fd}


def test_summarise_groups_and_tests():
  recs = ([_rec("none", "none", "none", s, c) for s, c in zip((1, 2, 3), (20, 22, 24))]
          + [_rec("score-drop-q0.1", "score", "drop", s, c) for s, c in zip((1, 2, 3), (2, 3, 4))]
          + [_rec("random-drop-q0.1", "random", "drop", s, c) for s, c in zip((1, 2, 3), (19, 21, 26))]
          + [_rec("score-drop_epochs-q0.1", "score", "drop_epochs", s, c) for s, c in zip((1, 2, 3), (5, 6, 8))])
  out = mitigate.summarise(recs, {"r": {}})
  g = {x["group"]: x for x in out["groups"]}
  assert g["none"]["copies_mean"] == 22.0 and g["none"]["copies_sd"] == 2.0
  assert np.isnan(g["none"]["kid_mean"])
  pairs = [(t["a"], t["b"]) for t in out["tests"]]
  assert ("score-drop-q0.1", "random-drop-q0.1") in pairs and ("random-drop-q0.1", "none") in pairs
  assert ("score-drop_epochs-q0.1", "score-drop-q0.1") in pairs and ("score-drop_epochs-q0.1", "none") in pairs
  t = next(t for t in out["tests"] if t["b"] == "random-drop-q0.1")
  assert t["copies"]["welch_p"] < 0.01 and t["copies"]["mw_u"] == 0.0
  assert np.isnan(t["fd"]["welch_p"])  # no variance: undefined, not an error
  assert len(out["arms"]) == 12
  # Holm over every Welch p of the regime's tests (one family; Mann-Whitney another)
  from memvol import stats
  cells = [(t, m) for t in out["tests"] for m in mitigate.TESTED]
  raw = [t[m]["welch_p"] for t, m in cells]
  for (t, m), adj in zip(cells, stats.holm(raw)):
    assert t[m]["welch_p_holm"] == pytest.approx(adj, nan_ok=True)
    assert np.isnan(adj) or adj >= t[m]["welch_p"]
  assert sum(np.isfinite(raw)) > 4


def test_targeted_is_a_difference_without_a_p_value():
  """Score selection does not depend on the seed, so its `targeted` is the same in every
  seed (sd 0 by construction): a test of it would be meaningless."""
  recs = [{**_rec("score-drop-q0.1", "score", "drop", s, c), "targeted": 85.0} for s, c in zip((1, 2, 3), (2, 3, 4))]
  recs += [{**_rec("random-drop-q0.1", "random", "drop", s, c), "targeted": t}
           for s, c, t in zip((1, 2, 3), (19, 21, 26), (10.0, 30.0, 4.5))]
  out = mitigate.summarise(recs, {"r": {}})
  t = out["tests"][0]
  assert "targeted" not in mitigate.TESTED and "targeted" not in t
  assert t["targeted_diff"] == pytest.approx(85.0 - np.mean([10.0, 30.0, 4.5]))


def test_group_tables_print_the_number_of_finite_values():
  recs = [_rec("none", "none", "none", s, c, fd) for s, c, fd in zip((1, 2, 3), (20, 22, 24), (1.0, np.nan, 3.0))]
  out = mitigate.summarise(recs, {"r": _baseline()})
  g = out["groups"][0]
  assert (g["copies_n"], g["fd_n"], g["kid_n"]) == (3, 2, 0)
  assert (g["fd_mean"], g["fd_sd"]) == (2.0, pytest.approx(np.sqrt(2.0)))
  md = mitigate.render_markdown(out, [])
  assert "| 22 ± 2 (3) |" in md and "| 2 ± 1.4 (2) |" in md


def _baseline(**kw):
  return {"workdir": "/w", "num_samples": 8, "sde_steps": 4, "copies": 0, "copied_images": 0, "num_train": 6,
          "score_column": "hutchinson_log_volume", **kw}


def _check_mitigate():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "check_mitigate", os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "check_mitigate.py"))
  check = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(check)
  return check


def test_mitigation_summary_names_expected_nulls_and_check_fails_on_others(tmp_path, capsys):
  check = _check_mitigate()
  from memvol import report
  q = dict(kid=0.1, precision=0.9, recall=0.5, final_loss=0.02,
           targeted=report.not_estimated("a none arm selects nothing"))   # as with_targeted gives it
  recs = [{**_rec("none", "none", "none", 1, 20), **q, "arm": "none-seed1"},
          {**_rec("score-drop-q0.1", "score", "drop", 1, 3), **q, "targeted": 4.0, "arm": "score-drop-q0.1-seed1"}]
  out = mitigate.summarise(recs, {"r": _baseline()}) | {"num_arms_planned": 2}
  root = str(tmp_path / "mitigate")
  mitigate.write_outputs(out, root, log=lambda m: None)
  s = io.load_json(os.path.join(root, "summary.json"))
  assert s["undefined"] == [] and s["not_estimated"]["groups[0].copies_sd"] == "fewer than 2 finite values"
  assert s["not_estimated"]["arms[0].targeted"] == "a none arm selects nothing"
  assert check.main(str(tmp_path)) == 0
  capsys.readouterr()
  out["tests"][0]["copies"]["welch_p"] = math.nan   # a p-value that should exist and does not
  mitigate.write_outputs(out, root, log=lambda m: None)
  assert check.main(str(tmp_path)) == 1 and "tests[0].copies.welch_p" in capsys.readouterr().out


def _detect_csv(folder, ids, copies):
  os.makedirs(folder, exist_ok=True)
  io.save_csv(os.path.join(folder, "detect.csv"),
              [{**dict.fromkeys(detect.DETECT_COLUMNS, 0), "id": i, "copies_ratio": c, "min_distance": 0.5}
               for i, c in zip(ids, copies)])


def test_targeted_counts_the_none_arms_copies_of_the_selection(tmp_path):
  recs = []
  for seed, copies in ((1, (3, 0, 1, 0)), (2, (5, 2, 0, 0))):
    folder = mitigate.arm_dir(str(tmp_path), mitigate.Arm("r", "none", "", 0.0, seed))
    _detect_csv(os.path.join(folder, "detect"), (10, 11, 12, 13), copies)
    recs.append({"regime": "r", "selection": "none", "seed": seed, "selected_ids": [],
                 **mitigate.copy_counts(folder, np.zeros(0))})
  assert recs[0]["copies_by_id"] == {"10": 3, "12": 1} and recs[1]["copies_by_id"] == {"10": 5, "11": 2}
  recs += [{"regime": "r", "selection": "score", "seed": 1, "selected_ids": [10, 12]},
           {"regime": "r", "selection": "random", "seed": 2, "selected_ids": [13]},
           {"regime": "q", "selection": "score", "seed": 1, "selected_ids": [10]}]   # no none arms
  out = mitigate.with_targeted(recs)
  assert out[2]["targeted"] == 4.5 and out[3]["targeted"] == 0.0   # (3 + 1 + 5 + 0) / 2
  assert np.isnan(out[0]["targeted"]) and np.isnan(out[4]["targeted"])
  assert "targeted" not in recs[2]   # the records themselves are left alone


def _adopt_case(tmp_path, **rec_kw):
  """A fake baseline (copied ids 3, 5 of 8) and a source summary holding one score arm."""
  reg = types.SimpleNamespace(name="r", dir="/base", copied=np.array([3, 5]), train_ids=np.arange(8))
  arm = mitigate.Arm("r", "score", "drop", 0.25, 1)
  cfg = ml_collections.ConfigDict({"sample": {"num_samples": 16, "sde_steps": 20}, "train": {"num_steps": 12}})
  rec = {"regime": "r", "arm": arm.name, "selection": "score", "selected_ids": [3, 5], "num_samples": 16,
         "sde_steps": 20, "train_steps": 12, "copies": 4, "copies_by_id": {"3": 4}, "targeted": 6.0, **rec_kw}
  path = str(tmp_path / "summary.json")
  io.save_json(path, {"arms": [rec], "baselines": {"r": {"copied_ids": [3, 5], "num_train": 8}}})
  return mitigate.load_adoptable(path), reg, arm, cfg


def test_adopted_arm_must_be_the_same_arm_of_the_same_baseline(tmp_path):
  source, reg, arm, cfg = _adopt_case(tmp_path)
  rec = mitigate.adopt_arm(source, reg, arm, cfg, np.array([3, 5]))
  assert rec["copies"] == 4 and "targeted" not in rec and rec["adopted_from"].endswith("summary.json")
  with pytest.raises(ValueError, match=r"now selects \[3, 6\]"):
    mitigate.adopt_arm(source, reg, arm, cfg, np.array([3, 6]))
  reg.copied = np.array([3])
  with pytest.raises(ValueError, match="not the same baseline"):
    mitigate.adopt_arm(source, reg, arm, cfg, np.array([3, 5]))
  source, reg, arm, cfg = _adopt_case(tmp_path, train_steps=6)
  with pytest.raises(ValueError, match=r"settings differ.*'train_steps': \(6, 12\)"):
    mitigate.adopt_arm(source, reg, arm, cfg, np.array([3, 5]))
  io.save_json(str(tmp_path / "bad.json"), {"groups": []})
  with pytest.raises(ValueError, match="holds no mitigation arm records"):
    mitigate.load_adoptable(str(tmp_path / "bad.json"))


def test_a_records_folder_is_adoptable_and_written_once(tmp_path):
  folder = str(tmp_path / "records")
  arm = mitigate.Arm("r", "score", "drop", 0.25, 1)
  base = {"regime": "r", "copied_ids": [3, 5], "num_train": 8, "workdir": "/somewhere"}
  rec = {"regime": "r", "arm": arm.name, "selected_ids": [3, 5], "copies": 4, "adopted_from": "/x"}
  mitigate.save_record(folder, base)
  mitigate.save_record(folder, rec, arm)
  mitigate.save_record(folder, rec | {"copies": 9}, arm)  # a record once written stays
  assert sorted(os.listdir(folder)) == ["r.baseline.json", f"r.{arm.name}.json"]
  source = mitigate.load_adoptable(folder)
  assert source["baselines"] == {"r": {"regime": "r", "copied_ids": [3, 5], "num_train": 8}}
  assert source["arms"] == {("r", arm.name): {"regime": "r", "arm": arm.name, "selected_ids": [3, 5], "copies": 4}}
  os.makedirs(tmp_path / "empty")
  assert mitigate.load_adoptable(str(tmp_path / "empty")) == {"path": str(tmp_path / "empty"), "baselines": {},
                                                              "arms": {}}


def test_shard_errors_name_the_stage_field():
  from memvol.bench import plan as bench_plan
  assert bench_plan.parse_shard("", "mitigate.shard") == (0, 1)
  assert bench_plan.parse_shard("1/2", "mitigate.shard") == (1, 2)
  with pytest.raises(ValueError, match=r"mitigate\.shard='2/2'"):
    bench_plan.parse_shard("2/2", "mitigate.shard")


# --- the stage end to end, and resume ------------------------------------------------


def tiny_config():
  """digits 8x8, a tiny MLP, a few steps everywhere; regimes `a` (the workdir itself) and
  `b` (no duplicates, its own baseline)."""
  c = _digits_cfg()
  c.data.num_train, c.data.num_heldout, c.data.num_duplicated, c.data.duplicate_factor = 16, 12, 2, 4
  c.model.name, c.model.hidden, c.model.num_layers = "mlp", 32, 1
  t = c.train
  t.num_steps, t.batch_size, t.lr, t.warmup_steps, t.log_every, t.ckpt_every, t.sample_every = 12, 8, 3e-3, 2, 4, 4, 0
  c.sample.num_samples, c.sample.sde_steps, c.sample.batch_size = 16, 20, 16
  c.score.batch_size, c.score.adaptive, c.score.solver, c.score.num_steps = 32, False, "heun", 4
  c.score.profile_times, c.score.num_probes = 0, 1
  c.detect.carlini_n = 4
  mt = c.mitigate
  mt.regimes = ("a", "b")
  mt.overrides = ("b:data.num_duplicated=0",)
  mt.arms = ("a:none", "a:score:drop:0.25", "b:random:augment:0.25")
  mt.seeds = (1, 2)
  mt.classifier_steps, mt.classifier_width = 20, 4
  return c


def _mtimes(folder):
  return {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
          for r, _, fs in os.walk(folder) for f in fs}


@pytest.mark.slow  # ~40 s of CPU: 2 baselines and 6 tiny arms
def test_stage_end_to_end_and_resume_arm_by_arm(tmp_path):
  from memvol import pipeline
  c = tiny_config()
  wd = str(tmp_path / "w")
  pipeline.run(c, wd, "mitigate")
  root = os.path.join(wd, "mitigate")
  summary = io.load_json(os.path.join(root, "summary.json"))
  assert len(summary["arms"]) == 6
  for a in summary["arms"]:
    for key in ("selection", "modification", "seed", "num_selected", "copies", "copied_images"):
      assert key in a
    assert a["copies"] == a["copies_selected"] + a["copies_unselected"]
    assert np.isfinite(a["fd"]) and np.isfinite(a["final_loss"])
  assert {a["num_selected"] for a in summary["arms"] if a["selection"] != "none"} == {4}
  assert all(a["nonfinite_score_ids"] == [] for a in summary["arms"] if a["selection"] == "score")
  assert summary["undefined"] == [] and _check_mitigate().main(wd) == 0
  assert os.path.exists(os.path.join(root, "report.md")) and os.path.exists(os.path.join(root, "copies_vs_quality.png"))
  assert os.path.exists(os.path.join(root, "b", "baseline", "scores", "scores.csv"))
  # dropped ids are out of that arm's training stream, per its own recorded split
  arm = next(a for a in summary["arms"] if a["group"] == "score-drop-q0.25")
  rec = io.load_json(os.path.join(root, "a", arm["arm"], "data", "split.json"))
  assert rec["data"]["drop_ids"] == arm["selected_ids"]

  # Kill one arm mid-way: its result and its samples are lost, its checkpoint survives.
  victim = os.path.join(root, "a", "score-drop-q0.25-seed2")
  os.remove(os.path.join(victim, "arm.json"))
  os.remove(os.path.join(victim, "samples", "samples_sde.npz"))
  before = _mtimes(root)
  pipeline.run(c, wd, "mitigate")
  after = _mtimes(root)
  changed = {p for p in after if after[p] != before.get(p)}
  assert os.path.join(victim, "arm.json") in changed
  assert os.path.join(victim, "samples", "samples_sde.npz") in changed
  others = {p for p in changed if not p.startswith(victim)}
  assert all(os.path.dirname(p) == root for p in others), sorted(others)  # only the summary files
  assert not any("checkpoints" in p for p in changed)  # nothing retrained

  # Another workdir adopts every finished arm from this summary: only the baselines run there.
  c2 = copy.deepcopy(c)
  c2.mitigate.adopt = os.path.join(root, "summary.json")
  wd2 = str(tmp_path / "w2")
  pipeline.run(c2, wd2, "mitigate")
  s2 = io.load_json(os.path.join(wd2, "mitigate", "summary.json"))
  summary = io.load_json(os.path.join(root, "summary.json"))
  assert [a.pop("adopted_from") for a in s2["arms"]] == [c2.mitigate.adopt] * 6
  assert s2["arms"] == summary["arms"] and s2["tests"] == summary["tests"]
  assert not any(os.path.exists(os.path.join(wd2, "mitigate", a["regime"], a["arm"], "checkpoints"))
                 for a in s2["arms"])


@pytest.mark.slow  # ~60 s of CPU: 2 baselines in each of 3 workdirs, 6 tiny arms twice
def test_shards_in_their_own_workdirs_make_the_plan_of_one_run(tmp_path):
  from memvol import pipeline
  c = tiny_config()
  pipeline.run(c, str(tmp_path / "one"), "mitigate")
  whole = io.load_json(str(tmp_path / "one" / "mitigate" / "summary.json"))
  records = str(tmp_path / "records")
  for k in (0, 1):
    ck = copy.deepcopy(c)
    ck.mitigate.shard, ck.mitigate.records_dir = f"{k}/2", records
    pipeline.run(ck, str(tmp_path / f"s{k}"), "mitigate")
    part = io.load_json(str(tmp_path / f"s{k}" / "mitigate" / "summary.json"))
    names = [a["arm"] for a in whole["arms"]]
    if k == 0:  # the even arms of the plan
      assert [a["arm"] for a in part["arms"]] == names[0::2]
    else:  # the odd ones, and shard 0's already in the folder, adopted
      assert [a["arm"] for a in part["arms"]] == names
      assert [a["arm"] for a in part["arms"] if "adopted_from" in a] == names[0::2]
  assert len([f for f in os.listdir(records) if not f.endswith(".baseline.json")]) == 6
  # The gather: no shard, over shard 0's workdir; shard 1's arms are adopted, nothing trains.
  cg = copy.deepcopy(c)
  cg.mitigate.records_dir = records
  before = _mtimes(str(tmp_path / "s0"))
  pipeline.run(cg, str(tmp_path / "s0"), "mitigate")
  gathered = io.load_json(str(tmp_path / "s0" / "mitigate" / "summary.json"))
  assert not any("checkpoints" in p for p in set(_mtimes(str(tmp_path / "s0"))) - set(before))
  for a in gathered["arms"]:
    a.pop("adopted_from", None)
    a.pop("wall_s", None)
  for a in whole["arms"]:
    a.pop("wall_s", None)
  assert gathered["arms"] == whole["arms"] and gathered["tests"] == whole["tests"]


def test_digits_plan_holds_the_primary_arms_with_eight_models_each():
  from experiments.configs import digits_mitigate
  c = digits_mitigate.get_config()
  arms = mitigate.parse_arms(c.mitigate)
  groups = {a.group for a in arms}
  assert {mitigate.PRIMARY["a"], mitigate.PRIMARY["b"]} <= groups
  assert all(sum(a.group == g for a in arms) >= 8 for g in groups)  # R >= 8 models per arm
  assert {a.selection for a in arms} >= {"risk", "calibrated", "score", "loss", "random", "none"}
  mitigate.check_selections(c, {a.selection for a in arms})
  for needed in ("python -m experiments.main", "--mode=screen", "--mode=mitigate", "Runtime", "Result"):
    assert needed in digits_mitigate.__doc__, needed
