"""memvol.report end to end on a synthetic workdir (split, samples, scores, curves, timings),
the summary's finite-ness as CI checks it, and clear errors on bad inputs."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import types

import numpy as np
import pytest
from sklearn.datasets import load_digits

from experiments.configs.base import get_base_config
from memvol import detect, io, report
from memvol import workdir as wdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESTS = ("hutchinson", "exact")


def _check_report():
  spec = importlib.util.spec_from_file_location("check_report", os.path.join(ROOT, "scripts", "check_report.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.main


def _config():
  c = get_base_config()
  c.score.estimators = ESTS
  c.detect.carlini_n = 10
  c.detect.chunk_size = 16
  c.report.num_bootstrap = 100
  c.report.top_k = 4
  return c


def _imageset(images, labels, ids):
  return types.SimpleNamespace(images=images, labels=labels, ids=ids)


def make_workdir(wd: str, copy_some: bool = True, seed: int = 0, n: int = 40):
  """8x8 digits: n training (4 planted duplicates x4), n held-out; samples copy the planted
  duplicates (twice each) and two singletons when `copy_some`; scores higher for trained and
  for copied images; curves; timings."""
  rng = np.random.default_rng(seed)
  d = load_digits()
  x = (d.images[:2 * n] / 8.0 - 1.0).astype(np.float32)[..., None]     # [-1, 1]
  y = d.target[:2 * n].astype(np.int64)
  ids = np.arange(2 * n, dtype=np.int64) + 1000
  train, held = slice(0, n), slice(n, 2 * n)
  dup = np.ones(n, np.int64)
  dup[[0, 1, 2, 3]] = 4
  split = types.SimpleNamespace(train=_imageset(x[train], y[train], ids[train]),
                                heldout=_imageset(x[held], y[held], ids[held]), dup_counts=dup)
  noise = rng.uniform(-1, 1, (24, 8, 8, 1)).astype(np.float32)
  copies = [0, 0, 1, 1, 2, 2, 3, 3, 10, 11] if copy_some else []
  samples = np.concatenate([x[copies] + 0.01 * rng.normal(size=(len(copies), 8, 8, 1)).astype(np.float32),
                            noise]) if copies else noise
  io.save_npz(os.path.join(wd, "samples", "samples_sde.npz"), images=samples)

  copied = np.zeros(2 * n, bool)
  copied[copies] = True
  base = rng.normal(0.0, 1.0, 2 * n) + 3.0 * (np.arange(2 * n) < n) + 4.0 * copied
  rows = []
  for i in range(2 * n):
    r = dict(id=int(ids[i]), split="train" if i < n else "heldout", label=int(y[i]),
             dup_count=int(dup[i]) if i < n else 0)
    for k, e in enumerate(ESTS):
      lv = base[i] * (1.0 + 0.1 * k) + 0.2 * rng.normal()
      r.update({f"{e}_log_volume": lv, f"{e}_stderr": 0.1, f"{e}_prior_logp": -90.0,
                f"{e}_logp": lv - 90.0, f"{e}_nfe": 120, f"{e}_status": "0"})
    rows.append(r)
  io.save_csv(os.path.join(wd, "scores", "scores.csv"), rows)
  ts = np.linspace(1e-3, 1.0, 20)
  for e in ESTS:
    lv = np.array([r[f"{e}_log_volume"] for r in rows])
    extra = {"split": np.array([r["split"] for r in rows])} if e == "exact" else {}
    io.save_npz(os.path.join(wd, "scores", f"profile_{e}.npz"), ids=ids, ts=ts,
                L_t=lv[:, None] * np.sqrt(ts)[None, :], **extra)
  io.save_json(os.path.join(wd, "timings.json"), {"train": 12.5, "sample": 3.0, "score": 7.25})
  return split


def test_report_end_to_end(tmp_path):
  wd, cfg = str(tmp_path), _config()
  split = make_workdir(wd)
  detect.run(cfg, wd, split=split)
  summary = report.run(cfg, wd, split=split)
  folder = os.path.join(wd, "report")
  md = open(os.path.join(folder, "report.md")).read()
  # Findings come first and state both claims with their p-values
  assert md.index("## Findings") < md.index("## Estimator")
  assert "Claim 1, trained vs held-out" in md and "Claim 2, memorised vs not memorised" in md
  assert md.count("Welch p = ") >= 3
  # every embedded figure exists
  pngs = {f for f in os.listdir(folder) if f.endswith(".png")}
  assert {f"{e}_{k}.png" for e in ESTS for k in ("overview", "per_class", "topk", "curves")} | {"agreement.png"} <= pngs
  for f in pngs:
    assert f"]({f})" in md
    assert os.path.getsize(os.path.join(folder, f)) > 5000
  assert "12.5" in md and "## Stage wall times" in md
  # summary.json: the numbers the lead's CI checks, finite, and consistent with the data
  assert _check_report()(wd) == 0
  with open(os.path.join(folder, "summary.json")) as f:
    s = json.load(f)
  assert s == json.loads(json.dumps(summary))
  h = s["estimators"]["hutchinson"]
  tv, mem, dup = h["trained_vs_heldout"], h["memorised_vs_not"], h["duplicates_vs_singletons"]
  assert (tv["n_pos"], tv["n_neg"]) == (40, 40)
  assert s["num_memorised_ratio"] == 6 and (mem["n_pos"], mem["n_neg"]) == (6, 34)
  assert (dup["n_pos"], dup["n_neg"]) == (4, 36)
  assert tv["auroc"] > 0.85 and tv["welch_p"] < 1e-6 and tv["supported"]
  assert mem["mean_diff"] > 2 and mem["supported"] and s["claims"]["memorised_gt_not"]["supported"]
  assert tv["auroc_lo"] <= tv["auroc"] <= tv["auroc_hi"]
  assert h["spearman_copies_ratio"]["rho"] > 0.3
  assert s["estimator_agreement"]["hutchinson|exact"]["rho"] > 0.9
  assert {r["label"] for r in h["per_class"]} <= set(range(10)) and len(h["per_class"]) >= 5
  assert h["status_counts"] == {"0": 80} and h["mean_nfe"] == 120
  for v in _numbers(s):
    assert math.isfinite(v)


def _numbers(o):
  if isinstance(o, dict):
    for v in o.values():
      yield from _numbers(v)
  elif isinstance(o, list):
    for v in o:
      yield from _numbers(v)
  elif isinstance(o, (int, float)) and not isinstance(o, bool):
    yield float(o)


def test_report_when_nothing_is_memorised(tmp_path):
  wd, cfg = str(tmp_path), _config()
  cfg.score.estimators = ("hutchinson",)
  split = make_workdir(wd, copy_some=False)
  os.remove(os.path.join(wd, "scores", "profile_hutchinson.npz"))
  detect.run(cfg, wd, split=split)
  s = report.run(cfg, wd, split=split)
  md = open(os.path.join(wd, "report", "report.md")).read()
  assert s["num_memorised_ratio"] == 0
  assert s["estimators"]["hutchinson"]["memorised_vs_not"] == {
      "available": False, "reason": "the group 'memorised' is empty"}
  assert s["claims"]["memorised_gt_not"]["testable"] is False
  assert "not testable: the group 'memorised' is empty" in md and "L(t) curves skipped" in md
  assert "agreement.png" not in md
  assert _check_report()(wd) == 0


def test_report_nan_scores_and_undefined_statistics(tmp_path):
  wd, cfg = str(tmp_path), _config()
  cfg.score.estimators = ("hutchinson",)
  split = make_workdir(wd)
  path = os.path.join(wd, "scores", "scores.csv")
  rows = io.load_csv(path)
  rows[5]["hutchinson_log_volume"] = "nan"      # a failed solve
  rows[10]["hutchinson_log_volume"] = ""        # and a missing value (row 10 is a copied singleton)
  rows[20]["hutchinson_status"] = "2"           # a solve that hit max_steps: left out
  rows[20]["hutchinson_log_volume"] = "1e6"
  io.save_csv(path, rows)
  # curves as scoring writes them (with a split array), no points saved
  ids = np.array([int(r["id"]) for r in rows])
  io.save_npz(os.path.join(wd, "scores", "profile_hutchinson.npz"), ids=ids,
              split=np.array([r["split"] for r in rows]), ts=np.zeros(0), L_t=np.zeros((len(rows), 0)))
  detect.run(cfg, wd, split=split)
  s = report.run(cfg, wd, split=split)
  h = s["estimators"]["hutchinson"]
  assert h["num_nonfinite"] == 2 and h["num_failed_solves"] == 1 and h["trained_vs_heldout"]["n_pos"] == 37
  assert h["trained_vs_heldout"]["mean_pos"] < 100 and h["status_counts"] == {"0": 79, "2": 1}
  assert "profile_times = 0" in open(os.path.join(wd, "report", "report.md")).read()
  # one memorised singleton left: its Welch test is undefined -> null, listed in `undefined`
  ms = h["memorised_vs_not_singletons"]
  assert ms["n_pos"] == 1 and ms["welch_p"] is None
  assert s["not_estimated"]["estimators.hutchinson.memorised_vs_not_singletons.welch_p"] == \
      "a group has fewer than 2 finite values"
  assert s["undefined"] == [] and _check_report()(wd) == 0   # every null is an expected one
  assert "2 images have a non-finite score" in open(os.path.join(wd, "report", "report.md")).read()


def test_report_errors(tmp_path):
  wd, cfg = str(tmp_path), _config()
  split = make_workdir(wd)
  scores = os.path.join(wd, "scores", "scores.csv")
  good = open(scores).read()
  with pytest.raises(FileNotFoundError, match="--mode=detect"):
    report.run(cfg, wd, split=split)
  detect.run(cfg, wd, split=split)
  os.remove(scores)
  with pytest.raises(FileNotFoundError, match="--mode=score"):
    report.run(cfg, wd, split=split)
  for content, match in ((b"", "no rows"), (good.splitlines()[0].encode() + b"\n", "no rows"),
                         (b"\x00\xff\xfe garbage \x89PNG", "unreadable|lacks columns"),
                         (good.replace("train,", "trian,", 1).encode(), "'split' has values"),
                         (good.replace(",0.1,", ",zz,", 1).encode(), "corrupt")):
    with open(scores, "wb") as f:
      f.write(content)
    with pytest.raises(ValueError, match=match):
      report.run(cfg, wd, split=split)
  with open(scores, "w") as f:
    f.write(good)
  cfg.score.estimators = ("hutchinson", "paper")
  with pytest.raises(ValueError, match="paper_log_volume"):
    report.run(cfg, wd, split=split)
  cfg.score.estimators = ESTS
  # detect.csv from another split
  det = os.path.join(wd, "detect", "detect.csv")
  rows = io.load_csv(det)
  rows[0]["id"] = "999999"
  io.save_csv(det, rows)
  with pytest.raises(ValueError, match="different splits"):
    report.run(cfg, wd, split=split)
  assert not os.path.exists(os.path.join(wd, "report", "report.md"))


@pytest.mark.parametrize("status", ["", "ok", "max_steps"])
def test_missing_or_unknown_status_is_an_error_not_success(tmp_path, status):
  wd, cfg = str(tmp_path), _config()
  split = make_workdir(wd)
  path = os.path.join(wd, "scores", "scores.csv")
  rows = io.load_csv(path)
  rows[7]["exact_status"] = status
  io.save_csv(path, rows)
  detect.run(cfg, wd, split=split)
  with pytest.raises(ValueError, match=rf"exact_status.*{rows[7]['id']}"):
    report.run(cfg, wd, split=split)
  assert not os.path.exists(os.path.join(wd, "report", "summary.json"))


def test_headline_finiteness_is_checked_before_nans_become_nulls(tmp_path):
  """Identical scores in both groups: Welch's p is NaN. The raw number is caught (summary's
  nonfinite_headline) and CI's check fails, although summary.json holds only a null."""
  wd, cfg = str(tmp_path), _config()
  cfg.score.estimators = ("hutchinson",)
  split = make_workdir(wd)
  path = os.path.join(wd, "scores", "scores.csv")
  rows = io.load_csv(path)
  for r in rows:
    r["hutchinson_log_volume"] = "5.0"
    r["hutchinson_stderr"] = "nan"  # as subspace / paper write it: not estimated
  io.save_csv(path, rows)
  detect.run(cfg, wd, split=split)
  s = report.run(cfg, wd, split=split)
  assert "claims.trained_gt_heldout.welch_p" in s["nonfinite_headline"]
  assert s["claims"]["trained_gt_heldout"]["welch_p"] is None  # what the old check saw: no number
  assert _check_report()(wd) == 1
  assert s["not_estimated"]["estimators.hutchinson.median_stderr"] == "not estimated by this estimator"
  assert "standard error of L: not estimated (NaN)" in open(os.path.join(wd, "report", "report.md")).read()
  raw = {"a": {"testable": True, "welch_p": math.nan, "mw_p": 0.1, "mean_diff": 1.0, "auroc": math.inf},
         "b": {"testable": False}}
  assert report.headline_nonfinite(raw) == ["claims.a.welch_p", "claims.a.auroc"]


