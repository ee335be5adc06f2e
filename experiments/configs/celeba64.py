"""64x64 RGB faces from an image folder (e.g. CelebA's img_align_celeba), DDPM UNet (GPU).

Command (from the repo root):

  python -m experiments.main --config=experiments/configs/celeba64.py \\
      --workdir=runs/celeba64 --config.data.path=/path/to/img_align_celeba

Data: PNG / JPEG files found recursively under data.path, each centre-cropped to its largest
square and resized to 64x64 RGB (the paper's code crops the central 160x160 of the 178x218
aligned CelebA images before resizing, so its faces are framed a little tighter). 1024
training images, 32 of them planted duplicates repeated 8 times in the training stream, and
1024 held-out images, drawn from the folder by data.split_seed; random horizontal flips.
Model: the paper's UNet (models.named_config("paper_cifar10"): 128 channels at the first
level, 256 below, attention at 16x16 and in the middle, dropout 0.1) on 64x64 inputs, so
its four levels run at 64, 32, 16 and 8.
Training: batch 64 (the paper's CelebA batch), Adam 2e-4 with warm-up, clipping at 1,
EMA 0.9999, 200k steps (about 10000 passes over the 1248-image training stream).

Expected runtime on one H100 (a rough estimate from the network's 45 GFLOPs per image and
forward pass at 64x64, XLA's count, not measured): training 5-12 h; sampling 1024 images
10-15 min; Hutchinson scoring of the 2048 images 30-60 min.
Expected result: trained faces have larger log volume growth than held-out faces (AUROC well
above 0.5), and the planted duplicates, which samples copy first, score above the singletons.

`:quick` is a CPU smoke test of the same chain on 16 + 16 images with a tiny UNet (minutes;
numbers only need to be finite); it still needs --config.data.path.
"""

from experiments.configs.base import get_base_config


def get_config(arg: str | None = None):
  c = get_base_config()
  c.data.name = "folder"
  c.data.path = ""  # required: --config.data.path=/path/to/image/folder
  c.data.resolution = 64
  c.data.channels = 3
  c.data.num_train = 1024
  c.data.num_heldout = 1024
  c.data.num_duplicated = 32
  c.data.duplicate_factor = 8
  c.data.random_flip = True

  m = c.model  # = models.named_config("paper_cifar10"), applied at 64x64
  m.name = "unet"
  m.ch = 128
  m.ch_mult = (1, 2, 2, 2)
  m.num_res_blocks_down = 2
  m.num_res_blocks_up = 3
  m.attn_resolutions = (16,)
  m.dropout = 0.1
  m.num_groups = 32

  t = c.train
  t.num_steps = 200_000
  t.batch_size = 64
  t.lr = 2e-4
  t.warmup_steps = 1000
  t.grad_clip = 1.0
  t.ema_decay = 0.9999
  t.log_every = 500
  t.ckpt_every = 10_000
  t.keep_checkpoints = 2
  t.keep_every = 50_000
  t.sample_every = 20_000
  t.sample_num = 36
  t.sample_steps = 1000

  c.sample.num_samples = 1024
  c.sample.batch_size = 128
  c.score.estimators = ("hutchinson",)
  c.score.batch_size = 32

  if arg == "quick":
    c.data.num_train = 16
    c.data.num_heldout = 16
    c.data.num_duplicated = 2
    c.data.duplicate_factor = 4
    m.ch = 16
    m.ch_mult = (1, 2)
    m.num_res_blocks_down = 1
    m.num_res_blocks_up = 2
    m.attn_resolutions = ()
    m.dropout = 0.0
    m.num_groups = 4
    t.num_steps = 60
    t.batch_size = 8
    t.lr = 1e-3
    t.warmup_steps = 10
    t.ema_decay = 0.99
    t.log_every = 20
    t.ckpt_every = 30
    t.keep_every = 0
    t.sample_every = 0
    c.sample.num_samples = 16
    c.sample.sde_steps = 50
    c.sample.batch_size = 16
    c.score.num_probes = 1
    c.score.batch_size = 16
    c.score.rtol = 1e-2
    c.score.atol = 1e-2
    c.detect.carlini_n = 8
    c.report.num_bootstrap = 100
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; expected '' or 'quick'")
  return c
