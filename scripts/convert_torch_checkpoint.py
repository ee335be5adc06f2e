"""Convert a torch checkpoint into a folder memvol loads (config.json +
diffusion_pytorch_model.safetensors). Needs torch, which memvol itself does not depend on:
run it in a separate venv (diffusers only for pickled UNet2DModels).

  python3.11 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch safetensors numpy pyyaml
  /tmp/venv-torch/bin/python scripts/convert_torch_checkpoint.py CKPT OUT [--format=...]

--format=diffusers (default): a diffusers UNet2DModel, either pickled whole
  (torch.save(model): its state dict and config are used) or as a state dict (.pt / .pth /
  .ckpt / .bin, also nested under "state_dict", "ema", "ema_model" or "model", with or
  without DataParallel's "module." prefix) with --config=config.json, its UNet2DModel config.
--format=pytorch-ddpm: a ckpt.pt of w86763777/pytorch-ddpm's trainer (the CIFAR-10,
  CIFAR-100, SVHN and Tiny-ImageNet victims of PIA and SecMI), with --weights=ema (the
  ema_model state dict, default; the one PIA and SecMI attack) or net. The architecture comes
  from --flagfile (that trainer's absl flagfile: logdir/flagfile.txt or config/CIFAR10.txt;
  ch, ch_mult, attn, num_res_blocks, T, img_size), default its CIFAR-10 settings;
  --num-groups for a fork that changes its hard-coded GroupNorm(32). Its time
  embedding table (T x ch, interleaved sin / cos) is checked against the sinusoid memvol
  computes and not copied. Loaded with torch.load(weights_only=True): no code runs.
--format=hasegawa: a model file of Hasegawa & Yasuda's trainer
  (masa-longriver/Quantifying_the_Ease_of_Reproduction: torch.save of the whole
  DataParallel(UNet)), unpickled with --source=THEIR_REPO on sys.path, and --config=their
  dataset yaml (config/cifar10.yaml; config/model.yaml beside it is merged in, as their
  load_config does). Their trainer saves the training weights, not the EMA (theirs is
  applied only while evaluating). Every NIN layer's W and b are read from the module,
  registered as parameters or not (created with `.to(device)`, they are plain tensors when
  the device is a GPU, so absent from its state dict and never trained).

--format=edm: an NVlabs/edm network (Karras et al.; also what sail-sg/DiffMemorize trains):
  a network-snapshot-*.pkl (--weights=ema, default) or a training-state-*.pt (--weights=net),
  unpickled with --edm_repo=A_CHECKOUT_OF_NVlabs/edm on sys.path (its torch_utils and dnnlib).
  SongUNet (DDPM++, NCSN++) under VPPrecond, VEPrecond or EDMPrecond; config.json holds the
  network's constructor kwargs and `precond` (memvol/models/song_unet.py), the weights keep
  NVlabs' names without the `model.` prefix. Buffers are weights: NCSN++'s Fourier `freqs`
  are kept, every resample_filter is checked against the config's filter (memvol computes
  it), and the augmentation layer map_augment (augment_dim 9 in EDM's CIFAR-10 pickles),
  which sampling never uses, is dropped and listed in `_dropped_unused`. Refused by name:
  iDDPMPrecond, DhariwalUNet (ADM), class labels, skip encoders / decoders. Pickles written
  under numpy 2 (numpy._core) need numpy >= 2 in this venv.

The folder's config.json records `_source_format`, `_source_checkpoint` and (pytorch-ddpm,
edm) `_source_weights`. A file that is not a checkpoint of the named format (garbage, empty,
truncated, another format's) ends the run with one line naming it, and nothing is written.
A checkpoint whose shapes do not fit its config is refused, naming the first parameter; so
is every config value memvol's network cannot express. When memvol (jax,
flax) is importable too, the folder is loaded back; otherwise check it where memvol runs:
  python -c "from memvol import pretrained; pretrained.load_model('OUT')"

torch.load of a whole module (diffusers, hasegawa) and every NVlabs/edm pickle (the
persistence module stores the network's source and executes it on load) unpickle CKPT,
which runs code: convert only checkpoints you trust. memvol never unpickles weights itself.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Callable, Mapping

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memvol import interop  # noqa: E402  (numpy only: no jax needed here)
from memvol.interop import diffusers, edm, folders, hasegawa, pytorch_ddpm  # noqa: E402

NESTED = ("state_dict", "ema", "ema_model", "model")
FORMATS = tuple(interop.SOURCES)
EXPECTED = {name: module.EXPECTED for name, module in interop.SOURCES.items()}  # what a file should be


def sniff(path: str) -> str:
  """What the file at `path` is by its first bytes: "zip" (torch.save's archive), "pickle"
  (protocol 2+: a plain pickle or torch's legacy format), "empty" or "unknown".
  FileNotFoundError when it does not exist."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (or is not a file)")
  with open(path, "rb") as f:
    head = f.read(4)
  if not head:
    return "empty"
  return "zip" if head == b"PK\x03\x04" else "pickle" if head[:1] == b"\x80" else "unknown"


def load_checkpoint(path: str, what: str, weights_only: bool) -> Any:
  """torch.load(path) (on the CPU), or one ValueError naming `path` and `what` was expected
  when the file is not one: empty, garbage, truncated, or (weights_only) a pickle of code
  objects such as an NVlabs/edm network."""
  import pickle
  import torch
  kind = sniff(path)
  if kind in ("empty", "unknown"):
    raise ValueError(f"{path} is not a {what}: {'an empty file' if kind == 'empty' else 'neither a torch archive nor a pickle'}")
  try:
    return torch.load(path, map_location="cpu", weights_only=weights_only)
  except pickle.UnpicklingError as e:
    if weights_only:
      raise ValueError(f"{path} is not a {what}: it pickles code objects, not only tensors (an NVlabs/edm "
                       "network-snapshot .pkl or training-state .pt? convert it with --format=edm)") from e
    raise ValueError(f"{path} is not a {what}: a damaged pickle ({str(e).splitlines()[0][:160]})") from e
  except (RuntimeError, EOFError, ValueError, OSError, ModuleNotFoundError, AttributeError) as e:
    first = (str(e).splitlines() or [""])[0][:160]
    damaged = "a damaged or truncated torch archive" if kind == "zip" else "an unreadable pickle"
    raise ValueError(f"{path} is not a {what}: {damaged} ({type(e).__name__}: {first})") from e


def _numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The tensors of a state dict as numpy (floating point as float64)."""
  import torch
  return {k: v.detach().to(torch.float64).cpu().numpy() if v.is_floating_point()
          else v.cpu().numpy() for k, v in state.items() if torch.is_tensor(v)}


def _found(obj: Any) -> str:
  return f"top-level keys {sorted(map(str, obj))[:10]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"


# --- one reader per format: open the file, pick the weights, hand numpy to interop -------


def _module_state(obj: Any) -> tuple[Mapping[str, Any], dict[str, Any] | None]:
  """(state dict, its UNet2DModel config or None) of a pickled module, or of a state dict
  possibly nested under one of NESTED."""
  import torch
  if isinstance(obj, torch.nn.DataParallel):
    obj = obj.module
  if isinstance(obj, torch.nn.Module):
    config = dict(getattr(obj, "config", {}) or {}) or None
    if config is not None:
      config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}
      config["_class_name"] = type(obj).__name__
    return obj.state_dict(), config
  while isinstance(obj, dict) and not any(torch.is_tensor(v) for v in obj.values()):
    key = next((k for k in NESTED if k in obj), None)
    if key is None:
      raise ValueError(f"no state dict found (top-level keys: {sorted(obj)[:10]})")
    obj = obj[key]
    if isinstance(obj, torch.nn.Module):
      return _module_state(obj)
  return obj, None


def _diffusers(args) -> tuple[dict, dict]:
  state, config = _module_state(load_checkpoint(args.checkpoint, EXPECTED["diffusers"], weights_only=False))
  return diffusers.to_folder(_numpy(state), config, args.config)


def _pytorch_ddpm(args) -> tuple[dict, dict]:
  ckpt = load_checkpoint(args.checkpoint, EXPECTED["pytorch-ddpm"], weights_only=True)
  key = pytorch_ddpm.WEIGHTS[args.weights]
  if not isinstance(ckpt, dict) or key not in ckpt:
    raise ValueError(f"{args.checkpoint} is not a pytorch-ddpm ckpt.pt: no {key!r} (it holds net_model and "
                     f"ema_model; found {_found(ckpt)})")
  flags = {**pytorch_ddpm.read_flagfile(args.flagfile), "num_groups": int(args.num_groups)}
  state, config = pytorch_ddpm.to_folder(_numpy(ckpt[key]), flags)
  return state, {**config, "_source_weights": key}


def hasegawa_tensors(module) -> dict[str, np.ndarray]:
  """Their UNet's tensors by name: the state dict, plus every NIN's W and b whether or not
  they are registered parameters (created with `.to(device)`, they are plain tensors when
  the device is a GPU)."""
  import torch
  if isinstance(module, torch.nn.DataParallel):
    module = module.module
  if type(module).__name__ != "UNet" or not hasattr(module, "ResnetBlock_D11"):
    raise ValueError(f"not Hasegawa & Yasuda's UNet (got {type(module).__module__}.{type(module).__name__})")
  hasegawa.check_norm_eps({name: m.eps for name, m in module.named_modules() if isinstance(m, torch.nn.GroupNorm)})
  tensors = dict(module.state_dict())
  for name, m in module.named_modules():
    if type(m).__name__ == "NIN":
      tensors[f"{name}.W"], tensors[f"{name}.b"] = m.W, m.b
  return _numpy(tensors)


def import_hasegawa_unet(source: str):
  """Their src.models.unet module from the repository at `source`, registered under that
  name (the one their pickles refer to) without running src/models/__init__.py, which
  imports their sampler and torchvision."""
  import importlib.util
  import types
  path = os.path.join(source, "src", "models", "unet.py")
  if not os.path.exists(path):
    raise ValueError(f"--source={source!r} must be their repository (with src/models/unet.py), "
                     "needed to unpickle the model")
  if "src.models.unet" in sys.modules:
    return sys.modules["src.models.unet"]
  for name, sub in (("src", "src"), ("src.models", os.path.join("src", "models"))):
    if name not in sys.modules:
      package = types.ModuleType(name)
      package.__path__ = [os.path.join(source, sub)]
      sys.modules[name] = package
  spec = importlib.util.spec_from_file_location("src.models.unet", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["src.models.unet"] = module
  spec.loader.exec_module(module)
  return module


def _hasegawa(args) -> tuple[dict, dict]:
  import torch
  if not args.config:
    raise ValueError("--format=hasegawa needs --config=THEIR_REPO/config/<dataset>.yaml")
  import_hasegawa_unet(os.path.abspath(args.source or ""))
  cfg = hasegawa.read_yaml(args.config)
  hasegawa.folder_config(cfg)  # refuse what memvol cannot express before unpickling (which runs code)
  module = load_checkpoint(args.checkpoint, EXPECTED["hasegawa"], weights_only=False)
  if not isinstance(module, torch.nn.Module):
    raise ValueError(f"{args.checkpoint} is not a Hasegawa & Yasuda model file (a pickled UNet module); found {_found(module)}")
  return hasegawa.to_folder(hasegawa_tensors(module), cfg)


def load_edm(path: str, edm_repo: str | None) -> Any:
  """The object in an NVlabs/edm network-snapshot-*.pkl (a plain pickle) or training-state
  -*.pt (torch.save), unpickled with the checkout `edm_repo` on sys.path (its torch_utils
  and dnnlib; the pickled networks carry their source and run it)."""
  import pickle
  if not edm_repo or not os.path.isdir(os.path.join(edm_repo, "torch_utils")):
    raise ValueError(f"--format=edm needs --edm_repo=PATH, a checkout of NVlabs/edm (its torch_utils and dnnlib "
                     f"unpickle the network); got {edm_repo!r}")
  sys.path.insert(0, os.path.abspath(edm_repo))
  what = EXPECTED["edm"]
  kind = sniff(path)
  if kind != "pickle":
    return load_checkpoint(path, what, weights_only=False)
  import torch  # noqa: F401  (the pickle refers to torch's classes)
  try:
    with open(path, "rb") as f:
      return pickle.load(f)
  except (pickle.UnpicklingError, EOFError, ValueError, ModuleNotFoundError, AttributeError, RuntimeError) as e:
    first = (str(e).splitlines() or [""])[0][:160]
    raise ValueError(f"{path} is not a {what}: an unreadable or truncated pickle ({type(e).__name__}: {first})") from e


def _edm(args) -> tuple[dict, dict]:
  import torch
  obj = load_edm(args.checkpoint, args.edm_repo)
  if isinstance(obj, dict) and ({"ema_model", "net_model"} & set(obj)):
    raise ValueError(f"{args.checkpoint} is not an NVlabs/edm checkpoint: it holds ema_model / net_model, a "
                     "pytorch-ddpm ckpt.pt: convert it with --format=pytorch-ddpm")
  if not isinstance(obj, dict) or args.weights not in obj:
    raise ValueError(f"{args.checkpoint} is not an NVlabs/edm checkpoint with {args.weights!r} weights (a "
                     "network-snapshot-*.pkl holds 'ema', a training-state-*.pt 'net': choose with --weights); "
                     f"found {_found(obj)}")
  net = obj[args.weights]
  if not isinstance(net, torch.nn.Module) or not hasattr(net, "init_kwargs") or not hasattr(net, "model"):
    raise ValueError(f"{args.checkpoint}: {args.weights!r} is {type(net).__name__}, not an NVlabs/edm "
                     "preconditioned network (VPPrecond, VEPrecond, EDMPrecond)")
  config = edm.folder_config(type(net).__name__, net.init_kwargs, type(net.model).__name__, net.model.init_kwargs)
  state, dropped = edm.to_folder(_numpy(net.state_dict()), config)
  config.update({"_source_weights": args.weights, "_source_class": type(net).__name__})
  if dropped:
    config["_dropped_unused"] = dropped
  return state, config


READERS: dict[str, Callable[[Any], tuple[dict, dict]]] = {
    "diffusers": _diffusers, "pytorch-ddpm": _pytorch_ddpm, "hasegawa": _hasegawa, "edm": _edm}


def convert(args) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state, config) of the folder for the parsed command line. A file that is empty or
  neither a torch archive nor a pickle is refused before torch is imported."""
  kind = sniff(args.checkpoint)
  if kind in ("empty", "unknown"):
    what = "an empty file" if kind == "empty" else "neither a torch archive nor a pickle"
    raise ValueError(f"{args.checkpoint} is not a {EXPECTED[args.format]}: {what}")
  state, config = READERS[args.format](args)
  config.update({"_source_format": args.format, "_source_checkpoint": os.path.basename(args.checkpoint)})
  return state, config


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint")
  p.add_argument("out")
  p.add_argument("--format", choices=FORMATS, default="diffusers")
  p.add_argument("--config", default=None,
                 help="diffusers: UNet2DModel config.json (for a bare state dict); hasegawa: their dataset yaml")
  p.add_argument("--weights", choices=("ema", "net"), default="ema",
                 help="pytorch-ddpm: ema_model or net_model; edm: a snapshot's ema or a training state's net")
  p.add_argument("--flagfile", default=None, help="pytorch-ddpm: its absl flagfile (default: its CIFAR-10 settings)")
  p.add_argument("--num-groups", type=int, default=32,
                 help="pytorch-ddpm: GroupNorm groups (its model.py hard-codes 32)")
  p.add_argument("--source", default=None, help="hasegawa: their repository, to unpickle the model")
  p.add_argument("--edm_repo", "--edm-repo", default=None, help="edm: a checkout of NVlabs/edm, to unpickle the network")
  return p


def main(argv: list[str] | None = None) -> None:
  """Convert; a checkpoint that is not one of the named format (or does not fit its
  config) exits with one line naming the file, before anything is written."""
  args = parser().parse_args(argv)
  try:
    from memvol.interop import networks
  except ImportError:  # no jax here: write the folder, check it where memvol runs
    networks = None
  try:
    state, config = convert(args)
    if networks is not None:
      model, shape = networks.model_from_config(config)
      networks.params_from_state_dict(state, model, shape)  # refuses weights that do not fit
  except (ValueError, FileNotFoundError) as e:
    msg = " ".join(str(e).split())
    sys.exit(f"error: {msg if args.checkpoint in msg else f'{args.checkpoint}: {msg}'}")
  folders.write(args.out, config, state)
  sde = config.get("_source_sde", {})
  if sde and not (math.isclose(sde.get("beta_min", 0.1), 0.1) and math.isclose(sde.get("beta_max", 20.0), 20.0)):
    print(f"note: the model was trained on the VP-SDE beta {sde.get('beta_min')} .. {sde.get('beta_max')}; "
          f"score it with --config.sde.beta_min={sde.get('beta_min')} --config.sde.beta_max={sde.get('beta_max')}")
  n = sum(int(np.prod(v.shape)) for v in state.values())
  if networks is not None:
    networks.load_model(args.out)
    print(f"{args.out}: {n:,} params ({args.format}), loads in memvol")
  else:
    print(f"{args.out}: {n:,} params ({args.format}) written; memvol (jax) not importable here, so not "
          f"checked: python -c \"from memvol import pretrained; pretrained.load_model('{args.out}')\"")


if __name__ == "__main__":
  main()
