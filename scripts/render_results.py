"""Render the README's results tables from a workdir's summary.json (main job, mitigation,
benchmark).

  python scripts/render_results.py --main=runs/mnist --hardware="2 CPU cores" --write
  python scripts/render_results.py --mitigate=runs/mitigate --name=mnist_mitigate --hardware=... --write
  python scripts/render_results.py --bench=runs/bench --write
  python scripts/render_results.py --check        # CI: the README's blocks = the committed copies
  python scripts/render_results.py --refresh      # after a renderer change: re-render every block

--write keeps the numbers the tables need as docs/results/<name>.summary.json (a small
copy) and replaces the README's marked block; for a mitigation run it also keeps the arms'
own records as docs/results/<name>.records.json (the baselines and one record per arm, from
which the tests recompute every committed figure, and which `mitigate.adopt` can take)

  <!-- results:<name> -->  ...  <!-- /results:<name> -->

with the rendered text. Where the README has no such block yet, --region START END makes one
of the text from the line that starts with START up to the line that starts with END (not
included); without it a missing block is an error. --check renders every committed copy
and exits 1 naming each README block that differs or is missing; --refresh rewrites every
README block from its committed copy (for a change of the renderer, not of the numbers). Without --write or
--check the rendered markdown is printed. Names: `mnist` for --main, `mnist_mitigate` for
--mitigate, `digits_bench` for --bench, unless --name says otherwise. A benchmark's per-model
records are committed where its run wrote them (bench.records_dir, docs/results/<name>/),
and the tests recompute the committed copy from them.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
README = os.path.join(ROOT, "README.md")
COMPARISONS = (("trained_vs_heldout", "trained vs held-out"),
               ("memorised_vs_not", "memorised vs not (training images)"),
               ("duplicates_vs_singletons", "planted duplicates vs singletons"))
PEER_COMPARISONS = (("trained_vs_heldout", "trained vs held-out"), ("memorised_vs_not", "memorised vs not"),
                    ("duplicates_vs_singletons", "duplicates vs singletons"),
                    ("memorised_vs_not_singletons", "memorised vs not, singletons"))
STAGES = ("train", "sample", "score", "detect", "report")
MAIN_KEYS = ("primary_estimator", "num_samples", "num_train", "num_heldout", "num_memorised_ratio",
             "num_planted_duplicates", "num_copied_samples_ratio", "ratio_threshold", "alpha", "claims",
             "timings_s")


# --- formatting (as memvol.report prints numbers) -------------------------------------


def fmt(x: Any, digits: int = 4) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  if isinstance(x, int) and not isinstance(x, bool):
    return str(x)
  return f"{x:.{digits}g}"


def fmt_p(p: Any) -> str:
  if p is None or not math.isfinite(p):
    return "n/a"
  return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def table(header: list[str], rows: list[list[str]]) -> str:
  return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                   + ["| " + " | ".join(r) + " |" for r in rows])


# --- the main job ---------------------------------------------------------------------


def extract_main(summary: dict[str, Any]) -> dict[str, Any]:
  """The part of a report's summary.json the README's tables use."""
  e = summary["primary_estimator"]
  st = summary["estimators"][e]
  out = {k: summary.get(k) for k in MAIN_KEYS}
  out["primary"] = {k: st[k] for k in [c for c, _ in COMPARISONS] + ["memorised_vs_not_singletons",
                                                                    "spearman_copies_ratio"] if k in st}
  if "peers" in summary:
    p = summary["peers"]
    out["peers"] = {"scores": p["scores"], "best": {k: p["best"][k]["auroc"] for k, _ in PEER_COMPARISONS},
                    "nfe_per_image": {n: p["costs"][n]["nfe_per_image"] for n in p["scores"]},
                    "auroc": {k: {n: p["comparisons"][k][n].get("auroc") for n in p["scores"]}
                              for k, _ in PEER_COMPARISONS}}
  if "agreement" in summary:
    a = summary["agreement"]
    out["agreement"] = {"n": a["n"], "estimators": {
        n: {k: v.get(k) for k in ("rho", "p", "nfe_per_image", "seconds_per_image")}
        for n, v in a["estimators"].items()}}
    out["primary_cost"] = summary.get("peers", {}).get("costs", {}).get(e)
  return out


def render_main(s: dict[str, Any]) -> str:
  """The results of the main job: the claims table, copies, Spearman, stage times, peers."""
  e = s["primary_estimator"]
  st = s["primary"]
  rows = []
  for key, name in COMPARISONS:
    c = st[key]
    if not c.get("available", True) or "n_pos" not in c:
      rows.append([name, "-", "-", "-", "-", f"n/a: {c.get('reason', 'not testable')}"])
      continue
    rows.append([name, f"{c['n_pos']} / {c['n_neg']}", f"{c['mean_pos']:.1f} vs {c['mean_neg']:.1f}",
                 fmt_p(c["welch_p"]), fmt_p(c["mw_p"]),
                 f"{c['auroc']:.3f} [{c['auroc_lo']:.3f}, {c['auroc_hi']:.3f}]"])
  lines = [f"Measured on {s.get('hardware', 'an unnamed machine')} with {s.get('command', 'command 1')} "
           f"(primary estimator `{e}`):", "",
           table(["comparison", "n", "mean L", "Welch p", "Mann-Whitney p", "AUROC [95% CI]"], rows), ""]
  singles = st.get("memorised_vs_not_singletons", {}).get("n_pos", 0) if st.get(
      "memorised_vs_not_singletons", {}).get("available", True) else 0
  n_mem = s["num_memorised_ratio"]
  claims = s["claims"]
  held = [name for key, name in (("trained_gt_heldout", "trained images have larger log volume growth than "
                                  "held-out ones"), ("memorised_gt_not", "the images the model reproduces have "
                                  "larger log volume growth than the other training images"))
          if claims[key].get("supported")]
  lines.append(
      f"{fmt(s['num_copied_samples_ratio'])} of the {s['num_samples']} samples are copies of a training image "
      f"(d(x', NN1)/d(x', NN2) < {s['ratio_threshold']:.3g}), of {n_mem} distinct images: "
      f"{n_mem - singles} of the {s['num_planted_duplicates']} planted duplicates and {singles} singletons. "
      + (f"At p < {s['alpha']:g}: " + "; ".join(held) + "." if held else
         f"Neither of the paper's claims holds at p < {s['alpha']:g}."))
  sp = st.get("spearman_copies_ratio", {})
  lines.append(f"Spearman correlation of the score with the copy count: {fmt(sp.get('rho'), 3)} "
               f"(p = {fmt_p(sp.get('p'))}).")
  t = s.get("timings_s") or {}
  if t:
    order = [k for k in STAGES if k in t] + sorted(k for k in t if k not in STAGES)
    lines.append("Wall time per stage: " + ", ".join(f"{k} {float(t[k]):.0f} s" for k in order)
                 + f" ({sum(float(v) for v in t.values()) / 60:.1f} min in all).")
  if "peers" in s:
    p = s["peers"]
    rows = []
    for n in p["scores"]:
      cells = []
      for key, _ in PEER_COMPARISONS:
        a = p["auroc"][key][n]
        text = "n/a" if a is None else f"{a:.3f}"
        cells.append(f"**{text}**" if n in p["best"][key] else text)
      rows.append([f"`{n}`"] + cells + [fmt(p["nfe_per_image"][n])])
    lines += ["", "AUROC of every score on the same checkpoint (best per column in bold) and network passes "
              "(forward + JVP) per image:", "",
              table(["score"] + [name for _, name in PEER_COMPARISONS] + ["passes / image"], rows)]
  if "agreement" in s:
    a = s["agreement"]
    pc = s.get("primary_cost") or {}
    for n, v in a["estimators"].items():
      lines += ["", f"Estimator agreement on {a['n']} training images: `{n}` against `{e}`, Spearman rho = "
                f"{fmt(v['rho'], 3)} (p = {fmt_p(v['p'])}), at {fmt(v['nfe_per_image'])} network passes per image "
                f"against {fmt(pc.get('nfe_per_image'))} ({fmt(v['seconds_per_image'], 3)} s vs "
                f"{fmt(pc.get('seconds_per_image'), 3)} s per image)."]
  return "\n".join(lines)


# --- the mitigation stage --------------------------------------------------------------


GROUP_COLUMNS = (("copies", "copies"), ("copied_images", "distinct images copied"), ("targeted", "targeted"),
                 ("fd", "FD (held-out)"), ("precision", "precision"), ("recall", "recall"))
TEST_COLUMNS = (("copies", "copies"), ("copied_images", "distinct copied"), ("fd", "FD"))


def extract_mitigate(summary: dict[str, Any]) -> dict[str, Any]:
  """The part of a mitigation summary.json the README's tables use."""
  keep_g = ("regime", "group", "num_selected", "seeds") + tuple(
      f"{m}_{k}" for m, _ in GROUP_COLUMNS for k in ("mean", "sd", "n"))
  keep_t = tuple(m for m, _ in TEST_COLUMNS)
  keep_p = ("welch_p", "welch_p_holm") + (("welch_q_bh",) if "primary" in summary else ())
  out = {"baselines": {r: {k: b.get(k) for k in ("num_samples", "copies", "copied_images", "num_train")}
                       for r, b in summary["baselines"].items()},
         "groups": [{k: g.get(k) for k in keep_g} for g in summary["groups"]],
         "tests": [{"regime": t["regime"], "a": t["a"], "b": t["b"], "targeted_diff": t.get("targeted_diff"),
                    **{m: {k: t[m].get(k) for k in keep_p} for m in keep_t}}
                   for t in summary["tests"]]}
  if "primary" in summary:  # a plan with the pre-registered comparison: it, and BH over the rest
    out["primary"] = summary["primary"]
    out["num_arms"] = len(summary["arms"])
    out["num_arms_planned"] = summary.get("num_arms_planned") or out["num_arms"]
  return out


