"""Make the fixtures of tests/test_pretrained.py (needs torch, and diffusers for the two
diffusers ones, which memvol does not depend on; run it in a separate venv):

  python3.11 -m venv /tmp/venv-torch
  /tmp/venv-torch/bin/pip install torch diffusers safetensors numpy pyyaml
  /tmp/venv-torch/bin/python scripts/make_pretrained_fixture.py tests/fixtures \
      [--only=ddpm_unet,...] [--ddpm-source=PYTORCH_DDPM_REPO] [--hasegawa-source=THEIR_REPO] \
      [--edm-source=NVLABS_EDM_REPO] [--diffmemorize-source=DIFFMEMORIZE_REPO]

Writes two random UNet2DModel folders (config.json, diffusion_pytorch_model.safetensors,
reference.npz with x [B, H, W, C] in [-1, 1], t [B] in (0, 1] and the network's output eps
[B, H, W, C] at timestep 999 t, computed in float64):

  ddpm_unet     DDPM's conventions (downsample_padding 0, sin before cos, freq_shift 1, one
                attention head, norm_eps 1e-6): 2 levels (24, 48 channels), attention at the
                second, 16x16x3.
  variant_unet  diffusers' defaults (downsample_padding 1, cos before sin, freq_shift 0,
                heads of 8 channels, norm_eps 1e-5), 8x12x1 images, attention at the first
                level, weights saved under the older attention names (query, key, value,
                proj_attn) that early diffusers checkpoints use.

and, built with the authors' own code (a checkout of their repository given by
--ddpm-source / --hasegawa-source) and converted by scripts/convert_torch_checkpoint.py:

  pytorch_ddpm_unet  w86763777/pytorch-ddpm's UNet(T=1000, ch=32, ch_mult=[1, 1], attn=[1],
                     num_res_blocks=1) at 8x8x3 with 8 GroupNorm groups (its model.py
                     hard-codes 32, which at 32 channels normalises each channel alone and
                     so removes the time embedding, a per-channel constant: the fixture
                     would not see it), saved as its trainer's ckpt.pt (ema_model and a
                     different net_model), converted with --format=pytorch-ddpm
                     --weights=ema --flagfile --num-groups=8; weights rounded to float16 values and the
                     folder's safetensors stored as float16 (lossless) to keep it small.
  hasegawa_unet      Hasegawa & Yasuda's UNet (channel1 8, channel2 16, 4 GroupNorm groups,
                     emb_dim1 8, emb_dim2 16) at 16x16x3, saved as their trainer does
                     (torch.save of the DataParallel module), converted with --format=hasegawa;
                     float16 weights and safetensors as above.

Their reference.npz holds x [B, H, W, C] in [-1, 1], the integer steps n [B] the network
takes (0 .. 999) and eps [B, H, W, C], computed in float64 with the checkpoint's own weights
(pytorch-ddpm: its float32 lookup table of the time embedding; Hasegawa & Yasuda: their
sinusoid in float64, which their forward computes in float32), plus num_params (of the
converted folder; pytorch-ddpm: its float32 time table [1000, 32] too) and source_shapes.json lists every tensor of the source checkpoint (name,
shape) for the converter's spec test.

and, with NVlabs/edm's own classes (--edm-source=A_CHECKOUT; its dnnlib needs `requests`),
pickled as its training loop writes a network-snapshot .pkl and converted with --format=edm:

  edm_ddpmpp  DDPM++ (positional embedding, standard encoder, filter [1, 1]) under VPPrecond,
              with augment_dim 9 as EDM's CIFAR-10 pickles (map_augment is dropped);
  edm_ncsnpp  NCSN++ (Fourier embedding, channel_mult_noise 2, residual encoder, filter
              [1, 3, 3, 1]) under VEPrecond;
  both SongUNet(model_channels 16, channel_mult [1, 2], num_blocks 1, attention at 8x8) at
  16x16x3, float16 weights (and Fourier freqs) stored as float16; and with sail-sg/
  DiffMemorize's SongUNet (--diffmemorize-source, its own training/networks.py, run in the
  same way), model_channels 8 under VPPrecond with some encoder skips off:
  diffmem_ddpmpp (skip_connections [1, 0, 0, 1]) and diffmem_ncsnpp ([1, 1, 0, 1]). Their reference.npz holds
  x = x0 + sigma z [B, H, W, C] at sigma [B] = 0.002, 0.02, 0.2, 2, 20, 80, NVlabs' D(x; sigma)
  of the same SongUNet under each of VPPrecond, VEPrecond and EDMPrecond (D_vp, D_ve, D_edm) in
  float64 (their forward casts to float32, and their attention and positional frequencies are
  float32 whatever the input: evaluated here in float64 with their formulas, checked against
  their own float32 forward, stored as own_float32), num_params (converted folder) and
  source_num_params (the torch module's parameters).

Every weight is perturbed away from its initial value (GroupNorm scales off 1, biases off
0, the zero-initialised output convolutions and NIN_tot non-zero), so a weight mapped to the
wrong place changes the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

CONFIGS = {
    "ddpm_unet": dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(24, 48), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=None, norm_eps=1e-6, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1),
    "variant_unet": dict(
        sample_size=(8, 12), in_channels=1, out_channels=1, block_out_channels=(16, 32),
        layers_per_block=1, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), norm_num_groups=4, attention_head_dim=8),
}
LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _legacy(key: str) -> str:
  for new, old in LEGACY.items():
    if ".attentions." in key and f".{new}." in key:
      return key.replace(f".{new}.", f".{old}.")
  return key


def make(name: str, out: str, seed: int) -> None:
  from diffusers import UNet2DModel
  from safetensors.torch import save_file
  torch.manual_seed(seed)
  model = UNet2DModel(**CONFIGS[name]).double().eval()
  with torch.no_grad():
    _perturb(model)
  h, w = (model.config.sample_size,) * 2 if np.ndim(model.config.sample_size) == 0 else model.config.sample_size
  c = model.config.in_channels
  gen = torch.Generator().manual_seed(seed + 1)
  x = 2 * torch.rand(4, c, h, w, generator=gen, dtype=torch.float64) - 1
  t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
  with torch.no_grad():
    eps = model(x, 999.0 * t).sample
  folder = os.path.join(out, name)
  os.makedirs(folder, exist_ok=True)
  state = {k: v.float().contiguous() for k, v in model.state_dict().items()}
  if name == "variant_unet":
    state = {_legacy(k): v for k, v in state.items()}
  save_file(state, os.path.join(folder, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
  config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
  config["_class_name"] = "UNet2DModel"
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  np.savez(os.path.join(folder, "reference.npz"), x=x.permute(0, 2, 3, 1).numpy(), t=t.numpy(),
           eps=eps.permute(0, 2, 3, 1).numpy(),
           num_params=np.int64(sum(p.numel() for p in model.parameters())))
  print(f"{folder}: {sum(p.numel() for p in model.parameters())} params, |eps| max {float(eps.abs().max()):.3g}")


def _perturb(model: torch.nn.Module, half: bool = False) -> None:
  """Every trainable weight moved off its init, rounded to the float32 (or float16) values
  that are saved; frozen tensors (pytorch-ddpm's time table) untouched."""
  with torch.no_grad():
    for p in model.parameters():
      if p.requires_grad:
        p.add_(0.3 * max(float(p.std()) if p.numel() > 1 else 0.0, 0.05) * torch.randn_like(p))
        p.copy_((p.half() if half else p.float()).double())


def _convert(argv: list[str]) -> None:
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import convert_torch_checkpoint
  convert_torch_checkpoint.main(argv)


def _save_reference(folder: str, x: torch.Tensor, n: torch.Tensor, eps: torch.Tensor,
                    source: dict[str, torch.Tensor], **extra: np.ndarray) -> None:
  from safetensors.numpy import load_file
  num = sum(v.size for v in load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")).values())
  np.savez(os.path.join(folder, "reference.npz"), x=x.permute(0, 2, 3, 1).numpy(), n=n.numpy(),
           eps=eps.permute(0, 2, 3, 1).numpy(), num_params=np.int64(num), **extra)
  with open(os.path.join(folder, "source_shapes.json"), "w") as f:
    json.dump({k: list(v.shape) for k, v in source.items()}, f, indent=0)
  print(f"{folder}: {num} params, |eps| max {float(eps.abs().max()):.3g}")


def _store_half(folder: str) -> None:
  """The converted float32 safetensors as float16: lossless, the weights are float16 values."""
  from safetensors.numpy import load_file, save_file
  weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  state = load_file(weights)
  assert all(np.array_equal(v.astype(np.float16).astype(np.float32), v) for v in state.values())
  save_file({k: v.astype(np.float16) for k, v in state.items()}, weights, metadata={"format": "pt"})
  os.chmod(weights, 0o644)


def _groups(model: torch.nn.Module, groups: int) -> torch.nn.Module:
  """The model with every GroupNorm splitting its channels into `groups` groups (shapes and
  weights unchanged)."""
  for m in model.modules():
    if isinstance(m, torch.nn.GroupNorm):
      m.num_groups = groups
  return model


def make_pytorch_ddpm(out: str, source: str, seed: int) -> None:
  sys.path.insert(0, os.path.abspath(source))
  from model import UNet  # pytorch-ddpm's model.py
  flags = dict(T=1000, ch=32, ch_mult=[1, 1], attn=[1], num_res_blocks=1, dropout=0.1)
  torch.manual_seed(seed)
  model = _groups(UNet(**flags), 8).double().eval()
  _perturb(model, half=True)
  net = _groups(UNet(**flags), 8).double()
  net.load_state_dict(model.state_dict())
  _perturb(net, half=True)  # net_model: other weights, so --weights=ema matters
  gen = torch.Generator().manual_seed(seed + 1)
  x = 2 * torch.rand(4, 3, 8, 8, generator=gen, dtype=torch.float64) - 1
  n = torch.tensor([0, 1, 500, 999])
  with torch.no_grad():
    eps = model(x, n)
  folder = os.path.join(out, "pytorch_ddpm_unet")
  with tempfile.TemporaryDirectory() as tmp:
    ckpt, flagfile = os.path.join(tmp, "ckpt.pt"), os.path.join(tmp, "flagfile.txt")
    torch.save({"net_model": {k: v.float() for k, v in net.state_dict().items()},
                "ema_model": {k: v.float() for k, v in model.state_dict().items()}, "step": 0}, ckpt)
    with open(flagfile, "w") as f:
      f.write("--T=1000\n--ch=32\n--ch_mult=1\n--ch_mult=1\n--attn=1\n--num_res_blocks=1\n"
              "--dropout=0.1\n--img_size=8\n--lr=0.0002\n")
    _convert([ckpt, folder, "--format=pytorch-ddpm", "--weights=ema", f"--flagfile={flagfile}",
              "--num-groups=8"])
  _store_half(folder)
  _save_reference(folder, x, n, eps, model.state_dict(),
                  time_table=model.time_embedding.timembedding[0].weight.detach().float().numpy())


HASEGAWA_MODEL_YAML = """unet:
  channel1: 8
  channel2: 16
  conv: {stride: 1, dilation: 1, init_scale: 1., padding: 1, kernel_size: 3}
  groupnorm: {num_groups: 4}
  time_embedding: {max_positions: 10000, emb_dim1: 8, emb_dim2: 16}
  dropout: 0.1
"""
HASEGAWA_DATA_YAML = "data: {height: 16, width: 16, channel: 3}\n"


def _hasegawa_time_mlp(emb: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
  """Their TimeEmbedding.forward in float64 (theirs casts t and the frequencies to float32):
  sin and cos of t w_k, w_k = max_positions^(-k / (emb_dim1/2 - 1)), then their MLP."""
  half = emb.emb_config["emb_dim1"] // 2
  w = torch.exp(-np.log(emb.emb_config["max_positions"]) / (half - 1) * torch.arange(half, dtype=torch.float64))
  a = t.double()[:, None] * w[None, :]
  return emb.linear_2(emb.act(emb.linear_1(torch.cat([torch.sin(a), torch.cos(a)], dim=1))))


def make_hasegawa(out: str, source: str, seed: int) -> None:
  import yaml
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from convert_torch_checkpoint import import_hasegawa_unet
  UNet = import_hasegawa_unet(os.path.abspath(source)).UNet  # their src/models/unet.py
  with tempfile.TemporaryDirectory() as tmp:
    os.makedirs(os.path.join(tmp, "config"))
    model_yaml, data_yaml = os.path.join(tmp, "config", "model.yaml"), os.path.join(tmp, "config", "tiny.yaml")
    for path, text in ((model_yaml, HASEGAWA_MODEL_YAML), (data_yaml, HASEGAWA_DATA_YAML)):
      with open(path, "w") as f:
        f.write(text)
    cfg = {**yaml.safe_load(HASEGAWA_MODEL_YAML), **yaml.safe_load(HASEGAWA_DATA_YAML), "device": "cpu"}
    torch.manual_seed(seed)
    model = UNet(cfg).eval()
    _perturb(model, half=True)
    ckpt = os.path.join(tmp, "epoch_000001.pth")
    torch.save(torch.nn.DataParallel(model), ckpt)  # as their trainer saves it
    gen = torch.Generator().manual_seed(seed + 1)
    x = 2 * torch.rand(4, 3, 16, 16, generator=gen, dtype=torch.float64) - 1
    n = torch.tensor([0, 1, 500, 999])
    model = model.double()
    model.TimeEmbedding.forward = lambda t: _hasegawa_time_mlp(model.TimeEmbedding, t)
    with torch.no_grad():
      eps = model(x, n.double())
    folder = os.path.join(out, "hasegawa_unet")
    _convert([ckpt, folder, "--format=hasegawa", f"--source={source}", f"--config={data_yaml}"])
  _store_half(folder)
  _save_reference(folder, x, n, eps, model.state_dict())


# --- NVlabs/edm SongUNets ---------------------------------------------------------------

_DDPMPP = dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard", resample_filter=[1, 1])
_NCSNPP = dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])
EDM_NETS = {  # small DDPM++ and NCSN++ at 16x16x3: two levels, attention at 8x8
    "edm_ddpmpp": ("VPPrecond", dict(_DDPMPP, augment_dim=9, model_channels=16)),
    "edm_ncsnpp": ("VEPrecond", dict(_NCSNPP, model_channels=16)),
    # sail-sg/DiffMemorize's SongUNet, two of its four encoder skips off
    "diffmem_ddpmpp": ("VPPrecond", dict(_DDPMPP, model_channels=8, skip_connections=[1, 0, 0, 1])),
    "diffmem_ncsnpp": ("VPPrecond", dict(_NCSNPP, model_channels=8, skip_connections=[1, 1, 0, 1])),
}
EDM_SIGMAS = [0.002, 0.02, 0.2, 2.0, 20.0, 80.0]


def _edm_float64(networks) -> None:
  """NVlabs' attention weights and positional frequencies in the input's dtype (they
  compute both in float32 whatever the input), so a float64 reference is float64 throughout."""
  class AttentionOp:
    @staticmethod
    def apply(q, k):
      return torch.einsum("ncq,nck->nqk", q, k / np.sqrt(k.shape[1])).softmax(dim=2)

  def positional(self, x):
    freqs = torch.arange(self.num_channels // 2, dtype=x.dtype) / (self.num_channels // 2 - (1 if self.endpoint else 0))
    x = x.ger((1 / self.max_positions) ** freqs)
    return torch.cat([x.cos(), x.sin()], dim=1)

  networks.AttentionOp = AttentionOp
  networks.PositionalEmbedding.forward = positional


def _edm_denoise64(model, precond: str, x: torch.Tensor, sigma: torch.Tensor, vp) -> torch.Tensor:
  """D(x; sigma) of the SongUNet `model` (float64) under NVlabs' VPPrecond / VEPrecond /
  EDMPrecond formulas (theirs cast x and sigma to float32 first), evaluated in float64;
  `vp` is a VPPrecond whose sigma_inv (dtype-preserving) gives the VP time."""
  s = sigma.reshape(-1, 1, 1, 1)
  if precond == "vp":
    c_skip, c_out, c_in, c_noise = 1, -s, 1 / (s**2 + 1).sqrt(), 999 * vp.sigma_inv(sigma)
  elif precond == "ve":
    c_skip, c_out, c_in, c_noise = 1, s, 1, (0.5 * sigma).log()
  else:
    sd = 0.5
    c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (sd**2 + s**2).sqrt(), sigma.log() / 4
  return c_skip * x + c_out * model(c_in * x, c_noise, class_labels=None)


def make_edm(name: str, out: str, source: str, seed: int) -> None:
  import copy
  import pickle
  for module in [m for m in sys.modules if m.split(".")[0] in ("training", "torch_utils", "dnnlib")]:
    del sys.modules[module]  # another checkout's (NVlabs/edm vs DiffMemorize)
  sys.path.insert(0, os.path.abspath(source))
  from training import networks  # NVlabs/edm's (or DiffMemorize's) training/networks.py
  precond_class, kw = EDM_NETS[name]
  kw = dict(kw, model_type="SongUNet", channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)
  torch.manual_seed(seed)
  net = getattr(networks, precond_class)(img_resolution=16, img_channels=3, **kw).eval()
  _perturb(net, half=True)
  with torch.no_grad():
    for buf_name, buf in net.named_buffers():
      if buf_name.endswith("freqs"):
        buf.copy_(buf.half().float())
  folder = os.path.join(out, name)
  gen = torch.Generator().manual_seed(seed + 1)
  sigma = torch.tensor(EDM_SIGMAS, dtype=torch.float64)
  x0 = 2 * torch.rand(len(EDM_SIGMAS), 3, 16, 16, generator=gen, dtype=torch.float64) - 1
  x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
  with tempfile.TemporaryDirectory() as tmp:
    snapshot = os.path.join(tmp, "network-snapshot-000000.pkl")
    with open(snapshot, "wb") as f:  # as NVlabs/edm's training loop writes it
      pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    _convert([snapshot, folder, "--format=edm", f"--edm_repo={source}"])
  with torch.no_grad():
    own32 = net(x.float(), sigma.float()).double()  # NVlabs' own forward (float32)
    _edm_float64(networks)
    model = copy.deepcopy(net.model).double()
    vp = networks.VPPrecond(img_resolution=16, img_channels=3, **kw).double()
    refs = {f"D_{p}": _edm_denoise64(model, p, x, sigma, vp) for p in ("vp", "ve", "edm")}
  own = refs[f"D_{dict(VPPrecond='vp', VEPrecond='ve')[precond_class]}"]
  gap = float(((own32 - own).flatten(1).norm(dim=1) / own.flatten(1).norm(dim=1)).max())
  assert gap < 1e-4, gap  # the float64 formulas are NVlabs' forward
  _store_half(folder)
  from safetensors.numpy import load_file
  num = sum(v.size for v in load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors")).values())
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  np.savez(os.path.join(folder, "reference.npz"), x=nhwc(x), sigma=sigma.numpy(),
           **{k: nhwc(v) for k, v in refs.items()}, own_float32=nhwc(own32), num_params=np.int64(num),
           source_num_params=np.int64(sum(p.numel() for p in net.parameters())))
  print(f"{folder}: {num} params ({precond_class}), float32 forward vs float64 {gap:.2e}")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("out", nargs="?", default=os.path.join("tests", "fixtures"))
  p.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
  p.add_argument("--ddpm-source", default="", help="a checkout of w86763777/pytorch-ddpm")
  p.add_argument("--hasegawa-source", default="",
                 help="a checkout of masa-longriver/Quantifying_the_Ease_of_Reproduction")
  p.add_argument("--edm-source", default="", help="a checkout of NVlabs/edm")
  p.add_argument("--diffmemorize-source", default="", help="a checkout of sail-sg/DiffMemorize")
  args = p.parse_args()
  names = args.only.split(",") if args.only else list(CONFIGS) + ["pytorch_ddpm_unet", "hasegawa_unet"] + list(EDM_NETS)
  for i, name in enumerate(CONFIGS):
    if name in names:
      make(name, args.out, seed=10 * i)
  if "pytorch_ddpm_unet" in names:
    make_pytorch_ddpm(args.out, args.ddpm_source, seed=30)
  if "hasegawa_unet" in names:
    make_hasegawa(args.out, args.hasegawa_source, seed=40)
  for i, name in enumerate(EDM_NETS):
    if name in names:
      source = args.diffmemorize_source if name.startswith("diffmem") else args.edm_source
      make_edm(name, args.out, source, seed=50 + 10 * i)


if __name__ == "__main__":
  main()