def test_check_report_fails_on_any_null_that_is_not_an_expected_one(tmp_path, capsys):
  """A NaN AUROC bound in a peers table, a NaN Spearman: null in summary.json, not headline
  numbers, and not expected: the check fails naming them. Expected nulls pass."""
  wd, cfg = str(tmp_path), _config()
  cfg.score.estimators = ("hutchinson",)
  split = make_workdir(wd, copy_some=False)   # nothing copied: Spearman with the copy counts is undefined
  detect.run(cfg, wd, split=split)
  s = report.run(cfg, wd, split=split)
  assert s["not_estimated"]["estimators.hutchinson.spearman_copies_ratio.rho"] == \
      "the copy count (ratio criterion) is the same for every training image"
  assert s["undefined"] == [] and _check_report()(wd) == 0
  path = os.path.join(wd, "report", "summary.json")
  good = io.load_json(path)
  for where in (("estimators", "hutchinson", "trained_vs_heldout", "auroc_lo"),
                ("estimators", "hutchinson", "spearman_dup_count", "rho")):
    bad = json.loads(json.dumps(good))
    node = bad
    for k in where[:-1]:
      node = node[k]
    node[where[-1]] = None
    io.save_json(path, bad)
    assert _check_report()(wd) == 1
    assert ".".join(where) in capsys.readouterr().out
  io.save_json(path, good)
  assert _check_report()(wd) == 0


