"""Formatting shared by every report (the main report, the mitigation stage, the benchmark):
numbers and p-values as text, markdown tables, and summary.json's nulls with their reasons."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


class NotEstimated(float):
  """NaN that is expected, with the reason: `jsonable` writes it as null and records the reason
  under summary.json's `not_estimated` (every other null is `undefined`)."""

  reason: str


def not_estimated(reason: str) -> float:
  x = NotEstimated(math.nan)
  x.reason = reason
  return x


def expected_nan(d: dict[str, Any], keys: tuple[str, ...], reason: str) -> None:
  """Mark the NaN values of d[keys] as expected, for `reason` (nothing when it is empty)."""
  for k in keys:
    if reason and isinstance(d.get(k), float) and not math.isfinite(d[k]) and not isinstance(d[k], NotEstimated):
      d[k] = not_estimated(reason)


def jsonable(obj: Any, path: str, undefined: list[str], expected: dict[str, str] | None = None) -> Any:
  """NaN / inf -> None, numpy scalars -> Python. A NotEstimated NaN is recorded with its
  reason in `expected` ({path: reason}); every other NaN, inf or None in `undefined`."""
  if isinstance(obj, dict):
    return {k: jsonable(v, f"{path}.{k}" if path else k, undefined, expected) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v, f"{path}[{i}]", undefined, expected) for i, v in enumerate(obj)]
  if obj is None:
    undefined.append(path)
    return None
  if isinstance(obj, NotEstimated) and expected is not None:
    expected[path] = obj.reason
    return None
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    if not math.isfinite(obj):
      undefined.append(path)
      return None
    return float(obj)
  return obj


def fmt_p(p: Any) -> str:
  if p is None or not math.isfinite(p):
    return "n/a"
  return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def fmt(x: Any, digits: int = 4) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  return f"{x:.{digits}g}"


def fmt_ms(mean: Any, sd: Any, n: Any, digits: int = 3, missing: str = "n/a") -> str:
  """'mean ± sd (n)', n = the finite values behind it; the sd is left out where it is not
  finite (one value), the whole cell is `missing` where the mean is."""
  if mean is None or not math.isfinite(mean):
    return missing
  text = fmt(mean, digits) + (f" ± {fmt(sd, 2)}" if sd is not None and math.isfinite(sd) else "")
  return text + ("" if n is None else f" ({int(n)})")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)
