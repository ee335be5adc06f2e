"""The tiniest real chain (no mocks): sklearn 8x8 digits, a 1-layer MLP of width 16, 20
training steps, 8 reverse-SDE samples, exact scores by 8 fixed Euler steps. One set of
overrides of experiments/configs/digits.py:quick, usable in-process (`config()`) and on the
command line of `python -m experiments.main` (`flags()`)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/configs/digits.py:quick"
OVERRIDES = {
    "data.num_train": 12, "data.num_heldout": 12, "data.num_duplicated": 2, "data.duplicate_factor": 3,
    "model.hidden": 16, "model.num_layers": 1,
    "train.num_steps": 20, "train.batch_size": 8, "train.warmup_steps": 5, "train.log_every": 10,
    "train.ckpt_every": 10,
    "sample.methods": ("sde",), "sample.num_samples": 8, "sample.batch_size": 8, "sample.sde_steps": 10,
    "score.estimators": ("exact",), "score.batch_size": 8, "score.adaptive": False, "score.num_steps": 8,
    "score.profile_times": 3, "score.solver": "euler",
    "detect.carlini_n": 4, "report.num_bootstrap": 20, "report.top_k": 2,
}


def config(**changes):
  """digits.py:quick with OVERRIDES, then `changes` ('section.field' -> value; '__' for '.')."""
  from experiments.configs import digits
  c = digits.get_config("quick")
  for k, v in {**OVERRIDES, **{k.replace("__", "."): v for k, v in changes.items()}}.items():
    section, field = k.split(".")
    c[section][field] = v
  return c


def flags(**changes) -> list[str]:
  """The same config as `config(**changes)`, as command-line flags of experiments.main."""
  out = [f"--config={CONFIG}"]
  for k, v in {**OVERRIDES, **{k.replace("__", "."): v for k, v in changes.items()}}.items():
    out.append(f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}")
  return out


def main_command(workdir: str, *extra: str, **changes) -> list[str]:
  return [sys.executable, "-m", "experiments.main", f"--workdir={workdir}", *flags(**changes), *extra]


def env() -> dict[str, str]:
  """Environment for child processes: this checkout (and tests/) first on the path, one CPU
  device."""
  tests = os.path.join(ROOT, "tests")
  e = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, tests, os.environ.get("PYTHONPATH", "")]))
  e["XLA_FLAGS"] = " ".join(f for f in e.get("XLA_FLAGS", "").split() if "device_count" not in f)
  e["JAX_PLATFORMS"] = "cpu"
  return e


def popen(workdir: str, *extra: str, **changes) -> subprocess.Popen:
  return subprocess.Popen(main_command(workdir, *extra, **changes), cwd=ROOT, env=env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_main(workdir: str, *extra: str, timeout: float = 120, **changes) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(workdir, *extra, **changes), cwd=ROOT, env=env(), text=True,
                        capture_output=True, timeout=timeout)
