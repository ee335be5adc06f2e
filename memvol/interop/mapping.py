"""The mapping machinery every format shares, numpy over dictionaries: a format's spec
applied to its state dict (with the layout changes it names), and the torch <-> Flax
layouts of the folder's weights.

A spec row is (source key, folder key or None = read, checked, not kept, source shape,
layout change); LAYOUTS are the changes, source layout -> the folder's torch layout.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

Spec = list[tuple[str, "str | None", tuple[int, ...], str]]

LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda w: w,
    "conv1x1_to_linear": lambda w: w.reshape(w.shape[:2]),  # [O, I, 1, 1] -> [O, I]
    "nin_to_linear": lambda w: w.T,  # NIN's W [I, O] -> [O, I]
    "nin_to_conv1x1": lambda w: w.T[:, :, None, None],  # NIN's W [I, O] -> [O, I, 1, 1]
}


class MismatchError(ValueError):
  """A checkpoint that does not fit its config."""


def unwrap(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The state dict without DataParallel's `module.` prefix."""
  return {k.removeprefix("module."): v for k, v in state.items()}


def map_state(state: Mapping[str, np.ndarray], spec: Spec, what: str) -> dict[str, np.ndarray]:
  """The folder's state dict (float32) of a source state dict (numpy) by its spec.
  MismatchError naming the first parameter (in the spec's order) that is missing or
  misshapen, else the first unexpected one; `what` names the format."""
  out = {}
  for key, dst, shape, layout in spec:
    if key not in state:
      raise MismatchError(f"the {what} checkpoint does not fit its config: parameter {key} is missing "
                          f"(the config needs shape {shape})")
    w = np.asarray(state[key])
    if tuple(w.shape) != tuple(shape):
      raise MismatchError(f"the {what} checkpoint does not fit its config: parameter {key} has shape "
                          f"{tuple(w.shape)}, the config needs {tuple(shape)}")
    if dst is not None:
      out[dst] = np.ascontiguousarray(LAYOUTS[layout](w.astype(np.float32)))
  known = {row[0] for row in spec}
  extra = [k for k in state if k not in known]
  if extra:
    raise MismatchError(f"the {what} checkpoint does not fit its config: unexpected parameter {extra[0]}"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
  return out


def to_flax(w: np.ndarray) -> np.ndarray:
  """A torch-layout weight in Flax's: convolutions OIHW -> HWIO, linear weights transposed."""
  return w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T if w.ndim == 2 else w


def to_torch(w: np.ndarray) -> np.ndarray:
  """A Flax-layout weight in torch's (the inverse of to_flax)."""
  return w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T if w.ndim == 2 else w
