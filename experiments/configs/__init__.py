"""Experiment configs: one `get_config(arg)` per file; `load` reads one by path for scripts."""

from __future__ import annotations

import importlib.util
import os

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(spec: str):
  """The ConfigDict of a config file given as 'path[:arg]' (as --config takes it); a relative
  path is read from the repo root."""
  path, _, arg = spec.partition(":")
  path = path if os.path.isabs(path) else os.path.join(_ROOT, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location("memvol_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
