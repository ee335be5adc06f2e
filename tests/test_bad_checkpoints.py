"""Files that are not what a newcomer says they are, for every format: memvol's loader on
a damaged safetensors file, and scripts/convert_torch_checkpoint.py on garbage, empty,
truncated and other formats' checkpoints. Each is one line naming the file and what was
expected, and nothing is written. Cases that need torch to make the file (truncated
archives, pickles of modules, another format's checkpoint) run the converter in a
subprocess and skip only when torch is not installed (CI installs '.[test]' only)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from memvol import pretrained
from memvol.interop import folders

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SCRIPT = os.path.join(ROOT, "scripts", "convert_torch_checkpoint.py")
FORMATS = ("diffusers", "pytorch-ddpm", "hasegawa", "edm")


def _converter():
  spec = importlib.util.spec_from_file_location("convert_torch_checkpoint", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("folder", ["ddpm_unet", "edm_ncsnpp"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_is_one_error_naming_the_file(tmp_path, folder, damage):
  dst = tmp_path / folder
  shutil.copytree(os.path.join(FIXTURES, folder), dst)
  weights = dst / folders.WEIGHTS_FILE
  data = weights.read_bytes()
  weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(5000), "empty": b""}[damage])
  with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file .*expected the weights written by"):
    pretrained.load_model(str(dst))
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    pretrained.load_eps_fn(str(dst))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("damage", ["garbage", "empty", "missing"])
def test_garbage_checkpoint_is_refused_before_torch(tmp_path, fmt, damage):
  """A random 5 kB file, an empty one or a missing path, under every --format: one line
  naming it and the expected kind, nothing written, torch never imported."""
  ckpt = tmp_path / "ckpt.pt"
  if damage != "missing":
    ckpt.write_bytes(b"" if damage == "empty" else b"\x13" + os.urandom(5000))
  out = tmp_path / "out"
  with pytest.raises(SystemExit) as e:
    _converter().main([str(ckpt), str(out), f"--format={fmt}", "--edm_repo=/nowhere", "--source=/nowhere",
                       "--config=/nowhere.yaml"])
  msg = str(e.value.code)
  assert "\n" not in msg and msg.startswith("error: ") and str(ckpt) in msg, msg
  if damage == "missing":
    assert "does not exist" in msg
  else:
    assert f"is not a {_converter().EXPECTED[fmt]}: " in msg
    assert ("an empty file" if damage == "empty" else "neither a torch archive nor a pickle") in msg
  assert not out.exists()
  assert "torch" not in sys.modules


def test_sniff():
  conv = _converter()
  assert conv.sniff(os.path.join(FIXTURES, "ddpm_unet", "config.json")) == "unknown"
  with pytest.raises(FileNotFoundError, match="does not exist"):
    conv.sniff("/no/such/file.pt")


_TORCH_CASES = r'''
import json, os, pickle, sys
import torch
sys.path.insert(0, os.path.join(sys.argv[1], "scripts"))
import convert_torch_checkpoint as conv
tmp = sys.argv[2]
os.makedirs(os.path.join(tmp, "edm_repo", "torch_utils"))
ddpm = os.path.join(tmp, "ckpt.pt")  # a pytorch-ddpm trainer's file (shapes irrelevant here)
torch.save({"net_model": {"head.weight": torch.zeros(2)}, "ema_model": {"head.weight": torch.zeros(2)}, "step": 0}, ddpm)
snapshot = os.path.join(tmp, "network-snapshot-000000.pkl")  # a plain pickle of modules, as NVlabs/edm writes
with open(snapshot, "wb") as f:
  pickle.dump({"ema": torch.nn.Linear(2, 2), "loss_fn": None}, f)
state = os.path.join(tmp, "training-state-000000.pt")  # torch.save of modules
torch.save({"net": torch.nn.Linear(2, 2)}, state)
cut = lambda src, dst: open(dst, "wb").write(open(src, "rb").read()[: os.path.getsize(src) // 2]) and dst
cases = {
    "truncated_ddpm": [cut(ddpm, os.path.join(tmp, "cut.pt")), "--format=pytorch-ddpm"],
    "truncated_diffusers": [os.path.join(tmp, "cut.pt"), "--format=diffusers"],
    "edm_as_ddpm": [snapshot, "--format=pytorch-ddpm"],
    "edm_state_as_ddpm": [state, "--format=pytorch-ddpm"],
    "ddpm_as_edm": [ddpm, "--format=edm"],
    "truncated_edm": [cut(snapshot, os.path.join(tmp, "cut.pkl")), "--format=edm"],
    "not_a_precond": [snapshot, "--format=edm"],
    "ema_from_state": [state, "--format=edm"],
    "no_edm_repo": [snapshot, "--format=edm", "--edm_repo="],
}
result = {}
for name, (ckpt, *flags) in cases.items():
  out = os.path.join(tmp, "out_" + name)
  if "--format=edm" in flags and not any(f.startswith("--edm_repo") for f in flags):
    flags.append("--edm_repo=" + os.path.join(tmp, "edm_repo"))
  try:
    conv.main([ckpt, out] + flags)
    result[name] = [None, os.path.exists(out)]
  except SystemExit as e:
    result[name] = [str(e.code), os.path.exists(out)]
print(json.dumps(result))
'''


def test_other_formats_and_truncated_checkpoints_need_torch(tmp_path):
  """Made with torch, in a subprocess (tests that import the converter's numpy mapping
  assert torch is absent): a truncated torch archive as pytorch-ddpm or diffusers, an EDM
  pickle (or training state) as pytorch-ddpm, a pytorch-ddpm ckpt as edm, a truncated EDM
  pickle, an EDM pickle without a preconditioned network or without the asked weights, and
  --format=edm without a checkout: one line each, naming the file, nothing written."""
  if importlib.util.find_spec("torch") is None:  # not importorskip: torch must stay out of this process
    pytest.skip("torch is not installed")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _TORCH_CASES, ROOT, str(tmp_path)], capture_output=True, text=True,
                        env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  expect = {
      "truncated_ddpm": r"cut.pt is not a pytorch-ddpm ckpt.pt: a damaged or truncated torch archive",
      "truncated_diffusers": r"cut.pt is not a diffusers UNet2DModel checkpoint: a damaged or truncated torch archive",
      "edm_as_ddpm": r"network-snapshot-000000.pkl is not a pytorch-ddpm ckpt.pt: it pickles code objects.*--format=edm",
      "edm_state_as_ddpm": r"training-state-000000.pt is not a pytorch-ddpm ckpt.pt: it pickles code objects",
      "ddpm_as_edm": r"ckpt.pt is not an NVlabs/edm checkpoint: it holds ema_model / net_model.*--format=pytorch-ddpm",
      "truncated_edm": r"cut.pkl is not a NVlabs/edm network-snapshot .pkl or training-state .pt: an unreadable or truncated pickle",
      "not_a_precond": r"network-snapshot-000000.pkl: 'ema' is Linear, not an NVlabs/edm preconditioned network",
      "ema_from_state": r"training-state-000000.pt is not an NVlabs/edm checkpoint with 'ema' weights .*choose with --weights",
      "no_edm_repo": r"--format=edm needs --edm_repo=PATH",
  }
  import re
  for name, pattern in expect.items():
    msg, written = result[name]
    assert msg is not None and msg.startswith("error: ") and "\n" not in msg, (name, msg)
    assert re.search(pattern, msg), (name, msg)
    assert "weights_only=False" not in msg and not written, (name, msg)
    assert str(tmp_path) in msg, (name, msg)
