"""Check that a workdir's report exists and every number in its summary.json is finite.

  python scripts/check_report.py runs/quick

Exits non-zero, naming what is missing or not finite (and, when scores.csv has peer_
columns, the peers comparison tables). A null passes only when summary.json names it under
`not_estimated` (a statistic the data cannot give, with the reason); any other null, and
any headline number the report found not finite, fails. Values are not judged.
"""

from __future__ import annotations

import json
import math
import os
import sys

PEER_COMPARISONS = ("trained_vs_heldout", "memorised_vs_not", "duplicates_vs_singletons",
                    "memorised_vs_not_singletons")  # = memvol.report.PEER_COMPARISONS


def _leaves(obj, path=""):
  """(path, value) of every leaf of a JSON tree."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _leaves(v, f"{path}.{k}" if path else str(k))
  elif isinstance(obj, (list, tuple)):
    for i, v in enumerate(obj):
      yield from _leaves(v, f"{path}[{i}]")
  else:
    yield path, obj


def _numbers(obj):
  """(path, float) of the numbers (not booleans) in a JSON tree."""
  return ((p, float(v)) for p, v in _leaves(obj) if isinstance(v, (int, float)) and not isinstance(v, bool))


def nulls(obj):
  """Paths of the nulls in a JSON tree."""
  return (p for p, v in _leaves(obj) if v is None)


def unexpected_nulls(summary: dict) -> list[str]:
  """The nulls of `summary` that its `not_estimated` does not name (itself left out)."""
  expected = summary.get("not_estimated", {})
  return [p for p in nulls({k: v for k, v in summary.items() if k != "not_estimated"}) if p not in expected]


def main(workdir: str) -> int:
  report = os.path.join(workdir, "report", "report.md")
  summary = os.path.join(workdir, "report", "summary.json")
  for p in (report, summary, os.path.join(workdir, "scores", "scores.csv"),
            os.path.join(workdir, "detect", "detect.csv")):
    if not os.path.exists(p) or os.path.getsize(p) == 0:
      print(f"missing or empty: {p}")
      return 1
  with open(summary) as f:
    nums = list(_numbers(json.load(f)))
  if not nums:
    print(f"{summary} holds no numbers")
    return 1
  required = ("trained_vs_heldout",)
  with open(summary) as f:
    data = json.load(f)
  text = json.dumps(data)
  for key in required:
    if key not in text:
      print(f"{summary} lacks {key}")
      return 1
  with open(os.path.join(workdir, "scores", "scores.csv")) as f:
    header = f.readline().strip().split(",")
  if any(c.startswith("peer_") for c in header):  # scored with peers: their tables must be there
    comps = data.get("peers", {}).get("comparisons", {})
    missing = [k for k in PEER_COMPARISONS if k not in comps]
    if missing:
      print(f"{summary} lacks the peers comparisons {missing}")
      return 1
  # NaN is written as null: only the nulls named in not_estimated are expected
  bad = [(p, v) for p, v in nums if not math.isfinite(v)]
  bad += [(p, None) for p in unexpected_nulls(data)]
  bad += [(p, math.nan) for p in data.get("nonfinite_headline", []) if (p, None) not in bad]
  pngs = [f for f in os.listdir(os.path.join(workdir, "report")) if f.endswith(".png")]
  print(f"{summary}: {len(nums)} numbers, {len(bad)} not finite, "
        f"{len(data.get('not_estimated', {}))} expected nulls; {len(pngs)} PNGs")
  for p, v in bad:
    print(f"  not finite: {p} = {v}")
  return 1 if bad or not pngs else 0


if __name__ == "__main__":
  if len(sys.argv) != 2:
    print(__doc__)
    sys.exit(2)
  sys.exit(main(sys.argv[1]))