def mean_sd_n(mean: Any, sd: Any, n: Any, digits: int = 3, missing: str = "n/a") -> str:
  """'mean ± sd (n)' as memvol.report.fmt_ms prints it."""
  if mean is None:
    return missing
  return fmt(mean, digits) + ("" if sd is None else f" ± {fmt(sd, 2)}") + ("" if n is None else f" ({n})")


def _mean_sd(g: dict[str, Any], m: str) -> str:
  return mean_sd_n(g.get(f"{m}_mean"), g.get(f"{m}_sd"), g.get(f"{m}_n"), missing="-")


def _adjusted(t: dict[str, Any], m: str, key: str, pr: dict[str, Any] | None) -> str:
  """A test cell's adjusted p; the primary comparison's own cell is in no secondary family."""
  if pr and (t["a"], t["b"], m) == (pr["a"], pr["b"], pr["metric"]):
    return "primary"
  return fmt_p(t[m].get(key))


def render_mitigate(s: dict[str, Any]) -> str:
  """Per regime: the arm groups (mean ± sd (n) over seeds) and the tests (Welch p, raw and
  Holm-adjusted over all tests of the regime in the summary); for a plan with the primary
  comparison, it and its verdict first, and BH q over the secondary tests in place of Holm."""
  from memvol.mitigate import outputs as mitigate_outputs
  out = []
  if "primary" in s:
    out += [f"Arms done: {s['num_arms']} of {s['num_arms_planned']} planned.", ""]
  for regime, base in s["baselines"].items():
    gs = [g for g in s["groups"] if g["regime"] == regime]
    pr = s.get("primary", {}).get(regime)
    out += [f"**{regime}** (baseline: {base['copies']} copies of {base['num_samples']}, "
            f"{base['copied_images']} of {base['num_train']} images copied)", ""]
    out += mitigate_outputs.primary_lines(pr) if pr else []
    out += [table(["arm group", "k"] + [name for _, name in GROUP_COLUMNS],
                  [[g["group"], "/".join(str(k) for k in sorted(set(g["num_selected"])))]
                   + [_mean_sd(g, m) for m, _ in GROUP_COLUMNS] for g in gs]), ""]
    ts = [t for t in s["tests"] if t["regime"] == regime]
    adj, adj_label = ("welch_q_bh", "BH q over the secondary family") if pr else ("welch_p_holm", "Holm-adjusted")
    if ts:
      out += [table([f"test: Welch p over seeds ({adj_label})"] + [name for _, name in TEST_COLUMNS]
                    + ["targeted a - b"],
                    [[f"{t['a']} vs {t['b']}"]
                     + [f"{fmt_p(t[m]['welch_p'])} ({_adjusted(t, m, adj, pr)})" for m, _ in TEST_COLUMNS]
                     + [fmt(t.get("targeted_diff"), 3)] for t in ts]), ""]
  return "\n".join(out).rstrip("\n")