def _add_peers(wd: str, seed: int = 3) -> dict[str, np.ndarray]:
  """Peer columns in scores.csv (loss tracks membership, sima is noise), timings in the
  manifest and an agreement.csv over the first 8 training images."""
  rng = np.random.default_rng(seed)
  path = os.path.join(wd, "scores", "scores.csv")
  rows = io.load_csv(path)
  h = np.array([float(r["hutchinson_log_volume"]) for r in rows])
  cols = {"loss": h + 0.5 * rng.normal(size=h.size), "sima": rng.normal(size=h.size)}
  for i, r in enumerate(rows):
    for n, v in cols.items():
      r[f"peer_{n}"], r[f"peer_{n}_nfe"] = str(v[i]), "4" if n == "loss" else "1"
    r["peer_logp"], r["peer_logp_nfe"] = r["hutchinson_logp"], "600"
  io.save_csv(path, rows)
  timing = {e: {"seconds_per_image": 0.5, "includes_compile": False} for e in ESTS}
  timing.update({"peer_loss": {"seconds_per_image": 0.01, "includes_compile": False},
                 "peer_sima": {"seconds_per_image": 0.002, "includes_compile": True},
                 "agreement_paper": {"seconds_per_image": 40.0, "includes_compile": False}})
  io.save_json(os.path.join(wd, "scores", "manifest.json"), {"seconds_per_image": timing})
  agree = [{"id": r["id"], "split": "train", "label": r["label"], "dup_count": r["dup_count"],
            "primary_log_volume": r["hutchinson_log_volume"],
            "paper_log_volume": str(2.0 * float(r["hutchinson_log_volume"]) + 0.01 * k),
            "paper_nfe": "101000", "paper_jvps": "0", "paper_status": "0"} for k, r in enumerate(rows[:8])]
  io.save_csv(os.path.join(wd, "scores", "agreement.csv"), agree)
  return {**cols, "logp": np.array([float(r["hutchinson_logp"]) for r in rows])}


