"""Check a finished benchmark run (CI): every planned model has its record in summary.json,
each of the three co-primary tests has its statement, numbers, Holm p and verdict, every
score its leaderboard row with costs, every secondary test its q, every number is finite,
every null is one summary.json names under `not_estimated` (with the reason), and report.md
and the figures exist. Values are not judged.

  python scripts/check_bench.py WORKDIR        # exit 0 when sound, 1 with the reason
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_report import _numbers, unexpected_nulls  # noqa: E402

FIGURES = ("primary.png", "propensity.png", "frontier.png", "predictors.png")  # = memvol.bench.outputs.FIGURES
PRIMARY_IDS = ("P1", "P2", "P3")  # = memvol.bench.analysis.PRIMARIES
TEST_KEYS = ("a", "b", "task", "test", "interval", "estimate", "ci", "p", "p_holm", "verdict", "keeps_sign")
ROW_KEYS = ("T1_auroc", "T1_tpr@0.01", "T1_tpr@0.001", "T2_auroc", "T3_spearman", "T5_spearman", "passes_per_image",
            "seconds_per_image")


def main(workdir: str) -> int:
  folder = os.path.join(workdir, "bench")
  with open(os.path.join(folder, "summary.json")) as f:
    s = json.load(f)
  if not s.get("complete") or len(s.get("models_done", [])) != s.get("num_models_planned"):
    print(f"{folder}: models {s.get('models_done')} done of {s.get('num_models_planned')} planned")
    return 1
  tests = s.get("primary", {}).get("tests", [])
  missing = ([i for i in PRIMARY_IDS if i not in [t.get("id") for t in tests]]
             + [f"{t.get('id')}.{k}" for t in tests for k in TEST_KEYS if k not in t])
  rows = s.get("leaderboard", {})
  lacking = [n for n in s.get("scores", []) if n not in rows or any(k not in rows[n] for k in ROW_KEYS)]
  untested = [t for t in s.get("secondary", []) if "q" not in t]
  if missing or lacking or untested or not s.get("scores"):
    print(f"{folder}: primary lacks {missing}; leaderboard rows missing or short for {lacking}; "
          f"{len(untested)} secondary tests without q")
    return 1
  bad = [(p, v) for p, v in _numbers(s) if not math.isfinite(v)]
  nulls = unexpected_nulls(s)
  if bad or nulls:
    print(f"{folder}/summary.json: not finite {bad[:10]}; nulls not named in not_estimated: {nulls[:20]}")
    return 1
  absent = [f for f in FIGURES + ("report.md",) if not os.path.exists(os.path.join(folder, f))
            or os.path.getsize(os.path.join(folder, f)) == 0]
  if absent:
    print(f"{folder}: missing or empty {absent}")
    return 1
  verdicts = ", ".join(f"{t['id']} {t['verdict']}" for t in tests)
  print(f"{folder}: {len(s['models_done'])} models, {len(s['scores'])} scores, {s['num_secondary']} secondary tests "
        f"corrected, all numbers finite, {len(s.get('not_estimated', {}))} expected nulls; {verdicts}")
  return 0


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit(__doc__)
  sys.exit(main(sys.argv[1]))