# --- the benchmark stage ---------------------------------------------------------------


BENCH_KEYS = ("models_done", "num_models_planned", "complete", "pool_size", "num_samples", "num_bootstrap", "choice",
              "scores", "primary", "leaderboard", "ranking_T2", "front_T2", "secondary", "num_secondary", "correction",
              "copies", "seconds_per_model", "compile_share", "label_names", "label_rho", "typicality", "predictors",
              "holds_under_all", "seconds_total", "sampler")


def extract_bench(summary: dict[str, Any]) -> dict[str, Any]:
  """The part of a benchmark summary.json the README's block uses (the per-image lists stay out)."""
  labels = {k: {f: v for f, v in lb.items() if f != "p"} for k, lb in summary["labels"].items()}
  return {k: summary[k] for k in BENCH_KEYS} | {"labels": labels}


def render_bench(s: dict[str, Any]) -> str:
  """The plan, the primary test and its verdict, the leaderboards, the significant secondary
  tests and the cost (memvol.bench.outputs.readme_markdown)."""
  from memvol.bench import outputs
  return outputs.readme_markdown(s)


BENCH_PLANS = {"digits_bench": "sklearn digits 8x8, MLP", "mnist_bench": "MNIST 14x14, UNet"}
SIDE_BY_SIDE = "bench_plans"  # the README block that sets the benchmark plans' copies side by side


