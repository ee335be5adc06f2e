"""scripts/render_results.py: the README's results blocks are rendered from summary.json
(main job and mitigation), and the README agrees with the committed copies."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from memvol import detect, mitigate, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  spec = importlib.util.spec_from_file_location("render_results", os.path.join(ROOT, "scripts", "render_results.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_readme_blocks_agree_with_the_committed_summaries():
  r = _script()
  assert r.check() == []


def test_main_job_tables_come_from_the_summary(tmp_path):
  import test_report
  r = _script()
  wd, cfg = str(tmp_path / "wd"), test_report._config()
  os.makedirs(wd)
  split = test_report.make_workdir(wd)
  test_report._add_peers(wd)
  cfg.score.peers = ("loss", "sima", "logp")
  detect.run(cfg, wd, split=split)
  s = report.run(cfg, wd, split=split)
  copy = {"kind": "main", **r.extract_main(json.loads(json.dumps(s))), "hardware": "2 CPU cores", "command": "command 1"}
  md = r.render(copy)
  tv = s["estimators"]["hutchinson"]["trained_vs_heldout"]
  assert (f"| trained vs held-out | 40 / 40 | {tv['mean_pos']:.1f} vs {tv['mean_neg']:.1f} | "
          f"{r.fmt_p(tv['welch_p'])} | {r.fmt_p(tv['mw_p'])} | {tv['auroc']:.3f} [{tv['auroc_lo']:.3f}, "
          f"{tv['auroc_hi']:.3f}] |") in md
  assert "Measured on 2 CPU cores with command 1" in md and "of 6 distinct images: 4 of the 4 planted" in md
  assert "train 12 s, sample 3 s, score 7 s (0.4 min in all)" in md
  assert f"| `sima` | {s['peers']['comparisons']['trained_vs_heldout']['sima']['auroc']:.3f} |" in md
  assert "Estimator agreement on 8 training images: `paper`" in md
  # --write into a README with the block; --check then agrees, and fails once a number is edited
  readme, results = str(tmp_path / "README.md"), str(tmp_path / "results")
  os.makedirs(results)
  with open(readme, "w") as f:
    f.write("# x\n\n<!-- results:demo -->\nold\n<!-- /results:demo -->\n\nafter\n")
  with open(readme) as f:
    text = r.replace_block(f.read(), "demo", md)
  with open(readme, "w") as f:
    f.write(text)
  with open(os.path.join(results, "demo.summary.json"), "w") as f:
    json.dump(copy, f)
  assert r.check(readme, results) == [] and text.endswith("\n<!-- /results:demo -->\n\nafter\n")
  with open(readme, "w") as f:
    f.write(text.replace(f"{tv['auroc']:.3f}", "0.999", 1))
  assert "differs" in r.check(readme, results)[0]
  with open(readme, "w") as f:
    f.write("# no block\n")
  assert "no block results:demo" in r.check(readme, results)[0]
  with pytest.raises(ValueError, match="no block"):
    r.replace_block("# none\n", "demo", md)
  made = r.make_block("# t\nMeasured by hand 1.0\n| old |\n\n![fig](f.png)\n", "demo", "Measured", "![fig]")
  assert made == "# t\n<!-- results:demo -->\n<!-- /results:demo -->\n\n![fig](f.png)\n"
  assert r.readme_block(r.replace_block(made, "demo", md), "demo") == md


def test_mitigation_tables_come_from_the_summary():
  r = _script()
  recs = []
  for group, sel, mod, copies in (("none", "none", "none", (20, 22, 24)), ("score-drop-q0.1", "score", "drop", (2, 3, 4)),
                                  ("random-drop-q0.1", "random", "drop", (19, 21, 26))):
    for seed, c in zip((1, 2, 3), copies):
      recs.append({"regime": "r", "group": group, "selection": sel, "modification": mod, "q": 0.1, "seed": seed,
                   "num_selected": 0 if sel == "none" else 3, "copies": c, "copied_images": c // 2,
                   "fd": 100.0 + c, "precision": 0.9, "recall": 0.5,
                   "targeted": 8.0 if sel == "score" else float(seed) if sel == "random" else np.nan})
  base = {"r": {"num_samples": 256, "copies": 30, "copied_images": 4, "num_train": 48}}
  s = json.loads(json.dumps(report.jsonable(mitigate.summarise(recs, base), "", [], {})))
  md = r.render({"kind": "mitigate", **r.extract_mitigate(s)})
  assert "**r** (baseline: 30 copies of 256, 4 of 48 images copied)" in md
  assert "| score-drop-q0.1 | 3 | 3 ± 1 (3) | 1.33 ± 0.58 (3) | 8 ± 0 (3) |" in md
  t = next(t for t in s["tests"] if t["b"] == "random-drop-q0.1")
  assert (f"| score-drop-q0.1 vs random-drop-q0.1 | {r.fmt_p(t['copies']['welch_p'])} "
          f"({r.fmt_p(t['copies']['welch_p_holm'])}) |") in md
  assert "| 6 |" in md   # targeted: 8 - mean(1, 2, 3), a difference without a test


def test_committed_mitigation_figures_follow_from_the_arm_records():
  """Every committed mitigation copy that has its arms' records beside it is what the stage
  computes from those records: the README's tables agree with the arms, not a hand copy."""
  r = _script()
  results = os.path.join(ROOT, "docs", "results")
  names = [f[: -len(".records.json")] for f in sorted(os.listdir(results)) if f.endswith(".records.json")]
  rendered = [n for n in names if os.path.exists(os.path.join(results, f"{n}.summary.json"))]
  assert rendered, "no committed mitigation copy with its arms' records"
  for name in rendered:
    with open(os.path.join(results, f"{name}.records.json")) as f:
      rec = json.load(f)
    with open(os.path.join(results, f"{name}.summary.json")) as f:
      committed = json.load(f)
    s = mitigate.summarise(mitigate.with_targeted(rec["arms"]), rec["baselines"])
    s = json.loads(json.dumps(report.jsonable(s, "", [], {})))
    assert {"kind": "mitigate", **r.extract_mitigate(s)} == committed, name