def test_report_peers_tables_figures_and_agreement(tmp_path):
  from memvol import stats
  wd, cfg = str(tmp_path), _config()
  cfg.score.peers = ("loss", "sima", "logp", "flipd")  # flipd has no column: left out
  split = make_workdir(wd)
  cols = _add_peers(wd)
  detect.run(cfg, wd, split=split)
  s = report.run(cfg, wd, split=split)
  p = s["peers"]
  assert p["scores"] == list(ESTS) + ["loss", "sima", "logp"]
  is_train = np.arange(80) < 40
  for name in ("loss", "sima", "logp"):
    c = p["comparisons"]["trained_vs_heldout"][name]
    assert c["auroc"] == pytest.approx(stats.auroc(cols[name][is_train], cols[name][~is_train]))
  assert set(p["comparisons"]) == set(report.PEER_COMPARISONS)
  assert p["comparisons"]["trained_vs_heldout"]["sima"]["auroc"] < 0.75  # noise
  assert "sima" not in p["best"]["trained_vs_heldout"]["auroc"] and p["best"]["trained_vs_heldout"]["auroc"]
  assert p["costs"]["loss"] == {"nfe_per_image": 4.0, "seconds_per_image": 0.01, "includes_compile": False}
  assert p["costs"]["hutchinson"]["nfe_per_image"] == 120  # no jvps column: forward evaluations only
  ag = s["agreement"]["estimators"]["paper"]
  assert ag["rho"] == pytest.approx(1.0) and ag["n"] == 8 and ag["nfe_per_image"] == 101000
  assert ag["seconds_per_image"] == 40.0
  md = open(os.path.join(wd, "report", "report.md")).read()
  assert md.index("## Peers on the same checkpoint") < md.index("## Copies found")
  for key in report.PEER_COMPARISONS:
    assert f"peers_roc_{key}.png" in md
  assert md.count("| `sima` |") == 4 and "**1**" in md  # sima: fewest network passes, in bold
  assert "0.002*" in md  # a time that includes compilation is marked
  assert "## Estimator agreement on a training subset" in md and "agreement_subset.png" in md
  for f in ["peers_spearman.png", "agreement_subset.png"] + [f"peers_roc_{k}.png" for k in report.PEER_COMPARISONS]:
    assert os.path.getsize(os.path.join(wd, "report", f)) > 5000
  assert _check_report()(wd) == 0


