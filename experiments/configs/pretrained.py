"""Score a model trained elsewhere: a diffusers UNet2DModel folder, e.g. DDPM on CIFAR-10.

Command (from the repo root; the folder holds config.json and
diffusion_pytorch_model.safetensors, e.g. google/ddpm-cifar10-32 downloaded beforehand;
cifar-10-batches-py is the folder of CIFAR-10's python pickles):

  python -m experiments.main --config=experiments/configs/pretrained.py \\
      --workdir=runs/ddpm_cifar10 --config.model.pretrained=/path/to/ddpm-cifar10-32 \\
      --config.data.path=/path/to/cifar-10-batches-py

A torch checkpoint (.pt / .pth / .ckpt) is converted first, with torch installed
separately: python scripts/convert_torch_checkpoint.py CKPT OUT --config=config.json.
No training stage: the `train` stage records the weights' SHA-256 (a workdir refuses
other weights) and the split. Data: 1000 training images drawn class-balanced from the 50000
of data_batch_1..5 (the model saw all of them) and 1000 held-out images from test_batch
(data.heldout_name = "cifar10_test"; it never saw those). Time: DDPM's linear betas
1e-4 .. 0.02 are the VP-SDE beta 0.1 .. 20 and the network sees 999 t (the gaps are
stated in memvol/interop/networks.py). Sampling 1000 reverse-SDE samples (1000 steps), copy
detection among the 1000 training images drawn (copies of the other 49000 go unseen),
Hutchinson log volume growth (1 Rademacher probe, tsit5 at rtol = atol 1e-3), report.

Expected runtime (the 35.7M-parameter network). CPU, measured on 2 cores shared with other
jobs (load ~8) with the random-init network: 0.19 s per forward pass and 0.48 s per forward
pass + JVP, per image (batches of 4). Per 1000 images that is ~13 h for the Hutchinson
scores at ~100 network evaluations per image (the adaptive count on the real model is not
measured) and ~53 h for 1000 reverse-SDE samples of 1000 steps: not a CPU job. The
`:quick` chain below took 1 min 46 s end to end (sample 22 s and score 57 s, both mostly
compilation; detect 6 s, report 7 s); at its settings (4 Euler steps, 1 probe) scoring
runs at 1.9 s per image, ~32 min per 1000 images. GPU: not measured (no GPU on this project's
machine); from the network's 11.7 GFLOPs per forward pass, an H100 at 30-50% of its
dense float32/TF32 rate should need minutes, not hours, per 1000 images.
Expected result: DDPM CIFAR-10 generalises (it reproduces almost none of its 50000
training images), so report/report.md should show few or no copies and trained and
held-out scores close together (AUROC near 0.5); any gap is the measure's signal of
easier reproduction of trained images.

`:quick` is the CPU smoke test of the same chain (a few minutes; numbers only need to be
finite) on the random-init DDPM CIFAR-10 network and 8 demo images, made by:
  python scripts/export_safetensors.py --random-ddpm-cifar10 /tmp/ddpm_random \\
      --demo-images /tmp/ddpm_random_images.npz
  python -m experiments.main --config=experiments/configs/pretrained.py:quick \\
      --workdir=/tmp/ddpm_quick --config.model.pretrained=/tmp/ddpm_random \\
      --config.data.path=/tmp/ddpm_random_images.npz
"""

from experiments.configs.base import get_base_config


def get_config(arg: str | None = None):
  c = get_base_config()
  c.model.pretrained = ""  # required: --config.model.pretrained=/path/to/diffusers/folder

  c.data.name = "cifar10"
  c.data.path = ""  # required: --config.data.path=/path/to/cifar-10-batches-py
  c.data.resolution = 32
  c.data.num_train = 1000
  c.data.num_heldout = 1000
  c.data.heldout_name = "cifar10_test"
  c.data.num_duplicated = 0

  c.sample.num_samples = 1000
  c.sample.sde_steps = 1000
  c.sample.batch_size = 250
  c.score.estimators = ("hutchinson",)
  c.score.num_probes = 1
  c.score.rtol = 1e-3
  c.score.atol = 1e-3
  c.score.batch_size = 50

  if arg == "quick":
    c.data.name = "npz"  # --config.data.path=the demo images (scripts/export_safetensors.py)
    c.data.heldout_name = ""
    c.data.num_train = 4
    c.data.num_heldout = 4
    c.sample.num_samples = 4
    c.sample.sde_steps = 10
    c.sample.batch_size = 4
    c.score.adaptive = False
    c.score.solver = "euler"
    c.score.num_steps = 4
    c.score.profile_times = 4
    c.score.batch_size = 4
    c.detect.carlini_n = 2
    c.report.top_k = 2
    c.report.num_bootstrap = 50
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c
