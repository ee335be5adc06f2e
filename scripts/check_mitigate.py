"""Check a finished mitigation run (CI): every planned arm is in summary.json with the
required fields, its counts are whole and its quality numbers finite, every null of
summary.json is one it names under `not_estimated` (with the reason), and the figure exists.

  python scripts/check_mitigate.py WORKDIR        # exit 0 when sound, 1 with the reason
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_report import unexpected_nulls  # noqa: E402

REQUIRED = ("selection", "modification", "seed", "num_selected", "copies", "copied_images")
FINITE = ("fd", "kid", "precision", "recall", "final_loss")


def main(workdir: str) -> int:
  folder = os.path.join(workdir, "mitigate")
  with open(os.path.join(folder, "summary.json")) as f:
    summary = json.load(f)
  arms = summary.get("arms", [])
  if not arms or len(arms) != summary.get("num_arms_planned"):
    print(f"{folder}: {len(arms)} arms in summary.json, {summary.get('num_arms_planned')} planned")
    return 1
  for a in arms:
    missing = [k for k in REQUIRED if k not in a]
    bad = [k for k in FINITE if not (isinstance(a.get(k), (int, float)) and math.isfinite(a[k]))]
    counts = [k for k in ("copies", "copied_images", "num_selected") if not isinstance(a.get(k), int) or a[k] < 0]
    if missing or bad or counts:
      print(f"arm {a.get('arm')}: missing {missing}, not finite {bad}, bad counts {counts}")
      return 1
  nulls = unexpected_nulls(summary)
  if nulls:
    print(f"{folder}/summary.json: {len(nulls)} nulls that are not expected (not in not_estimated): "
          + ", ".join(nulls[:20]))
    return 1
  pngs = [f for f in os.listdir(folder) if f.endswith(".png")]
  if not pngs or not os.path.exists(os.path.join(folder, "report.md")):
    print(f"{folder}: no report.md or no PNG")
    return 1
  print(f"{folder}: {len(arms)} arms, all fields present and finite, "
        f"{len(summary.get('not_estimated', {}))} expected nulls; {len(pngs)} PNGs")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
