"""PIA / SecMI's CIFAR-10 setting: their victim, their member split, their peer times.

The victim: the DDPM UNet of w86763777/pytorch-ddpm (35.7M params, ch 128, ch_mult 1 2 2 2,
attention at 16x16, linear betas 1e-4 .. 0.02 over 1000 steps) that Kong et al. (PIA) and
Duan et al. (SecMI) train on 25,000 CIFAR-10 training images, the members listed in their
CIFAR10_train_ratio0.5.npz (mia_train_idxs; the other 25,000 of CIFAR-10's training set,
mia_eval_idxs, are the non-members); they attack its EMA weights. Their ckpt.pt is
converted first (torch in a separate venv; memvol never opens a pickle):

  python scripts/convert_torch_checkpoint.py /path/to/ckpt.pt /path/to/pia_cifar10 \\
      --format=pytorch-ddpm --weights=ema [--flagfile=/path/to/logdir/flagfile.txt]

Command (from the repo root; cifar-10-batches-py is the folder of CIFAR-10's python pickles,
CIFAR10_train_ratio0.5.npz is in kong13661/PIA's DDPM/ folder; SecMI's
mia_evals/member_splits/CIFAR10_train_ratio0.5.npz holds the same indices):

  python -m experiments.main --config=experiments/configs/pia_cifar10.py \\
      --workdir=runs/pia_cifar10 --config.model.pretrained=/path/to/pia_cifar10 \\
      --config.data.path=/path/to/cifar-10-batches-py \\
      --config.data.member_split_path=/path/to/CIFAR10_train_ratio0.5.npz

Data: 1000 members and 1000 non-members drawn class-balanced by data.split_seed from the
published split (--config.data.num_train=25000 --config.data.num_heldout=25000 scores all
of it, as their attack.py does). Peers at their times (base config, DDPM step n -> t = n /
1000): SecMI t_sec = 100 with DDIM step k = 10, PIA / PIAN t = 200 with the l4 error, the
loss at t = 100 (their NA). Their AUROCs on this victim (PIA Table 2): loss 84.7, SecMI
88.1, PIA 88.5, PIAN 87.8. Log volume growth: Hutchinson (1 Rademacher probe, tsit5 at
rtol = atol 1e-3), as experiments/configs/pretrained.py; 1000 reverse-SDE samples of 1000
steps for the copy search (copies of the 24,000 members not drawn go unseen).

Expected runtime (not measured on the real checkpoint: no GPU and no checkpoint here). The
network is paper_cifar10's (the same 35.7M-parameter DDPM UNet), whose costs BUILD.md
gives. H200: Hutchinson with 4 probes at rtol 1e-4 took 0.86 s per image on the random-init
network (1197 network evaluations), so the 2000 images here need at most ~30 min (1 probe
at rtol 1e-3 is cheaper; a trained network needs fewer steps); the peers add ~37 passes per
image (secmi 11, loss 4, pia 2, pian 2, sima 1, flipd 17), seconds in all; 1000 samples of
1000 steps are 10^6 image-forwards, a few minutes. The full 25,000 + 25,000 split: ~12 h
for the scores. CPU (2 cores, BUILD.md: 0.36 s per forward, 0.41 s per JVP): ~13 h per
1000 images for the scores and ~2 days for the samples: not a CPU job.
Expected result: AUROC of the log volume growth (trained = members vs held-out =
non-members) beside the peers' in report/report.md; on this victim the peers should land
near PIA's 85 - 89. Whether L separates members as well is the question this config asks.

`:quick` is the same chain in CI time (about 2 min on 2 CPU cores) on a converted random
pytorch-ddpm network (tests/fixtures/pytorch_ddpm_unet, 8x8) and a synthetic stand-in for
CIFAR-10 in its python-pickle format (the images pooled to 8x8) with a member split file:
tests/test_pia_cifar10.py makes both and runs it end to end.
"""

from experiments.configs.base import get_base_config


def get_config(arg: str | None = None):
  c = get_base_config()
  c.model.pretrained = ""  # required: --config.model.pretrained=/path/to/converted/folder

  c.data.name = "cifar10"
  c.data.path = ""  # required: --config.data.path=/path/to/cifar-10-batches-py
  c.data.member_split_path = ""  # required: --config.data.member_split_path=.../CIFAR10_train_ratio0.5.npz
  c.data.resolution = 32
  c.data.num_train = 1000
  c.data.num_heldout = 1000
  c.data.num_duplicated = 0

  c.sample.num_samples = 1000
  c.sample.sde_steps = 1000
  c.sample.batch_size = 250
  c.score.estimators = ("hutchinson",)
  c.score.num_probes = 1
  c.score.rtol = 1e-3
  c.score.atol = 1e-3
  c.score.batch_size = 50
  pr = c.score.peer  # the originals' times (the base config's, restated: this config pins them)
  pr.loss_t = 0.1
  pr.secmi_t = 0.1
  pr.secmi_interval = 0.01
  pr.pia_t = 0.2
  pr.p = 4.0

  if arg == "quick":
    c.data.resolution = 8
    c.data.num_train = 8
    c.data.num_heldout = 8
    c.sample.num_samples = 8
    c.sample.sde_steps = 10
    c.sample.batch_size = 8
    c.score.adaptive = False
    c.score.solver = "euler"
    c.score.num_steps = 4
    c.score.profile_times = 4
    c.score.batch_size = 8
    c.detect.carlini_n = 2
    c.report.top_k = 2
    c.report.num_bootstrap = 50
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c