def render_side_by_side(copies: dict[str, dict[str, Any]]) -> str:
  """One table, a column per benchmark plan (BENCH_PLANS, "no records yet" for a plan without
  a committed copy): its size, the co-primary tests, T1-T5 of the leading scores, the
  typicality share and the nearest-neighbour predictor, per copy label where it has them."""
  from memvol.bench import analysis  # noqa: PLC0415
  names = list(BENCH_PLANS) + sorted(n for n in copies if n not in BENCH_PLANS)
  lead = (analysis.RANK32, analysis.BASELINE, f"lira_off_{analysis.RANK32}")

  def cell(name: str, fn) -> str:
    s = copies.get(name)
    if s is None:
      return "no records yet"
    try:
      return fn(s)
    except KeyError:
      return "n/a"

  def test(i: int):
    return lambda s: (f"{fmt(s['primary']['tests'][i]['estimate'], 3)} [{fmt(s['primary']['tests'][i]['ci'][0], 3)}, "
                      f"{fmt(s['primary']['tests'][i]['ci'][1], 3)}] **{s['primary']['tests'][i]['verdict'].split(' (')[0]}**")

  rows = [["plan", lambda s: f"{s['pool_size']} images, {len(s['models_done'])} of {s['num_models_planned']} models, "
                             f"{s['choice']['train_steps']} steps, {s['num_samples']} samples"],
          ["IN images copied (ratio)", lambda s: mean_sd_n(**s["copies"]["IN_share_copied"])],
          ["copy labels", lambda s: ", ".join(s["label_names"])]]
  rows += [[f"{t['id']}: {t['name']}", test(i)] for i, t in enumerate(analysis.PRIMARIES)]
  for n in lead:
    rows += [[f"T1 AUROC `{n}`", lambda s, n=n: mean_sd_n(**s["leaderboard"][n]["T1_auroc"])],
             [f"T2 AUROC `{n}`", lambda s, n=n: " / ".join(fmt(s["labels"][k]["scores"][n]["T2_auroc"], 3)
                                                           for k in s["label_names"])],
             [f"T3 rho `{n}`", lambda s, n=n: " / ".join(fmt(s["labels"][k]["scores"][n]["T3_spearman"], 3)
                                                         for k in s["label_names"])],
             [f"T5 rho `{n}`", lambda s, n=n: " / ".join(fmt(s["labels"][k]["scores"][n]["T5_spearman"], 3)
                                                         for k in s["label_names"])]]
  rows += [[f"typicality `{analysis.RANK32}`", lambda s: fmt(s["typicality"][analysis.RANK32]["rho"], 2)],
           ["`nn1_pixel` vs p_i", lambda s: " / ".join(fmt(s["predictors"][k]["rows"]["nn1_pixel"]["rho_p"], 2)
                                                       for k in s["label_names"])]]
  return ("Per label where a plan has several (ratio / absolute / closest). T2, T3, T5 and the predictor are "
          "read per label; P1-P3 on the ratio label.\n\n"
          + table(["", *[f"{n} ({BENCH_PLANS.get(n, 'benchmark')})" for n in names]],
                  [[r[0], *[cell(n, r[1]) for n in names]] for r in rows]))


