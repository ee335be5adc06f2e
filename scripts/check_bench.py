"""Check a finished benchmark run (CI): every planned seed is in summary.json, every score
has its per-seed records, aggregates, cost and leaderboard entries, every task its
cost-accuracy front, every number is finite, every null is one summary.json names under
`not_estimated` (with the reason), and report.md and both figures exist. Values are not
judged.

  python scripts/check_bench.py WORKDIR        # exit 0 when sound, 1 with the reason
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_report import _numbers, unexpected_nulls  # noqa: E402

TASKS = ("T1_auroc", "T2_auroc", "T3_spearman")  # = memvol.bench.TASKS
FIGURES = ("frontier.png", "dose_response.png")


def main(workdir: str) -> int:
  folder = os.path.join(workdir, "bench")
  with open(os.path.join(folder, "summary.json")) as f:
    s = json.load(f)
  if len(s.get("seeds_done", [])) != s.get("num_seeds_planned"):
    print(f"{folder}: seeds {s.get('seeds_done')} done of {s.get('num_seeds_planned')} planned")
    return 1
  names = s.get("scores", [])
  raw = [n for n in names if not n.startswith("cal_")]
  if not raw or sorted(f"cal_{n}" for n in raw) != sorted(n for n in names if n.startswith("cal_")):
    print(f"{folder}: scores {names}: every raw score needs its cal_ twin")
    return 1
  seen = {(r["score"], r["seed"]) for r in s.get("records", [])}
  missing = [(n, k) for n in names for k in s["seeds_done"] if (n, k) not in seen]
  lacking = [n for n in names if n not in s.get("aggregates", {})
             or "passes_per_image" not in s["aggregates"][n] or "seconds_per_image" not in s["aggregates"][n]]
  boards = s.get("leaderboard", {}).get("tasks", {})
  fronts = s.get("leaderboard", {}).get("pareto", {})
  if missing or lacking or sorted(boards) != sorted(TASKS) or sorted(fronts) != sorted(TASKS):
    print(f"{folder}: records missing {missing[:8]}, aggregates or cost missing for {lacking}, "
          f"leaderboard tasks {sorted(boards)}, Pareto fronts of {sorted(fronts)}")
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
  print(f"{folder}: {len(s['seeds_done'])} seeds, {len(names)} scores, "
        f"{s['leaderboard'].get('num_comparisons')} comparisons corrected, all numbers finite, "
        f"{len(s.get('not_estimated', {}))} expected nulls; winners "
        + ", ".join(f"{t}: {boards[t].get('winner') or 'none'}" for t in TASKS))
  return 0


if __name__ == "__main__":
  if len(sys.argv) != 2:
    print(__doc__)
    sys.exit(2)
  sys.exit(main(sys.argv[1]))
