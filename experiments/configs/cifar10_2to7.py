"""The paper's CIFAR-10 2^7 setting: 64 training + 64 held-out images, DDPM UNet (GPU).

Command (from the repo root; cifar-10-batches-py is the folder of CIFAR-10's python
pickles, e.g. from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz):

  python -m experiments.main --config=experiments/configs/cifar10_2to7.py \\
      --workdir=runs/cifar10_2to7 --config.data.path=/path/to/cifar-10-batches-py

Data: 64 training images drawn class-balanced from the 50000 images of data_batch_1..5,
and 64 held-out images from the same pool (the paper took its 64 held-out images from
the test batch; either way they were never trained on); no planted duplicates; random
horizontal flips during training (the paper's default).
Model: models.named_config("paper_cifar10"), the DDPM CIFAR-10 UNet (35.7M params: 128
channels at 32x32, 256 at 16/8/4, 2 residual blocks down and 3 up per level, attention at
16x16 and in the middle, GroupNorm 32, dropout 0.1).
Training as the paper's code: batch 16, Adam 2e-4 with a 120-step warm-up (its 30 epochs of
4 batches), gradient clipping at 1, EMA 0.9999, 1.6M steps (its 400000 epochs of 4 batches).
Scoring: Hutchinson's full log-determinant and the paper's K = 100 finite-difference
scheme (1000 Euler steps), so the numbers can be set beside the paper's.

Expected runtime on one H100 (a rough estimate from the network's 11.7 GFLOPs per image
and forward pass, XLA's count, not measured): training 5-12 h (`:short`, 200k steps: 40-90 min);
sampling 1024 images ~5 min; scoring ~30 min, nearly all of it the `paper` estimator
(101,000 network calls per image).
Expected result: the paper reports a mean K = 100 log volume growth of about 594 for the
trained images against 373 for the held-out ones; report/report.md should show trained >
held-out with AUROC near 1, and sample copies of many of the 64 training images.

`:short` trains 200k steps (the training images are reproduced long before 1.6M steps).
`:quick` is a CPU smoke test of the same chain with a tiny UNet (minutes; numbers only need
to be finite); it still needs --config.data.path.
"""

from experiments.configs.base import get_base_config


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.name = "cifar10"
  c.data.path = ""  # required: --config.data.path=/path/to/cifar-10-batches-py
  c.data.resolution = 32
  c.data.num_train = 64
  c.data.num_heldout = 64
  c.data.num_duplicated = 0
  c.data.random_flip = True

  m = c.model  # = models.named_config("paper_cifar10")
  m.name = "unet"
  m.ch = 128
  m.ch_mult = (1, 2, 2, 2)
  m.num_res_blocks_down = 2
  m.num_res_blocks_up = 3
  m.attn_resolutions = (16,)
  m.dropout = 0.1
  m.num_groups = 32

  t = c.train
  t.num_steps = 1_600_000
  t.batch_size = 16
  t.lr = 2e-4
  t.warmup_steps = 120
  t.grad_clip = 1.0
  t.ema_decay = 0.9999
  t.log_every = 1000
  t.ckpt_every = 20_000
  t.keep_checkpoints = 2
  t.keep_every = 200_000
  t.sample_every = 100_000
  t.sample_num = 64
  t.sample_steps = 1000

  c.sample.num_samples = 1024
  c.sample.batch_size = 256
  c.score.estimators = ("hutchinson", "paper")
  c.score.batch_size = 16
  c.score.K = 100
  c.score.paper_steps = 1000

  if arg == "short":
    t.num_steps = 200_000
    t.keep_every = 0
  elif arg == "quick":
    c.data.num_train = 16
    c.data.num_heldout = 16
    m.ch = 16
    m.ch_mult = (1, 2)
    m.num_res_blocks_down = 1
    m.num_res_blocks_up = 2
    m.attn_resolutions = ()
    m.dropout = 0.0
    m.num_groups = 4
    t.num_steps = 100
    t.batch_size = 16
    t.lr = 1e-3
    t.warmup_steps = 10
    t.ema_decay = 0.99
    t.log_every = 20
    t.ckpt_every = 50
    t.keep_every = 0
    t.sample_every = 0
    c.sample.num_samples = 32
    c.sample.sde_steps = 100
    c.sample.batch_size = 32
    c.score.estimators = ("hutchinson",)
    c.score.num_probes = 1
    c.score.rtol = 1e-2
    c.score.atol = 1e-2
    c.detect.carlini_n = 8
    c.report.num_bootstrap = 100
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '', 'short' or 'quick'")
  return c