def test_profile_section_bound_fractions_and_window_aurocs(tmp_path):
  """A profile where memorised images cross the bound from the 5th time on and trained images
  grow more only from the 7th: the fractions above it, the crossing times, where the
  AUROC lives, and the capped score are what the construction says."""
  from memvol import profile as profile_lib
  from memvol import sde as sde_lib
  from memvol import volume
  wd, cfg = str(tmp_path), _config()
  split = make_workdir(wd)
  detect.run(cfg, wd, split=split)
  rows = io.load_csv(os.path.join(wd, "scores", "scores.csv"))
  sde, dim = sde_lib.VPSDE(), 64
  ts = np.asarray(volume.profile_times(sde, sde.eps, sde.T, 8))
  bound = profile_lib.bound(sde, sde.eps, ts, dim)
  n = len(rows)
  is_train = np.array([r["split"] == "train" for r in rows])
  det = detect.read_detect(wdir.detect_csv(wd))
  mem = np.zeros(n, bool)
  mem[:40] = det["copies_ratio"] > 0
  rng = np.random.default_rng(1)
  frac = 0.6 + 0.01 * rng.normal(size=(n, 1)) + 0.1 * (is_train[:, None] & (np.arange(8) >= 6)[None, :])
  L_t = bound[None, :] * frac
  L_t[mem, 4:] = bound[4:] + 5.0  # memorised: above the bound from ts[4] on
  summ = profile_lib.summarise(sde, sde.eps, sde.T, ts, L_t, L_t[:, -1], dim)
  io.save_npz(os.path.join(wd, "scores", "profile_hutchinson.npz"), ids=np.array([int(r["id"]) for r in rows]),
              split=np.array([r["split"] for r in rows]), L_t=L_t, bound_dim=np.asarray(dim), **summ)
  summary = report.run(cfg, wd, split=split)
  p = summary["profile"]["hutchinson"]
  assert p["fraction_above_bound"]["memorised"] == [0.0] * 4 + [1.0] * 4
  assert p["fraction_above_bound"]["held-out"] == [0.0] * 8
  assert p["fraction_ever_above"]["memorised"] == 1.0 and p["median_t_above"]["memorised"] == float(ts[4])
  au = p["window_auroc"]["trained_vs_heldout"]
  assert au[6] == 1.0 and au[7] == 1.0 and abs(au[2] - 0.5) < 0.25  # trained grow more only there
  assert p["window_auroc"]["memorised_vs_not"][4] == 1.0  # the crossing window
  capped = summ["L_capped"]
  assert np.all(capped <= bound[-1] + 1e-9) and np.allclose(capped[~is_train], L_t[~is_train, -1])
  assert np.all(capped[mem] < L_t[mem, -1] - 4.9)  # the 5 nats above the bound are capped away
  md = open(os.path.join(wd, "report", "report.md")).read()
  assert "Where in t the signal lives" in md and "A score that respects the bound" in md
  assert "](hutchinson_profile.png)" in md and os.path.getsize(os.path.join(wd, "report", "hutchinson_profile.png")) > 5000
  assert _check_report()(wd) == 0