def test_benchmark_block_comes_from_the_summary():
  import test_bench
  from memvol.bench import analysis
  r = _script()
  recs = test_bench._records(np.random.default_rng(0), num_models=8)
  s = json.loads(json.dumps(report.jsonable(analysis.summarise(recs, test_bench.CHOICE, 8, 200), "", [], {})))
  md = r.render({"kind": "bench", **r.extract_bench(s)})
  for t in s["primary"]["tests"]:
    assert f"| {t['id']} | {r.fmt(t['estimate'], 3)} |" in md and f"**{t['verdict']}**" in md
  assert md.index("fixed before any run") < md.index("| P1 |")
  a = s["leaderboard"][analysis.RANK32]
  assert f"| `{analysis.RANK32}` | {report.fmt_ms(a['T1_auroc']['mean'], a['T1_auroc']['sd'], 8)} |" in md
  assert f"| `lira_on_{analysis.BASELINE}` |" in md and "Secondary tests with q < 0.05" in md
  assert "absolute T3" in md and "Typicality share" in md


def test_committed_benchmark_figures_follow_from_the_model_records():
  """Every committed benchmark copy is recomputed from the per-model records committed beside it.

  A copy is a snapshot of the records it names: each of them must be committed, and records of a
  plan still running may land beside them before the next render."""
  from memvol.bench import analysis, model, pool
  r = _script()
  results = os.path.join(ROOT, "docs", "results")
  for name in sorted(f[: -len(".summary.json")] for f in os.listdir(results) if f.endswith(".summary.json")):
    with open(os.path.join(results, f"{name}.summary.json")) as f:
      committed = json.load(f)
    if committed["kind"] != "bench":
      continue
    recs = {x["model"]: x for x in model.load_records(os.path.join(results, name))}
    assert set(committed["models_done"]) <= set(recs), (name, sorted(set(committed["models_done"]) - set(recs)))
    if committed["complete"]:
      assert sorted(recs) == committed["models_done"], name
    recs = [recs[k] for k in committed["models_done"]]
    s = analysis.summarise(recs, committed["choice"], committed["num_models_planned"], committed["num_bootstrap"],
                           pool.load(os.path.join(results, name)))
    s = json.loads(json.dumps(report.jsonable(s, "", [], {})))
    assert {"kind": "bench", **r.extract_bench(s)} == committed, name


def test_mean_sd_cells_print_as_the_report_prints_them():
  r = _script()
  for mean, sd, n in ((0.7321, 0.1534, 3), (5.0, 0.0, 3), (0.5, None, 1), (None, None, 0)):
    assert r.mean_sd_n(mean, sd, n) == report.fmt_ms(mean if mean is not None else float("nan"),
                                                     sd if sd is not None else float("nan"), n)


def test_benchmark_plans_side_by_side():
  r = _script()
  copies = r.bench_copies()
  md = r.render_side_by_side(copies)
  assert "| P2: the paper's claim, counterfactually |" in md
  for name in r.BENCH_PLANS:
    col = f"{name} ({r.BENCH_PLANS[name]})"
    assert col in md and (name in copies or "no records yet" in md)
  assert r.readme_block(open(r.README).read(), r.SIDE_BY_SIDE) == md  # the README shows the committed copies