def bench_copies(results: str = RESULTS) -> dict[str, dict[str, Any]]:
  """{name: copy} of the committed benchmark copies."""
  out = {}
  for p in sorted(glob.glob(os.path.join(results, "*.summary.json"))):
    with open(p) as f:
      c = json.load(f)
    if c.get("kind") == "bench":
      out[os.path.basename(p)[: -len(".summary.json")]] = c
  return out


# --- README blocks --------------------------------------------------------------------


RENDER = {"main": (extract_main, render_main), "mitigate": (extract_mitigate, render_mitigate),
          "bench": (extract_bench, render_bench)}


def render(copy: dict[str, Any]) -> str:
  """Markdown of a committed copy (its `kind` says which renderer)."""
  return RENDER[copy["kind"]][1](copy)


def _block(name: str) -> re.Pattern:
  return re.compile(rf"(<!-- results:{re.escape(name)} -->\n)(.*?)(<!-- /results:{re.escape(name)} -->)", re.S)


def readme_block(text: str, name: str) -> str | None:
  """The text between the block's marker lines (without the newline before the end marker)."""
  m = _block(name).search(text)
  return None if m is None else m.group(2).removesuffix("\n")


def replace_block(text: str, name: str, body: str) -> str:
  if readme_block(text, name) is None:
    raise ValueError(f"README.md has no block <!-- results:{name} --> ... <!-- /results:{name} -->: "
                     "put the two marker lines where the rendered text belongs")
  return _block(name).sub(lambda m: m.group(1) + body + "\n" + m.group(3), text, count=1)


def make_block(text: str, name: str, start: str, end: str) -> str:
  """text with the lines from the one starting with `start` up to the one starting with
  `end` (excluded) replaced by an empty block `name`."""
  lines = text.split("\n")
  i = next((k for k, l in enumerate(lines) if l.startswith(start)), None)
  j = next((k for k, l in enumerate(lines) if i is not None and k > i and l.startswith(end)), None)
  if i is None or j is None:
    raise ValueError(f"README.md has no line starting with {start!r} followed by one starting with {end!r}")
  return "\n".join(lines[:i] + [f"<!-- results:{name} -->", f"<!-- /results:{name} -->", ""] + lines[j:])


def rendered_copies(results: str = RESULTS) -> dict[str, tuple[str, str]]:
  """{name: (path, rendered text)} of every committed copy docs/results/<name>.summary.json."""
  out = {}
  for p in sorted(glob.glob(os.path.join(results, "*.summary.json"))):
    with open(p) as f:
      out[os.path.basename(p)[: -len(".summary.json")]] = (p, render(json.load(f)))
  return out


def check(readme: str = README, results: str = RESULTS) -> list[str]:
  """Why the README's blocks disagree with the committed copies ([] when they agree)."""
  text = open(readme).read()
  problems = []
  copies = rendered_copies(results)
  for name, (p, body) in copies.items():
    got = readme_block(text, name)
    if got is None:
      problems.append(f"README.md has no block results:{name} for {os.path.relpath(p, ROOT)}")
    elif got != body:
      problems.append(f"README.md block results:{name} differs from the rendering of {os.path.relpath(p, ROOT)}; "
                      f"run python scripts/render_results.py --write ...")
  side = readme_block(text, SIDE_BY_SIDE)
  if side is not None and side != render_side_by_side(bench_copies(results)):
    problems.append(f"README.md block results:{SIDE_BY_SIDE} differs from the benchmark copies' side-by-side table; "
                    "run python scripts/render_results.py --refresh")
  for name in re.findall(r"<!-- results:([\w.-]+) -->", text):
    if name not in copies and name != SIDE_BY_SIDE:
      problems.append(f"README.md block results:{name} has no committed copy docs/results/{name}.summary.json")
  return problems


def with_side_by_side(text: str) -> str:
  """text with its side-by-side benchmark block (if it has one) rendered from the copies."""
  if readme_block(text, SIDE_BY_SIDE) is None:
    return text
  return replace_block(text, SIDE_BY_SIDE, render_side_by_side(bench_copies()))


def _write_atomic(path: str, content: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(content)
  os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--main", help="workdir of the main job (reads report/summary.json)")
  ap.add_argument("--mitigate", help="workdir of a mitigation run (reads mitigate/summary.json)")
  ap.add_argument("--bench", help="workdir of a benchmark run (reads bench/summary.json)")
  ap.add_argument("--name", help="block / copy name (default: mnist, mnist_mitigate or digits_bench)")
  ap.add_argument("--hardware", default="", help="the machine the run was measured on, e.g. '2 CPU cores'")
  ap.add_argument("--command", default="", help="the command that made the workdir, as the README names it")
  ap.add_argument("--write", action="store_true", help="save the copy and replace the README block")
  ap.add_argument("--check", action="store_true", help="exit 1 when a README block disagrees with its copy")
  ap.add_argument("--refresh", action="store_true", help="re-render every README block from its committed copy")
  ap.add_argument("--region", nargs=2, metavar=("START", "END"),
                  help="with --write, where the README has no block yet: make one of these lines")
  args = ap.parse_args(argv)
  if args.check:
    problems = check()
    for p in problems:
      print(p)
    if not problems:
      print("README.md: every results block agrees with docs/results/")
    return 1 if problems else 0
  if args.refresh:
    text = open(README).read()
    for name, (_, body) in rendered_copies().items():
      text = replace_block(text, name, body)
    text = with_side_by_side(text)
    _write_atomic(README, text)
    print("README.md: every results block re-rendered from docs/results/")
    return 0
  given = {k: v for k, v in (("main", args.main), ("mitigate", args.mitigate), ("bench", args.bench)) if v}
  if len(given) != 1:
    ap.error("give one of --main, --mitigate, --bench (or --check)")
  (kind, wd), = given.items()
  path = os.path.join(wd, {"main": "report", "mitigate": "mitigate", "bench": "bench"}[kind], "summary.json")
  with open(path) as f:
    summary = json.load(f)
  copy = {"kind": kind, **RENDER[kind][0](summary)}
  if kind == "main":
    copy["hardware"] = args.hardware or "an unnamed machine"
    copy["command"] = args.command or "command 1"
  body = render(copy)
  if not args.write:
    print(body)
    return 0
  name = args.name or {"main": "mnist", "mitigate": "mnist_mitigate", "bench": "digits_bench"}[kind]
  text = open(README).read()
  if args.region and readme_block(text, name) is None:
    text = make_block(text, name, *args.region)
  text = replace_block(text, name, body)
  os.makedirs(RESULTS, exist_ok=True)
  _write_atomic(os.path.join(RESULTS, f"{name}.summary.json"), json.dumps(copy, indent=1, sort_keys=True) + "\n")
  if kind == "bench":
    text = with_side_by_side(text)
  if kind == "mitigate":
    records = {"baselines": summary["baselines"], "arms": summary["arms"]}
    _write_atomic(os.path.join(RESULTS, f"{name}.records.json"), json.dumps(records, indent=1, sort_keys=True) + "\n")
  _write_atomic(README, text)
  print(f"wrote {os.path.relpath(os.path.join(RESULTS, name + '.summary.json'), ROOT)} and README.md block results:{name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
